"""The sanity-check branches. A branch takes the ticket of a round and trains a variant of it
with the ticket's budget: its mask is made from the ticket's mask, and it starts from fresh
weights or the ticket's own start weights (`Method.masks` / `Method.start_state` answer for
branches from these entries)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lth import pruning
from lth.registry import Registry

BRANCHES = Registry("branch")


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
