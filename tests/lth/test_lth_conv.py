"""CNN tickets: --granularity block prunes conv layers in the BSR conv kernel's channel blocks
(each spanning the kh x kw window), the ticket trains on SparseConv2d, and the run's summary
counts conv layers; grouped / depthwise convs are not block-pruned and stay dense."""
import json
import os
import warnings

import pytest
import torch

import sparsekern as sk
from _lth_helpers import load, run_inprocess
from lth.cli import parse_config
from lth.sparse import sparsify_model
from lth.train import Experiment
from sparsekern.nn import is_block_aligned

CNN = ["--model", "resnet20", "--epochs", "2", "--rounds", "2",
       "--batch-size", "128", "--granularity", "block", "--block", "8x8",
       "--prune-fraction", "0.5", "--prune-scope", "layerwise", "--sparse-policy", "sparse",
       "--branches", "none", "--no-progress", "--timing-repeats", "1", "--timing-warmup", "0",
       "--threads", "1"]


def test_block_ticket_of_a_resnet_trains_on_bsr_conv_kernels(tmp_path):
    run = run_inprocess(CNN, tmp_path)
    ck = load(os.path.join(run, "round_02", "checkpoint.pt"))
    convs = {n: m for n, m in ck["masks"].items() if m.dim() == 4}
    assert len(convs) == 20  # 18 3x3 convs and 2 1x1 shortcuts; the first conv excluded
    for n, m in convs.items():
        assert is_block_aligned(m, (8, 8)), n  # whole 8x8 channel blocks over every tap
        assert int((ck["model"][n][~m] != 0).sum()) == 0, n
    assert sum(1 - float(m.float().mean()) for m in convs.values()) / len(convs) > 0.5
    decisions = {n: d for n, d in ck["decisions"].items() if d["kind"] == "conv"}
    assert decisions.keys() == convs.keys()
    assert {(d["chosen"], d["format"]) for d in decisions.values()} == {("sparse", "bsr")}
    result = json.load(open(os.path.join(run, "round_02", "result.json")))
    assert result["sparse_layers"] == f"{len(ck['decisions'])}/{len(ck['decisions'])}"
    assert result["step_ms_sparse"] > 0 and result["step_ms_dense"] > 0
    # the trained ticket, rebuilt from its checkpoint, runs on SparseConv2d
    exp = Experiment(parse_config(CNN + ["--runs-dir", str(tmp_path)]))
    model = exp.fresh_model(0)
    model.load_state_dict(ck["model"])
    sparsify_model(model, ck["masks"], policy="sparse")
    assert sum(isinstance(m, sk.SparseConv2d) for m in model.modules()) == 20
    with torch.no_grad():
        assert model.eval()(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_depthwise_convs_are_not_block_pruned_and_stay_dense(tmp_path):
    args = ["--model", "mobilenetv2", "--width-mult", "0.25", "--granularity", "block",
            "--block", "8x8", "--runs-dir", str(tmp_path)]
    exp = Experiment(parse_config(args))
    modules = dict(exp.template.named_modules())
    grouped = [f"{n}.weight" for n, m in modules.items()
               if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert grouped and not set(grouped) & set(exp.prunable)
    unstructured = Experiment(parse_config(args[:4] + ["--runs-dir", str(tmp_path)]))
    assert set(grouped) <= set(unstructured.prunable)  # pruned unstructured, masked-dense
    masks = {n: torch.rand(dict(exp.template.named_parameters())[n].shape) > 0.5
             for n in grouped[:1] + exp.prunable[:1]}
    found = sparsify_model(exp.template, masks, policy="sparse")
    assert found[grouped[0]]["chosen"] == "dense" and "groups=" in found[grouped[0]]["reason"]
    assert found[exp.prunable[0]]["chosen"] == "sparse"


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "resnet18", "mobilenetv2"])
def test_block_tickets_of_every_cnn_run_on_bsr_conv_kernels(name):
    """One IMP prune of each CNN in 8x8 channel blocks: every pruned conv becomes a BSR
    SparseConv2d holding exactly its mask, depthwise convs stay unpruned nn.Conv2d, and a
    training step runs."""
    from lth import pruning
    from lth.hparams import ModelHparams
    from lth.models import build_model
    model = build_model(ModelHparams(name=name, width_mult=0.25), (3, 16, 16), 10, seed=0)
    names = pruning.prunable_names(model, ("first_conv", "classifier"), "block")
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny layers keep their last block
        masks = pruning.prune(pruning.magnitude_scores({n: params[n] for n in names}),
                              pruning.full_masks(model, names), 0.6, "global", "block", (8, 8))
    sparsify_model(model, masks, policy="sparse")
    modules = dict(model.named_modules())
    for n, m in masks.items():
        layer = modules[n[: -len(".weight")]]
        if m.dim() == 4:
            assert isinstance(layer, sk.SparseConv2d) and layer.format == "bsr", n
            assert torch.equal(layer.mask(), m), n
    depthwise = [m for m in model.modules() if type(m) is torch.nn.Conv2d and m.groups > 1]
    assert bool(depthwise) == (name == "mobilenetv2")
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)),
                                      torch.arange(4)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
