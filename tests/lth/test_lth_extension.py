"""The methods extension point: a module that registers a settings section and a modifier gets
flags, config-file keys and a run hash without editing hparams.py, and the loop calls its hooks
(batch, loss, after_backward, on_step with a new optimizer, summary, state on resume)."""
import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from _lth_helpers import TINY, load, run_inprocess
from lth import hparams
from lth.cli import build_parser, parse_config
from lth.hparams import ConfigError, hp, register_section
from lth.methods import MODIFIERS, Modifier

ARGS = TINY + ["--branches", "none", "--rounds", "1", "--epochs", "2"]


class Probe(Modifier):
    """Scales the loss, counts every hook call, and swaps in a fresh optimizer once."""

    @classmethod
    def enabled(cls, c):
        return c.probe.scale != 1.0

    @classmethod
    def check(cls, c):
        if c.probe.scale > 100:
            raise ConfigError("--probe-scale: too large for the probe")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.calls = {"batch": 0, "loss": 0, "after_backward": 0, "on_step": 0}
        self.grads_seen = 0
        self.swapped_at = None

    def begin_phase(self, model, optimizer, phase):
        self.phase = phase
        self.calls = dict.fromkeys(self.calls, 0)
        self.grads_seen = 0

    def batch(self, x, y, step):
        self.calls["batch"] += 1
        return x, y

    def loss(self, model, x, y, out, step):
        self.calls["loss"] += 1
        return self.ctx.config.probe.scale * F.cross_entropy(out, y)

    def after_backward(self, model, step):
        self.calls["after_backward"] += 1
        self.grads_seen += all(p.grad is not None for p in model.parameters() if p.requires_grad)

    def on_step(self, model, optimizer, step):
        self.calls["on_step"] += 1
        if self.phase.round == 1 and self.swapped_at is None:
            self.swapped_at = step
            fresh = type(optimizer)(model.parameters(), **optimizer.defaults)
            for new, old in zip(fresh.param_groups, optimizer.param_groups):
                new["initial_lr"], new["lr"] = old["initial_lr"], old["lr"]
            return model, fresh
        return None

    def summary(self, phase):
        return {"probe_calls": dict(self.calls), "probe_swapped_at": self.swapped_at,
                "probe_grads_seen": self.grads_seen}

    def state_dict(self):
        return {"calls": dict(self.calls)}

    def load_state_dict(self, state):
        self.calls = dict(state["calls"])


@pytest.fixture
def probe():
    @dataclass
    class ProbeHparams:
        scale: float = hp(1.0, "probe: loss multiplier", flag="--probe-scale",
                          check=lambda v: None if v > 0 else f"must be > 0, got {v}")
    register_section("probe")(ProbeHparams)
    MODIFIERS.register("probe", "a test modifier")(Probe)
    try:
        yield Probe
    finally:
        hparams.SECTIONS.pop("probe")
        MODIFIERS._entries.pop("probe")


def test_a_registered_section_is_flags_config_keys_and_hashed_only_when_set(probe, tmp_path):
    assert "--probe-scale PROBE_SCALE" in build_parser().format_help()
    assert "probe settings" in build_parser().format_help()
    default = parse_config(ARGS)
    assert default.probe.scale == 1.0
    assert "probe.scale" not in default.non_default()
    assert default.hash() == parse_config(ARGS + ["--probe-scale", "1"]).hash()
    scaled = parse_config(ARGS + ["--probe-scale", "2"])
    assert scaled.non_default()["probe.scale"] == 2.0 and scaled.hash() != default.hash()
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"probe": {"scale": 3}}))
    assert parse_config(["--config", str(path)]).probe.scale == 3.0
    path.write_text(json.dumps({"probe-scale": 4}))
    assert parse_config(["--config", str(path)]).probe.scale == 4.0


@pytest.mark.parametrize("argv, words", [
    (["--probe-scale", "0"], "--probe-scale: must be > 0"),
    (["--probe-scale", "500"], "--probe-scale: too large"),
])
def test_section_values_and_modifier_checks_name_the_flag(probe, argv, words, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv)
    assert words in capsys.readouterr().err


def test_clashing_section_flags_are_refused(probe):
    @dataclass
    class Clash:
        lr: float = hp(0.1, "an lr that --lr already is")
    with pytest.raises(ValueError, match="--lr"):
        register_section("clash")(Clash)
    assert "clash" not in hparams.SECTIONS


def test_the_loop_calls_every_hook_of_an_enabled_modifier(probe, tmp_path):
    run = run_inprocess(ARGS + ["--probe-scale", "2"], tmp_path)
    summary = json.load(open(os.path.join(run, "summary.json")))
    for entry in summary:
        calls = entry["probe_calls"]
        assert calls["batch"] == calls["loss"] == calls["after_backward"] == calls["on_step"]
        assert calls["on_step"] == entry["steps"] > 0
        assert entry["probe_grads_seen"] == entry["steps"]
    # the swapped-in optimizer trains on with the same lr schedule (scheduler rebound)
    assert summary[1]["probe_swapped_at"] == summary[1]["first_step"] + 1
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    plain = run_inprocess(ARGS, tmp_path / "plain")
    plain_rows = [json.loads(line) for line in open(os.path.join(plain, "metrics.jsonl"))]
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in plain_rows])
    # the scaled loss is what trained: the weights differ from the unscaled run's
    a = load(os.path.join(run, "round_00", "checkpoint.pt"))
    b = load(os.path.join(plain, "round_00", "checkpoint.pt"))
    assert a["hooks"][1] == {"calls": summary[0]["probe_calls"]}
    assert not torch.equal(a["model"]["fcs.0.weight"], b["model"]["fcs.0.weight"])


def test_provider_state_is_restored_on_resume(probe, tmp_path, monkeypatch):
    from lth import train
    args = ARGS + ["--probe-scale", "2"]
    real = train.EpochEnd.on_epoch_end
    ended = []

    def stop_after_first_epoch(self, step, stats):  # a kill right after the first checkpoint
        real(self, step, stats)
        ended.append(step)
        if len(ended) == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(train.EpochEnd, "on_epoch_end", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(args, tmp_path)
    monkeypatch.setattr(train.EpochEnd, "on_epoch_end", real)
    run = run_inprocess(args, tmp_path)
    summary = json.load(open(os.path.join(run, "summary.json")))
    # counted across the kill: the first epoch's calls came back from the checkpoint
    assert summary[0]["probe_calls"]["on_step"] == summary[0]["steps"]
    assert summary[0]["probe_calls"]["loss"] == summary[0]["steps"]
