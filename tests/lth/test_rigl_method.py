"""`--method rigl` / `set` end to end on digits: the small experiment runs to completion and
reports its mask updates and their cost, each layer keeps its number of weights while the masks
move, the model trains on sparse kernels, block-RigL keeps whole blocks, and a run interrupted
mid-round resumes to the weights and masks of an uninterrupted one."""
import json
import os

import pytest
import torch

from _lth_helpers import ROOT, load, run_dir_of, run_inprocess
from lth import pruning
from lth.cli import parse_config
from lth.pruning import dst

SMALL = os.path.join(ROOT, "lth", "experiments", "rigl.yaml")
FAST = ["--timing-repeats", "1", "--timing-warmup", "0", "--no-progress", "--threads", "1"]


def _entry(run, branch="ticket", round_index=1):
    summary = json.load(open(os.path.join(run, "summary.json")))
    return next(e for e in summary if e["round"] == round_index and e["branch"] == branch)


def _masks_moved_with_constant_counts(run, granularity="unstructured", block=(8, 8)):
    start = load(os.path.join(run, "round_01", "masks.pt"))
    final = load(os.path.join(run, "round_01", "checkpoint.pt"))
    moved = 0
    for n, m in start.items():
        end = final["masks"][n]
        assert int(end.sum()) == int(m.sum()), n  # each layer's sparsity exactly constant
        assert not bool(final["model"][n][~end].any()), n  # pruned weights exactly zero
        if granularity == "block":
            assert pruning.is_block_aligned(end, block), n
        moved += int((end & ~m).sum())
    assert moved > 0
    return start, final


def test_small_rigl_experiment_runs_and_reports_its_updates(tmp_path):
    args = ["--config", SMALL, *FAST]
    run = run_inprocess(args, tmp_path)
    c = parse_config(args)
    e = _entry(run)
    assert e["method"] == "rigl" and e["dst_grow"] == "gradient"
    assert e["density_distribution"] == "erk"
    assert abs(e["sparsity"] - 0.9) <= 0.005
    total = e["steps"]
    end = int(c.dst.end * total)
    assert e["dst_end_step"] == end
    assert e["dst_updates"] == sum(dst.is_update_step(s, c.dst.update_every, end)
                                   for s in range(1, total + 1))
    assert e["dst_swapped_weights"] > 0
    for key in ("dst_scores_ms", "dst_mask_ms", "dst_repack_ms"):
        assert e[key] > 0
    per_update = e["dst_scores_ms"] + e["dst_mask_ms"] + e["dst_repack_ms"]
    assert e["dst_ms_per_step"] == pytest.approx(per_update * e["dst_updates"] / total)
    assert e["sparse_layers"] == "2/2"  # trained on sparsekern's kernels
    assert all(v["chosen"] == "sparse" and v["format"] == "csr" for v in e["layers"].values())
    _masks_moved_with_constant_counts(run)
    for branch in ("random_reinit", "random_ticket"):  # static baselines at the same sparsity
        b = _entry(run, branch)
        assert b["sparsity"] == e["sparsity"] and "dst_updates" not in b
    assert _entry(run, round_index=0)["sparsity"] == 0.0


def test_set_grows_at_random_and_keeps_counts(tmp_path):
    args = ["--method", "set", "--target-sparsity", "0.8", "--widths", "48,48", "--epochs", "2",
            "--batch-size", "64", "--dst-update-every", "5", "--sparse-policy", "sparse",
            "--branches", "none", "--density-distribution", "uniform", *FAST]
    run = run_inprocess(args, tmp_path)
    e = _entry(run)
    assert e["method"] == "set" and e["dst_grow"] == "random" and e["dst_updates"] > 0
    start, _ = _masks_moved_with_constant_counts(run)
    for m in start.values():  # uniform: every layer at the target
        assert 1 - int(m.sum()) / m.numel() == pytest.approx(0.8, abs=1 / m.numel())


def test_block_rigl_moves_whole_blocks_on_bsr_kernels(tmp_path):
    args = ["--method", "rigl", "--target-sparsity", "0.75", "--widths", "64,64", "--epochs",
            "2", "--batch-size", "64", "--dst-update-every", "5", "--sparse-policy", "sparse",
            "--granularity", "block", "--block", "8x8", "--sparse-format", "bsr",
            "--branches", "none", *FAST]
    run = run_inprocess(args, tmp_path)
    e = _entry(run)
    assert e["dst_updates"] > 0
    assert all(v["format"] == "bsr" for v in e["layers"].values())
    _masks_moved_with_constant_counts(run, "block", (8, 8))


def test_interrupted_round_resumes_to_the_uninterrupted_masks_and_weights(tmp_path,
                                                                           monkeypatch):
    args = ["--method", "rigl", "--target-sparsity", "0.9", "--widths", "64,64", "--epochs",
            "3", "--batch-size", "64", "--dst-update-every", "7", "--sparse-policy", "sparse",
            "--branches", "none", "--optimizer", "adam", "--lr", "0.003", *FAST]
    ref = run_inprocess(args, tmp_path / "ref")

    from lth.loop import EpochEnd

    class Killed(Exception):
        pass

    original = EpochEnd.on_epoch_end

    def kill_after_first_epoch_of_round_1(self, step, stats):
        original(self, step, stats)  # the epoch's checkpoint is written, then the "kill"
        if self.phase.round == 1 and len(self.history) == 1:
            raise Killed

    monkeypatch.setattr(EpochEnd, "on_epoch_end", kill_after_first_epoch_of_round_1)
    with pytest.raises(Killed):
        run_inprocess(args, tmp_path / "kill")
    monkeypatch.setattr(EpochEnd, "on_epoch_end", original)
    run = run_dir_of(args + ["--runs-dir", str(tmp_path / "kill")], tmp_path / "kill")
    killed = load(os.path.join(run, "round_01", "checkpoint.pt"))
    start = load(os.path.join(run, "round_01", "masks.pt"))
    assert any(not torch.equal(killed["masks"][n], start[n]) for n in start)  # moved before
    run_inprocess(args, tmp_path / "kill")
    a = load(os.path.join(ref, "round_01", "checkpoint.pt"))
    b = load(os.path.join(run, "round_01", "checkpoint.pt"))
    for n in a["masks"]:
        assert torch.equal(a["masks"][n], b["masks"][n]), n
    for n in a["model"]:
        assert torch.equal(a["model"][n], b["model"][n]), n
    ea, eb = _entry(ref), _entry(run)
    assert ea["dst_updates"] == eb["dst_updates"] and ea["test_acc"] == eb["test_acc"]


@pytest.mark.parametrize("args,flag", [
    (["--method", "rigl"], "--target-sparsity"),
    (["--method", "rigl", "--target-sparsity", "0.9", "--granularity", "nm"], "--granularity"),
    (["--method", "set", "--target-sparsity", "0.9", "--dst-drop-fraction", "1.5"],
     "--dst-drop-fraction"),
    (["--method", "rigl", "--target-sparsity", "0.9", "--density-distribution", "lognormal"],
     "--density-distribution"),
    (["--method", "imp", "--dst-update-every", "50"], "--dst-update-every"),
])
def test_bad_settings_name_the_flag(args, flag, capsys):
    with pytest.raises(SystemExit):
        parse_config(args)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m lth.train: error:") and flag in error


def test_update_every_beyond_the_last_update_step_is_a_usage_error(tmp_path, capsys):
    from lth.train import main
    code = main(["--method", "rigl", "--target-sparsity", "0.9", "--epochs", "2",
                 "--dst-update-every", "1000", "--runs-dir", str(tmp_path), *FAST])
    assert code == 2
    assert "--dst-update-every 1000: no mask update before --dst-end" in capsys.readouterr().err
