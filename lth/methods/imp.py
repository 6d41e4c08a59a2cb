"""Iterative magnitude pruning with rewinding (IMP) and one-shot pruning.

Round 0 trains the dense network; each pruned round scores the previous round's final weights
(--pruning), removes a fraction of what remains, and restarts from the point --rewind names.
"""
from __future__ import annotations

import torch

from lth import pruning
from lth.hparams import ConfigError
from lth.methods.base import METHODS, Method, Phase, Plan, lr_factor


def rewind_step(c, steps_per_epoch: int) -> int:
    """The step of round 0 that --rewind-to names (0 for --rewind init)."""
    k, unit = int(c.method.rewind_to[:-2]), c.method.rewind_to[-2:]
    if c.method.rewind == "init":
        return 0
    return k * steps_per_epoch if unit == "ep" else k


@METHODS.register("imp", "iterative magnitude pruning with rewinding (Frankle & Carbin 2019)")
class IMP(Method):
    """Every round removes --prune-fraction of what remains."""

    rewinds = True

    @classmethod
    def last_round(cls, c) -> int:
        return c.method.rounds

    def check_run(self, ctx) -> None:
        c = ctx.config
        if c.method.rewind in ("weights", "lr") and self.last_round(c):
            k = rewind_step(c, ctx.steps_per_epoch)
            if k >= ctx.total_steps:
                raise ConfigError(f"--rewind-to {c.method.rewind_to}: step {k} is not before "
                                  f"the end of training ({ctx.total_steps} iterations = "
                                  f"{c.training.epochs} epochs x {ctx.steps_per_epoch})")
        if self.last_round(c):
            self.check_rounds_prune(ctx)

    def check_rounds_prune(self, ctx) -> None:
        """Each round of --prune-fraction removes round(fraction x what remains): where that is
        nothing (a tiny fraction, a layer of few blocks, N:M groups already at N) the round would
        train on at the previous sparsity, and so would every later one. Refused before
        training, naming the round."""
        c = ctx.config
        p, params = c.pruning, dict(ctx.template.named_parameters())
        if p.granularity == "block":
            units = {n: pruning.block_pattern(torch.ones(params[n].shape, dtype=torch.bool),
                                              p.block).numel() for n in ctx.prunable}
            what = f"{p.block[0]}x{p.block[1]} blocks"
        else:
            units = {n: params[n].numel() for n in ctx.prunable}
            what = f"{p.nm[0]}:{p.nm[1]} groups" if p.granularity == "nm" else "weights"
        rounds = self.last_round(c)
        idle = pruning.idle_round(units, p.fraction, rounds, p.scope, p.granularity, p.nm)
        if idle is None:
            return
        if p.granularity == "nm":
            why = (f"every group of {p.nm[1]} already keeps {p.nm[0]} after round {idle - 1}: "
                   f"use --rounds {idle - 1}")
        else:
            why = (f"--prune-fraction {p.fraction:g} of the {what} left ({sum(units.values())} "
                   f"at first) rounds to none: raise --prune-fraction"
                   + (" or use a smaller --block" if p.granularity == "block" else "")
                   + (f", or use --rounds {idle - 1}" if idle > 1 else ""))
        raise ConfigError(f"round {idle} of --rounds {rounds} would prune nothing: {why}")

    def prune(self, scores, masks, round_index: int):
        p = self.ctx.config.pruning
        return pruning.prune(scores, masks, p.fraction, p.scope, p.granularity, p.block, p.nm)

    def round_masks(self, round_index: int):
        ctx, c = self.ctx, self.ctx.config
        previous = ctx.final_state(Phase(round_index - 1))
        weights = {n: previous[n] for n in ctx.prunable}
        scores = pruning.STRATEGIES.get(c.pruning.strategy)(
            weights, ctx.generator("prune-scores", round_index))
        before = (pruning.full_masks(ctx.template, ctx.prunable) if round_index == 1
                  else ctx.phase_masks(Phase(round_index - 1)))
        return self.prune(scores, before, round_index)

    def round_plan(self, round_index: int) -> Plan:
        c, spe, total = self.ctx.config, self.ctx.steps_per_epoch, self.ctx.total_steps
        if round_index == 0:
            return Plan("init", 0, total)
        rewind = c.method.rewind
        if rewind == "init":
            return Plan("rewind", 0, total)
        if rewind == "weights":
            return Plan("rewind", rewind_step(c, spe), total)
        if rewind == "lr":
            return Plan("previous", rewind_step(c, spe), total)
        epochs = c.method.finetune_epochs or c.training.epochs
        lr, flag = c.method.finetune_lr, "--finetune-lr"
        if lr is None:  # the last epoch's rate of the --lr schedule
            flag = "--lr"
            lr = c.training.lr * lr_factor(c.training, (c.training.epochs - 1) * spe, spe)
        return Plan("previous", 0, epochs * spe, constant_lr=lr, lr_flag=flag)

    def round_start(self, round_index: int, plan: Plan):
        if plan.start == "init":
            return self.ctx.template.state_dict()
        if plan.start == "rewind":
            return self.ctx.rewind_state()
        return self.ctx.final_state(Phase(round_index - 1))

    def rewind_step(self, phase: Phase) -> int | None:
        c = self.ctx.config
        if phase == Phase(0) and c.method.rewind in ("init", "weights") and self.last_round(c):
            return rewind_step(c, self.ctx.steps_per_epoch)
        return None

    def summary(self, phase: Phase) -> dict:
        m = self.ctx.config.method
        if phase.round == 0:
            return {"rewind": "none"}
        return {"rewind": m.rewind if m.rewind in ("init", "finetune")
                else f"{m.rewind}@{m.rewind_to}"}


@METHODS.register("oneshot", "prune once to the target sparsity, then rewind and retrain")
class OneShot(IMP):
    """Train dense once, prune straight to the target sparsity, retrain (one pruned round)."""

    takes_target_sparsity = True

    @classmethod
    def last_round(cls, c) -> int:
        return 1

    def check_rounds_prune(self, ctx) -> None:
        """Nothing to check: one round, straight to the target (not by --prune-fraction)."""

    @classmethod
    def check(cls, c) -> None:
        if c.method.rounds < 1 and c.pruning.target_sparsity is None:
            raise ConfigError("--rounds: oneshot needs --rounds >= 1 or --target-sparsity")

    @staticmethod
    def target(c) -> float:
        p = c.pruning
        if p.target_sparsity is not None:
            return p.target_sparsity
        return 1.0 - (1.0 - p.fraction) ** max(c.method.rounds, 1)

    def prune(self, scores, masks, round_index: int):
        c, p = self.ctx.config, self.ctx.config.pruning
        return pruning.prune_to(scores, masks, self.target(c), p.granularity, p.block, p.nm,
                                p.scope)
