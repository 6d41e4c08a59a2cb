"""Guarded load of the compiled extension sparsekern._C.

Importing sparsekern never fails because the extension is missing or broken: it warns once and
the ops fall back to the pure-torch implementations in reference.py.
"""
import warnings

import torch  # noqa: F401  (loads libtorch, which _C links against)

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
