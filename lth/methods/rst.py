"""RST, Random Sparse Network Transformation (Bai et al., "Dual Lottery Ticket Hypothesis",
ICLR 2022): pick a random sparse network, then transform a randomly initialised dense network
into it instead of training the sparse one from scratch.

A mask is drawn for the random dense init (uniformly at random, or --rst-mask magnitude: the
smallest |w| at init) with the sparsity of --target-sparsity. The dense network trains while an
L2 penalty lambda * w is added to the gradient of the weights the mask will remove -- and of no
other weight. lambda starts at 0 and grows every --rst-every iterations, reaching --rst-ceiling
after N = ceil(ceiling / --rst-delta) increments (linear: lambda = i * delta; x2 / x3:
ceiling * (i / N)^2 or ^3), then is held for --rst-stabilize (growing regularisation, Wang et
al. 2021, whose code RST builds on). The penalty phase trains at the constant --lr. Then the mask
is applied and the sparse network is fine-tuned with the full --epochs schedule on the sparse
kernels.

RST_Iter (--rst-cycles C > 1) does this C times: cycle r penalises, within the mask of cycle
r - 1, the weights that cycle r removes, each cycle removing the ratio 1 - (1 - p)^(1/C) of what
remains (sparsity 1 - (1 - p)^(r/C) after cycle r). The cycles after the first train on the
sparse kernels of the previous cycle's mask, the penalty acting on the packed weights.

Phases: round r < C is the penalty phase of cycle r + 1 (round 0 dense), round C the fine-tune;
sanity branches belong to round C.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import sparsekern as sk
from lth import pruning
from lth.hparams import ConfigError, _at_least, _positive, _rewind_point, hp, register_section
from lth.methods.base import METHODS, Method, Phase, Plan
from lth.methods.imp import OneShot

SCHEDULE_POWER = {"linear": 1, "x2": 2, "x3": 3}


@register_section("rst", methods=("rst",))
@dataclass
class RSTHparams:
    mask: str = hp("random", "rst: the mask of the random sparse network: random (uniform) or "
                   "magnitude (smallest |w| of the random init)", flag="--rst-mask",
                   choices=("random", "magnitude"))
    delta: float = hp(1e-4, "rst: penalty increment", flag="--rst-delta", check=_positive)
    every: int = hp(5, "rst: iterations between penalty increments", flag="--rst-every",
                    check=_at_least(1))
    ceiling: float = hp(1.0, "rst: largest penalty factor lambda", flag="--rst-ceiling",
                        check=_positive)
    schedule: str = hp("linear", "rst: growth of lambda to the ceiling", flag="--rst-schedule",
                       choices=tuple(SCHEDULE_POWER))
    stabilize: str = hp("10000it", "rst: penalty held at the ceiling for Nit iterations or Nep "
                        "epochs before the mask is applied", flag="--rst-stabilize",
                        parse=_rewind_point, metavar="N{it,ep}")
    cycles: int = hp(1, "rst: transformation cycles; > 1 is RST_Iter", flag="--rst-cycles",
                     check=_at_least(1))


def penalty_factor(r, step: int) -> float:
    """lambda after `step` iterations of a penalty phase (r: the rst settings)."""
    increments = math.ceil(r.ceiling / r.delta - 1e-9)
    i = min(step // r.every, increments)
    return r.ceiling * (i / increments) ** SCHEDULE_POWER[r.schedule]


def penalty_steps(r, steps_per_epoch: int) -> int:
    """Iterations of a penalty phase: lambda's growth, then the stabilisation."""
    k, unit = int(r.stabilize[:-2]), r.stabilize[-2:]
    growth = math.ceil(r.ceiling / r.delta - 1e-9) * r.every
    return growth + (k * steps_per_epoch if unit == "ep" else k)


def weight_selectors(model: nn.Module, selected: dict[str, torch.Tensor]):
    """[(parameter, float selector shaped like it)] for bool masks over dense weights: a plain
    or masked-dense layer's weight, or a sparse layer's packed values (the selector packed with
    the layer's own index)."""
    modules = dict(model.named_modules())
    out = []
    for name, sel in selected.items():
        module = modules[name[: -len(".weight")]]
        if isinstance(module, (sk.SparseLinear, sk.SparseConv2d)):
            fmt = module.weight_format()
            block = fmt.block if module.format == "bsr" else None
            packed = sk.nn.pack(sel.to(module.values.dtype), module.mask(), module.format, block,
                                nm=module.nm)
            for key, index in module.index().items():
                if not torch.equal(getattr(packed, key), index):
                    raise RuntimeError(f"rst: {name}: the selector packed differently from the "
                                       f"layer ({key})")
            out.append((module.values, packed.values))
        else:
            out.append((module.weight, sel.to(module.weight.dtype)))
    return out


@METHODS.register("rst", "RST (dual LTH): transform a random dense init into a random sparse "
                  "network with a growing L2 penalty, then fine-tune it; --rst-cycles > 1 is "
                  "RST_Iter (Bai et al. 2022)")
class RST(Method):

    takes_target_sparsity = True
    dense_round0 = False  # round 0 is the penalty phase

    @classmethod
    def last_round(cls, c) -> int:
        return c.rst.cycles

    @classmethod
    def check(cls, c) -> None:
        if c.method.rounds < 1 and c.pruning.target_sparsity is None:
            raise ConfigError("--rounds: rst needs --target-sparsity or --rounds >= 1 (the "
                              "sparsity of --rounds rounds of --prune-fraction)")
        if c.rst.cycles > 1 and c.method.branch_rounds not in ("last", "none"):
            raise ConfigError("--branch-rounds: rst's rounds before the last are penalty "
                              "phases; use last or none")

    # ------------------------------------------------------------------ masks of the cycles
    def cycle_masks(self, cycle: int) -> dict[str, torch.Tensor]:
        """The mask after `cycle` cycles (0: every prunable weight)."""
        ctx, c = self.ctx, self.ctx.config
        masks = pruning.full_masks(ctx.template, ctx.prunable)
        if cycle == 0:
            return masks
        weights = {n: w.detach() for n, w in ctx.template.named_parameters()
                   if n in ctx.prunable}
        strategy = "magnitude" if c.rst.mask == "magnitude" else "random"
        scores = pruning.STRATEGIES.get(strategy)(weights, ctx.generator("rst-scores"))
        p, target = c.pruning, OneShot.target(c)
        for r in range(1, cycle + 1):  # nested: each cycle prunes within the previous mask
            masks = pruning.prune_to(scores, masks, 1 - (1 - target) ** (r / c.rst.cycles),
                                     p.granularity, p.block, p.nm, p.scope)
        return masks

    def round_masks(self, round_index: int):
        return self.cycle_masks(round_index)

    def penalising(self, phase: Phase) -> bool:
        return phase.branch == "ticket" and phase.round < self.ctx.config.rst.cycles

    def round_plan(self, round_index: int) -> Plan:
        c = self.ctx.config
        start = "init" if round_index == 0 else "previous"
        if round_index < c.rst.cycles:
            return Plan(start, 0, penalty_steps(c.rst, self.ctx.steps_per_epoch),
                        constant_lr=c.training.lr)
        return Plan(start, 0, self.ctx.total_steps)

    def round_start(self, round_index: int, plan: Plan):
        if round_index == 0:
            return self.ctx.template.state_dict()
        return self.ctx.final_state(Phase(round_index - 1))

    # ------------------------------------------------------------------ the penalty
    def begin_phase(self, model, optimizer, phase: Phase) -> None:
        self.selectors, self.phase = [], phase
        if not self.penalising(phase):
            return
        now, then = self.cycle_masks(phase.round), self.cycle_masks(phase.round + 1)
        self.selectors = weight_selectors(model, {n: (now[n] & ~then[n]).to(self.ctx.device)
                                                  for n in now})
        self.start_norm = self.penalised_norm()
        self.last_factor = 0.0

    def penalised_norm(self) -> float:
        return math.sqrt(sum(float((p.detach() * s).pow(2).sum()) for p, s in self.selectors))

    @torch.no_grad()
    def after_backward(self, model, step: int) -> None:
        if not self.selectors:
            return
        self.last_factor = penalty_factor(self.ctx.config.rst, step)
        if self.last_factor:
            for param, sel in self.selectors:
                param.grad.add_(param * sel, alpha=self.last_factor)

    def state_dict(self) -> dict:
        return {"start_norm": self.start_norm} if self.selectors else {}

    def load_state_dict(self, state: dict) -> None:
        if self.selectors:
            self.start_norm = state["start_norm"]

    def summary(self, phase: Phase) -> dict:
        r = self.ctx.config.rst
        out = {"rst_mask": r.mask, "rst_cycles": r.cycles}
        if self.penalising(phase):
            out.update(rst_phase="penalty", rst_cycle=phase.round + 1,
                       rst_lambda=penalty_factor(r, self.phase_steps(phase)),
                       rst_penalised_norm_start=self.start_norm,
                       rst_penalised_norm_end=self.penalised_norm())
        else:
            out["rst_phase"] = "finetune" if phase.branch == "ticket" else "branch"
        return out

    def phase_steps(self, phase: Phase) -> int:
        plan = self.plan(phase)
        return plan.last_step - plan.first_step - 1
