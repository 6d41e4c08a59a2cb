"""Ticket-search methods (IMP, one-shot), rewinding, and the sanity-check branches.

A run is a list of phases: the ticket line (round 0 = dense training, then one phase per pruned
round) followed by the branches. This module decides, for a phase, which mask it trains, which
weights it starts from and which part of the learning-rate schedule it runs; `lth.train` runs it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from lth import pruning
from lth.registry import Registry

METHODS = Registry("method")
BRANCHES = Registry("branch")


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from the run seed and a purpose, stable across processes and versions."""
    text = "/".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


# ----------------------------------------------------------------------------- methods

class IMP:
    """Iterative magnitude pruning: every round removes --prune-fraction of what remains."""

    @staticmethod
    def last_round(c) -> int:
        return c.method.rounds

    @staticmethod
    def next_masks(c, scores, masks, round_index: int):
        p = c.pruning
        return pruning.prune(scores, masks, p.fraction, p.scope, p.granularity, p.block, p.nm)


class OneShot:
    """Train dense once, prune straight to the target sparsity, retrain (one pruned round)."""

    @staticmethod
    def last_round(c) -> int:
        return 1

    @staticmethod
    def target(c) -> float:
        p = c.pruning
        if p.target_sparsity is not None:
            return p.target_sparsity
        return 1.0 - (1.0 - p.fraction) ** max(c.method.rounds, 1)

    @staticmethod
    def next_masks(c, scores, masks, round_index: int):
        p = c.pruning
        return pruning.prune_to(scores, masks, OneShot.target(c), p.granularity, p.block, p.nm,
                                p.scope)


METHODS.register("imp", "iterative magnitude pruning with rewinding (Frankle & Carbin 2019)")(IMP)
METHODS.register("oneshot", "prune once to the target sparsity, then rewind and retrain")(OneShot)


# ----------------------------------------------------------------------------- branches
# A branch takes the ticket of a round and trains a variant of it with the ticket's budget: its
# mask is made from the ticket's mask, and it starts from fresh weights or the ticket's own.

@dataclass(frozen=True)
class Branch:
    start: str  # "fresh": a new initialisation; "ticket": the ticket's start weights
    make_masks: Callable  # (config, ticket masks, torch.Generator) -> masks


BRANCHES.register("random_reinit", "the ticket's mask, freshly initialised weights")(
    Branch("fresh", lambda c, masks, gen: {n: m.clone() for n, m in masks.items()}))
BRANCHES.register("random_ticket", "a random mask with the ticket's layerwise sparsity, fresh "
                  "weights")(
    Branch("fresh", lambda c, masks, gen: pruning.random_like(
        masks, c.pruning.granularity, c.pruning.block, c.pruning.nm, gen)))
BRANCHES.register("shuffled", "the ticket's mask permuted within each layer, the ticket's start "
                  "weights")(
    Branch("ticket", lambda c, masks, gen: pruning.shuffle(
        masks, c.pruning.granularity, c.pruning.block, c.pruning.nm, gen)))


# ----------------------------------------------------------------------------- phases

@dataclass(frozen=True)
class Phase:
    round: int
    branch: str = "ticket"

    @property
    def key(self) -> str:
        base = f"round_{self.round:02d}"
        return base if self.branch == "ticket" else f"{base}_{self.branch}"


def phases(c) -> list[Phase]:
    from lth.hparams import branch_rounds
    out = [Phase(r) for r in range(METHODS.get(c.method.name).last_round(c) + 1)]
    for r in branch_rounds(c):
        out += [Phase(r, b) for b in c.method.branches]
    return out


@dataclass(frozen=True)
class Plan:
    """What a phase trains: steps [first_step, last_step) of the round's schedule, starting from
    `start` (init: the initialisation; rewind: the weights saved at the rewind point of round 0;
    previous: the final weights of the previous round), at `constant_lr` if set."""
    start: str
    first_step: int
    last_step: int
    constant_lr: float | None = None


def rewind_step(c, steps_per_epoch: int) -> int:
    k, unit = int(c.method.rewind_to[:-2]), c.method.rewind_to[-2:]
    if c.method.rewind == "init":
        return 0
    return k * steps_per_epoch if unit == "ep" else k


def plan(c, round_index: int, steps_per_epoch: int) -> Plan:
    total = c.training.epochs * steps_per_epoch
    if round_index == 0:
        return Plan("init", 0, total)
    rewind = c.method.rewind
    if rewind == "init":
        return Plan("rewind", 0, total)
    if rewind == "weights":
        return Plan("rewind", rewind_step(c, steps_per_epoch), total)
    if rewind == "lr":
        return Plan("previous", rewind_step(c, steps_per_epoch), total)
    epochs = c.method.finetune_epochs or c.training.epochs
    lr = c.method.finetune_lr
    if lr is None:
        lr = c.training.lr * lr_factor(c.training, (c.training.epochs - 1) * steps_per_epoch,
                                       steps_per_epoch)
    return Plan("previous", 0, epochs * steps_per_epoch, constant_lr=lr)


def needs_rewind_point(c) -> bool:
    return c.method.rewind in ("init", "weights") and \
        METHODS.get(c.method.name).last_round(c) >= 1


def lr_factor(t, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at global step `step` of a round's schedule."""
    total = t.epochs * steps_per_epoch
    if t.warmup_steps and step < t.warmup_steps:
        warm = (step + 1) / t.warmup_steps
    else:
        warm = 1.0
    if t.schedule == "constant":
        f = 1.0
    elif t.schedule == "cosine":
        import math
        f = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    elif t.schedule == "linear":
        f = max(0.0, 1.0 - step / total)
    else:  # multistep
        f = t.gamma ** sum(step >= m * steps_per_epoch for m in t.milestones)
    return warm * f
