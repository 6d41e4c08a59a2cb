"""Fixtures shared by the sparsekern tests: instruction-set and dtype parametrisation."""
import pytest
import torch
from _sk_helpers import ISAS, use_isa

# float32 runs the active instruction set, float64 always the scalar kernels.
KERNELS = [pytest.param((torch.float32, isa), id=f"float32-{isa}") for isa in ISAS]
KERNELS.append(pytest.param((torch.float64, "scalar"), id="float64"))


@pytest.fixture(params=ISAS)
def isa(request):
    """Every available CPU instruction set in turn for the float32 kernels (restored after)."""
    with use_isa(request.param):
        yield request.param


@pytest.fixture(params=KERNELS)
def dtype(request):
    """float32 on every available instruction set, then float64 (restored after)."""
    dtype, isa = request.param
    with use_isa(isa):
        yield dtype
