"""Smoke of the benchmark harness: its code paths at a tiny size, run once each.

pytest's addopts carry --benchmark-disable, so the `benchmark` fixture calls each function once
as a plain test; `pytest --benchmark-enable tests/benchmarks` times them. No timing assertions
(DESIGN.md: speed is proven by `python -m benchmarks`, never by tests).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import linear, memory, peers, report
from benchmarks.masks import block_mask, exact_random_mask

OUT_FEATURES, IN_FEATURES = 128, 192  # whole 64x64 blocks, so torch's BSR accepts every format
BATCH = 16
REPO_ROOT = Path(__file__).resolve().parents[2]  # `python -m benchmarks` runs from here
ACTIVE_PEERS = [p for p in peers.available_peers(threads=1) if p.prepare is not None]


def pruned_weight(fmt: str, sparsity: float) -> linear.PrunedWeight:
    gen = torch.Generator().manual_seed(0)
    block = linear.FORMATS[fmt]
    mask = linear.make_mask(block, OUT_FEATURES, IN_FEATURES, sparsity, gen)
    dense = torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen) * mask
    return linear.PrunedWeight(fmt, block, sparsity, mask, dense)


def test_unstructured_mask_keeps_exact_count():
    mask = exact_random_mask((37, 53), 0.9, torch.Generator().manual_seed(1))
    assert int(mask.sum()) == round(0.1 * 37 * 53)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_block_mask_keeps_exact_whole_blocks(block):
    mask = block_mask(128, 256, block, 0.75, torch.Generator().manual_seed(2))
    tiles = mask.view(128 // block, block, 256 // block, block)
    kept = tiles.any(dim=3).any(dim=1)
    assert torch.equal(tiles.all(dim=3).all(dim=1), kept)  # a tile is all kept or all pruned
    assert int(kept.sum()) == round(0.25 * kept.numel())


@pytest.mark.parametrize("mode", linear.MODES)
@pytest.mark.parametrize("fmt", list(linear.FORMATS))
def test_group_candidates_run(benchmark, fmt, mode):
    weight = pruned_weight(fmt, 0.75)
    fns, notes, errors = linear.build_group(weight, BATCH, mode, ACTIVE_PEERS,
                                            torch.Generator().manual_seed(3))
    assert {"dense", "sparsekern"} <= fns.keys()
    for peer in ACTIVE_PEERS:  # every applicable peer is either measured or says why not
        if peer.applies(weight.block):
            assert (peer.name in fns) != (peer.name in notes)
    assert set(errors) == set(fns) - {"dense"}  # y (forward) or dX (train) checked vs dense
    assert max(errors.values()) < 1e-5
    benchmark(fns["sparsekern"])


def test_time_group_reports_every_candidate():
    weight = pruned_weight("csr", 0.9)
    fns, _, _ = linear.build_group(weight, BATCH, "forward", [], torch.Generator())
    measured = linear.time_group(fns, linear.Timing(warmup=1, max_repeats=2,
                                                    group_budget_s=0.01))
    assert set(measured.seconds) == {"dense", "sparsekern"} and measured.rounds == 2
    assert all(s > 0 for s in measured.seconds.values())
    assert measured.stable is False  # 2 rounds cannot show a settled ratio


def _row(mode, dense_ms, batch=256, shape=(2048, 2048)):
    return {"mode": mode, "batch": batch, "in_features": shape[0], "out_features": shape[1],
            "ms": {"dense": dense_ms}}


def test_disturbed_rows_are_slow_dense_baselines_of_their_own_mode():
    rows = [_row("forward", 10.0), _row("forward", 12.0), _row("forward", 40.0),
            _row("train", 30.0), _row("train", 33.0), _row("forward", 40.0, batch=1024),
            _row("forward", 40.0, shape=(4096, 2048))]
    assert linear.disturbed_rows(rows) == [2]


def test_remeasure_keeps_the_quieter_measurement():
    weight = pruned_weight("csr", 0.9)
    timing = linear.Timing(warmup=0, max_repeats=1, group_budget_s=0.0)
    slow = {"mode": "forward", "format": "csr", "sparsity": 0.9, "batch": BATCH,
            "in_features": IN_FEATURES, "out_features": OUT_FEATURES, "ms": {"dense": 1e9},
            "attempts": 1}
    rows = [{**slow, "ms": {"dense": 1e-9}}, slow]  # the second looks disturbed
    seen = []
    linear.remeasure_disturbed(rows, {linear.weight_key(slow): weight}, [], timing,
                               torch.Generator(), retries=1, on_row=seen.append)
    assert rows[1]["attempts"] == 2 and rows[1]["ms"]["dense"] < 1e9 and len(seen) == 1


def test_memory_counts_sparse_layers_below_dense():
    rows = memory.measure(IN_FEATURES, OUT_FEATURES, 0.9)
    assert {(r["optimizer"], r["layer"]) for r in rows} == {
        (o, layer) for o in memory.OPTIMIZERS for layer in ("dense", "bsr32", "csr")}
    for r in rows:
        assert r["optimizer_state_bytes"] > 0  # the step created state
        if r["layer"] != "dense":
            assert r["ratio"] < 0.5 and r["index_bytes"] > 0


def test_quick_run_writes_results(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks", "linear", "--quick", "--out", str(out),
           "--in-features", "128", "--out-features", "128", "--batch-sizes", "16",
           "--formats", "bsr16,csr", "--sparsities", "0.5,0.9", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "issue targets" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert {"command", "machine", "isa", "torch", "threads", "date", "peers", "linear",
            "memory", "targets", "runtime_s"} <= results.keys()
    assert results["threads"] == 1
    assert len(results["linear"]) == 2 * 2 * len(linear.MODES)  # formats x sparsities x modes
    for row in results["linear"]:
        assert {"mode", "format", "sparsity", "batch", "ms", "speedup", "ideal",
                "repeats", "timing"} <= row.keys()
        assert row["timing"]["rounds"] == row["repeats"] and "busy" in row["timing"]
        assert {"dense", "sparsekern"} <= row["ms"].keys()
    assert {t["status"] for t in results["targets"]} <= {"pass", "MISS", "not measured"}
    text = (out / "RESULTS.md").read_text()
    assert results["command"] in text
    for heading in ("Issue targets", "Forward", "Training step", "Training memory"):
        assert heading in text


def test_shapes_run_reports_the_fraction_of_the_dense_flop_rate(tmp_path):
    """--shapes: every (K, N) x M in one process, the fraction of the dense FLOP rate next to
    every speedup, issue 8's fraction targets at M >= 128 with the misses listed."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "benchmarks", "linear", "--quick", "--out", str(out),
           "--shapes", "64x128,128x64", "--batch-sizes", "16,128", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "issue 8 targets" in done.stdout and "misses:" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["shapes"] == [[64, 128], [128, 64]]
    assert (results["in_features"], results["out_features"]) == (64, 128)  # no 2048x2048: first
    rows = results["linear"]  # shapes x formats (bsr32, csr) x sparsity 0.9 x M x modes
    assert len(rows) == 2 * 2 * 2 * len(linear.MODES)
    assert {(r["in_features"], r["out_features"], r["batch"]) for r in rows} == {
        (k, n, m) for k, n in results["shapes"] for m in (16, 128)}
    for r in rows:
        assert r["fraction_of_ideal"].keys() == r["speedup"].keys()
        assert r["fraction_of_ideal"]["sparsekern"] == pytest.approx(
            r["speedup"]["sparsekern"] / r["ideal"])
    fractions = results["fraction_targets"]  # M=16 < 128 is not judged
    assert {(t["batch"], t["in_features"], t["out_features"]) for t in fractions} == {
        (128, 64, 128), (128, 128, 64)}
    assert len(fractions) == 2 * len(report.FRACTION_TARGETS)
    assert {t["status"] for t in fractions} <= {"pass", "MISS"}
    text = (out / "RESULTS.md").read_text()
    for heading in ("Issue 8 targets", "Misses (", "Issue targets (M=16, K=64, N=128)",
                    "Forward (y = x W^T), M=128, K=128, N=64", "fraction of dense FLOP rate",
                    "Training step", "Training memory"):
        assert heading in text


def test_fraction_targets_judge_every_shape_from_m_128():
    def row(fmt, mode, batch, shape, speedup):
        return {"format": fmt, "mode": mode, "sparsity": 0.9, "batch": batch, "ideal": 10.0,
                "in_features": shape[0], "out_features": shape[1], "timing": {},
                "speedup": {"sparsekern": speedup},
                "fraction_of_ideal": {"sparsekern": speedup / 10.0}}
    rows = [row("bsr32", "forward", 256, (768, 3072), 8.5),   # 0.85 >= 0.8
            row("bsr32", "train", 256, (768, 3072), 6.0),     # 0.60 < 0.7
            row("csr", "forward", 64, (768, 3072), 1.0)]      # M=64: not judged
    targets = report.fraction_targets({"shapes": [[768, 3072], [1024, 1024]],
                                       "batch_sizes": [64, 256], "linear": rows})
    assert len(targets) == 2 * len(report.FRACTION_TARGETS)
    status = {(t["in_features"], t["format"], t["mode"]): t["status"] for t in targets}
    assert status[(768, "bsr32", "forward")] == "pass"
    assert status[(768, "bsr32", "train")] == "MISS"
    assert status[(768, "csr", "forward")] == "not measured"
    assert status[(1024, "bsr32", "forward")] == "not measured"
    assert report.fraction_misses(targets) == [
        "M=256, K=768, N=3072: BSR32 step 0.60 < 0.7 (speedup 6.00x of ideal 10.0x)"]


def test_bad_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit):
        linear.parse_args(["--formats", "bsr7"])
    with pytest.raises(SystemExit):
        linear.parse_args(["--sparsities", "1.5"])
    with pytest.raises(SystemExit):
        linear.parse_args(["--shapes", "768"])
    assert "--shapes" in capsys.readouterr().err
    for flag in ("--in-features", "--out-features"):
        with pytest.raises(SystemExit):
            linear.parse_args(["--shapes", "768x3072", flag, "64"])
        err = capsys.readouterr().err
        assert "--shapes and --in-features/--out-features are mutually exclusive" in err
    for argv, words in ((["--formats", ","], "--formats: give at least one format"),
                        (["--batch-sizes", ""], "--batch-sizes: give at least one batch size"),
                        (["--memory-sparsity", "1.5"], "--memory-sparsity must lie in [0, 1)")):
        with pytest.raises(SystemExit):  # an empty list is not the default list
            linear.parse_args(argv)
        assert words in capsys.readouterr().err
    args = linear.parse_args(["--shapes", "768x3072,2048x2048"])
    assert args.shapes == ((768, 3072), (2048, 2048))
    assert (args.in_features, args.out_features) == report.TARGET_SHAPE  # targets, memory
    assert linear.parse_args([]).shapes == ((2048, 2048),)


def test_triton_compile_takes_the_names_its_help_uses():
    """sm_90, fp16 and a square block size are what a user types; bad ones are one-line errors."""
    from benchmarks import triton_compile
    assert [triton_compile._arch(a) for a in ("90", "sm_90", "SM80")] == ["90", "90", "80"]
    assert [triton_compile._dtype(d) for d in ("fp16", "bfloat16", "TF32")] == [
        "float16", "bfloat16", "tfloat32"]
    assert [triton_compile._block(b) for b in ("32", "16x64")] == ["32x32", "16x64"]
    for parse, bad in ((triton_compile._arch, "hopper"), (triton_compile._dtype, "int8"),
                       (triton_compile._block, "12"), (triton_compile._block, "16x16x16")):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            parse(bad)


def test_targets_cover_the_issue():
    results = {"batch_sizes": [256], "linear": [], "memory": [],
               "in_features": 2048, "out_features": 2048,
               "peers": {"sparseprop": {"label": "SparseProp", "reason_absent": "x"}}}
    targets = report.evaluate_targets(results)
    assert len(targets) == len(report.SPEED_TARGETS) + len(report.PEER_TARGETS)
    assert all(t["status"] == "not measured" for t in targets)


def test_default_output_is_under_the_current_directory(tmp_path, monkeypatch):
    """Without --out results go to ./benchmarks/<suite>: the committed folders when run from the
    repository root, the user's directory when run from an installed package."""
    monkeypatch.chdir(tmp_path)
    assert linear.output_dir(linear.parse_args([])) == tmp_path / "benchmarks"
    assert report.default_output_dir("conv") == tmp_path / "benchmarks" / "conv"


def test_run_outside_the_repository_writes_beside_the_user(tmp_path):
    """The harness's own folder (site-packages when installed) is never written."""
    package_files = {p: p.stat().st_mtime_ns for p in (REPO_ROOT / "benchmarks").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts}
    cmd = [sys.executable, "-m", "benchmarks", "linear", "--in-features", "64",
           "--out-features", "64", "--batch-sizes", "8", "--formats", "csr", "--sparsities",
           "0.9", "--warmup", "0", "--repeats", "1", "--retries", "0", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "benchmarks" / "results.json").read_text())["linear"]
    assert (tmp_path / "benchmarks" / "RESULTS.md").is_file()
    assert {p: p.stat().st_mtime_ns for p in package_files} == package_files


def test_csr_profile_splits_the_forward(tmp_path):
    """`python -m benchmarks csr-profile --quick`: every shape timed at 1 and the run's thread
    count, the floor (one entry per row) below the full call, the even-rows and
    leading-columns comparisons, the panel reach over K."""
    out = tmp_path / "profile"
    cmd = [sys.executable, "-m", "benchmarks", "csr-profile", "--quick", "--threads", "2",
           "--repeats", "3", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    (row,) = results["shapes"]
    assert sorted(row["by_threads"]) == ["1", "2"]  # JSON keys
    for t in row["by_threads"].values():
        assert t["csr_ms"] > 0 and t["dense_ms"] > 0 and 0 < t["floor_share"]
        assert t["fraction"] == pytest.approx(t["dense_ms"] / t["csr_ms"] / 10)
        assert t["even_rows_ms"] > 0 and t["even_rows_timing"]["rounds"] >= 1
        assert t["leading_columns_ms"] > 0 and t["leading_columns_timing"]["rounds"] >= 1
        assert t["timing"]["rounds"] >= 1
    assert [r["K"] for r in results["panel_reach"]] == [32, 64]
    for r in results["panel_reach"]:
        assert r["panel_kib"] == r["K"] * results["panel_rows"] * 4 / 1024
    text = (out / "RESULTS.md").read_text()
    assert results["command"] in text and "## Panel reach" in text


def test_csr_profile_even_rows_keeps_the_count_spread_evenly():
    from benchmarks.csr_profile import even_rows
    gen = torch.Generator().manual_seed(3)
    mask = even_rows(7, 40, 93, gen)
    per_row = mask.sum(dim=1)
    assert int(per_row.sum()) == 93 and set(per_row.tolist()) == {13, 14}
    assert even_rows(5, 9, 0, gen).sum() == 0 and even_rows(5, 9, 45, gen).all()


def test_csr_profile_leading_columns_keep_each_rows_count_in_its_first_columns():
    from benchmarks.csr_profile import leading_columns
    mask = torch.rand(6, 20, generator=torch.Generator().manual_seed(4)) < 0.3
    mask[0] = False
    mask[1] = True
    lead = leading_columns(mask)
    assert torch.equal(lead.sum(dim=1), mask.sum(dim=1))
    for row, n in zip(lead, mask.sum(dim=1).tolist()):
        assert row[:n].all() and not row[n:].any()


def test_cache_profile_times_each_format_cold_and_warm(tmp_path):
    """`python -m benchmarks cache-profile --quick`: both formats at the quick shape, the cold,
    warm and idle calls in one group with dense, the fractions and the verdict in RESULTS.md."""
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "benchmarks", "cache-profile", "--quick", "--repeats", "3",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert [r["format"] for r in results["rows"]] == ["bsr32", "csr"]
    for r in results["rows"]:
        assert r["cold_ms"] > 0 and r["warm_ms"] > 0 and r["idle_ms"] > 0 and r["dense_ms"] > 0
        assert r["pause_ms"] > 0 and "pause_fraction" not in r
        for call in ("cold", "warm", "idle"):
            assert r[f"{call}_fraction"] == pytest.approx(r["dense_ms"] / r[f"{call}_ms"] / 10)
        assert r["cold_share"] == pytest.approx(1 - r["warm_ms"] / r["cold_ms"])
        assert r["idle_share"] == pytest.approx(1 - r["warm_ms"] / r["idle_ms"])
        assert r["timing"]["rounds"] >= 1
    text = (out / "RESULTS.md").read_text()
    assert results["command"] in text and "no target (M < 128)" in text


def test_cache_profile_verdict_separates_time_memory_and_kernel_misses():
    from benchmarks.cache_profile import verdict
    row = {"format": "bsr32", "M": 256}
    assert verdict({**row, "cold_fraction": 0.85, "warm_fraction": 0.9,
                    "idle_fraction": 0.7}) == "pass"
    assert verdict({**row, "cold_fraction": 0.7, "warm_fraction": 0.9,
                    "idle_fraction": 0.85}) == "memory miss"
    assert verdict({**row, "cold_fraction": 0.7, "warm_fraction": 0.9,
                    "idle_fraction": 0.75}) == "time miss"
    assert verdict({**row, "cold_fraction": 0.7, "warm_fraction": 0.75,
                    "idle_fraction": 0.9}) == "miss warm too"
    assert verdict({**row, "M": 64, "cold_fraction": 0.1, "warm_fraction": 0.1,
                    "idle_fraction": 0.1}).startswith("no target")


def test_a_bad_out_is_refused_before_anything_runs(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit):
        linear.parse_args(["--out", str(a_file)])
    assert f"--out: {a_file} exists and is not a folder" in capsys.readouterr().err
    assert linear.parse_args(["--out", str(tmp_path / "new" / "dir")]).out.is_dir()


def test_the_benchmarks_entry_point_helps_and_names_an_unknown_benchmark(capsys):
    from benchmarks.__main__ import main
    assert main(["--help"]) == 0
    assert "python -m benchmarks <benchmark> --help" in capsys.readouterr().out
    assert main(["bogus"]) == 2
    assert "unknown benchmark 'bogus'" in capsys.readouterr().err
