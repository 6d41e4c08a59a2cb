"""The retraining tweaks: each changes the model or the loss it claims and nothing else --
the activation swap only the activations, the skip branches only add a branch (exactly the
original network when its BatchNorm scale is 0), mixup only the batch, the rescaling only the
pruned layers' weights -- and only in the pruned rounds; together with any method they run and
the summary records which were on."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _lth_helpers import ROOT, run_inprocess
from lth.hparams import ModelHparams
from lth.methods.tweaks import (SKIP_BN_WEIGHT, add_skip_branches, mixup, rescale_layers,
                                swap_activations)
from lth.models import build_model

SMALL = os.path.join(ROOT, "lth", "experiments", "tweaks.yaml")
FAST = ["--timing-repeats", "1", "--timing-warmup", "0", "--no-progress", "--threads", "1"]
MODELS = {"mlp": ((1, 8, 8), 1.0, 2), "resnet20": ((3, 16, 16), 0.25, 19),
          "mobilenetv2": ((3, 32, 32), 0.25, 35), "vgg16": ((3, 32, 32), 0.125, 13)}


def _model(name):
    shape, mult, _ = MODELS[name]
    return build_model(ModelHparams(name=name, widths=(32, 16), width_mult=mult), shape, 7, 0)


def _same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _relu6_as_relu(model):
    """The network with MobileNetV2's ReLU6 modules as plain ReLU (what a swap to relu is)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.ReLU6):
            model.set_submodule(name, nn.ReLU())
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_activation_swap_changes_only_the_activations(name):
    x = torch.randn(4, *MODELS[name][0])
    ref = _relu6_as_relu(_model(name).eval())
    same, count = swap_activations(_model(name).eval(), "relu")
    assert count == MODELS[name][2]  # every ReLU / ReLU6 application
    _same_state(ref, same)
    assert torch.equal(same(x), ref(x))  # relu in place of relu: the very same network
    swish, _ = swap_activations(_model(name).eval(), "swish")
    _same_state(ref, swish)
    assert not torch.allclose(swish(x), ref(x))


def test_swish_mlp_computes_silu_between_the_layers():
    model = _model("mlp").eval()
    swapped, _ = swap_activations(_model("mlp").eval(), "swish")
    x = torch.randn(5, 1, 8, 8)
    h = x.flatten(1)
    for fc in model.fcs:
        h = F.silu(fc(h))
    assert torch.allclose(swapped(x), model.classifier(h), atol=1e-6)


def test_skip_branches_add_only_a_small_branch_beside_same_size_convs():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    ref = _model("resnet20")
    branched, convs = add_skip_branches(_model("resnet20"), seed=1)
    assert len(convs) == 19 and all(n.endswith(("conv", "conv1", "conv2")) for n in convs)
    before, after = ref.state_dict(), branched.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # originals untouched
    assert all(k.startswith("skip_branches.") for k in set(after) - set(before))
    for branch in branched.skip_branches.values():
        assert torch.equal(branch.bn.weight, torch.full_like(branch.bn.weight, SKIP_BN_WEIGHT))
        assert branch.conv.kernel_size == (1, 1)
    out, expected = branched(x), ref(x)
    assert not torch.equal(out, expected)
    assert (out - expected).norm() < 1e-2 * expected.norm()  # starts as the network it was
    with torch.no_grad():
        for branch in branched.skip_branches.values():
            branch.bn.weight.zero_()
    assert torch.allclose(branched(x), ref(x), atol=1e-6)  # nothing but the branches changed
    a, _ = add_skip_branches(_model("resnet20"), seed=1)  # seeded by name: resume-safe
    b, _ = add_skip_branches(_model("resnet20"), seed=1)
    _same_state(a.skip_branches, b.skip_branches)


def test_skip_branches_leave_convs_of_other_sizes_alone():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=0), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2))
    branched, convs = add_skip_branches(net, seed=0)
    assert convs == ["1"]  # only the stride-2 'same' conv: valid, 1x1 and grouped are skipped
    assert branched(torch.randn(1, 3, 10, 10)).shape == (1, 8, 4, 4)


def test_mixup_mixes_inputs_and_targets_with_one_beta_weight():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    mx, my = mixup(x, y, 5, 0.4, seed=123)
    rng = np.random.default_rng(123)
    lam = rng.beta(0.4, 0.4)
    perm = torch.from_numpy(rng.permutation(8))
    assert torch.allclose(mx, lam * x + (1 - lam) * x[perm])
    assert torch.allclose(my.sum(1), torch.ones(8))
    out = torch.randn(8, 5, generator=gen)
    mixed_loss = F.cross_entropy(out, my)
    assert torch.allclose(mixed_loss, lam * F.cross_entropy(out, y)
                          + (1 - lam) * F.cross_entropy(out, y[perm]))
    assert torch.equal(mixup(x, y, 5, 0.4, seed=123)[0], mx)
    assert not torch.equal(mixup(x, y, 5, 0.4, seed=124)[0], mx)


def test_rescale_multiplies_only_the_pruned_layers_by_sqrt_of_inverse_density():
    model = _model("resnet20")
    params = dict(model.named_parameters())
    names = ["blocks.0.conv1.weight", "blocks.5.conv2.weight"]
    with torch.no_grad():
        params[names[0]][torch.rand(params[names[0]].shape) < 0.75] = 0
        params[names[1]][:, :4] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    factors = rescale_layers(model, names)
    after = model.state_dict()
    for n in names:
        kept = int(torch.count_nonzero(before[n]))
        assert factors[n] == pytest.approx(math.sqrt(before[n].numel() / kept))
        assert torch.allclose(after[n], before[n] * factors[n])
        assert not bool(after[n][before[n] == 0].any())
    assert all(torch.equal(after[k], before[k]) for k in before if k not in names)


def _summary(run):
    return json.load(open(os.path.join(run, "summary.json")))


def test_small_tweaks_experiment_runs_and_records_the_tweaks_of_pruned_rounds(tmp_path):
    run = run_inprocess(["--config", SMALL, *FAST], tmp_path)
    entries = _summary(run)
    dense = next(e for e in entries if e["round"] == 0)
    assert not [k for k in dense if k.startswith("tweak_") and k not in (
        "tweak_label_smoothing", "tweak_warmup_steps", "tweak_schedule")]
    pruned = [e for e in entries if e["round"] >= 1]
    assert pruned
    for e in pruned:
        assert e["tweak_activation"] == "swish" and e["tweak_activations_swapped"] == 19
        assert e["tweak_skip_branches"] == 19 and e["tweak_skip_parameters"] > 0
        assert e["tweak_mixup"] == 0.2 and e["tweak_label_smoothing"] == 0.1
        assert e["tweak_warmup_steps"] > 0 and e["tweak_schedule"] == "cosine"
        assert all(f >= 1.0 for f in e["tweak_rescale_init"].values())
        assert max(e["tweak_rescale_init"].values()) > 1.0


def test_tweaks_combine_with_rigl(tmp_path):
    run = run_inprocess(["--method", "rigl", "--target-sparsity", "0.8", "--widths", "48,48",
                         "--epochs", "2", "--batch-size", "64", "--dst-update-every", "5",
                         "--sparse-policy", "sparse", "--branches", "none", "--activation",
                         "gelu", "--mixup", "0.3", "--rescale-init", *FAST], tmp_path)
    e = next(e for e in _summary(run) if e["round"] == 1)
    assert e["dst_updates"] > 0 and e["tweak_activation"] == "gelu" and e["tweak_mixup"] == 0.3
    assert e["sparse_layers"] == "2/2"


@pytest.mark.parametrize("args,flag", [
    (["--skip-branches", "--rewind", "finetune"], "--skip-branches"),
    (["--activation", "tanhshrink"], "--activation"),
    (["--mixup", "-1"], "--mixup"),
])
def test_bad_tweak_settings_name_the_flag(args, flag, capsys):
    from lth.cli import parse_config
    with pytest.raises(SystemExit):
        parse_config(args)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m lth.train: error:") and flag in error


def test_interrupted_tweaked_round_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    from lth.loop import EpochEnd
    args = ["--widths", "48,48", "--rounds", "1", "--epochs", "3", "--batch-size", "64",
            "--rewind-to", "5it", "--branches", "none", "--activation", "mish", "--mixup",
            "0.5", "--rescale-init", "--sparse-policy", "sparse", *FAST]
    # policy sparse: the auto policy times the kernels, and two runs on a busy machine may
    # pick different ones for a layer, which differ in the last bit
    whole = run_inprocess(args, tmp_path / "whole")
    real = EpochEnd.on_epoch_end

    def interrupted(self, step, stats):  # stops right after round 1's first checkpoint
        real(self, step, stats)
        if self.phase.round == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(EpochEnd, "on_epoch_end", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(args, tmp_path / "cut")
    monkeypatch.setattr(EpochEnd, "on_epoch_end", real)
    resumed = run_inprocess(args, tmp_path / "cut")
    a = torch.load(os.path.join(whole, "round_01", "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed, "round_01", "checkpoint.pt"), weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ea, eb = (next(e for e in _summary(r) if e["round"] == 1) for r in (whole, resumed))
    assert ea["tweak_rescale_init"] == eb["tweak_rescale_init"]  # the real start's factors
    assert ea["test_acc"] == eb["test_acc"]
