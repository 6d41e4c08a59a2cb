"""Mask updates of dynamic sparse training: RigL (Evci et al. 2020) and SET (Mocanu et al. 2018).

Every update of a layer drops the round(fraction * kept) kept units of smallest magnitude and
grows as many among the units that are not kept after the drop: those of largest dense-gradient
magnitude (RigL) or random ones (SET). A just-dropped unit may be grown back, as in RigL's
reference code; every grown unit restarts from zero (weights and optimizer state, see
`lth.sparse.repack`). The fraction decays with a cosine from its initial value to 0 at the last
update step. A layer with every unit kept (one that ERK made dense) is left as it is.

A unit is one weight, or one block for block masks (block-RigL: scores are the L2 norms of |w|
and of the gradient over each block, a conv block spanning the whole kh x kw window, so the
mask stays made of the BSR kernel's channel / feature blocks). Ragged edge blocks hold fewer
weights than whole ones; blocks are swapped only with blocks of the same size, so every layer
keeps exactly its number of kept weights, not only of kept blocks.
"""
from __future__ import annotations

import math

import torch

from lth.pruning import block_expand, block_pattern, block_sum

GRANULARITIES = ("unstructured", "block")


def drop_fraction(step: int, initial: float, end_step: int, decay: str = "cosine") -> float:
    """Fraction of each layer's kept units replaced at `step`; 0 from `end_step` on."""
    if step >= end_step:
        return 0.0
    if decay == "cosine":
        return initial / 2 * (1 + math.cos(math.pi * step / end_step))
    if decay == "constant":
        return initial
    raise ValueError(f"--drop-decay: unknown {decay!r}; known: cosine, constant")


def is_update_step(step: int, every: int, end_step: int) -> bool:
    """Masks change after optimizer step `step` (1-based) every `every` steps before end_step."""
    return step % every == 0 and 0 < step < end_step


def _swap(kept: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor,
          fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat units -> (new kept, grown) with the same number of kept units. Selection by topk
    over the kept units (drop) and the others (grow): a full sort of a large layer costs ~10x
    more, and the mask update is part of the measured re-packing time."""
    count = int(kept.sum())
    n = int(math.floor(fraction * count + 0.5))
    if n == 0 or count == kept.numel():  # a dense layer (ERK) has nowhere else to grow
        return kept.clone(), torch.zeros_like(kept)
    kept_at = kept.nonzero().squeeze(1)
    dropped = kept_at[torch.topk(drop_score[kept_at], n, largest=False, sorted=False).indices]
    survivors = kept.clone()
    survivors[dropped] = False
    free_at = (~survivors).nonzero().squeeze(1)
    grown = torch.zeros_like(kept)
    grown[free_at[torch.topk(grow_score[free_at], n, sorted=False).indices]] = True
    return survivors | grown, grown


def update_mask(mask: torch.Tensor, weight: torch.Tensor, grow_score: torch.Tensor,
                fraction: float, granularity: str = "unstructured",
                block=(32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (new mask, grown): grown is True where a unit was (re)grown and so restarts
    from zero. grow_score is shaped like the weight: |dense gradient| for RigL, random for
    SET."""
    if granularity == "unstructured":
        new, grown = _swap(mask.flatten(), weight.detach().abs().flatten().float(),
                           grow_score.flatten().float(), fraction)
        return new.view(mask.shape), grown.view(mask.shape)
    if granularity != "block":
        raise ValueError(f"--granularity {granularity}: dynamic sparse training updates "
                         f"{' or '.join(GRANULARITIES)} masks")
    shape = tuple(mask.shape)
    kept = block_pattern(mask, block)
    sizes = block_sum(torch.ones(shape), block)  # weights per block (fewer on ragged edges)
    drop = block_sum(weight.detach().float() ** 2, block).sqrt()
    grow = block_sum(grow_score.float() ** 2, block).sqrt()
    new, grown = kept.clone(), torch.zeros_like(kept)
    for size in torch.unique(sizes):
        same = sizes == size
        n, g = _swap(kept[same], drop[same], grow[same], fraction)
        new[same], grown[same] = n, g
    return block_expand(new, shape, block), block_expand(grown, shape, block)


def update_masks(masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                 grow_scores: dict[str, torch.Tensor], fraction: float,
                 granularity: str = "unstructured", block=(32, 32)):
    """update_mask over every layer: ({name: new mask}, {name: grown})."""
    new, grown = {}, {}
    for name, mask in masks.items():
        new[name], grown[name] = update_mask(mask.cpu(), weights[name].cpu(),
                                             grow_scores[name].cpu(), fraction, granularity,
                                             block)
    return new, grown


def random_scores(masks: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
    """SET's grow scores: uniform noise shaped like each weight."""
    return {n: torch.rand(m.shape, generator=generator) for n, m in masks.items()}

