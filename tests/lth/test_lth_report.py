"""`python -m lth.report RUN_DIR`: the rigorous winning-ticket verdict per sparsity, with the
dense gap and the margin over the best random baseline both shown."""
import json
import os

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
    assert "summary.json not found" in capsys.readouterr().err
