"""What each file of a run folder must hold, checked where it is read. A file that parses but
holds something else (an edit, another run's file copied in, a hand-made `{}`) is as unreadable
as a truncated one and gets the same one-line treatment (the phase redone, the masks computed
again, or a line saying what to do), not a KeyError or a size mismatch deep in the code that
reads it. Each check raises ValueError saying what is wrong."""
from __future__ import annotations

import math

import torch


class UnreadableFile(Exception):
    """A file of the run folder that a kill, a full disk or an edit left unreadable."""

    def __init__(self, path: str, error: Exception):
        why = (str(error).strip().splitlines() or [""])[0]
        self.path = path
        super().__init__(f"{path} is unreadable ({type(error).__name__}"
                         f"{': ' + why[:120] if why else ''})")


def read(load, path: str, check=None):
    """load(path) of a run file that exists; any failure to read it, or content that `check`
    (one of the checks below) refuses, is UnreadableFile."""
    try:
        obj = load(path)
        if check is not None:
            check(obj)
        return obj
    except Exception as e:  # a truncated zip, bad pickle or JSON: whatever the reader raises
        raise UnreadableFile(path, e) from None


NUMBER = (int, float)
# the fields of a phase's result.json that the summary, the tables and the verdicts read
RESULT_FIELDS = {"round": int, "branch": str, "method": str, "sparsity": NUMBER,
                 "test_acc": NUMBER, "best_test_acc": NUMBER, "test_loss": NUMBER,
                 "train_acc": NUMBER, "train_loss": NUMBER, "epochs": NUMBER, "steps": int,
                 "step_ms_dense": NUMBER, "step_ms_sparse": NUMBER, "step_ms_unmasked": NUMBER,
                 "speedup": NUMBER, "sparse_layers": str, "layers": dict, "empty_layers": list,
                 "wall_s": NUMBER}
CONFIG_FIELDS = {"name": str, "hash": str, "non_default": dict, "config": dict, "command": list}
# what lth.report reads of every summary entry (each mode adds its own: the metric, step times)
SUMMARY_FIELDS = {"round": int, "branch": str, "method": str, "sparsity": NUMBER,
                  "test_acc": NUMBER}


def check_fields(obj, fields: dict, what: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(obj).__name__}")
    for key, kind in fields.items():
        if key not in obj:
            raise ValueError(f"{what} has no {key!r}")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, kind) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"{what}'s {key!r} is {value!r}")


def check_result(obj, round_: int, branch: str) -> None:
    check_fields(obj, RESULT_FIELDS, "a phase result")
    if (obj["round"], obj["branch"]) != (round_, branch):
        raise ValueError(f"it is the result of round {obj['round']} {obj['branch']}, not of "
                         f"round {round_} {branch}")


def check_summary(obj, fields: dict = SUMMARY_FIELDS) -> None:
    if not isinstance(obj, list) or not obj:
        raise ValueError(f"a summary must be a non-empty JSON list of phase results, got "
                         f"{type(obj).__name__}{'' if obj else ' (empty)'}")
    for entry in obj:
        check_fields(entry, fields, "a summary entry")
        for key in ("sparsity", "test_acc", "best_test_acc"):
            if key in entry and not 0 <= entry[key] <= 1:
                raise ValueError(f"a summary entry's {key!r} is {entry[key]!r}, not in [0, 1]")
    phases = [(e["round"], e["branch"]) for e in obj]
    if len(set(phases)) < len(phases):
        raise ValueError("a summary holds the same round and branch twice")


def check_config(obj, fields: dict = CONFIG_FIELDS) -> None:
    check_fields(obj, fields, "a run's config")


def check_state(obj, like: dict[str, torch.Tensor], what: str) -> None:
    """A model state with exactly the tensors (names and shapes) of `like`."""
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be a dict of tensors, got {type(obj).__name__}")
    if set(obj) != set(like):
        raise ValueError(f"{what} holds the tensors of another model (missing "
                         f"{sorted(set(like) - set(obj))[:3]}, unknown "
                         f"{sorted(set(obj) - set(like))[:3]})")
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor) or t.shape != like[name].shape:
            raise ValueError(f"{what}'s {name} is {_described(t)}, the model's "
                             f"{tuple(like[name].shape)}")


def check_masks(obj, like: dict[str, torch.Tensor], what: str = "masks",
                empty_ok: bool = False) -> None:
    """Bool masks of weights of `like` (names and shapes)."""
    if not isinstance(obj, dict) or not (obj or empty_ok):
        raise ValueError(f"{what} must be a non-empty dict of bool masks, got "
                         f"{type(obj).__name__}{' (empty)' if isinstance(obj, dict) else ''}")
    for name, m in obj.items():
        if name not in like:
            raise ValueError(f"{what} name {name!r}, not a weight of the model")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != like[name].shape:
            raise ValueError(f"{what}[{name!r}] is {_described(m)}, the weight "
                             f"{tuple(like[name].shape)}")


def check_checkpoint(obj, form: int, phase_key: str, config_hash: str,
                     like: dict[str, torch.Tensor]) -> None:
    """A checkpoint this run wrote for this phase: its format, phase and settings (the hash),
    a model state like `like` and masks of its weights."""
    if not isinstance(obj, dict):
        raise ValueError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    if obj.get("format") != form:
        raise ValueError(f"unknown checkpoint format {obj.get('format')!r} (this version "
                         f"writes {form})")
    if obj.get("phase") != phase_key:
        raise ValueError(f"it is a checkpoint of phase {obj.get('phase')!r}, not {phase_key}")
    if obj.get("config_hash") != config_hash:
        raise ValueError(f"it is a checkpoint of a run with other settings (hash "
                         f"{obj.get('config_hash')!r}, this run's {config_hash})")
    check_state(obj.get("model"), like, "its model")
    check_masks(obj.get("masks"), like, "its masks", empty_ok=True)


def _described(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {str(t.dtype).replace('torch.', '')} tensor {tuple(t.shape)}"
    return type(t).__name__
