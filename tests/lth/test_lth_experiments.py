"""The small experiment configs (lth/experiments/{imp,kd,rst}.yaml) run to the end and write their
summaries; interrupted after a checkpoint of a chosen phase, a rerun resumes there and ends with
exactly the weights of an uninterrupted run (provider state -- KD's teacher, RST's penalty --
included)."""
import glob
import json
import os

import pytest
import torch

from _lth_helpers import ROOT, load, run_inprocess

EXPERIMENTS = os.path.join(ROOT, "lth", "experiments")
QUIET = ["--no-progress", "--threads", "1"]


def check_imp(summary):
    ticket = [e for e in summary if e["branch"] == "ticket"]
    assert [e["round"] for e in ticket] == [0, 1, 2, 3]
    assert ticket[-1]["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert ticket[-1]["rewind"] == "weights@1ep"
    assert [e["branch"] for e in summary if e["branch"] != "ticket"] == ["random_ticket"]


def check_kd(summary):
    check_imp(summary)
    assert all(e["kd_teacher"] == "round_00" and e["kd_alpha"] == 0.9
               for e in summary if e["round"] >= 1)


def check_rst(summary):
    assert [(e["round"], e["branch"], e["rst_phase"]) for e in summary] == [
        (0, "ticket", "penalty"), (1, "ticket", "finetune"), (1, "random_reinit", "branch")]
    assert summary[0]["rst_lambda"] == pytest.approx(1.0)
    assert summary[1]["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert [e["dense_reference"] for e in summary] == [False, False, False]


@pytest.mark.parametrize("name, interrupt_in, check", [
    ("imp", "round_02", check_imp), ("kd", "round_02", check_kd), ("rst", "round_00", check_rst)])
def test_small_experiment_runs_and_resumes_after_an_interruption(name, interrupt_in, check,
                                                                 tmp_path, monkeypatch, capsys):
    from lth import train
    args = ["--config", os.path.join(EXPERIMENTS, f"{name}.yaml"), *QUIET]
    whole = run_inprocess(args, tmp_path / "whole")
    summary = json.load(open(os.path.join(whole, "summary.json")))
    check(summary)
    verdict = json.load(open(os.path.join(whole, "report.json")))[-1]["verdict"]
    assert verdict.startswith("no dense reference") == (name == "rst")
    assert {e["sparse_layers"] for e in summary if e["sparsity"] > 0} == {"2/2"}
    assert all(e["test_acc"] > 0.3 and e["step_ms_sparse"] > 0 for e in summary)

    real = train.EpochEnd.on_epoch_end

    def interrupted(self, step, stats):  # stops right after this phase's first checkpoint
        real(self, step, stats)
        if self.phase.key == interrupt_in:
            raise KeyboardInterrupt
    monkeypatch.setattr(train.EpochEnd, "on_epoch_end", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(args, tmp_path / "cut")
    monkeypatch.setattr(train.EpochEnd, "on_epoch_end", real)
    capsys.readouterr()
    resumed = run_inprocess(args, tmp_path / "cut")
    assert f"{interrupt_in}: resuming after epoch" in capsys.readouterr().out
    # the same results, provider summaries (KD's teacher, RST's penalised norms) included;
    # only the measured times differ
    timed = ("step_ms", "speedup", "wall_s", "timing_", "load_average", "busy")
    for a, b in zip(summary, json.load(open(os.path.join(resumed, "summary.json")))):
        assert {k: v for k, v in a.items() if not k.startswith(timed)} == \
            {k: v for k, v in b.items() if not k.startswith(timed)}
    for phase in sorted(e for e in os.listdir(whole) if e.startswith("round_")):
        a = load(os.path.join(whole, phase, "checkpoint.pt"))["model"]
        b = load(os.path.join(resumed, phase, "checkpoint.pt"))["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), phase
    rows = [json.loads(line) for line in open(os.path.join(resumed, "metrics.jsonl"))]
    epochs = [(r["phase"], r["epoch"]) for r in rows]
    assert len(epochs) == len(set(epochs))  # the resumed phase's epochs logged once each


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EXPERIMENTS, "*.yaml"))),
                         ids=os.path.basename)
def test_every_experiment_config_is_valid_and_says_what_it_checks(path):
    from lth.cli import parse_config
    config = parse_config(["--config", path])
    text = open(path).read()
    assert f"python -m lth.train --config lth/experiments/{os.path.basename(path)}" in text
    if config.dataset.name != "digits":  # paper scale: the claim it checks is stated
        assert "Claim checked:" in text
