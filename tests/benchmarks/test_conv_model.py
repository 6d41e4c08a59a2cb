"""Smoke of `python -m benchmarks conv` and `python -m benchmarks model`: their code paths at a
tiny size, run once each. No timing assertions (speed is proven by the harness, not by tests)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import conv, model

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny problems: one thread is as fast and immune to a busy neighbour on shared cores (two
    OpenMP threads on an oversubscribed 2-core box made each op ~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("fmt", list(conv.FORMATS))
def test_conv_masks_keep_exact_counts(fmt):
    layer = conv.Layer("t", 40, 48, 3, 1, 6, 2)
    w = conv.pruned_conv(layer, fmt, 0.75, torch.Generator().manual_seed(0))
    block = conv.FORMATS[fmt]
    if block is None:
        assert int(w.mask.sum()) == round(0.25 * w.mask.numel())
    else:  # whole channel blocks over every tap
        chan = w.mask.flatten(2)
        assert bool((chan.all(2) == chan.any(2)).all())
        assert sk_block_aligned(w.mask, block)
    assert bool((w.dense[~w.mask] == 0).all())


def sk_block_aligned(mask, block):
    from sparsekern.nn import is_block_aligned
    return is_block_aligned(mask, (block, block))


@pytest.mark.parametrize("mode", conv.MODES)
@pytest.mark.parametrize("fmt", list(conv.FORMATS))
def test_conv_group_candidates_agree_with_dense(fmt, mode):
    layer = conv.Layer("t", 64, 64, 3, 2, 7, 3)  # stride 2, odd size: 4x4 channel blocks
    w = conv.pruned_conv(layer, fmt, 0.75, torch.Generator().manual_seed(1))
    sparseprop_cls, _, _ = conv.sparseprop_available(threads=1)
    fns, notes, errors = conv.build_group(w, mode, sparseprop_cls,
                                          torch.Generator().manual_seed(2))
    assert {"dense", "sparsekern"} <= fns.keys()
    assert errors["sparsekern"] < 1e-5  # y (forward) or dX (train) checked vs dense
    if sparseprop_cls is not None and fmt == "csr":
        # the peer is timed only when it computes the same (else n/a with the reason)
        assert ("sparseprop" in fns) != ("sparseprop" in notes)
        assert "sparseprop" not in fns or errors["sparseprop"] < 1e-4


def test_conv_disturbed_rows_are_per_layer_and_mode():
    rows = [{"layer": "a", "mode": "forward", "ms": {"dense": d}} for d in (10.0, 11.0, 30.0)]
    rows.append({"layer": "b", "mode": "forward", "ms": {"dense": 30.0}})
    assert conv.disturbed_rows(rows) == [2]


def test_conv_quick_run_writes_results(tmp_path):
    out = tmp_path / "conv"
    cmd = [sys.executable, "-m", "benchmarks", "conv", "--quick", "--out", str(out),
           "--layers", "1x1s2-64-128-32", "--batch", "1", "--formats", "bsr16,csr",
           "--threads", "1", "--repeats", "1", "--warmup", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "issue targets" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["threads"] == 1 and results["batch_override"] == 1
    assert len(results["conv"]) == 2 * len(conv.MODES)  # formats x modes
    for row in results["conv"]:
        assert {"dense", "sparsekern"} <= row["ms"].keys() and row["batch"] == 1
        assert row["fraction_of_ideal"]["sparsekern"] == pytest.approx(
            row["speedup"]["sparsekern"] / row["ideal"])
    targets = results["targets"]
    assert len(targets) == len(conv.SPEED_TARGETS) + len(conv.PEER_TARGETS)
    assert {t["status"] for t in targets} <= {"pass", "MISS", "not measured"}
    text = (out / "RESULTS.md").read_text()
    assert results["command"] in text and "Issue targets" in text
    assert (out / "speedup.png").stat().st_size > 0
    assert not (out / conv.PARTIAL).exists()  # only while running


def test_progress_writer_leaves_the_rows_so_far(tmp_path):
    on_row = conv.progress_writer({"command": "c"}, "conv", tmp_path, lambda row: str(row))
    on_row({"layer": "a"})
    on_row({"layer": "b"})
    partial = json.loads((tmp_path / conv.PARTIAL).read_text())
    assert partial["partial"] is True and [r["layer"] for r in partial["conv"]] == ["a", "b"]


def test_model_flop_ideal_counts_pruned_layers_only():
    dense, masks = model.ticket("resnet20", "unstructured", 0.9, 8, seed=0)
    ideal = model.flop_ideal(dense, masks, torch.randn(2, 3, 32, 32))
    assert 1.0 < ideal < 10.0  # the first conv and the classifier stay dense
    _, block_masks = model.ticket("resnet20", "block", 0.9, 8, seed=0)
    for m in block_masks.values():
        assert sk_block_aligned(m, 8)


def test_model_quick_run_writes_results(tmp_path):
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "benchmarks", "model", "--quick", "--out", str(out),
           "--batch-sizes", "2", "--threads", "1", "--repeats", "1", "--warmup", "0",
           "--policy-repeats", "1", "--fold-bn"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert {(r["masks"], r["mode"]) for r in results["model"]} == {
        (k, m) for k in model.MASKS for m in model.MODES}
    for row in results["model"]:
        assert row["model"] == "resnet20" and row["batch"] == 2
        assert row["bn_folded"] == (row["mode"] == "inference")
        assert row["relative_error_logits"] < 1e-4
        assert {"dense", "sparse"} == row["ms"].keys() and row["flop_ideal"] > 1
        names = [d["name"] for d in row["decisions"]]
        assert len(names) == int(row["sparse_layers"].split("/")[1]) == 20
        assert all(d["kind"] in ("conv", "linear") for d in row["decisions"])
    assert [t["status"] for t in results["targets"]].count("not measured") == 3
    assert (out / "resnet20.png").stat().st_size > 0
    assert "resnet20 (3x32x32 input)" in (out / "RESULTS.md").read_text()


def test_bad_arguments_are_rejected():
    for parse, argv in ((conv.parse_args, ["--layers", "3x3-1-1"]),
                        (conv.parse_args, ["--formats", "bsr7"]),
                        (conv.parse_args, ["--sparsities", "1.5"]),
                        (model.parse_args, ["--models", "alexnet"]),
                        (model.parse_args, ["--batch-sizes", "0"])):
        with pytest.raises(SystemExit):
            parse(argv)


def test_model_merge_keeps_other_models_rows(tmp_path):
    old = {"command": "python -m benchmarks model --models vgg16",
           "model": [{"model": "vgg16", "masks": "block", "batch": 64, "run": {"command": "A"}},
                     {"model": "resnet20", "masks": "block", "batch": 64,
                      "run": {"command": "A"}},
                     {"model": "resnet20", "masks": "block", "batch": 128,
                      "run": {"command": "A"}}]}
    (tmp_path / "results.json").write_text(json.dumps(old))
    results = {}
    keys = ("model", "masks", "batch")
    rows = conv.merged_rows(tmp_path / "results.json",
                            [{"model": "resnet20", "masks": "block", "batch": 128,
                              "run": {"command": "B"}}], results, "model", keys)
    assert [(r["model"], r["batch"], r["run"]["command"]) for r in rows] == [
        ("vgg16", 64, "A"), ("resnet20", 64, "A"), ("resnet20", 128, "B")]
    assert results["merged_commands"] == ["A"]
    assert conv.merged_rows(tmp_path / "absent.json", rows[:1], {}, "model", keys) == rows[:1]
