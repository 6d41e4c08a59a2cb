"""The retraining tweaks of "Spending Your Winning Lottery Better After Drawing It" (Jaiswal, Ma,
Chen, Ding, Wang; arXiv 2101.03255 v3): changes to how a sparse network is retrained, each its
own flag, combinable with each other and with any method (imp, kd, rigl, ...).

They apply to the pruned phases -- rounds >= 1 and their sanity branches, so a ticket and its
random baselines share the recipe -- while the dense round 0 trains the plain recipe:

- --activation swish|mish|gelu|elu|softplus: every ReLU of the network becomes that smoother
  activation;
- --skip-branches: beside every conv whose output has its input's size ("same" padding), an
  extra 1x1 conv + BatchNorm branch is added to its output; the BatchNorm scale starts at 1e-4,
  so the network starts as it was and the branch grows only if training wants it (the branch is
  dense: extra parameters, reported);
- --mixup A: training batches mixed with Beta(A, A) weights (Zhang et al. 2018), the targets
  becoming soft labels that the run's cross-entropy takes;
- --rescale-init: each pruned layer's start weights multiplied by sqrt(weights / kept weights),
  so that its output starts with the variance of the dense layer it was cut from (a layer of
  density d sums d times fewer terms per output).

Label smoothing and warm-up + cosine learning rate, the paper's two remaining tweaks, are the
run's own --label-smoothing 0.1 and --warmup-steps N --schedule cosine (they apply to every
round); the summary records every tweak that was on (tweak_*).

The architecture tweaks rewrite the model's torch.fx graph, so they need a model torch.fx can
trace (all registered models but lenet5, whose pooling depends on the input size); the names of
existing parameters are unchanged, so masks and checkpoints line up.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lth.hparams import ConfigError, _nonneg, hp, register_section
from lth.methods.base import MODIFIERS, Modifier, Phase, derive_seed

ACTIVATIONS = {"relu": F.relu, "swish": F.silu, "mish": F.mish, "gelu": F.gelu, "elu": F.elu,
               "softplus": F.softplus}
SKIP_BN_WEIGHT = 1e-4


@register_section("tweaks")
@dataclass
class TweakHparams:
    activation: str = hp("relu", "pruned rounds: the activation that replaces every ReLU (relu "
                         "= none replaced)", flag="--activation", choices=tuple(ACTIVATIONS))
    skip_branches: bool = hp(False, "pruned rounds: an extra 1x1 conv + BatchNorm (scale "
                             f"{SKIP_BN_WEIGHT:g} at the start) beside every same-size conv",
                             flag="--skip-branches")
    mixup: float = hp(0.0, "pruned rounds: mixup with Beta(A, A) weights; 0 = off",
                      flag="--mixup", check=_nonneg, metavar="A")
    rescale_init: bool = hp(False, "pruned rounds: each pruned layer's start weights times "
                            "sqrt(weights / kept weights)", flag="--rescale-init")


# ----------------------------------------------------------------------------- the mechanisms

def _trace(model: nn.Module, flag: str) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises several types for code it cannot follow
        raise ConfigError(f"{flag}: torch.fx cannot trace {type(model).__name__} "
                          f"({str(e).splitlines()[0][:120]}); this tweak rewrites the model's "
                          f"graph, pick a traceable --model") from None


def _is_relu(node: torch.fx.Node, modules: dict) -> bool:
    """ReLU and ReLU6 (MobileNetV2's), as a function, a tensor method or a module."""
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_, F.relu6)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return node.op == "call_module" and isinstance(modules.get(node.target), (nn.ReLU, nn.ReLU6))


def swap_activations(model: nn.Module, name: str) -> tuple[torch.fx.GraphModule, int]:
    """(the model with every ReLU / ReLU6 -- functional, method or module -- computing
    ACTIVATIONS[name] instead, how many were replaced). In-place ReLUs become out-of-place:
    the models use their result."""
    gm = _trace(model, "--activation")
    modules = dict(gm.named_modules())
    fn = ACTIVATIONS[name]
    count = 0
    for node in list(gm.graph.nodes):
        if not _is_relu(node, modules):
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(fn, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if not count:
        raise ConfigError(f"--activation: {type(model).__name__} has no ReLU to replace")
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, count


def _same_size(conv: nn.Module) -> bool:
    """A conv (groups 1, zero padding, kernel > 1) whose output has the size a 1x1 conv with
    its stride gives: padding = dilation * (kernel - 1) / 2 on both axes."""
    if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str) or conv.kernel_size == (1, 1):
        return False
    return all(2 * p == d * (k - 1) for p, d, k in zip(conv.padding, conv.dilation,
                                                       conv.kernel_size))


class SkipBranch(nn.Module):
    """1x1 conv (the main conv's channels and stride) + BatchNorm whose scale starts small."""

    def __init__(self, conv: nn.Conv2d, generator: torch.Generator):
        super().__init__()
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride, bias=False,
                              device=conv.weight.device, dtype=conv.weight.dtype)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu", generator=generator)
        self.bn = nn.BatchNorm2d(conv.out_channels, device=conv.weight.device,
                                 dtype=conv.weight.dtype)
        nn.init.constant_(self.bn.weight, SKIP_BN_WEIGHT)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x):
        return self.bn(self.conv(x))


def add_skip_branches(model: nn.Module, seed: int) -> tuple[torch.fx.GraphModule, list[str]]:
    """(the model with conv(x) + SkipBranch(x) in place of conv(x) for every same-size conv,
    the convs that got one). The branches live in `skip_branches` (a ModuleDict keyed by the
    conv's name with _ for .), initialised from `seed` and the conv's name."""
    gm = _trace(model, "--skip-branches")
    modules = dict(gm.named_modules())
    branches = nn.ModuleDict()
    gm.add_module("skip_branches", branches)
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _same_size(modules.get(node.target)):
            continue
        key = node.target.replace(".", "_")
        branches[key] = SkipBranch(modules[node.target],
                                   torch.Generator().manual_seed(derive_seed(seed, node.target)))
        with gm.graph.inserting_after(node):
            side = gm.graph.call_module(f"skip_branches.{key}", node.args, node.kwargs)
        with gm.graph.inserting_after(side):
            total = gm.graph.call_function(operator.add, (node, side))
        node.replace_all_uses_with(total, delete_user_cb=lambda user, t=total: user is not t)
        done.append(node.target)
    if not done:
        raise ConfigError(f"--skip-branches: {type(model).__name__} has no conv with kernel > 1 "
                          f"and same-size output to put a 1x1 branch beside")
    gm.recompile()
    return gm, done


def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float,
          seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lam * (x, onehot(y)) + (1 - lam) * the same batch permuted, lam ~ Beta(alpha, alpha);
    cross-entropy on these soft targets is lam * CE(y) + (1 - lam) * CE(y permuted)."""
    rng = np.random.default_rng(seed)
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(y))).to(x.device)
    soft = y.float() if y.dim() == 2 else F.one_hot(y, num_classes).to(x.dtype)
    return lam * x + (1 - lam) * x[perm], lam * soft + (1 - lam) * soft[perm]


@torch.no_grad()
def rescale_layers(model: nn.Module, names) -> dict[str, float]:
    """Multiplies each named (masked) weight by sqrt(numel / nonzeros); returns the factors."""
    params = dict(model.named_parameters())
    factors = {}
    for n in names:
        w = params[n]
        kept = int(torch.count_nonzero(w))
        factors[n] = math.sqrt(w.numel() / kept) if kept else 1.0
        w.mul_(factors[n])
    return factors


# ----------------------------------------------------------------------------- the modifiers

class RetrainTweak(Modifier):
    """A tweak of the pruned phases (rounds >= 1 and their branches)."""

    @staticmethod
    def applies(phase: Phase) -> bool:
        return phase.round >= 1


@MODIFIERS.register("activation", "--activation: a smooth activation in place of ReLU")
class ActivationSwap(RetrainTweak):
    @classmethod
    def enabled(cls, config) -> bool:
        return config.tweaks.activation != "relu"

    def model_transform(self, model, phase):
        if not self.applies(phase):
            return model
        model, self.swapped = swap_activations(model, self.ctx.config.tweaks.activation)
        return model

    def summary(self, phase):
        if not self.applies(phase):
            return {}
        return {"tweak_activation": self.ctx.config.tweaks.activation,
                "tweak_activations_swapped": self.swapped}


@MODIFIERS.register("skip_branches", "--skip-branches: 1x1 conv + BatchNorm beside each conv")
class SkipBranches(RetrainTweak):
    @classmethod
    def enabled(cls, config) -> bool:
        return config.tweaks.skip_branches

    @classmethod
    def check(cls, c) -> None:
        if c.method.rewind in ("lr", "finetune"):
            raise ConfigError(f"--skip-branches: --rewind {c.method.rewind} starts a round from "
                              f"the previous round's weights, whose branches a fresh model does "
                              f"not have; use --rewind weights or init")

    def model_transform(self, model, phase):
        if not self.applies(phase):
            return model
        model, self.convs = add_skip_branches(model, derive_seed(
            self.ctx.config.training.seed, "skip-branches"))
        self.parameters = sum(p.numel() for p in model.skip_branches.parameters())
        return model

    def summary(self, phase):
        if not self.applies(phase):
            return {}
        return {"tweak_skip_branches": len(self.convs),
                "tweak_skip_parameters": self.parameters}


@MODIFIERS.register("mixup", "--mixup A: mixup of the training batches")
class Mixup(RetrainTweak):
    @classmethod
    def enabled(cls, config) -> bool:
        return config.tweaks.mixup > 0

    def begin_phase(self, model, optimizer, phase):
        self.phase = phase
        classifier = [m for m in self.ctx.template.modules() if isinstance(m, nn.Linear)]
        self.num_classes = classifier[-1].out_features

    def batch(self, x, y, step: int):
        if not self.applies(self.phase):
            return x, y
        c = self.ctx.config
        return mixup(x, y, self.num_classes, c.tweaks.mixup,
                     derive_seed(c.training.seed, "mixup", self.phase.key, step))

    def summary(self, phase):
        return {"tweak_mixup": self.ctx.config.tweaks.mixup} if self.applies(phase) else {}


@MODIFIERS.register("rescale_init", "--rescale-init: layer-wise rescaled start weights")
class RescaleInit(RetrainTweak):
    @classmethod
    def enabled(cls, config) -> bool:
        return config.tweaks.rescale_init

    def model_transform(self, model, phase):
        if self.applies(phase):
            self.factors = rescale_layers(model, self.ctx.prunable)
        return model

    def summary(self, phase):
        return {"tweak_rescale_init": self.factors} if self.applies(phase) else {}

    def state_dict(self) -> dict:
        # on resume the transform sees a fresh model (the checkpoint is loaded after it): the
        # factors of the phase's real start come back from here
        return {"factors": dict(getattr(self, "factors", {}))}

    def load_state_dict(self, state: dict) -> None:
        self.factors = dict(state["factors"])


@MODIFIERS.register("recipe_tweaks", "--label-smoothing / --warmup-steps: recorded as tweaks")
class RecipeTweaks(Modifier):
    """The paper's recipe tweaks that are the run's own training settings (every round): the
    summary says they were on."""

    @classmethod
    def enabled(cls, config) -> bool:
        t = config.training
        return t.label_smoothing > 0 or t.warmup_steps > 0

    def summary(self, phase):
        t = self.ctx.config.training
        return {"tweak_label_smoothing": t.label_smoothing,
                "tweak_warmup_steps": t.warmup_steps, "tweak_schedule": t.schedule}
