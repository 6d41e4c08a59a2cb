"""Mask makers. A mask is a bool tensor shaped like its weight ({param name: mask}); True = kept.

Scores come from a registered strategy (magnitude, random); `prune` removes a fraction of the
remaining units, where a unit is one weight (unstructured), one block (block: the mask then
runs on sparsekern's BSR kernels), or one weight inside its group of M consecutive input weights
(nm). A block of a linear weight is BN output x BK input features; a block of a conv weight
[C_out, C_in, kh, kw] is BN output x BK input channels spanning the whole kh x kw window (the
BSR conv block), scored by the mean |w| over it. Counts are exact: global pruning removes
round(fraction * remaining) units over all layers together, layerwise pruning the same per
layer. Pruning never removes a layer's last unit: a layer the count would empty keeps its
highest-scoring unit (a few units more than the exact count, with a warning naming the layers),
so the network is never cut in two.
"""
from __future__ import annotations

import fnmatch
import math
import warnings

import torch
from torch import nn

from lth.registry import Registry

STRATEGIES = Registry("pruning strategy")


@STRATEGIES.register("magnitude", "prune the smallest |w| (IMP)")
def magnitude_scores(weights: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
    return {n: w.detach().abs().float() for n, w in weights.items()}


@STRATEGIES.register("random", "prune uniformly at random (a baseline)")
def random_scores(weights: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
    return {n: torch.rand(w.shape, generator=generator) for n, w in weights.items()}


# ----------------------------------------------------------------------------- what is prunable

def layer_weights(model: nn.Module) -> list[str]:
    """Parameter names of the weights of every nn.Linear / nn.Conv2d, in module order."""
    return [f"{n}.weight" if n else "weight" for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))]


def prunable_names(model: nn.Module, exclude=("first_conv", "classifier"),
                   granularity: str = "unstructured") -> list[str]:
    """Layer weights minus the excluded ones. Tokens: first_conv (the first Conv2d),
    classifier (the last Linear), first_layer (the first Linear or Conv2d), or glob patterns
    over parameter names ("fcs.0.weight") or module names ("fcs.0"). A pattern that matches no
    layer weight is an error, so a typo cannot silently prune everything. With
    granularity="block", grouped / depthwise convs are not prunable: they have no BSR kernel
    and a channel block of a depthwise conv is whole channels, so they stay dense."""
    names = layer_weights(model)
    modules = dict(model.named_modules())
    if granularity == "block":
        names = [n for n in names if getattr(modules[n[: -len(".weight")]], "groups", 1) == 1]
    convs = [n for n in names if isinstance(modules[n[: -len(".weight")]], nn.Conv2d)]
    linears = [n for n in names if isinstance(modules[n[: -len(".weight")]], nn.Linear)]
    excluded = set()
    for token in exclude:
        if token == "first_conv":
            excluded.update(convs[:1])
        elif token == "classifier":
            excluded.update(linears[-1:])
        elif token == "first_layer":
            excluded.update(names[:1])
        else:
            hits = [n for n in names if fnmatch.fnmatchcase(n, token)
                    or fnmatch.fnmatchcase(n[: -len(".weight")], token)]
            if not hits:
                raise ValueError(f"--prune-exclude: {token!r} matches no layer weight; layer "
                                 f"weights: {', '.join(names)}")
            excluded.update(hits)
    return [n for n in names if n not in excluded]


def full_masks(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}


def sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of the masked (prunable) weights that are pruned."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


def empty_layers(masks: dict[str, torch.Tensor]) -> list[str]:
    """The layers whose mask keeps no weight, sorted."""
    return sorted(n for n, m in masks.items() if not bool(m.any()))


def layer_sparsity(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: 1.0 - int(m.sum()) / m.numel() for n, m in masks.items()}


# ----------------------------------------------------------------------------- units

def _rows(t: torch.Tensor) -> torch.Tensor:
    """The (out_features, in_features[*kh*kw]) view that sparse kernels see."""
    return t.reshape(t.shape[0], -1)


def _channels(t: torch.Tensor) -> torch.Tensor:
    """What a block is cut from: [out, in] as is; a conv [C_out, C_in, kh, kw] summed over its
    kh x kw window to [C_out, C_in] (a BSR conv block spans the whole window)."""
    return t.sum(dim=(2, 3)) if t.dim() == 4 else _rows(t)


def _block_shape(shape) -> tuple[int, int]:
    """The 2-D shape blocks tile: (out, in) of a linear weight, (C_out, C_in) of a conv."""
    return (shape[0], shape[1]) if len(shape) == 4 else (shape[0], math.prod(shape[1:]))


def _grid(shape2d, block):
    bn, bk = block
    return math.ceil(shape2d[0] / bn), math.ceil(shape2d[1] / bk)


def block_sum(t: torch.Tensor, block) -> torch.Tensor:
    """[out, in] (or a conv [C_out, C_in, kh, kw]) -> [Nb, Kb] sums over each block, a conv
    block spanning the whole kh x kw window (ragged edge blocks are zero-padded)."""
    t = _channels(t)
    bn, bk = block
    nb, kb = _grid(t.shape, block)
    padded = t.new_zeros(nb * bn, kb * bk)
    padded[: t.shape[0], : t.shape[1]] = t
    return padded.view(nb, bn, kb, bk).sum(dim=(1, 3))


def block_expand(grid: torch.Tensor, shape, block) -> torch.Tensor:
    """[Nb, Kb] per block -> per weight, shaped like the weight (a conv block over every tap)."""
    bn, bk = block
    rows = _block_shape(shape)
    full = grid.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[: rows[0], : rows[1]]
    if len(shape) == 4:
        return full[:, :, None, None].expand(tuple(shape)).contiguous()
    return full.reshape(shape).contiguous()


def block_pattern(mask: torch.Tensor, block) -> torch.Tensor:
    """[Nb, Kb] bool: blocks holding at least one kept weight."""
    return block_sum(mask.float(), block) > 0


def is_block_aligned(mask: torch.Tensor, block) -> bool:
    return bool(torch.equal(block_expand(block_pattern(mask, block), mask.shape, block), mask))


def nm_groups(t: torch.Tensor, m: int, name: str = "weight") -> torch.Tensor:
    """[out, in] -> [out, in / M, M]."""
    t = _rows(t)
    if t.shape[1] % m:
        raise ValueError(f"--granularity nm: {name} has {t.shape[1]} input weights per output, "
                         f"not a multiple of M={m}; exclude it with --prune-exclude")
    return t.reshape(t.shape[0], t.shape[1] // m, m)


def nm_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept weights in each group of M."""
    return nm_groups(mask, m).sum(-1)


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _keep_top(scores: torch.Tensor, kept: torch.Tensor, keep: int) -> torch.Tensor:
    """Among the kept entries of flat `scores`, keep the `keep` highest (ties: lower index)."""
    masked = torch.where(kept, scores, torch.full_like(scores, -math.inf))
    order = torch.sort(masked, descending=True, stable=True).indices
    out = torch.zeros_like(kept)
    out[order[:keep]] = True
    return out


def _keep_top_per_group(scores: torch.Tensor, kept: torch.Tensor,
                        counts: torch.Tensor) -> torch.Tensor:
    """[..., M]: in each group keep the counts[...] highest-scoring kept entries."""
    masked = torch.where(kept, scores, torch.full_like(scores, -math.inf))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
    return rank < counts.unsqueeze(-1)


def _keep_one_per_layer(new: dict, us: dict, uk: dict) -> dict:
    """Pruning never empties a layer that had kept units: such a layer keeps its
    highest-scoring unit (and a warning names it)."""
    emptied = [n for n in new if bool(uk[n].any()) and not bool(new[n].any())]
    for n in emptied:
        best = int(torch.where(uk[n], us[n], torch.full_like(us[n], -math.inf)).argmax())
        new[n] = new[n].clone()
        new[n][best] = True
    if emptied:
        warnings.warn(f"pruning would remove every unit of {emptied}; each keeps its "
                      f"highest-scoring unit so the network is not cut in two", RuntimeWarning,
                      stacklevel=3)
    return new


def idle_round(units: dict[str, int], fraction: float, rounds: int, scope: str = "global",
               granularity: str = "unstructured", nm=(2, 4)) -> int | None:
    """The first of `rounds` rounds of `prune` from full masks that removes nothing, or None.
    units: prunable units per layer (weights, blocks, or N:M groups). Counts only (what prune
    removes: round(fraction * remaining), per layer for layerwise; an N:M group steps down
    to N and then stays), so it answers before any training."""
    if granularity == "nm":
        n_keep, m = nm
        count = m  # every group of a full mask keeps M
        for r in range(1, rounds + 1):
            if count <= n_keep:
                return r
            count = max(n_keep, count - max(1, _round(count * fraction)))
        return None
    left = dict(units)
    for r in range(1, rounds + 1):
        if scope == "global":
            removed = _round(fraction * sum(left.values()))
            if removed == 0:
                return r
            total = sum(left.values())
            left = {"all": total - removed}
        else:
            step = {n: _round(fraction * u) for n, u in left.items()}
            if not any(step.values()):
                return r
            left = {n: u - step[n] for n, u in left.items()}
    return None


def _units(scores, masks, granularity, block):
    """(unit scores, unit kept) per layer for unstructured / block granularity, flattened."""
    us, uk = {}, {}
    for n, mask in masks.items():
        s = scores[n].float()
        if granularity == "block":
            count = block_sum(torch.ones_like(s), block)
            us[n] = (block_sum(s, block) / count).flatten()
            uk[n] = block_pattern(mask, block).flatten()
        else:
            us[n], uk[n] = s.flatten(), mask.flatten()
    return us, uk


def _from_units(unit_kept, masks, granularity, block):
    out = {}
    for n, mask in masks.items():
        if granularity == "block":
            out[n] = block_expand(unit_kept[n].view(_grid(_block_shape(mask.shape), block)),
                                  mask.shape, block)
        else:
            out[n] = unit_kept[n].view(mask.shape).clone()
    return out


def prune(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], fraction: float,
          scope: str = "global", granularity: str = "unstructured", block=(32, 32),
          nm=(2, 4)) -> dict[str, torch.Tensor]:
    """New masks: the kept units minus round(fraction * remaining) of the lowest-scoring ones
    (over all layers for scope=global, per layer for layerwise). nm: each group of M keeps
    max(N, kept - max(1, round(fraction * kept))) of its kept weights (scope does not apply)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune: fraction must be in [0, 1), got {fraction}")
    if scope not in ("global", "layerwise"):
        raise ValueError(f"prune: scope must be global or layerwise, got {scope!r}")
    if granularity == "nm":
        n_keep, m = nm
        out = {}
        for name, mask in masks.items():
            kept = nm_groups(mask, m, name)
            counts = kept.sum(-1)
            step = torch.clamp(torch.round(counts.float() * fraction).long(), min=1)
            target = torch.where(counts > n_keep, torch.clamp(counts - step, min=n_keep), counts)
            new = _keep_top_per_group(nm_groups(scores[name].float(), m, name), kept, target)
            out[name] = new.reshape(mask.shape)
        return out
    if granularity not in ("unstructured", "block"):
        raise ValueError(f"prune: unknown granularity {granularity!r}")
    us, uk = _units(scores, masks, granularity, block)
    new = {}
    if scope == "global":
        names = list(masks)
        flat_s, flat_k = torch.cat([us[n] for n in names]), torch.cat([uk[n] for n in names])
        remaining = int(flat_k.sum())
        kept = _keep_top(flat_s, flat_k, remaining - _round(fraction * remaining))
        for n, part in zip(names, kept.split([us[n].numel() for n in names])):
            new[n] = part
        new = _keep_one_per_layer(new, us, uk)
    else:
        for n in masks:
            remaining = int(uk[n].sum())
            new[n] = _keep_top(us[n], uk[n], remaining - _round(fraction * remaining))
        new = _keep_one_per_layer(new, us, uk)
    return _from_units(new, masks, granularity, block)


def prune_to(scores, masks, target_sparsity: float, granularity="unstructured", block=(32, 32),
             nm=(2, 4), scope="global"):
    """One-shot: from `masks`, remove units until round(target * total) units are pruned."""
    if granularity == "nm":
        n_keep, m = nm
        out = {}
        for name, mask in masks.items():
            groups = nm_groups(mask, m, name)
            target = torch.clamp(torch.full_like(groups.sum(-1), _round(m * (1 - target_sparsity))),
                                 min=n_keep)
            target = torch.minimum(target, groups.sum(-1))
            out[name] = _keep_top_per_group(nm_groups(scores[name].float(), m, name), groups,
                                            target).reshape(mask.shape)
        return out
    us, uk = _units(scores, masks, granularity, block)
    if scope == "global":
        total = sum(u.numel() for u in uk.values())
        remaining = sum(int(u.sum()) for u in uk.values())
        keep = max(0, min(remaining, total - _round(target_sparsity * total)))
        names = list(masks)
        kept = _keep_top(torch.cat([us[n] for n in names]), torch.cat([uk[n] for n in names]),
                         keep)
        new = _keep_one_per_layer(dict(zip(names, kept.split([us[n].numel() for n in names]))),
                                  us, uk)
    else:
        new = {}
        for n in masks:
            keep = min(int(uk[n].sum()), uk[n].numel() - _round(target_sparsity * uk[n].numel()))
            new[n] = _keep_top(us[n], uk[n], max(keep, 0))
        new = _keep_one_per_layer(new, us, uk)
    return _from_units(new, masks, granularity, block)


# ----------------------------------------------------------------------------- baselines

def random_like(masks: dict[str, torch.Tensor], granularity: str = "unstructured",
                block=(32, 32), nm=(2, 4), generator: torch.Generator | None = None):
    """Random masks with each layer's count of kept units (and, for nm, each group's count):
    the random-ticket baseline at the same layerwise sparsity."""
    out = {}
    for name, mask in masks.items():
        if granularity == "nm":
            groups = nm_groups(mask, nm[1], name)
            scores = torch.rand(groups.shape, generator=generator)
            out[name] = _keep_top_per_group(scores, torch.ones_like(groups), groups.sum(-1)) \
                .reshape(mask.shape)
            continue
        us, uk = _units({name: mask.float()}, {name: mask}, granularity, block)
        scores = torch.rand(us[name].shape, generator=generator)
        kept = _keep_top(scores, torch.ones_like(uk[name]), int(uk[name].sum()))
        out[name] = _from_units({name: kept}, {name: mask}, granularity, block)[name]
    return out


def shuffle(masks: dict[str, torch.Tensor], granularity: str = "unstructured", block=(32, 32),
            nm=(2, 4), generator: torch.Generator | None = None):
    """Each layer's mask permuted within the layer (blocks for block masks, within each group of
    M for nm), so layerwise sparsity is kept and only the positions change."""
    out = {}
    for name, mask in masks.items():
        if granularity == "nm":
            groups = nm_groups(mask, nm[1], name)
            perm = torch.rand(groups.shape, generator=generator).argsort(-1)
            out[name] = groups.gather(-1, perm).reshape(mask.shape)
            continue
        _, uk = _units({name: mask.float()}, {name: mask}, granularity, block)
        perm = torch.randperm(uk[name].numel(), generator=generator)
        out[name] = _from_units({name: uk[name][perm]}, {name: mask}, granularity, block)[name]
    return out
