"""The guarded load of sparsekern._C: when the extension cannot be imported, `import sparsekern`
warns (RuntimeWarning) instead of failing and every op falls back to reference.py."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsekern import _extension
from _sk_helpers import OPS, use_isa

_C = _extension._C


def test_extension_is_loaded():
    """The suite tests the compiled kernels: a missing or broken build must not silently turn
    every comparison into reference-vs-reference."""
    assert _extension.available(), f"sparsekern._C did not load: {_extension.LOAD_ERROR}"
    for op in OPS:
        assert hasattr(torch.ops.sparsekern, op), op


def test_isa_controls():
    isas = _C.available_isas()
    assert isas and isas[-1] == "scalar" and set(isas) <= {"avx512", "avx2", "scalar"}
    previous = _C.active_isa()
    assert previous in isas
    for name in isas:
        with use_isa(name):
            assert _C.active_isa() == name
        assert _C.active_isa() == previous
    with pytest.raises(ValueError, match="isa='bogus' is not available"):
        _C.set_isa("bogus")
    assert _C.active_isa() == previous


# Prints the active and the best instruction set, then every warning sparsekern gave while being
# imported (twice, and its modules once more: the check must still warn only once).
ISA_SCRIPT = textwrap.dedent("""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import sparsekern
        import sparsekern
        import sparsekern._extension, sparsekern.ops
    from sparsekern._extension import _C
    print(_C.active_isa(), _C.available_isas()[0])
    for w in caught:
        print(w.category.__name__, w.message)
""")


def _import_with_isa(wanted: str) -> tuple[str, str, list[str]]:
    env = dict(os.environ, SPARSEKERN_ISA=wanted)
    result = subprocess.run([sys.executable, "-c", ISA_SCRIPT], capture_output=True, text=True,
                            env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    first, *warned = result.stdout.splitlines()
    active, best = first.split()
    return active, best, [w for w in warned if "SPARSEKERN_ISA" in w]


def test_isa_environment_variable_picks_the_isa():
    active, _, warned = _import_with_isa("scalar")
    assert active == "scalar" and warned == []


@pytest.mark.parametrize("wanted", ["bogus", "AVX2", "avx2 "])
def test_unknown_isa_variable_warns_once_and_uses_the_best(wanted):
    active, best, warned = _import_with_isa(wanted)
    assert active == best
    assert warned == [f"RuntimeWarning sparsekern: SPARSEKERN_ISA={wanted!r} is unknown; "
                      f"choices here: {', '.join(_C.available_isas())}; using {best!r}"]


def test_unavailable_isa_variable_warns_once_and_uses_the_best():
    unavailable = [name for name in _extension.ISA_NAMES if name not in _C.available_isas()]
    if not unavailable:
        pytest.skip(f"this CPU runs every instruction set the extension has "
                    f"({', '.join(_extension.ISA_NAMES)}): none is unavailable")
    active, best, warned = _import_with_isa(unavailable[0])
    assert active == best
    assert len(warned) == 1
    assert f"SPARSEKERN_ISA={unavailable[0]!r} is not available on this CPU/build" in warned[0]
    assert f"choices here: {', '.join(_C.available_isas())}" in warned[0]


def test_isa_names_cover_the_extension():
    """ISA_NAMES tells unknown names from unavailable ones: it must hold every usable one."""
    assert set(_C.available_isas()) <= set(_extension.ISA_NAMES)

# Runs in a fresh interpreter: the import of sparsekern._C is made to fail before sparsekern
# is imported (a None entry in sys.modules makes `from sparsekern import _C` raise ImportError).
FALLBACK_SCRIPT = textwrap.dedent("""
    import sys
    import warnings

    sys.modules["sparsekern._C"] = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import sparsekern as sk
    ours = [w for w in caught if "C++ extension could not be loaded" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert issubclass(ours[0].category, RuntimeWarning), ours[0].category

    import torch
    import torch.nn.functional as F
    from sparsekern import _extension, ops, reference

    assert not _extension.available() and _extension.LOAD_ERROR is not None
    assert not hasattr(torch.ops.sparsekern, "bsr_linear")  # nothing was registered
    for name in ("bsr_linear", "bsr_linear_grad_input", "bsr_linear_grad_weight",
                 "csr_linear", "csr_linear_grad_input", "csr_linear_grad_weight"):
        assert ops._op(name) is getattr(reference, name), name

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    weight = torch.randn(37, 45, dtype=torch.float64)
    mask = torch.rand(37, 45) < 0.4
    for W in (sk.BlockSparse.from_dense(weight, mask, block=(8, 16)),
              sk.CSR.from_dense(weight, mask)):
        x = torch.randn(2, 5, 45, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(37, dtype=torch.float64, requires_grad=True)
        y = sk.linear(x, W, bias)
        dense = W.to_dense()
        assert rel(y, F.linear(x, dense, bias)) < 1e-12
        y.sum().backward()
        assert rel(x.grad, torch.ones(2, 5, 37, dtype=torch.float64) @ dense) < 1e-12
        assert rel(bias.grad, torch.full((37,), 10.0, dtype=torch.float64)) < 1e-12

        fmt = "bsr" if isinstance(W, sk.BlockSparse) else "csr"
        layer = sk.SparseLinear.from_dense(torch.nn.Linear(45, 37, dtype=torch.float64), mask,
                                           format=fmt,
                                           block=(8, 8) if fmt == "bsr" else None)
        xs = torch.randn(4, 45, dtype=torch.float64)
        layer(xs).sum().backward()
        expected = F.linear(xs, layer.dense_weight(), layer.bias)
        assert rel(layer(xs), expected) < 1e-12
        assert layer.values.grad is not None and layer.values.grad.shape == layer.values.shape
    print("FALLBACK-OK")
""")


def test_fallback_to_reference_when_extension_is_missing():
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FALLBACK-OK" in result.stdout
