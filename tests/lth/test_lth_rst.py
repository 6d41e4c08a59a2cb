"""RST: the growing penalty acts on the weights the mask will remove and on no other (dense in
the first cycle, on packed sparse values in RST_Iter's later ones), drives them below 1e-3 of
their start before the mask is applied, and the run ends in a fine-tune of exactly that mask."""
import copy
import json
import os

import pytest
import torch

import sparsekern as sk
from _lth_helpers import TINY, load, run_inprocess
from lth import pruning
from lth.cli import parse_config
from lth.methods import Phase
from lth.methods.rst import penalty_factor, penalty_steps
from lth.train import Experiment

FAST = ["--method", "rst", "--target-sparsity", "0.8", "--rst-delta", "0.1", "--rst-every", "2",
        "--rst-stabilize", "60it", "--branches", "none"]


def experiment(args, tmp_path):
    return Experiment(parse_config(TINY + FAST + list(args) + ["--runs-dir", str(tmp_path)]))


def penalise_without_loss(exp, model, phase, steps):
    """Only the penalty moves the weights: zero loss gradients, plain SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    exp.method.begin_phase(model, opt, phase)
    for step in range(steps):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        exp.method.after_backward(model, step)
        opt.step()


def test_lambda_grows_by_delta_every_k_to_the_ceiling_then_holds():
    r = parse_config(["--method", "rst"]).rst
    assert (r.delta, r.every, r.ceiling) == (1e-4, 5, 1.0)
    assert [penalty_factor(r, s) for s in (0, 4, 5, 9, 10)] == pytest.approx(
        [0, 0, 1e-4, 1e-4, 2e-4])
    assert penalty_factor(r, 50000) == pytest.approx(1.0)
    assert penalty_factor(r, 10 ** 7) == pytest.approx(1.0)
    assert penalty_steps(r, 14) == 50000 + 10000
    square = parse_config(["--method", "rst", "--rst-schedule", "x2"]).rst
    cube = parse_config(["--method", "rst", "--rst-schedule", "x3"]).rst
    half = 25000
    assert penalty_factor(square, half) == pytest.approx(0.25)
    assert penalty_factor(cube, half) == pytest.approx(0.125)


def test_penalty_drives_only_the_to_be_masked_weights_below_a_thousandth(tmp_path):
    exp = experiment([], tmp_path)
    model = exp.fresh_model(0)
    model.load_state_dict(exp.method.start_state(Phase(0), exp.method.plan(Phase(0))))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = exp.method.masks(Phase(1))
    assert pruning.sparsity(target) == pytest.approx(0.8, abs=1e-3)
    penalise_without_loss(exp, model, Phase(0), exp.method.plan(Phase(0)).last_step)
    for n, p in model.named_parameters():
        p = p.detach()
        if n not in target:  # not prunable: never penalised
            assert torch.equal(p, start[n]), n
            continue
        kept, removed = target[n], ~target[n]
        assert torch.equal(p[kept], start[n][kept]), n
        assert float(p[removed].abs().max()) < 1e-3 * float(start[n][removed].abs().min()), n


def test_rst_iter_penalises_packed_values_within_the_previous_mask(tmp_path):
    exp = experiment(["--rst-cycles", "2"], tmp_path)
    first, second = exp.method.masks(Phase(1)), exp.method.masks(Phase(2))
    assert pruning.sparsity(first) == pytest.approx(1 - 0.2 ** 0.5, abs=1e-3)
    assert pruning.sparsity(second) == pytest.approx(0.8, abs=1e-3)
    assert all(bool((second[n] <= first[n]).all()) for n in first)  # nested
    model = exp.fresh_model(0)
    model.load_state_dict(exp.template.state_dict())
    sk.sparsify(model, first, policy="sparse")
    assert all(isinstance(m, sk.SparseLinear) for n, m in model.named_modules()
               if f"{n}.weight" in first)
    start = {k: v.clone() for k, v in sk.densify(copy.deepcopy(model)).state_dict().items()}
    penalise_without_loss(exp, model, Phase(1), exp.method.plan(Phase(1)).last_step)
    end = sk.densify(model).state_dict()
    for n in first:
        removed = first[n] & ~second[n]
        assert torch.equal(end[n][second[n]], start[n][second[n]]), n
        assert float(end[n][removed].abs().max()) < 1e-3 * float(start[n][removed].abs().min())
        assert int((end[n][~first[n]] != 0).sum()) == 0


def test_rst_run_transforms_then_fine_tunes_the_mask(tmp_path):
    run = run_inprocess(TINY + FAST, tmp_path)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert [(e["round"], e["rst_phase"]) for e in summary] == [(0, "penalty"), (1, "finetune")]
    penalty, finetune = summary
    assert penalty["sparsity"] == 0.0 and penalty["steps"] == 10 * 2 + 60
    assert penalty["rst_lambda"] == pytest.approx(1.0)
    # with the loss pulling back, the penalty still shrinks the weights to be removed
    assert penalty["rst_penalised_norm_end"] < 0.1 * penalty["rst_penalised_norm_start"]
    assert finetune["sparsity"] == pytest.approx(0.8, abs=1e-3) and finetune["method"] == "rst"
    masks = load(os.path.join(run, "round_01", "masks.pt"))
    start = load(os.path.join(run, "round_00", "checkpoint.pt"))["model"]
    init = Experiment(parse_config(TINY + FAST + ["--runs-dir", str(tmp_path)])).template
    removed = {n: ~m for n, m in masks.items()}
    for n, m in removed.items():  # the transformed weights, not the init, are fine-tuned
        assert not torch.equal(start[n][~m], init.state_dict()[n][~m])


@pytest.mark.parametrize("argv, words", [
    (["--method", "rst", "--rewind", "init"], "--rewind: applies to --method imp or oneshot"),
    (["--method", "rst", "--epochs", "1", "--rewind-to", "2ep"], "rst does not rewind"),
    (["--rst-cycles", "2"], "--rst-cycles: applies to --method rst only"),
    (["--method", "rst", "--rst-delta", "0"], "--rst-delta: must be > 0"),
    (["--method", "rst", "--rst-cycles", "2", "--branch-rounds", "all"], "--branch-rounds:"),
    (["--method", "rst", "--rst-stabilize", "soon"], "--rst-stabilize"),
])
def test_rst_settings_errors_name_the_flag(argv, words, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv)
    assert words in capsys.readouterr().err
