"""Training on sparse kernels: mask invariants under momentum and weight decay (in the modules,
through a run, across a resume), rewinding restores the right weights, checkpoints load with
weights_only=True, and a run writes what DESIGN.md promises."""
import copy
import csv
import json
import os

import pytest
import torch
from torch import nn

import sparsekern as sk
from _lth_helpers import TINY, checkpoints, load, run_inprocess
from lth import checkpoint, pruning
from lth.cli import parse_config
from lth.hparams import ModelHparams
from lth.methods import Phase, derive_seed
from lth.models import build_model
from lth.sparse import (MaskedConv2d, current_masks, dense_state_dict, sparsify_model,
                        zero_pruned)
from lth.train import Experiment, make_optimizer


def _pruned(model, fraction=0.7, exclude=("classifier",)):
    names = pruning.prunable_names(model, exclude)
    params = dict(model.named_parameters())
    masks = pruning.prune(pruning.magnitude_scores({n: params[n] for n in names}),
                          pruning.full_masks(model, names), fraction)
    zero_pruned(model, masks)
    return masks


@pytest.mark.parametrize("policy", ["sparse", "dense"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_pruned_weights_stay_exactly_zero_under_momentum_and_weight_decay(policy, optimizer):
    torch.manual_seed(0)
    model = build_model(ModelHparams(name="lenet5"), (1, 8, 8), 10, seed=1)
    masks = _pruned(model, exclude=())  # conv and linear layers, classifier included
    decisions = sparsify_model(model, masks, policy=policy)
    assert {d["chosen"] for n, d in decisions.items() if d["kind"] == "linear"} == {policy}
    assert {d["chosen"] for n, d in decisions.items() if d["kind"] == "conv"} == {policy}
    assert isinstance(model.conv2, MaskedConv2d if policy == "dense" else sk.SparseConv2d)
    t = parse_config(["--optimizer", optimizer, "--weight-decay", "0.05", "--lr", "0.1"] +
                     (["--nesterov"] if optimizer == "sgd" else [])).training
    opt = make_optimizer(t, model.parameters())
    for _ in range(25):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(32, 1, 8, 8)),
                                    torch.randint(0, 10, (32,))).backward()
        opt.step()
    state = dense_state_dict(model)
    for n, m in masks.items():
        assert int((state[n][~m] != 0).sum()) == 0, n
        assert int((state[n][m] == 0).sum()) == 0, n  # kept weights did train
    for name, module in model.named_modules():  # optimizer state only where weights are kept
        if isinstance(module, (sk.MaskedLinear, MaskedConv2d)):
            st = opt.state[module.weight]
            buf = st["momentum_buffer"] if optimizer == "sgd" else st["exp_avg"]
            assert int((buf[~module.mask()] != 0).sum()) == 0, name
    assert {n: torch.equal(m, masks[n]) for n, m in current_masks(model).items()} == \
        {n: True for n in masks}


def test_sparsify_model_leaves_the_timing_repeats_to_sparsekern_unless_given(monkeypatch):
    seen = []
    real = sk.sparsify

    def spy(*args, **kwargs):
        seen.append(kwargs.get("repeats"))
        return real(*args, **kwargs)
    monkeypatch.setattr(sk, "sparsify", spy)
    masks = {"0.weight": torch.rand(8, 8) < 0.5}
    sparsify_model(nn.Sequential(nn.Linear(8, 8)), masks, policy="sparse")
    sparsify_model(nn.Sequential(nn.Linear(8, 8)), masks, policy="sparse", repeats=3)
    assert seen == [None, 3]


def test_dense_state_round_trips_through_sparsify():
    model = build_model(ModelHparams(widths=(64, 64)), (1, 8, 8), 10, seed=0)
    masks = _pruned(model)
    before = copy.deepcopy(model.state_dict())
    sparsify_model(model, masks, policy="sparse")
    assert isinstance(model.fcs[1], sk.SparseLinear)
    after = dense_state_dict(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_run_checkpoints_keep_masks_and_load_weights_only(tmp_path, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    run = run_inprocess(TINY + ["--sparse-policy", "sparse", "--weight-decay", "0.01"],
                        tmp_path)
    assert calls and all(c is True for c in calls)  # every load lth did was weights_only
    monkeypatch.setattr(torch, "load", real)
    files = checkpoints(run)
    assert [os.path.basename(os.path.dirname(f)) for f in files] == [
        "round_00", "round_01", "round_02", "round_02_random_reinit"]
    for f in files:
        ck = load(f)  # weights_only=True: tensors and plain containers only
        assert set(ck) >= {"model", "masks", "optimizer", "scheduler", "rng", "decisions"}
        for n, m in ck["masks"].items():
            assert int((ck["model"][n][~m] != 0).sum()) == 0
        if ck["round"] > 0:
            assert all(d["chosen"] == "sparse" for d in ck["decisions"].values())
            assert pruning.sparsity(ck["masks"]) > 0.19
    for extra in ("masks.pt", "rewind.pt"):
        for f in [os.path.join(run, d, extra) for d in os.listdir(run)]:
            if os.path.isfile(f):
                load(f)
    assert not [f for f in os.listdir(run) if ".tmp." in f]


def test_run_outputs_summary_metrics_plots(tmp_path):
    run = run_inprocess(TINY + ["--branches", "random_reinit,random_ticket,shuffled"], tmp_path)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert [(e["round"], e["branch"]) for e in summary] == [
        (0, "ticket"), (1, "ticket"), (2, "ticket"), (2, "random_reinit"),
        (2, "random_ticket"), (2, "shuffled")]
    for e in summary:
        for key in ("round", "sparsity", "test_acc", "epochs", "method", "step_ms_dense",
                    "step_ms_sparse"):
            assert key in e
        assert e["step_ms_dense"] > 0 and e["step_ms_sparse"] > 0
    assert [round(e["sparsity"], 3) for e in summary[:3]] == [0.0, 0.2, 0.36]
    assert summary[0]["epochs"] == 3 and summary[1]["epochs"] == 2  # rewound to epoch 1
    rows = list(csv.DictReader(open(os.path.join(run, "summary.csv"))))
    assert len(rows) == 6 and rows[5]["branch"] == "shuffled"
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [m["epoch"] for m in metrics if m["phase"] == "round_00"] == [1, 2, 3]
    assert [m["epoch"] for m in metrics if m["phase"] == "round_01"] == [2, 3]
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["hash"] == os.path.basename(run).rsplit("-", 1)[1]
    for png in ("accuracy_vs_sparsity.png", "step_time_vs_sparsity.png"):
        with open(os.path.join(run, "plots", png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = json.load(open(os.path.join(run, "report.json")))
    assert report[-1]["best_baseline"] in ("random_reinit", "random_ticket", "shuffled")
    # the branches' masks: same layer counts as the ticket; reinit keeps the mask itself
    ticket = load(os.path.join(run, "round_02", "masks.pt"))
    for b in ("random_reinit", "random_ticket", "shuffled"):
        other = load(os.path.join(run, f"round_02_{b}", "masks.pt"))
        for n in ticket:
            assert int(other[n].sum()) == int(ticket[n].sum())
            assert torch.equal(other[n], ticket[n]) == (b == "random_reinit")


def _experiment(args, runs_dir):
    return Experiment(parse_config(list(args) + ["--runs-dir", str(runs_dir)]))


CONSTANT = ["--schedule", "constant", "--widths", "32", "--batch-size", "64", "--no-progress",
            "--threads", "1",
            "--timing-repeats", "1", "--timing-warmup", "0", "--branches", "none"]


def test_weight_rewinding_restores_the_weights_of_iteration_k(tmp_path):
    args = CONSTANT + ["--epochs", "4", "--rounds", "1", "--rewind-to", "1ep"]
    run = run_inprocess(args, tmp_path / "a")
    exp = _experiment(args, tmp_path / "a")
    assert exp.steps_per_epoch == 23
    rewind = load(os.path.join(run, "round_00", "rewind.pt"))
    # the same seed and data order, trained for exactly one epoch (23 iterations) and stopped
    short = run_inprocess(CONSTANT + ["--epochs", "1", "--rounds", "0"], tmp_path / "b")
    after_k = load(os.path.join(short, "round_00", "checkpoint.pt"))["model"]
    assert all(torch.equal(rewind[k], after_k[k]) for k in rewind)
    init = exp.template.state_dict()
    assert not any(torch.equal(rewind[k], init[k]) for k in init if k.endswith("weight"))
    # round 1 starts from the rewind point (then masked) and trains the rest of the schedule
    plan = exp.method.plan(Phase(1))
    assert (plan.start, plan.first_step, plan.last_step) == ("rewind", 23, 92)
    start = exp.method.start_state(Phase(1), plan)
    assert all(torch.equal(start[k], rewind[k]) for k in rewind)
    result = json.load(open(os.path.join(run, "round_01", "result.json")))
    assert (result["first_step"], result["steps"], result["rewind"]) == (23, 69, "weights@1ep")
    # iterations as the unit
    run = run_inprocess(CONSTANT + ["--epochs", "2", "--rounds", "1", "--rewind-to", "30it"],
                        tmp_path / "c")
    result = json.load(open(os.path.join(run, "round_01", "result.json")))
    assert (result["first_step"], result["steps"]) == (30, 16)
    rewind30 = load(os.path.join(run, "round_00", "rewind.pt"))
    assert not all(torch.equal(rewind30[k], rewind[k]) for k in rewind)


def test_rewind_init_lr_and_finetune_start_points(tmp_path):
    base = TINY + ["--branches", "none"]
    run = run_inprocess(base + ["--rewind", "init"], tmp_path / "init")
    exp = _experiment(base + ["--rewind", "init"], tmp_path / "init")
    init = build_model(exp.c.model, (1, 8, 8), 10, derive_seed(0, "init")).state_dict()
    rewind = load(os.path.join(run, "round_00", "rewind.pt"))
    assert all(torch.equal(rewind[k], init[k]) for k in init)
    assert json.load(open(os.path.join(run, "round_01", "result.json")))["first_step"] == 0

    args = base + ["--rewind", "lr", "--rewind-to", "1ep"]
    run = run_inprocess(args, tmp_path / "lr")
    exp = _experiment(args, tmp_path / "lr")
    plan = exp.method.plan(Phase(2))
    assert (plan.start, plan.first_step) == ("previous", exp.steps_per_epoch)
    start = exp.method.start_state(Phase(2), plan)  # the previous round's final weights
    final1 = load(os.path.join(run, "round_01", "checkpoint.pt"))["model"]
    assert all(torch.equal(start[k], final1[k]) for k in final1)
    assert not os.path.exists(os.path.join(run, "round_00", "rewind.pt"))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    lr = {(r["phase"], r["epoch"]): r["lr"] for r in rows}
    for epoch in (2, 3):  # the lr schedule is rewound: same lr as round 0 at the same epoch
        assert lr[("round_02", epoch)] == pytest.approx(lr[("round_00", epoch)])
    assert ("round_02", 1) not in lr

    args = base + ["--rewind", "finetune", "--finetune-epochs", "2", "--finetune-lr", "0.003"]
    run = run_inprocess(args, tmp_path / "ft")
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    ft = [r for r in rows if r["phase"] == "round_02"]
    assert len(ft) == 2 and all(r["lr"] == pytest.approx(0.003) for r in ft)


def test_oneshot_prunes_to_the_target_once(tmp_path):
    run = run_inprocess(TINY + ["--method", "oneshot", "--target-sparsity", "0.9",
                                "--branches", "none"], tmp_path)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert [e["round"] for e in summary] == [0, 1]
    assert summary[1]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert summary[1]["method"] == "oneshot"


def test_block_and_nm_tickets_train(tmp_path):
    run = run_inprocess(["--widths", "64,64", "--epochs", "2", "--rounds", "2",
                         "--granularity", "block", "--block", "16x16", "--sparse-format", "bsr",
                         "--sparse-policy", "sparse", "--no-progress", "--timing-repeats", "1",
                         "--branches", "random_ticket", "--threads", "1"], tmp_path / "b")
    ck = load(os.path.join(run, "round_02", "checkpoint.pt"))
    assert {d["format"] for d in ck["decisions"].values()} == {"bsr"}
    for m in ck["masks"].values():
        assert pruning.is_block_aligned(m, (16, 16))
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert {tuple(v["block"]) for e in summary if e["round"] == 2
            for v in e["layers"].values()} == {(16, 16)}
    run = run_inprocess(["--widths", "64,64", "--epochs", "2", "--rounds", "2",
                         "--granularity", "nm", "--nm", "2:4", "--sparse-format", "nm",
                         "--no-progress",
                         "--timing-repeats", "1", "--branches", "none", "--threads", "1"],
                        tmp_path / "n")
    masks = load(os.path.join(run, "round_02", "masks.pt"))
    for m in masks.values():
        assert bool((pruning.nm_counts(m, 4) == 2).all())
    summary = json.load(open(os.path.join(run, "summary.json")))
    layers = {e["round"]: e["layers"] for e in summary}
    # the first prune keeps 3 of every 4: NM layers at 3:4 on the way to 2:4
    assert layers[1] and all(v["format"] == "nm" and v["nm"] == [3, 4]
                             for v in layers[1].values())
    assert layers[2] and all(v["format"] == "nm" and v["nm"] == [2, 4]
                             for v in layers[2].values())


def test_conv_tickets_train_on_sparse_conv_kernels(tmp_path):
    run = run_inprocess(["--model", "lenet5", "--epochs", "1", "--rounds", "1", "--rewind",
                         "init", "--no-progress", "--timing-repeats", "1", "--branches", "none",
                         "--batch-size", "256", "--threads", "1", "--sparse-policy", "sparse"],
                        tmp_path)
    result = json.load(open(os.path.join(run, "round_01", "result.json")))
    assert "conv1.weight" not in result["layers"]  # the first conv is excluded by default
    assert result["layers"]["conv2.weight"] == {**result["layers"]["conv2.weight"],
                                                "kind": "conv", "chosen": "sparse",
                                                "format": "csr"}
    assert result["layers"]["fc1.weight"]["kind"] == "linear"
    assert result["sparse_layers"] == "3/3"  # conv2, fc1, fc2: conv layers count
    ck = load(os.path.join(run, "round_01", "checkpoint.pt"))
    assert int((ck["model"]["conv2.weight"][~ck["masks"]["conv2.weight"]] != 0).sum()) == 0


def test_atomic_save_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    checkpoint.save({"a": torch.ones(2)}, path)

    def boom(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))


def test_rng_state_round_trips(tmp_path):
    import random

    import numpy as np
    checkpoint.save(checkpoint.rng_state(), str(tmp_path / "rng.pt"))
    a = (torch.rand(3), np.random.rand(), random.random())
    checkpoint.set_rng_state(checkpoint.load(str(tmp_path / "rng.pt")))
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_auto_policy_trains_masked_dense_when_the_whole_step_is_slower(tmp_path, monkeypatch):
    from lth import train
    real = train.sparsify_model

    def layer_policy_says_sparse(model, masks, format="auto", policy="auto", block=None,
                                 batch_size=256, decisions=None, repeats=None, example_input=None,
                                 nm=None):
        if policy == "auto" and decisions is None:
            policy = "sparse"
        return real(model, masks, format, policy, block, batch_size, decisions, repeats,
                    example_input, nm)

    def sparse_is_slower(self, dense, trained, masks):
        return {"step_ms_dense": 1.0, "step_ms_sparse": 2.0 if masks else 1.0,
                "step_ms_unmasked": 0.9, "timing_batch": 64, "timing_threads": 1}
    monkeypatch.setattr(train, "sparsify_model", layer_policy_says_sparse)
    monkeypatch.setattr(train.Experiment, "measure", sparse_is_slower)
    run = run_inprocess(TINY + ["--branches", "none"], tmp_path / "auto")
    result = json.load(open(os.path.join(run, "round_01", "result.json")))
    assert result["sparse_layers"] == "0/2"
    assert (result["step_ms_sparse"], result["step_ms_sparse_kernels"]) == (1.0, 2.0)
    ck = load(os.path.join(run, "round_01", "checkpoint.pt"))
    assert all(d["chosen"] == "dense" and "slower" in d["note"] for d in ck["decisions"].values())
    # policy=sparse is obeyed even then
    run = run_inprocess(TINY + ["--branches", "none", "--sparse-policy", "sparse"],
                        tmp_path / "sparse")
    result = json.load(open(os.path.join(run, "round_01", "result.json")))
    assert result["sparse_layers"] == "2/2" and result["step_ms_sparse"] == 2.0


def test_devices_without_sparse_kernels_train_masked_dense(tmp_path, monkeypatch):
    from lth import sparse, train
    assert sparse.sparse_kernels_run_on(torch.device("cpu"))
    monkeypatch.setattr(train, "sparse_kernels_run_on", lambda device: False)
    with pytest.warns(RuntimeWarning, match="no kernels for cpu"):
        run = run_inprocess(TINY + ["--branches", "none", "--sparse-policy", "sparse"], tmp_path)
    ck = load(os.path.join(run, "round_02", "checkpoint.pt"))
    assert {d["chosen"] for d in ck["decisions"].values()} == {"dense"}
