"""The extension point of `python -m lth.train`: a method (which masks, which start weights, which
part of the schedule each phase trains, and how) plus modifiers (flags that combine with any
method), all "hook providers" that the one training loop (`lth.loop.fit`, run by `lth.train`)
calls in turn.

A new method is ONE new file in `lth/methods/` that registers itself; `lth/methods/__init__.py`
imports every module of the package, so nothing else needs editing:

    from dataclasses import dataclass
    from lth.hparams import hp, register_section
    from lth.methods.base import METHODS, Method

    @register_section("mine", methods=("mine",))  # flags (--mine-rate ...), config-file keys
    @dataclass                           # ({"mine": {"rate": ...}}), checked values, in the run
    class MineHparams:                   # hash only when not at their default; given to another
        rate: float = hp(0.1, "what it is",   # --method: an error naming the flag
                         flag="--mine-rate", check=lambda v: ...)

    @METHODS.register("mine", "one line for --help")
    class Mine(IMP):                     # or Method
        def loss(self, model, x, y, out, step): ...
        # settings: self.ctx.config.mine.rate

A modifier is the same with `@MODIFIERS.register(name, help)` on a `Modifier` subclass whose
`enabled(config)` says when the flags switch it on (e.g. `--mixup 0.2`).

What a run is. A run is a list of phases (`Method.phases`): the ticket line -- round 0 (usually
dense training), then one phase per pruned round -- followed by the sanity-check branches
(`lth.methods.branches`), each a `Phase(round, branch)` with its own folder `round_NN[_branch]`.
The loop (not the method) owns the run folder, checkpoints, resume, DDP and timing: for each phase
not yet finished it asks the method for the masks (`masks`, computed once and saved), the plan
(`plan`: steps [first_step, last_step) of the round's lr schedule, optionally at a constant lr)
and the start weights (`start_state`), builds the model, then trains it calling the hooks below.

Hooks. Every provider (the method first, then each enabled modifier in registration order) is an
instance made once per run with `ctx` (a `RunContext`: the settings, the device, the prunable
weights, the initialisation, and read access to finished phases). Each hook has a no-op default;
the loop calls them at these points of every phase:

  model_transform(model, phase) -> model
      On the plain dense model (nn.Linear / nn.Conv2d) holding the phase's start weights, masked,
      before the pruned layers are packed into sparse kernels: change the architecture (swap
      activations, add branches) or the start values (rescale). On resume the same call is made
      on a freshly built model and the checkpoint's weights are loaded after it, so the
      architecture must be a function of (config, phase) only. Keep the names of the existing
      parameters: masks are keyed by them.
  begin_phase(model, optimizer, phase)
      Every time a phase (re)starts, after the model is packed and the optimizer built, before
      the first step: set up per-phase state afresh (a teacher, penalty selectors, counters).
      On resume, load_state_dict(...) then restores what state_dict() checkpointed.
  batch(x, y, step) -> (x, y)
      Each training batch before the forward. `y` may become soft targets (float, one row of
      class probabilities per example): cross-entropy and the accuracy count accept both.
  loss(model, x, y, out, step) -> Tensor | None
      The training loss of a batch. The first provider that returns a tensor gives it (the
      others are not asked); if none does, `ctx.cross_entropy(out, y)` (--label-smoothing).
      `step` is the number of optimizer steps done in this round's schedule (0 first).
  after_backward(model, step)
      After loss.backward(), before optimizer.step(): edit gradients (an extra penalty on
      chosen weights, gradient statistics). Every provider is called.
  on_step(model, optimizer, step) -> None | (model, optimizer)
      After optimizer.step() and the lr scheduler; `step` counts the steps done. Return None, or
      a re-packed model (e.g. a dynamic-sparse update) and its optimizer: the loop then trains,
      evaluates and checkpoints that model (its masks are read back from its layers), and binds
      the lr scheduler to the optimizer if it is a new object (keep each param group's
      "initial_lr").
  summary(phase) -> dict
      At the end of a phase: plain values merged into the phase's entry of summary.json (a key
      the loop already writes is an error).
  state_dict() -> dict / load_state_dict(state)
      Provider state saved in every checkpoint (tensors and plain values only: checkpoints load
      with weights_only=True) and restored on resume, right after `begin_phase`.

Method only (the rest of a run's shape; class attributes takes_target_sparsity, rewinds and
dense_round0 say which shared flags apply to it and whether round 0 is the dense reference):
  last_round(config)  (classmethod) index of the last pruned round (0: dense only)
  phases(config)      (classmethod) the ticket line and the branches
  check(config)       (classmethod) settings that cannot work with this method -> ConfigError
                      naming the flag; modifiers have the same classmethod
  check_run(ctx)      settings that cannot work with this data (steps per epoch) -> ConfigError
  masks(phase)        {param name: bool mask} of a pruned phase (round >= 1; never asked for
                      round 0, which trains every weight); computed once and saved by the loop
  plan(phase)         the Plan (which steps of the schedule, at which lr) of a phase
  start_state(phase, plan) -> state dict of the plain dense model the phase starts from
                      These three answer branches (from their round's ticket) themselves and
                      ask the method about ticket rounds only: round_masks(round),
                      round_plan(round), round_start(round, plan) are what a method overrides.
  rewind_step(phase)  a step of this phase whose weights the loop saves as the rewind point
                      (`ctx.rewind_state()` reads them back), or None
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lth.methods.branches import BRANCHES
from lth.registry import Registry

METHODS = Registry("method")
MODIFIERS = Registry("modifier")


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from the run seed and a purpose, stable across processes and versions."""
    text = "/".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


@dataclass(frozen=True)
class Phase:
    round: int
    branch: str = "ticket"

    @property
    def key(self) -> str:
        base = f"round_{self.round:02d}"
        return base if self.branch == "ticket" else f"{base}_{self.branch}"


@dataclass(frozen=True)
class Plan:
    """What a phase trains: steps [first_step, last_step) of the round's schedule, starting from
    `start` (a label recorded for the reader: init, rewind, previous, ...), at `constant_lr` if
    set; `lr_flag` is the flag that sets the phase's learning rate, for the error of a diverged
    phase to name."""
    start: str
    first_step: int
    last_step: int
    constant_lr: float | None = None
    lr_flag: str = "--lr"


@dataclass
class RunContext:
    """What the loop offers hook providers (read-only by convention)."""
    config: object  # lth.hparams.Config
    device: torch.device
    steps_per_epoch: int
    prunable: list[str]
    template: nn.Module  # the run's initialisation (seed "init"); never trained
    fresh_model: Callable[[int], nn.Module]  # seed -> plain dense model on the CPU
    phase_masks: Callable[[Phase], dict]  # the masks a finished phase ended with (round 0: {})
    final_state: Callable[[Phase], dict]  # dense weights at the end of a finished phase
    rewind_state: Callable[[], dict]  # the weights saved at the rewind point (Method.rewind_step)
    trained_model: Callable[[Phase], nn.Module]  # a finished phase's model, packed, on device
    cross_entropy: Callable  # (out, y) -> the run's cross-entropy (--label-smoothing)
    log: Callable[[str], None]

    @property
    def total_steps(self) -> int:
        """Steps of one round's full schedule (--epochs)."""
        return self.config.training.epochs * self.steps_per_epoch

    def generator(self, *parts) -> torch.Generator:
        """A CPU generator seeded by the run seed and a purpose."""
        return generator(self.config.training.seed, *parts)


class Hooks:
    """A hook provider: every hook is a no-op by default (see the module docstring)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    @classmethod
    def check(cls, config) -> None:
        """Refuses a config this provider cannot run; by default it can run any."""

    def model_transform(self, model: nn.Module, phase: Phase) -> nn.Module:
        return model

    def begin_phase(self, model: nn.Module, optimizer, phase: Phase) -> None:
        """Called once before a phase trains; nothing to prepare by default."""

    def batch(self, x: torch.Tensor, y: torch.Tensor, step: int):
        return x, y

    def loss(self, model: nn.Module, x, y, out, step: int) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called after loss.backward(), before the optimizer step; no-op by default."""

    def on_step(self, model: nn.Module, optimizer, step: int):
        return None

    def summary(self, phase: Phase) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict() saved; the default saves nothing."""


class Modifier(Hooks):
    """A flag-selected tweak that combines with any method."""

    @classmethod
    def enabled(cls, config) -> bool:
        raise NotImplementedError(f"{cls.__name__} must say when its flags switch it on")


class Method(Hooks):
    """How a run finds and trains its tickets; subclasses override what differs."""

    # whether --target-sparsity means something to this method
    takes_target_sparsity = False
    # whether --rewind / --rewind-to mean something to this method
    rewinds = False
    # whether round 0 trains the plain dense network (the reference tickets are judged against)
    dense_round0 = True

    @classmethod
    def last_round(cls, config) -> int:
        return 0

    @classmethod
    def phases(cls, config) -> list[Phase]:
        from lth.hparams import branch_rounds
        out = [Phase(r) for r in range(cls.last_round(config) + 1)]
        for r in branch_rounds(config):
            out += [Phase(r, b) for b in config.method.branches]
        return out

    def check_run(self, ctx: RunContext) -> None:
        """Refuses a run this method cannot do (checked once the run is set up); none by default."""

    # the three questions the loop asks about a phase; branches are answered here, from the
    # ticket of their round, so a method only answers them for its ticket rounds
    def masks(self, phase: Phase) -> dict[str, torch.Tensor]:
        if phase.branch == "ticket":
            return self.round_masks(phase.round)
        gen = self.ctx.generator("branch-mask", phase.branch, phase.round)
        return BRANCHES.get(phase.branch).make_masks(self.ctx.config,
                                                     self.ctx.phase_masks(Phase(phase.round)), gen)

    def plan(self, phase: Phase) -> Plan:
        return self.round_plan(phase.round)

    def start_state(self, phase: Phase, plan: Plan) -> dict[str, torch.Tensor]:
        if phase.branch == "ticket":
            return self.round_start(phase.round, plan)
        if BRANCHES.get(phase.branch).start == "ticket":
            return self.start_state(Phase(phase.round), plan)
        seed = derive_seed(self.ctx.config.training.seed, "branch-init", phase.branch,
                           phase.round)
        return self.ctx.fresh_model(seed).state_dict()

    def round_masks(self, round_index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has pruned rounds but no masks")

    def round_plan(self, round_index: int) -> Plan:
        return Plan("init", 0, self.ctx.total_steps)

    def round_start(self, round_index: int, plan: Plan) -> dict[str, torch.Tensor]:
        return self.ctx.template.state_dict()

    def rewind_step(self, phase: Phase) -> int | None:
        return None


def providers(ctx: RunContext) -> list[Hooks]:
    """The run's method, then every modifier its flags switch on."""
    c = ctx.config
    out: list[Hooks] = [METHODS.get(c.method.name)(ctx)]
    out += [MODIFIERS.get(n)(ctx) for n in MODIFIERS.names() if MODIFIERS.get(n).enabled(c)]
    return out


def lr_factor(t, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at global step `step` of a round's schedule (t: the training
    settings); plans refer to points of this schedule."""
    total = t.epochs * steps_per_epoch
    if t.warmup_steps and step < t.warmup_steps:
        warm = (step + 1) / t.warmup_steps
    else:
        warm = 1.0
    if t.schedule == "constant":
        f = 1.0
    elif t.schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    elif t.schedule == "linear":
        f = max(0.0, 1.0 - step / total)
    else:  # multistep
        f = t.gamma ** sum(step >= m * steps_per_epoch for m in t.milestones)
    return warm * f
