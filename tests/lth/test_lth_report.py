"""`python -m lth.report RUN_DIR`: the rigorous winning-ticket verdict per sparsity, with the
dense gap and the margin over the best random baseline both shown."""
import json
import os
import shutil

import pytest

from _lth_helpers import TINY, run_inprocess
from lth import report


def _entry(round_, branch, acc, sparsity):
    return {"round": round_, "branch": branch, "test_acc": acc, "best_test_acc": acc + 0.01,
            "sparsity": sparsity}


ENTRIES = [
    _entry(0, "ticket", 0.95, 0.0),
    _entry(1, "ticket", 0.949, 0.2), _entry(1, "random_reinit", 0.90, 0.2),
    _entry(1, "shuffled", 0.93, 0.2),
    _entry(2, "ticket", 0.94, 0.36), _entry(2, "random_reinit", 0.938, 0.36),
    _entry(3, "ticket", 0.90, 0.49), _entry(3, "random_ticket", 0.80, 0.49),
    _entry(4, "ticket", 0.951, 0.59),
]


def test_verdicts_need_dense_accuracy_and_a_margin_over_the_best_baseline():
    rows = {r["round"]: r for r in report.verdicts(ENTRIES, tolerance=0.01, margin=0.005)}
    assert rows[1]["verdict"] == "WINNING"
    assert rows[1]["best_baseline"] == "shuffled"  # the best baseline, not the first
    assert rows[1]["margin_over_baseline"] == pytest.approx(0.019)
    assert rows[2]["verdict"] == "not winning (random baseline as good)"
    assert rows[3]["verdict"] == "not winning (below dense)"
    assert rows[3]["gap_to_dense"] == pytest.approx(-0.05)
    assert rows[4]["verdict"] == "no baseline" and rows[4]["best_baseline"] is None
    strict = {r["round"]: r for r in report.verdicts(ENTRIES, tolerance=0.0, margin=0.005)}
    assert strict[1]["verdict"] == "not winning (below dense)"
    best = {r["round"]: r for r in report.verdicts(ENTRIES, metric="best_test_acc")}
    assert best[1]["ticket_acc"] == pytest.approx(0.959)
    text = report.report_text(report.verdicts(ENTRIES))
    assert "shuffled 93.00%" in text and "+1.90 pts" in text and "-0.10" in text


def test_report_cli_prints_and_saves(tmp_path, capsys):
    run = run_inprocess(TINY + ["--branches", "random_reinit,shuffled"], tmp_path)
    capsys.readouterr()
    assert report.main([run, "--tolerance", "0.5", "--margin", "0"]) == 0
    out = capsys.readouterr().out
    saved = json.load(open(os.path.join(run, "report.json")))
    assert "winning-ticket verdict" in out and saved[-1]["verdict"] in out.splitlines()[-3]
    assert f"{100 * saved[-1]['best_baseline_acc']:.2f}%" in out
    assert saved[-1]["tolerance"] == 0.5 and saved[-1]["best_baseline"] in ("random_reinit",
                                                                           "shuffled")
    assert open(os.path.join(run, "report.txt")).read().strip() == out.split("\n\nsaved")[0]
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path)])
    assert exc.value.code == 2
    assert "config.json not found" in capsys.readouterr().err


def _fake_run(root, name, non_default, accs, method="imp"):
    """A run folder as python -m lth.train writes it (config.json + summary.json)."""
    run = os.path.join(str(root), name)
    os.makedirs(run)
    json.dump({"name": name, "non_default": non_default}, open(os.path.join(run,
                                                                           "config.json"), "w"))
    entries = [{"round": r, "branch": b, "method": method, "sparsity": s, "test_acc": a,
                "step_ms_sparse": 1.0 + r, "step_ms_dense": 2.0}
               for (r, b, s), a in zip([(0, "ticket", 0.0), (1, "ticket", 0.9),
                                        (1, "random_ticket", 0.9)], accs)]
    json.dump(entries, open(os.path.join(run, "summary.json"), "w"))
    return run


def test_compare_groups_seeds_and_overlays_methods(tmp_path, capsys):
    runs = [_fake_run(tmp_path, "imp_mlp_digits-a1", {"method.rounds": 1}, [0.9, 0.8, 0.5]),
            _fake_run(tmp_path, "imp_mlp_digits-b2", {"method.rounds": 1, "training.seed": 1},
                      [0.92, 0.84, 0.6]),
            _fake_run(tmp_path, "kd_mlp_digits-c3", {"method.name": "kd"}, [0.9, 0.88, 0.7],
                      method="kd")]
    out = tmp_path / "cmp"
    assert report.main([*runs, "--out", str(out)]) == 0
    rows = json.load(open(out / "comparison.json"))
    imp = {(r["round"], r["branch"]): r for r in rows if r["config"] == "imp_mlp_digits"}
    assert imp[(1, "ticket")]["seeds"] == 2
    assert imp[(1, "ticket")]["test_acc"] == pytest.approx(0.82)
    assert imp[(1, "ticket")]["test_acc_std"] == pytest.approx(0.0282843, rel=1e-5)
    assert imp[(1, "random_ticket")]["line"] == "random_ticket"
    kd = [r for r in rows if r["config"] == "kd_mlp_digits"]
    assert [r["seeds"] for r in kd] == [1, 1, 1] and kd[1]["line"] == "kd"
    text = capsys.readouterr().out
    assert "82.00 +- 2.83 (2)" in text and "kd_mlp_digits" in text
    assert os.path.isfile(out / "comparison.png")
    assert open(out / "comparison.txt").read().strip() == text.split("\n\nsaved")[0]


def test_a_run_without_a_dense_round_zero_is_judged_on_its_baselines():
    entries = [{**e, "dense_reference": e["round"] != 0} for e in ENTRIES]
    rows = report.verdicts(entries)
    assert all(r["dense_acc"] is None and r["reaches_dense"] is None for r in rows)
    assert [r["verdict"] for r in rows] == [
        "no dense reference; beats the random baseline",
        "no dense reference; random baseline as good",
        "no dense reference; beats the random baseline", "no dense reference, no baseline"]
    text = report.report_text(rows)
    assert "no dense round 0 in this run" in text


def test_a_round_without_sparse_layers_reports_no_speedup(tmp_path, capsys):
    """With no layer on the sparse kernels the round trains masked-dense: the same model as the
    dense baseline, timed once, so its speedup is 1.00x and not the noise of two timings."""
    args = ["--widths", "32,32", "--epochs", "1", "--rounds", "2", "--batch-size", "128",
            "--rewind", "init", "--sparse-policy", "dense", "--timing-repeats", "2",
            "--timing-warmup", "1",
            "--no-progress", "--threads", "1"]
    run = run_inprocess(args, tmp_path)
    entries = json.load(open(os.path.join(run, "summary.json")))
    assert len(entries) >= 2 and all(e["sparse_layers"].startswith("0/") for e in entries)
    assert all(e["step_ms_sparse"] == e["step_ms_dense"] and e["speedup"] == 1.0
               for e in entries)
    capsys.readouterr()
    assert report.main(["--time", run]) == 0
    rows = json.load(open(os.path.join(run, "timing.json")))["rows"]
    assert rows and all(r["step_ms_sparse"] == r["step_ms_dense"] for r in rows)


def test_time_retimes_every_round_in_one_process(tmp_path, capsys):
    args = ["--widths", "32,32", "--epochs", "1", "--rounds", "2", "--batch-size", "128",
            "--branches", "random_reinit", "--rewind", "init", "--timing-repeats", "2",
            "--timing-warmup", "1",
            "--no-progress", "--threads", "1"]
    run = run_inprocess(args, tmp_path)
    capsys.readouterr()
    shutil.rmtree(os.path.join(run, "plots"))  # as a run killed before it plotted leaves it
    assert report.main(["--time", run]) == 0
    out = capsys.readouterr().out
    assert "re-timed in one process, interleaved: median of 2 rounds (at most 2" in out
    timing = json.load(open(os.path.join(run, "timing.json")))
    summary = {(e["round"], e["branch"]): e for e in
               json.load(open(os.path.join(run, "summary.json")))}
    rows = {(r["round"], r["branch"]): r for r in timing["rows"]}
    assert set(rows) == set(summary)  # every finished phase, the branch too
    for key, r in rows.items():
        assert r["speedup"] == pytest.approx(r["step_ms_dense"] / r["step_ms_sparse"])
        assert r["sparsity"] == summary[key]["sparsity"]
        assert r["in_run_step_ms_sparse"] == summary[key]["step_ms_sparse"]
    r0 = rows[(0, "ticket")]  # no masks: dense, sparse and unmasked are the one model
    assert r0["step_ms_dense"] == r0["step_ms_sparse"] == timing["step_ms_unmasked"]
    assert timing["timing_threads"] == 1 and timing["load_average"] is not None
    assert timing["timing_rounds"] == 2 and timing["busy"] in (True, False)
    for e in summary.values():  # how each in-run figure was taken
        assert e["timing_rounds"] >= 1 and e["timing_stable"] in (True, False)
        assert e["load_average"] is not None and e["busy"] in (True, False)
    assert os.path.isfile(os.path.join(run, "timing.txt"))
    assert os.path.isfile(os.path.join(run, "plots", "step_time_one_process.png"))
    with pytest.raises(SystemExit):
        report.main(["--time", run, run])


@pytest.mark.parametrize("edit,why", [
    (lambda e: e[1].update(test_acc=float("nan")), "'test_acc' is nan"),
    (lambda e: e[1].update(test_acc=float("inf")), "'test_acc' is inf"),
    (lambda e: e[1].update(sparsity=7.0), "'sparsity' is 7.0, not in [0, 1]"),
    (lambda e: e.append(dict(e[1])), "the same round and branch twice"),
])
def test_a_summary_with_impossible_numbers_is_unreadable(tmp_path, capsys, edit, why):
    run = _fake_run(tmp_path, "imp_mlp_digits-a1", {}, [0.9, 0.8, 0.5])
    path = os.path.join(run, "summary.json")
    entries = json.load(open(path))
    edit(entries)
    json.dump(entries, open(path, "w"))
    other = _fake_run(tmp_path, "imp_mlp_digits-b2", {"training.seed": 1}, [0.9, 0.8, 0.5])
    for argv in ([run], [run, other, "--out", str(tmp_path / "cmp")]):  # verdicts, comparison
        assert report.main(argv) == 2
        err = capsys.readouterr().err
        assert "summary.json is unreadable" in err and why in err, err


def test_a_run_given_twice_and_a_bad_out_are_refused(tmp_path, capsys):
    run = _fake_run(tmp_path, "imp_mlp_digits-a1", {}, [0.9, 0.8, 0.5])
    a_file = tmp_path / "file"
    a_file.write_text("x")
    other = _fake_run(tmp_path, "imp_mlp_digits-b2", {"training.seed": 1}, [0.9, 0.8, 0.5])
    for argv, words in (([run, run + "/"], "a RUN_DIR is given twice"),
                        ([run, other, "--out", str(a_file)], f"--out {a_file}: cannot make"),
                        ([run, "--tolerance", "5"], "fractions of accuracy in [0, 1)"),
                        ([run, other, "--margin", "nan"], "fractions of accuracy in [0, 1)")):
        with pytest.raises(SystemExit) as exc:
            report.main(argv)
        assert exc.value.code == 2
        assert words in capsys.readouterr().err
