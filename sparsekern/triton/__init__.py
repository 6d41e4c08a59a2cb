"""GPU path: Triton kernels registered as the CUDA implementation of the sparsekern ops, and the
backend switch that runs the same kernels on CPU tensors in the Triton interpreter.

Registration (done when sparsekern is imported, without importing triton): a
``torch.library.Library("sparsekern", "IMPL")`` registers, for the CUDA dispatch key, one Python
function per existing op (``bsr_linear``, ``csr_linear``, ``bsr_conv2d``, ``csr_conv2d`` and their
``*_grad_input`` / ``*_grad_weight``). The schemas (csrc/ops.cpp), fake kernels (sparsekern/ops.py)
and autograd formulas (csrc/autograd.cpp) are the same ones the CPU uses, so ``opcheck``, autograd
and ``torch.compile(fullgraph=True)`` behave as on the CPU; the autograd backward calls the grad
ops, which dispatch by device to these kernels. (``triton_op``/``wrap_triton`` would define *new*
ops; the ops exist already, so a kernel registration is the fit.) Each registered function imports
triton and the kernels on first call.

Backend switch: ``SPARSEKERN_BACKEND=triton`` (read at ``import sparsekern``) or
``sparsekern.set_backend("triton")`` registers the same launchers for the CPU dispatch key, on a
second Library object that overrides the C++ CPU kernels; ``set_backend("cpu")`` destroys it,
which restores the C++ kernels. CPU tensors then run the Triton kernels in the interpreter.

The interpreter must be chosen before triton is imported: triton decides at import time whether
its own ``tl`` helpers are interpreted (TRITON_INTERPRET). ``set_backend("triton")`` therefore
sets ``TRITON_INTERPRET=1`` when triton is not imported yet, and raises a RuntimeError saying so
when triton was already imported in compiled mode (set the variable before importing torch's
compiler or triton). In an interpreted process a CUDA tensor is refused with an error instead of
running (slowly) in the interpreter.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

from sparsekern import _extension

BACKENDS = ("cpu", "triton")
LINEAR_OPS = ("bsr_linear", "bsr_linear_grad_input", "bsr_linear_grad_weight",
              "csr_linear", "csr_linear_grad_input", "csr_linear_grad_weight")
CONV_OPS = ("bsr_conv2d", "bsr_conv2d_grad_input", "bsr_conv2d_grad_weight",
            "csr_conv2d", "csr_conv2d_grad_input", "csr_conv2d_grad_weight")
OP_NAMES = LINEAR_OPS + CONV_OPS  # the ops with Triton kernels: every sparsekern op

_cuda_lib = None   # Library registering the Triton launchers for CUDA tensors
_cpu_lib = None    # Library overriding the C++ CPU kernels while the triton backend is on


def interpreter_active() -> bool:
    """True when triton is imported in interpreter mode (its tl helpers are interpreted)."""
    if "triton" not in sys.modules:
        return False
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(standard.sum, InterpretedFunction)


def _launchers():
    try:
        from sparsekern.triton import launch
    except ImportError as exc:
        raise RuntimeError(
            f"sparsekern: the GPU kernels need triton, which could not be imported ({exc})"
        ) from exc
    return launch.OPS


def _cuda_impl(name):
    def impl(*args):
        if interpreter_active():
            raise RuntimeError(
                f"sparsekern.{name}: CUDA tensors in a process where triton runs in the "
                "interpreter (TRITON_INTERPRET=1 / SPARSEKERN_BACKEND=triton); that would run the "
                "kernel on the host, slowly. Unset both variables to run the compiled GPU "
                "kernels.")
        return _launchers()[name](*args)

    impl.__name__ = f"triton_{name}_cuda"
    return impl


def _cpu_impl(name):
    def impl(*args):
        return _launchers()[name](*args)

    impl.__name__ = f"triton_{name}_interpreted"
    return impl


def _existing(names):
    """The ops of `names` whose schema the loaded extension defines."""
    return [n for n in names if hasattr(torch.ops.sparsekern, n)]


def register_cuda() -> bool:
    """Registers the Triton launchers as the CUDA kernels of the sparsekern ops (idempotent).
    False when the ops do not exist (extension not loaded: everything runs the reference)."""
    global _cuda_lib
    if _cuda_lib is not None:
        return True
    if not _extension.available():
        return False
    lib = torch.library.Library("sparsekern", "IMPL")
    for name in _existing(OP_NAMES):
        lib.impl(name, _cuda_impl(name), "CUDA")
    _cuda_lib = lib
    return True


def use_interpreter() -> None:
    """Imports triton in interpreter mode now (sets TRITON_INTERPRET=1) unless it is imported
    already; a RuntimeError if it was imported in compiled mode. set_backend('triton') calls it;
    a test process calls it before anything imports triton (e.g. at collection)."""
    if "triton" in sys.modules:
        if not interpreter_active():
            raise RuntimeError(
                "sparsekern.set_backend('triton'): triton is already imported in compiled mode "
                "(e.g. by torch.compile), and the interpreter can only be chosen before triton is "
                "imported. Set SPARSEKERN_BACKEND=triton (or TRITON_INTERPRET=1) in the "
                "environment before starting Python.")
        return
    os.environ["TRITON_INTERPRET"] = "1"
    import triton  # noqa: F401  (imported now, in interpreter mode)
    if not interpreter_active():
        raise RuntimeError("sparsekern.set_backend('triton'): triton did not start in "
                           "interpreter mode although TRITON_INTERPRET=1 was set")


def set_backend(name: str) -> None:
    """'cpu': the C++ CPU kernels (default). 'triton': CPU tensors run the Triton kernels in the
    Triton interpreter (to check the GPU kernels without a GPU). CUDA tensors always run Triton."""
    global _cpu_lib
    if name not in BACKENDS:
        raise ValueError(f"set_backend: name must be one of {BACKENDS}, got {name!r}")
    if name == "cpu":
        if _cpu_lib is not None:
            _cpu_lib._destroy()
            _cpu_lib = None
        return
    if _cpu_lib is not None:
        return
    if not _extension.available():
        raise RuntimeError("sparsekern.set_backend('triton'): the sparsekern ops are not "
                           f"registered (C++ extension not loaded: {_extension.LOAD_ERROR})")
    use_interpreter()
    _launchers()  # import the kernels now: a broken triton fails here, not mid-model
    lib = torch.library.Library("sparsekern", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for op in _existing(OP_NAMES):
            lib.impl(op, _cpu_impl(op), "CPU")
    _cpu_lib = lib


def get_backend() -> str:
    return "triton" if _cpu_lib is not None else "cpu"


@contextlib.contextmanager
def backend(name: str):
    """Runs the body under backend `name`, restoring the previous one after."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _from_environment():
    name = os.environ.get("SPARSEKERN_BACKEND", "").strip().lower()
    if not name or name == "cpu":
        return
    if name not in BACKENDS:
        warnings.warn(f"SPARSEKERN_BACKEND={name!r} is not one of {BACKENDS}; using 'cpu'",
                      RuntimeWarning, stacklevel=3)
        return
    set_backend(name)


register_cuda()
_from_environment()
