"""Atomic writes and safe loads. Every checkpoint holds only tensors and plain containers of
str/int/float/bool/None, so it loads with torch.load(..., weights_only=True) -- no pickled code."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch


def _tmp(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: a reader (or a rerun
    after a kill) sees the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: str, map_location="cpu"):
    return torch.load(path, map_location=map_location, weights_only=True)


def load_if_exists(path: str, map_location="cpu"):
    return load(path, map_location) if os.path.isfile(path) else None


def write_json(obj, path: str) -> None:
    write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def write_text(text: str, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def rng_state() -> dict:
    """Every RNG a training step could touch, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
