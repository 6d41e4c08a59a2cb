"""Modules over the sparse ops, and model-level conversion: sparsify / densify / report.

SparseLinear and SparseConv2d train their packed `values` (an nn.Parameter holding only the kept
weights), so gradients and optimizer state exist only for kept weights; the index tensors are
buffers. MaskedLinear and MaskedConv2d are the dense-kernel counterparts (fixed mask) that
`sparsify` keeps where the sparse kernels are not faster or cannot run.

A mask given by the user is the mask that trains. BSR stores whole blocks; when the mask is not
made of whole blocks (format="bsr" forced with a scattered mask), the module also holds a bool
`value_mask` buffer shaped like `values` and selects through it (`torch.where`, not a product:
an inf in x makes a pruned weight's gradient inf, and inf * 0 is NaN), so the weights inside a
kept block but outside the mask get no gradient and stay exactly zero under SGD (momentum,
weight decay), Adam and AdamW. format="auto" never needs it: BSR only for block-aligned masks,
else CSR. An N:M weight (format="nm") marks the free slots of groups that keep fewer than N in
its own `kept` buffer and selects through it in the same way; format="auto" picks it for a mask
that keeps exactly N of every M inputs (2:4, 1:4 or 4:8) and is not made of whole blocks.

A sparsified model's state_dict is enough to rebuild it: `load_sparse(skeleton, state_dict)`
turns the layers the state holds packed into the SparseLinear / SparseConv2d it describes.
"""
from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.formats import (BLOCK_SIZES, CSR, NM, BlockSparse, check_block, check_nm,
                                nm_group_counts)
from sparsekern.ops import conv_geometry, sparse_conv2d, sparse_linear
from sparsekern.timing import measure

FORMATS = ("auto", "bsr", "csr", "nm")
NM_PATTERNS = ((2, 4), (1, 4), (4, 8))  # what format="auto" recognises, in order of preference
POLICIES = ("auto", "sparse", "dense")


# ---------------------------------------------------------------------------------- packing

def as_mask(mask, who: str = "mask") -> torch.Tensor | None:
    """A bool mask; float/int 0/1 masks (torch.nn.utils.prune's `weight_mask`) are converted."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{who}: a non-bool mask must hold only 0 and 1, got dtype "
                         f"{mask.dtype} with other values")
    return mask != 0


def pruned_to_zero(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`weight` with the positions outside the bool `mask` exactly zero, and no gradient there.
    A select, not `weight * mask`: an inf or NaN at a pruned position (one inf in x makes its
    gradient inf) times 0 is NaN, which would then stay in the pruned weight for good."""
    return torch.where(mask, weight, 0.0)

def _layer_mask(mask, layer: nn.Module, who: str) -> torch.Tensor:
    """A masked layer's bool mask, shaped like its weight (never broadcast into it)."""
    mask = as_mask(mask, f"{who}: mask")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(layer.weight.shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{who}: mask must be a tensor shaped like the weight "
                         f"{tuple(layer.weight.shape)}, got {got}")
    return mask.to(layer.weight.device).clone()


def keep_frozen(weight: nn.Parameter, bias: nn.Parameter | None, layer: nn.Module) -> None:
    """The parameters standing for `layer`'s train only where its own did: a frozen weight or
    bias (requires_grad=False) stays frozen through sparsify and from_dense."""
    weight.requires_grad_(layer.weight.requires_grad)
    if bias is not None and layer.bias is not None:
        bias.requires_grad_(layer.bias.requires_grad)


def _channel_view(mask: torch.Tensor) -> torch.Tensor | None:
    """The 2-D pattern a BSR block sees: the mask itself for a linear weight; for a conv weight
    [C_out, C_in, kh, kw] the [C_out, C_in] channel pattern, or None when some channel pair keeps
    only part of its kh x kw window (then no channel block packs the mask exactly)."""
    if mask.dim() != 4:
        return mask
    channels = mask.flatten(2).any(dim=2)
    if not torch.equal(channels[:, :, None, None].expand_as(mask), mask):
        return None
    return channels


def _closed_under(pattern: torch.Tensor, block) -> bool:
    """Whether the (bn, bk) block closure of a 2-D bool pattern is the pattern itself."""
    bn, bk = block
    n, k = pattern.shape
    nb, kb = -(-n // bn), -(-k // bk)
    padded = pattern.new_zeros(nb * bn, kb * bk)
    padded[:n, :k] = pattern
    present = padded.view(nb, bn, kb, bk).any(dim=3).any(dim=1)
    closure = present[:, None, :, None].expand(nb, bn, kb, bk).reshape(nb * bn, kb * bk)
    return bool((closure[:n, :k] == pattern).all())


def is_block_aligned(mask: torch.Tensor, block) -> bool:
    """Whether BSR with `block` stores exactly `mask` (for a conv: channel blocks over the whole
    kh x kw window)."""
    pattern = _channel_view(mask)
    return pattern is not None and _closed_under(pattern, block)


def _aligned_block(mask: torch.Tensor) -> tuple[int, int] | None:
    """The largest block (bn, bk) whose block closure of `mask` is `mask` itself, if any: a
    ticket pruned in whole blocks of that shape runs on the BSR kernels without extra weights.
    For a conv weight the blocks are of channels spanning the whole kh x kw window."""
    pattern = _channel_view(mask)
    if pattern is None:
        return None
    for block in sorted(((bn, bk) for bn in BLOCK_SIZES for bk in BLOCK_SIZES),
                        key=lambda b: (-b[0] * b[1], -b[0])):
        if _closed_under(pattern, block):
            return block
    return None


def _nm_fits(mask: torch.Tensor, nm, exactly: bool) -> bool:
    """Whether `mask` keeps at most N of every M consecutive inputs of each row ((rows, K)
    view); exactly: every full group keeps exactly N (and there is one), a ragged tail at most
    N."""
    n, m = nm
    counts = nm_group_counts(mask, m)
    if not exactly:
        return bool((counts <= n).all())
    full = math.prod(mask.shape[1:]) // m
    return (full > 0 and mask.shape[0] > 0 and bool((counts[:, :full] == n).all())
            and bool((counts[:, full:] <= n).all()))


def nm_pattern(mask: torch.Tensor, candidates=NM_PATTERNS, exactly: bool = True):
    """The first (n, m) of `candidates` that `mask` follows (see _nm_fits), or None."""
    return next((nm for nm in candidates if _nm_fits(mask, nm, exactly)), None)


def pack(weight: torch.Tensor, mask: torch.Tensor | None, format: str = "auto",
         block=None, nm=None) -> BlockSparse | CSR | NM:
    """Packs a dense linear [out, in] or conv [C_out, C_in, kh, kw] weight.

    format="auto": BSR when the mask is made of whole blocks (`block` if given, else the largest
    fitting block shape), else NM when it keeps exactly N of every M inputs (`nm` if given, else
    2:4, 1:4 or 4:8), else CSR. format="bsr": `block`, else the largest fitting block, else
    (32, 32); the stored pattern is then the block closure of the mask (see `value_mask`).
    format="nm": `nm`, else the first of 2:4, 1:4, 4:8 that the mask follows exactly, else the
    first it fits (at most N per group); a mask that fits none is an error. `block` goes with
    "bsr" / "auto" only, `nm` with "nm" / "auto": either given to another format is an error."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if nm is not None:
        try:
            nm = tuple(nm)
            if len(nm) != 2:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"nm must be a pair (n, m), got {nm!r}") from None
        nm = check_nm(*nm, "nm")
    # An argument the chosen format would ignore is an error, not a silent no-op.
    if block is not None:
        if format not in ("auto", "bsr"):
            raise ValueError(f"block={block!r} applies to format='bsr' or 'auto', not {format!r}")
        block = check_block(block)
    if nm is not None and format not in ("auto", "nm"):
        raise ValueError(f"nm={nm!r} applies to format='nm' or 'auto', not {format!r}")
    mask = weight.detach() != 0 if mask is None else as_mask(mask)
    same_shape = isinstance(mask, torch.Tensor) and mask.shape == weight.shape
    candidates = NM_PATTERNS if nm is None else (nm,)
    if format == "auto":
        if block is None:
            block = _aligned_block(mask) if same_shape else None
        elif same_shape and not is_block_aligned(mask, block):
            block = None
        if block is not None:
            format = "bsr"
        else:
            nm = nm_pattern(mask, candidates) if same_shape else None
            format = "csr" if nm is None else "nm"
    if format == "nm":
        if nm is None and same_shape:
            nm = nm_pattern(mask) or nm_pattern(mask, exactly=False)
            if nm is None:
                counts = {f"{n}:{m}": int(nm_group_counts(mask, m).max()) for n, m in NM_PATTERNS}
                raise ValueError(f"format='nm': mask keeps more than N of some group of M for "
                                 f"every N:M of {counts} (most kept in a group); pass nm=(n, m) "
                                 f"or use format='csr'")
        return NM.from_dense(weight, mask, *(nm or (2, 4)))
    if format == "bsr":
        if block is None:
            block = (_aligned_block(mask) if same_shape else None) or (32, 32)
        return BlockSparse.from_dense(weight, mask, block=block)
    return CSR.from_dense(weight, mask)


def value_mask(packed: BlockSparse | CSR | NM, mask: torch.Tensor) -> torch.Tensor | None:
    """None when `packed` stores exactly `mask` (or, NM, marks it itself); else bool like
    packed.values, True where the stored value is inside `mask` (BSR of a mask that is not made
    of whole blocks)."""
    if isinstance(packed, (CSR, NM)) or torch.equal(packed.mask(), mask):
        return None
    ones = BlockSparse.from_dense(mask.to(packed.dtype), mask, block=packed.block)
    return ones.values != 0


# ---------------------------------------------------------------------------------- modules

_FORMAT_NAMES = {BlockSparse: "bsr", CSR: "csr", NM: "nm"}
_FORMAT_CLASSES = {name: cls for cls, name in _FORMAT_NAMES.items()}


def _plain_value(v):
    """Tuples as lists and integers (numpy's too) as int: how metadata compares whatever
    container it was saved in, and what torch.load(weights_only=True) reads back."""
    if isinstance(v, (list, tuple)):
        return [_plain_value(x) for x in v]
    return operator.index(v) if hasattr(v, "__index__") and not isinstance(v, bool) else v


def _describe(meta) -> str:
    if not isinstance(meta, dict):
        return repr(meta)
    nm = meta.get("nm")
    pattern = f" {nm[0]}:{nm[1]}" if nm else ""
    shape = tuple(meta.get("weight_shape") or ())
    return f"a {meta.get('format')}{pattern} weight of shape {shape}"


class _PackedWeight(nn.Module):
    """What SparseLinear and SparseConv2d share: the packed weight as `values` (the only
    parameter of the weight), its index tensors as buffers, an optional `value_mask`, and as
    `_extra_state` the metadata (format, shape, N:M, conv geometry) that `from_state_dict` and
    `load_sparse` rebuild a layer from. load_state_dict validates the incoming index (the
    transposed index against the forward one) before it copies anything. An NM weight's derived
    index (everything but col_idx and kept) is not saved: it is rebuilt from the loaded
    col_idx."""

    def _setup(self, weight, bias, value_mask, who: str):
        if type(weight) not in _FORMAT_NAMES:
            raise TypeError(f"{who}: weight must be a sparsekern.BlockSparse, CSR or NM, got "
                            f"{type(weight).__name__}")
        self.format = _FORMAT_NAMES[type(weight)]
        self.nm = weight.nm if isinstance(weight, NM) else None
        self.weight_shape = tuple(weight.shape)
        self.values = nn.Parameter(weight.values.detach().clone())
        self._index_names = tuple(n for n in weight.tensors() if n != "values")
        stored = getattr(weight, "_stored_names", self._index_names)
        for name in self._index_names:
            self.register_buffer(name, getattr(weight, name).clone(),
                                 persistent=name in stored)
        self.nm_padded = isinstance(weight, NM) and not bool(weight.kept.all())
        if value_mask is not None and (value_mask.dtype != torch.bool
                                       or value_mask.shape != weight.values.shape):
            raise ValueError(f"{who}: value_mask must be a bool tensor shaped like the values "
                             f"{tuple(weight.values.shape)}, got {value_mask.dtype} "
                             f"{tuple(value_mask.shape)}")
        self.register_buffer("value_mask", None if value_mask is None else value_mask.clone())
        if value_mask is not None:
            with torch.no_grad():  # outside the mask: exact zeros, and they stay so
                self.values.copy_(pruned_to_zero(self.values, self.value_mask))
        out = self.weight_shape[0]
        if bias is not None and tuple(bias.shape) != (out,):
            raise ValueError(f"{who}: bias must have shape ({out},), got {tuple(bias.shape)}")
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def index(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._index_names}

    # ---- state_dict: validated on load; metadata so that a layer rebuilds from it alone

    def _metadata(self) -> dict:
        """What rebuilding this layer needs besides its tensors; plain types only, so that
        torch.load(..., weights_only=True) reads it back."""
        return {"version": 1, "format": self.format, "weight_shape": list(self.weight_shape),
                "nm": None if self.nm is None else list(self.nm),
                "value_mask": self.value_mask is not None}

    def get_extra_state(self) -> dict:
        return self._metadata()

    def set_extra_state(self, state) -> None:
        """Refuses a state whose metadata differs from the one this layer saves (another
        format, shape, N:M pattern or conv geometry), naming the differing keys, before any
        tensor is copied (_load_from_state_dict calls this first)."""
        mine = self._metadata()
        theirs = {k: _plain_value(v) for k, v in state.items()} if isinstance(state, dict) else {}
        if isinstance(state, dict) and "value_mask" not in state:
            del mine["value_mask"]  # saved before the metadata recorded it (load_state_dict's
            # own missing / unexpected keys then tell whether the value_mask buffers agree)
        differing = sorted((k for k in mine.keys() | theirs.keys()
                            if theirs.get(k) != mine.get(k)), key=str)
        if differing:
            keys = ", ".join(f"{k!r} (state {theirs.get(k)!r}, layer {mine.get(k)!r})"
                             for k in differing)
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state's metadata "
                             f"differs from this layer's in {keys}: the state holds "
                             f"{_describe(state)}, this layer {_describe(mine)}; rebuild the "
                             f"layer from the state (sk.load_sparse or "
                             f"{type(self).__name__}.from_state_dict)")

    def _checked_format(self, tensors: dict) -> BlockSparse | CSR | NM:
        """The format over `tensors` (values and stored index), through its constructor: every
        index tensor validated, the transposed index against the forward one; NM derives its
        transposed index from col_idx."""
        tensors = {name: t.detach() for name, t in tensors.items()}
        if self.format == "nm":
            return NM(tensors["values"], tensors["col_idx"], tensors["kept"], self.weight_shape,
                      self.nm)
        cls = BlockSparse if self.format == "bsr" else CSR
        return cls(shape=self.weight_shape, **tensors)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        extra = prefix + "_extra_state"
        if extra in state_dict:
            self.set_extra_state(state_dict[extra])
        names = ("values", *(n for n in self._index_names if n in self._buffers
                             and n not in self._non_persistent_buffers_set))
        loaded = None
        if any(prefix + n in state_dict for n in names):
            # what the layer will hold: the loaded tensors, its own where the state has none
            incoming = {n: state_dict.get(prefix + n, getattr(self, n)) for n in names}
            try:
                loaded = self._checked_format(incoming)
            except ValueError as exc:
                raise ValueError(f"{type(self).__name__}.load_state_dict"
                                 f"{f' ({prefix[:-1]!r})' if prefix else ''}: {exc}") from None
        errors_before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if extra not in state_dict and extra in missing_keys:
            missing_keys.remove(extra)  # saved before the metadata existed: still loadable
        if self.format == "nm" and loaded is not None and len(error_msgs) == errors_before:
            derived = loaded.to(self.col_idx.device).tensors()
            for name in self._index_names:
                if name in self._non_persistent_buffers_set:
                    setattr(self, name, derived[name])
            self.nm_padded = not bool(self.kept.all())

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = "", layer: nn.Module | None = None):
        """The layer rebuilt from a state_dict saved from one (its keys under `prefix`), without
        the mask it was made from: format, shape, block, N:M (and a conv's stride, padding,
        dilation) come from the state; every index tensor is validated. `layer`: the dense
        nn.Linear / nn.Conv2d it stands for (a model skeleton's); checked against the state,
        and needed only for a state saved before sparsekern recorded its metadata
        (`_extra_state`): its shape and geometry are then used (BSR and CSR only)."""
        who = f"{cls.__name__}.from_state_dict"
        meta = state_dict.get(prefix + "_extra_state")
        if meta is None:
            meta = cls._metadata_of_layer(state_dict, prefix, layer, who)
        elif not isinstance(meta, dict):
            raise ValueError(f"{who}: {prefix}_extra_state must be the metadata dict a "
                             f"{cls.__name__} saves, got {type(meta).__name__} {meta!r}")
        elif layer is not None:
            cls._check_layer(meta, layer, who)
        saved_with = meta.get("value_mask")  # None: saved before the metadata recorded it
        if saved_with is not None and bool(saved_with) != (prefix + "value_mask" in state_dict):
            raise ValueError(f"{who}: the layer was saved {'with' if saved_with else 'without'} a "
                             f"value_mask (the mask inside its stored blocks or groups), but the "
                             f"state {'lacks' if saved_with else 'holds'} {prefix}value_mask")
        if layer is not None and (layer.bias is not None) != (prefix + "bias" in state_dict):
            has = layer.bias is not None
            raise ValueError(f"{who}: the model's layer {'has' if has else 'has no'} bias, the "
                             f"state {'lacks' if has else 'holds'} {prefix}bias")
        fmt = meta.get("format") if isinstance(meta, dict) else None
        shape = meta.get("weight_shape") if isinstance(meta, dict) else None
        if fmt not in _FORMAT_CLASSES or not isinstance(shape, (list, tuple)) \
                or len(shape) != cls._weight_dims:
            raise ValueError(f"{who}: {prefix}_extra_state must be the metadata of a "
                             f"{cls._weight_dims}-D {cls.__name__} weight (format one of "
                             f"{tuple(_FORMAT_CLASSES)}), got {meta!r}")
        format_cls = _FORMAT_CLASSES[fmt]
        names = getattr(format_cls, "_stored_names", format_cls._tensor_names)
        state = {name: state_dict[prefix + name] for name in names if prefix + name in state_dict}
        state["shape"] = torch.tensor(meta["weight_shape"], dtype=torch.int64)
        if meta.get("nm") is not None:
            state["nm"] = torch.tensor(meta["nm"], dtype=torch.int64)
        try:
            weight = format_cls.from_state_dict(state)
            return cls._from_packed(weight, state_dict.get(prefix + "bias"),
                                    state_dict.get(prefix + "value_mask"), meta)
        except ValueError as exc:
            raise ValueError(f"{who}{f' ({prefix[:-1]!r})' if prefix else ''}: {exc}") from None

    @classmethod
    def _metadata_of_layer(cls, state_dict, prefix, layer, who) -> dict:
        """The metadata of a state saved without it: the format from its keys, the rest from
        the dense layer it stands for."""
        if prefix + "kept" in state_dict:
            raise ValueError(f"{who}: the N:M state under {prefix!r} has no metadata "
                             f"({prefix}_extra_state), so its N:M pattern is unknown; it was "
                             f"saved before sparsekern recorded it: re-create it with sparsify")
        fmt = "bsr" if prefix + "block_row_ptr" in state_dict else "csr"
        if layer is None:
            raise ValueError(f"{who}: the state under {prefix!r} has no metadata "
                             f"({prefix}_extra_state: saved by an older sparsekern); pass "
                             f"layer=<the dense layer it stands for> (sk.load_sparse does)")
        return {"format": fmt, "weight_shape": list(layer.weight.shape), "nm": None,
                **cls._geometry_of(layer)}

    @classmethod
    def _check_layer(cls, meta: dict, layer: nn.Module, who: str):
        want = {"weight_shape": list(layer.weight.shape), **cls._geometry_of(layer)}
        have = {k: _plain_value(meta.get(k)) for k in want}
        if have != {k: _plain_value(v) for k, v in want.items()}:
            raise ValueError(f"{who}: the state holds a layer with {have}, the model's layer "
                             f"has {want}")

    @classmethod
    def _geometry_of(cls, layer) -> dict:
        return {}

    def _values(self) -> torch.Tensor:
        """The values the kernels use: pruned positions inside kept blocks (or an N:M group's
        free slots) forced to zero, so they get no gradient, when there are any."""
        if self.value_mask is not None:
            return pruned_to_zero(self.values, self.value_mask)
        return pruned_to_zero(self.values, self.kept) if self.nm_padded else self.values

    def _format(self, values) -> BlockSparse | CSR | NM:
        """The format over this layer's buffers, validated when they were built or loaded."""
        extra = {"n": self.nm[0], "m": self.nm[1]} if self.format == "nm" else {}
        return _FORMAT_CLASSES[self.format]._trusted(self.weight_shape, values=values,
                                                     **self.index(), **extra)

    def weight_format(self) -> BlockSparse | CSR | NM:
        """The current weight as a format object (sharing this module's index tensors)."""
        return self._format(self._values().detach())

    def dense_weight(self) -> torch.Tensor:
        return self.weight_format().to_dense()

    def mask(self) -> torch.Tensor:
        """Bool like the dense weight: the weights that train (the mask it was made from)."""
        if self.value_mask is None:
            return self.weight_format().mask()
        return self._format(self.value_mask.to(self.values.dtype)).to_dense() != 0

    def sparsity(self) -> float:
        return 1.0 - int(self.mask().sum()) / math.prod(self.weight_shape)

    def _format_repr(self) -> str:
        block = f", block={self.weight_format().block}" if self.format == "bsr" else ""
        block += f" {self.nm[0]}:{self.nm[1]}" if self.format == "nm" else ""
        inside = ", value_mask" if self.value_mask is not None else ""
        return f"format={self.format}{block}{inside}, sparsity={self.sparsity():.3f}"


class SparseLinear(_PackedWeight):
    """y = x W^T + b with W stored as BlockSparse, CSR or NM."""

    _weight_dims = 2

    def __init__(self, weight: BlockSparse | CSR | NM, bias: torch.Tensor | None = None,
                 value_mask: torch.Tensor | None = None):
        super().__init__()
        self._setup(weight, bias, value_mask, "SparseLinear")
        if len(self.weight_shape) != 2:
            raise ValueError(f"SparseLinear: weight must be made from a 2-D linear weight, got "
                             f"shape {self.weight_shape} (use SparseConv2d for a conv weight)")
        self.out_features, self.in_features = self.weight_shape

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None,
                   format: str = "auto", block=None, nm=None) -> "SparseLinear":
        """format: auto (BSR for a mask of whole blocks, else NM for an exact 2:4 / 1:4 / 4:8
        mask, else CSR), bsr, csr or nm (see `pack`). block: (bn, bk) output x input features;
        None = the largest block the mask is made of (bsr: else 32x32). nm: (n, m) for NM; None
        = found from the mask. mask: bool like the weight (float 0/1 accepted), None = the
        nonzeros."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: linear must be nn.Linear, got "
                            f"{type(linear).__name__}")
        mask = as_mask(mask)
        packed = pack(linear.weight, mask, format, block, nm)
        layer = cls(packed, linear.bias,
                    value_mask(packed, mask if mask is not None else linear.weight.detach() != 0))
        keep_frozen(layer.values, layer.bias, linear)
        return layer

    @classmethod
    def _from_packed(cls, weight, bias, value_mask, meta) -> "SparseLinear":
        return cls(weight, bias, value_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self._values(), self.index(),
                             (self.out_features, self.in_features), self.bias, self.nm)

    def to_linear(self) -> nn.Linear:
        return _linear_like(self, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self._format_repr()}, bias={self.bias is not None}")


def _check_conv(conv, who: str):
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{who}: conv must be nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"{who}: groups={conv.groups}: the sparse conv kernels need groups=1 "
                         f"(grouped/depthwise convs stay dense; sparsify keeps them as "
                         f"MaskedConv2d)")
    if conv.padding_mode != "zeros":
        raise ValueError(f"{who}: padding_mode={conv.padding_mode!r}: the sparse conv kernels "
                         f"pad with zeros only")


class SparseConv2d(_PackedWeight):
    """Conv2d (groups=1, zero padding) with its [C_out, C_in, kh, kw] weight stored as
    BlockSparse (blocks of (out_channels, in_channels) spanning the whole kh x kw window) or CSR
    (over the (C_out, C_in * kh * kw) view). Accepts NCHW or channels_last input (batched or
    not); the output is channels_last, the layout the kernels compute in, so a chain of sparse
    convs with BatchNorm/ReLU between them converts the layout once, at the first one."""

    _weight_dims = 4

    def __init__(self, weight: BlockSparse | CSR | NM, bias: torch.Tensor | None = None, stride=1,
                 padding=0, dilation=1, value_mask: torch.Tensor | None = None):
        super().__init__()
        self._setup(weight, bias, value_mask, "SparseConv2d")
        if len(self.weight_shape) != 4:
            raise ValueError(f"SparseConv2d: weight must be made from a 4-D conv weight "
                             f"[C_out, C_in, kh, kw], got shape {self.weight_shape}")
        self.out_channels, self.in_channels, kh, kw = self.weight_shape
        self.kernel_size = (kh, kw)
        try:  # checked here, not first at the forward: a state_dict's geometry too
            conv_geometry(stride, padding, dilation, self.kernel_size)
        except ValueError as exc:
            raise ValueError(f"SparseConv2d: {exc}") from None
        self.stride, self.padding, self.dilation = stride, padding, dilation

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None,
                   format: str = "auto", block=None, nm=None) -> "SparseConv2d":
        """format: auto (BSR for a mask of whole channel blocks, else NM for an exact 2:4 / 1:4
        / 4:8 mask over the (C_out, C_in * kh * kw) view, else CSR), bsr, csr or nm (see
        `pack`). block: (out_channels, in_channels) per block, each spanning the kh x kw window;
        None = the largest block the mask is made of (bsr: else 32x32). nm: (n, m) for NM; None
        = found from the mask. mask: bool like the 4-D weight (float 0/1 accepted), None = the
        nonzeros. stride, padding, dilation are kept."""
        _check_conv(conv, "SparseConv2d.from_dense")
        mask = as_mask(mask)
        packed = pack(conv.weight, mask, format, block, nm)
        layer = cls(packed, conv.bias, conv.stride, conv.padding, conv.dilation,
                    value_mask(packed, mask if mask is not None else conv.weight.detach() != 0))
        keep_frozen(layer.values, layer.bias, conv)
        return layer

    def _metadata(self) -> dict:
        return {**super()._metadata(), "stride": _plain_value(self.stride),
                "padding": _plain_value(self.padding), "dilation": _plain_value(self.dilation)}

    @classmethod
    def _geometry_of(cls, layer) -> dict:
        return {k: _plain_value(getattr(layer, k)) for k in ("stride", "padding", "dilation")}

    @classmethod
    def _from_packed(cls, weight, bias, value_mask, meta) -> "SparseConv2d":
        geometry = [tuple(g) if isinstance(g, list) else g
                    for g in (meta["stride"], meta["padding"], meta["dilation"])]
        return cls(weight, bias, *geometry, value_mask=value_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_conv2d(x, self._values(), self.index(), self.weight_shape, self.bias,
                             self.stride, self.padding, self.dilation, self.nm)

    def to_conv(self) -> nn.Conv2d:
        return _conv_like(self, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"{self._format_repr()}, bias={self.bias is not None}")


class MaskedLinear(nn.Linear):
    """Dense kernels with a fixed mask: what `sparsify` keeps where sparse is not faster.
    Pruned weights take no part in the output, so they get no gradient from the loss."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.register_buffer("weight_mask", _layer_mask(mask, linear, "MaskedLinear"))
        with torch.no_grad():
            self.weight.copy_(pruned_to_zero(linear.weight, self.weight_mask))
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        keep_frozen(self.weight, self.bias, linear)

    def forward(self, x):
        return F.linear(x, pruned_to_zero(self.weight, self.weight_mask), self.bias)

    def mask(self) -> torch.Tensor:
        return self.weight_mask

    def to_linear(self) -> nn.Linear:
        return _linear_like(self, pruned_to_zero(self.weight.detach(), self.weight_mask), self.bias)


class MaskedConv2d(nn.Conv2d):
    """A Conv2d (any groups / padding mode) with a fixed mask: pruned weights take no part in
    the output, so they get no gradient; they are stored as exact zeros."""

    def __init__(self, conv: nn.Conv2d, mask: torch.Tensor):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                         conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        self.register_buffer("weight_mask", _layer_mask(mask, conv, "MaskedConv2d"))
        with torch.no_grad():
            self.weight.copy_(pruned_to_zero(conv.weight, self.weight_mask))
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        keep_frozen(self.weight, self.bias, conv)

    def forward(self, x):
        return self._conv_forward(x, pruned_to_zero(self.weight, self.weight_mask), self.bias)

    def mask(self) -> torch.Tensor:
        return self.weight_mask

    def to_conv(self) -> nn.Conv2d:
        return _conv_like(self, pruned_to_zero(self.weight.detach(), self.weight_mask), self.bias)


def _linear_like(module, weight, bias) -> nn.Linear:
    out = nn.Linear(module.in_features, module.out_features, bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _conv_like(module, weight, bias) -> nn.Conv2d:
    out = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                    module.padding, module.dilation, getattr(module, "groups", 1),
                    bias is not None, getattr(module, "padding_mode", "zeros"),
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


# ---------------------------------------------------------------------------------- sparsify

_LINEAR = (nn.Linear, MaskedLinear, SparseLinear)
_CONV = (nn.Conv2d, MaskedConv2d, SparseConv2d)


def _kind(module: nn.Module) -> str | None:
    """linear / conv for the layers sparsify converts (plain or already converted), else None;
    subclasses of nn.Linear / nn.Conv2d other than sparsekern's are not converted."""
    if type(module) in _LINEAR:
        return "linear"
    if type(module) in _CONV:
        return "conv"
    return None


def _plain(module: nn.Module) -> nn.Module:
    """The plain nn.Linear / nn.Conv2d a converted layer stands for (zeros where pruned)."""
    if isinstance(module, (SparseLinear, MaskedLinear)):
        return module.to_linear()
    if isinstance(module, (SparseConv2d, MaskedConv2d)):
        return module.to_conv()
    return module


def _dense_reason(module: nn.Module) -> str | None:
    """Why a layer cannot run on the sparse kernels, or None."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return (f"groups={module.groups}: the sparse conv kernels need groups=1 (grouped / "
                    f"depthwise convs stay dense)")
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}: the sparse conv kernels pad with zeros"
    return None


def _train_step_fn(module: nn.Module, x: torch.Tensor):
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()
    return step


def _masked(module: nn.Module, mask: torch.Tensor) -> nn.Module:
    return MaskedConv2d(module, mask) if isinstance(module, nn.Conv2d) else MaskedLinear(module,
                                                                                          mask)


def _choose(module, sparse, mask, x: torch.Tensor, repeats: int):
    """Times a training step both ways, interleaved until the dense/sparse ratio settles
    (sparsekern.timing.measure: 5 to `repeats` rounds), and picks the faster."""
    dense = _masked(module, mask)
    params = [*dense.parameters(), *sparse.parameters()]
    grads = [p.grad for p in params]  # the timing steps must not leave gradients behind
    measured = measure({"dense": _train_step_fn(dense, x), "sparse": _train_step_fn(sparse, x)},
                       warmup=2, max_rounds=repeats)
    for p, g in zip(params, grads):
        p.grad = g
    times = measured.seconds
    chosen = "sparse" if times["sparse"] < times["dense"] else "dense"
    return chosen, dense, measured


def _timing_inputs(model: nn.Module, names, example_input, batch_size: int) -> dict:
    """{layer name: the input its timing uses}. With an example input: what the layer really
    receives in model(example_input), including whether it needs a gradient (the first layer's
    input usually does not, so its dX is not timed). Without: batch_size random rows that need
    a gradient (linear layers only: a conv's spatial size is not known from its weight), from a
    private generator so the caller's random stream is untouched."""
    modules = dict(model.named_modules())
    if example_input is None:
        out = {}
        for name in names:
            module = modules[name]
            if isinstance(module, nn.Conv2d):
                raise ValueError(f"sparsify: policy='auto' times each layer on its input; conv "
                                 f"layer {name!r} needs example_input=<a batch for the model> "
                                 f"(or pass policy='sparse' / 'dense')")
            w = module.weight
            generator = torch.Generator(device=w.device).manual_seed(0)
            out[name] = torch.randn(batch_size, module.in_features, device=w.device,
                                    dtype=w.dtype, generator=generator, requires_grad=True)
        return out
    seen = {}
    hooks = [modules[name].register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, args[0]))
        for name in names]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # no side effects: batch-norm statistics stay as they are, dropout draws nothing
    try:
        with torch.enable_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes:
            m.training = training
    missing = sorted(set(names) - set(seen))
    if missing:
        raise ValueError(f"sparsify: example_input never reached layers {missing}")
    return {name: x.detach().clone().requires_grad_(x.requires_grad) for name, x in seen.items()}


def _targets(model: nn.Module, masks) -> dict[str, torch.Tensor]:
    """{layer name: bool mask} of the layers to convert, checked against the model."""
    modules = dict(model.named_modules())
    if masks is None:
        targets, subclassed = {}, []
        for name, module in modules.items():
            plain = type(module) in (nn.Linear, nn.Conv2d)
            foreign = isinstance(module, (nn.Linear, nn.Conv2d)) and _kind(module) is None
            if not (plain or foreign):
                continue
            mask = module.weight.detach() != 0
            if bool(mask.all()):
                continue
            if plain:
                targets[name] = mask
            else:
                subclassed.append(f"{name} ({type(module).__name__})")
        if subclassed:
            warnings.warn(f"sparsify: not converted, as subclasses of nn.Linear / nn.Conv2d: "
                          f"{', '.join(subclassed)}; they hold zeros but stay as they are "
                          f"(naming one in masks= is an error)", UserWarning, stacklevel=3)
        return targets
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict {{'<layer>.weight': bool mask}} (or None), got "
                        f"{type(masks).__name__}")
    known = {f"{n}.weight" for n, m in modules.items() if _kind(m)}
    unknown = sorted(set(masks) - known)
    if unknown:
        for key in unknown:
            module = modules.get(key[: -len(".weight")] if key.endswith(".weight") else None)
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                raise ValueError(f"masks: layer {key[:-len('.weight')]!r} is a "
                                 f"{type(module).__name__} (a subclass of nn.Linear / "
                                 f"nn.Conv2d); sparsify converts plain nn.Linear / nn.Conv2d "
                                 f"layers only")
        raise ValueError(f"masks: no nn.Linear / nn.Conv2d weight named {unknown}; known: "
                         f"{sorted(known)}")
    targets = {}
    for key, mask in masks.items():
        name = key[: -len(".weight")]
        mask = as_mask(mask, f"masks[{key!r}]")
        module = modules[name]
        shape = tuple(module.weight_shape if isinstance(module, _PackedWeight)
                      else module.weight.shape)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
            raise ValueError(f"masks[{key!r}]: shape {tuple(getattr(mask, 'shape', ()))} does "
                             f"not match the weight's {shape}")
        targets[name] = mask
    return targets


def _after_sparse_conv(model: nn.Module, order: list[str], name: str) -> bool:
    """Whether a SparseConv2d comes before layer `name` in module order (for the usual models,
    forward order): its channels_last output then reaches `name`."""
    return any(isinstance(model.get_submodule(n), SparseConv2d)
               for n in order[1: order.index(name)] if n)


def sparsify(model: nn.Module, masks: dict[str, torch.Tensor] | None = None,
             format: str = "auto", policy: str = "auto", block=None, batch_size: int = 256,
             repeats: int = 12, example_input=None, nm=None) -> nn.Module:
    """Replaces the pruned nn.Linear and nn.Conv2d layers of `model` (in place) and returns it.

    masks: {"<layer>.weight": bool tensor like the weight}; layers not named stay as they are
    (BatchNorm and everything else is never touched). A layer that an earlier call converted is
    converted again with the new mask. None: every plain nn.Linear / nn.Conv2d with zeros in its
    weight is pruned where it is zero (subclasses stay as they are, with a warning naming them).
    format and block (and nm, for N:M) as in `pack`: format="auto" packs each layer as BSR, NM or
    CSR by its mask. policy="auto" times a training step of each layer both ways, interleaved until
    the dense/sparse ratio settles (5 to `repeats` rounds; the decision's `timing` says how many,
    and whether the machine was busy), and keeps the faster; "sparse" / "dense" force the choice.
    Grouped / depthwise convs (and padding modes other than zeros) stay dense (MaskedConv2d) under
    every policy, with the reason in their decision. The timing input is what each layer receives in
    model(example_input) when one is given (a real batch: its size, and no dX for a layer whose
    input needs no gradient), else batch_size random rows (linear layers; conv layers need
    example_input). Each decision is readable afterwards via `decisions(model)` and printable via
    `report(model)`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    targets = _targets(model, masks)
    for name in targets:  # converted earlier: back to the plain layer the new mask applies to
        module = model.get_submodule(name)
        if _plain(module) is not module:
            _set_submodule(model, name, _plain(module))
    timed = [n for n in targets if _dense_reason(model.get_submodule(n)) is None]
    inputs = (_timing_inputs(model, timed, example_input, batch_size)
              if policy == "auto" and timed else {})
    order = [n for n, _ in model.named_modules()]
    for name in sorted(targets, key=order.index):  # forward order (module order) for layouts
        mask = targets[name]
        module = model.get_submodule(name)
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        decision = {"name": name, "kind": kind, "shape": list(module.weight.shape),
                    "sparsity": 1.0 - int(mask.sum()) / mask.numel()}
        reason = _dense_reason(module)
        if reason is not None:
            chosen, sparse, dense = "dense", None, _masked(module, mask)
            decision.update(format="dense", reason=reason)
        else:
            cls = SparseConv2d if kind == "conv" else SparseLinear
            try:
                sparse = cls.from_dense(module, mask, format=format, block=block, nm=nm)
            except ValueError as exc:  # e.g. format="nm" with a mask that is not N:M
                raise ValueError(f"sparsify: layer {name!r}: {exc}") from None
            decision["format"] = sparse.format
            if sparse.format == "bsr":
                decision["block"] = list(sparse.weight_format().block)
            if sparse.format == "nm":
                decision["nm"] = list(sparse.nm)
            if policy == "auto":
                x = inputs[name]
                if kind == "conv" and x.dim() == 4 and _after_sparse_conv(model, order, name):
                    # a sparse conv upstream hands on channels_last (BatchNorm, ReLU and dense
                    # convs keep it): time both candidates on the layout they will receive
                    x = x.detach().contiguous(memory_format=torch.channels_last)
                    x.requires_grad_(inputs[name].requires_grad)
                try:
                    chosen, dense, measured = _choose(module, sparse, mask, x, repeats)
                    decision.update(dense_ms=measured.seconds["dense"] * 1e3,
                                    sparse_ms=measured.seconds["sparse"] * 1e3,
                                    timing=measured.record(),
                                    timed_input=list(x.shape),
                                    timed_layout="channels_last" if x.dim() == 4 and
                                    not x.is_contiguous() else "contiguous",
                                    timed_grad_input=x.requires_grad)
                except NotImplementedError as exc:  # no kernel for this format on this device
                    chosen, dense = "dense", _masked(module, mask)
                    decision["reason"] = str(exc).splitlines()[0]
            else:
                chosen, dense = policy, _masked(module, mask) if policy == "dense" else None
        decision["chosen"] = chosen
        replacement = sparse if chosen == "sparse" else dense
        replacement.sparsekern_decision = decision
        _set_submodule(model, name, replacement)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Replaces every SparseLinear / MaskedLinear / SparseConv2d / MaskedConv2d (in place) by
    the plain nn.Linear / nn.Conv2d with zeros where pruned, and returns the model."""
    for name, module in list(model.named_modules()):
        if _plain(module) is not module:
            _set_submodule(model, name, _plain(module))
    return model


def load_sparse(model: nn.Module, state_dict: dict, strict: bool = True) -> nn.Module:
    """Rebuilds a sparsified model from its state_dict alone (no masks), in place, and returns
    it. `model` is the architecture: a dense skeleton (plain nn.Linear / nn.Conv2d; an already
    sparsified model works too); `state_dict` one saved from its sparsified version
    (torch.load(..., weights_only=True) reads it). Every Linear / Conv2d whose state is packed
    becomes the SparseLinear / SparseConv2d that state describes (format, block, N:M and shape
    from its metadata, index validated; see SparseLinear.from_state_dict), on the skeleton
    layer's device and dtype; one saved as MaskedLinear / MaskedConv2d (its `weight_mask`)
    becomes one with that mask; the others become plain layers. Everything else (biases,
    BatchNorm statistics, ...) is then loaded as model.load_state_dict(state_dict, strict)
    would; strict: keys missing from the state or unknown to the model are an error."""
    rebuilt, ignored = [], []  # ignored: keys under a rebuilt layer that it does not hold
    for name, module in list(model.named_modules()):
        kind = _kind(module)
        if kind is None:
            continue
        prefix = f"{name}." if name else ""
        plain = _plain(module)
        if prefix + "values" in state_dict:
            cls = SparseConv2d if kind == "conv" else SparseLinear
            try:
                new = cls.from_state_dict(state_dict, prefix, layer=plain)
            except ValueError as exc:
                raise ValueError(f"load_sparse: layer {name!r}: {exc}") from None
            new = new.to(device=plain.weight.device, dtype=plain.weight.dtype)
            rebuilt.append(prefix)
            known = {prefix + k for k in new.state_dict()}
            ignored += [k for k in state_dict if k.startswith(prefix) and k not in known]
        elif prefix + "weight_mask" in state_dict:
            mask = as_mask(state_dict[prefix + "weight_mask"], f"{prefix}weight_mask")
            if tuple(mask.shape) != tuple(plain.weight.shape):
                raise ValueError(f"load_sparse: layer {name!r}: {prefix}weight_mask has shape "
                                 f"{tuple(mask.shape)}, the layer's weight "
                                 f"{tuple(plain.weight.shape)}")
            new = _masked(plain, mask.to(plain.weight.device))
        else:
            new = plain
        if new is not module:
            _set_submodule(model, name, new)
    # the rebuilt layers hold their state already (validated once, in from_state_dict)
    owned = tuple(rebuilt)
    rest = {k: v for k, v in state_dict.items() if not (owned and k.startswith(owned))}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not (owned and k.startswith(owned))]
    unexpected = ignored + unexpected
    if strict and (missing or unexpected):
        raise ValueError(f"load_sparse: the state_dict does not fit the model: missing keys "
                         f"{missing}, unexpected keys {unexpected}")
    return model


def decisions(model: nn.Module) -> dict[str, dict]:
    """{layer name: what sparsify decided and measured} for every converted layer."""
    return {name: dict(m.sparsekern_decision) for name, m in model.named_modules()
            if hasattr(m, "sparsekern_decision")}


def report(model: nn.Module) -> str:
    """The decisions of `sparsify` as a printable table, one row per converted layer: name,
    kind, weight shape, sparsity, format, measured dense / sparse ms of a training step, choice
    (and why a layer stayed dense when it cannot run sparse)."""
    rows = []
    for name, d in decisions(model).items():
        fmt = d["format"] + (f" {d['block'][0]}x{d['block'][1]}" if "block" in d else "")
        fmt += f" {d['nm'][0]}:{d['nm'][1]}" if "nm" in d else ""
        ms = [f"{d[k]:.3f}" if k in d else "-" for k in ("dense_ms", "sparse_ms")]
        speedup = f"{d['dense_ms'] / d['sparse_ms']:.2f}x" if "dense_ms" in d else "-"
        note = d.get("reason", "")
        if d.get("timing", {}).get("busy"):
            note = "; ".join(filter(None, [note, "timed on a busy machine"]))
        rows.append([name, d["kind"], "x".join(map(str, d["shape"])),
                     f"{100 * d['sparsity']:.1f}%", fmt, *ms, speedup, d["chosen"], note])
    header = ["layer", "kind", "shape", "sparsity", "format", "dense ms", "sparse ms",
              "speedup", "chosen", "note"]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class _LeafTracer(torch.fx.Tracer):
    """Traces a model down to its modules, never into sparsekern's or torch's layers."""

    def is_leaf_module(self, module, qualified_name):
        return isinstance(module, (_PackedWeight, MaskedLinear, MaskedConv2d)) or \
            super().is_leaf_module(module, qualified_name)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """For inference: folds every BatchNorm2d that directly follows a conv layer (SparseConv2d,
    MaskedConv2d or nn.Conv2d, whose output goes nowhere else) into that conv, in place, and
    replaces the BatchNorm by nn.Identity. The conv then carries weight * gamma / sqrt(var + eps)
    (same mask, same format) and bias beta + (bias - mean) * gamma / sqrt(var + eps): one pass
    over the activations less per layer. The model must be in eval mode (the running statistics
    are folded) and traceable by torch.fx; returns the model and the names folded as
    `model.sparsekern_folded` ([(conv, batchnorm), ...])."""
    if model.training:
        raise ValueError("fold_batchnorm: the model is in training mode; call model.eval() "
                         "first (folding uses the BatchNorm running statistics)")
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (not isinstance(source, torch.fx.Node) or source.op != "call_module"
                or len(source.users) != 1):
            continue
        conv, bn = modules[source.target], modules[node.target]
        if not isinstance(conv, (SparseConv2d, nn.Conv2d)) or bn.running_mean is None:
            continue
        _set_submodule(model, source.target, _fold(conv, bn))
        _set_submodule(model, node.target, nn.Identity())
        folded.append((source.target, node.target))
    model.sparsekern_folded = folded
    return model


def _fold(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
            1.0 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(scale)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        new_bias = shift + (bias - bn.running_mean) * scale
        if isinstance(conv, SparseConv2d):
            mask = conv.mask()
            weight = conv.dense_weight() * scale.view(-1, 1, 1, 1)
            block = conv.weight_format().block if conv.format == "bsr" else None
            packed = pack(weight, mask, conv.format, block, conv.nm)
            out = SparseConv2d(packed, new_bias, conv.stride, conv.padding, conv.dilation,
                               value_mask(packed, mask))
        else:
            out = _conv_like(conv, conv.weight * scale.view(-1, 1, 1, 1), new_bias)
            if isinstance(conv, MaskedConv2d):
                out = MaskedConv2d(out, conv.mask())
    if hasattr(conv, "sparsekern_decision"):
        out.sparsekern_decision = {**conv.sparsekern_decision, "folded_batchnorm": True}
    return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    if not name:
        raise ValueError("sparsify/densify: the model itself is a Linear/Conv2d layer; wrap it "
                         "in a container (e.g. nn.Sequential) to convert it in place")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
