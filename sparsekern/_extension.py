"""Guarded load of the compiled extension sparsekern._C.

Importing sparsekern never fails because the extension is missing or broken: it warns once and
the ops fall back to the pure-torch implementations in reference.py.
"""
import os
import warnings

import torch  # noqa: F401  (loads libtorch, which _C links against)

ISA_NAMES = ("avx512", "avx2", "scalar")  # every instruction set the extension has kernels for

try:
    from sparsekern import _C  # noqa: F401  (registers torch.ops.sparsekern.*)

    LOAD_ERROR = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = exc
    warnings.warn(
        f"sparsekern: the C++ extension could not be loaded ({exc}); falling back to the slow "
        "pure-torch reference ops. Build it with `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    return _C is not None


def _check_isa_variable():
    """The extension reads SPARSEKERN_ISA once and silently takes the best instruction set for a
    name it cannot use; say so here (once: this module is imported once), as set_isa raises."""
    wanted = os.environ.get("SPARSEKERN_ISA", "")
    if not wanted or _C is None:
        return
    usable = list(_C.available_isas())
    if wanted in usable:
        return
    why = "is not available on this CPU/build" if wanted in ISA_NAMES else "is unknown"
    warnings.warn(f"sparsekern: SPARSEKERN_ISA={wanted!r} {why}; choices here: "
                  f"{', '.join(usable)}; using {_C.active_isa()!r}", RuntimeWarning, stacklevel=2)


_check_isa_variable()
