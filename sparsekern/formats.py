"""Sparse weight formats: what a pruned weight is packed into. A linear weight is
[out_features, in_features]; a conv2d weight [C_out, C_in, kh, kw] is packed over its
(C_out, C_in * kh * kw) view, with the layouts given below.

BlockSparse (BSR)
    Only blocks holding at least one kept weight are stored. ``values[nnz_blocks, bk, bn]`` holds
    each block *transposed* (K-major): the forward microkernel multiplies one input feature by a
    contiguous run of output features, so the block is read row by row without a per-call
    transpose (a departure from DESIGN.md's ``[nnz_blocks, bn, bk]``, see README). Block-CSR index
    over block rows: ``block_row_ptr[Nb+1]``, ``block_col_idx[nnz_blocks]``; the transposed index
    that dX needs, built once: ``block_col_ptr[Kb+1]``, ``block_row_idx``, ``block_perm`` (stored
    block id of the i-th block in column order). Ragged weights are padded to whole blocks.

CSR (unstructured)
    ``values[nnz]``, ``row_ptr[N+1]``, ``col_idx[nnz]``; transposed index ``col_ptr[K+1]``,
    ``row_idx[nnz]``, ``perm[nnz]`` (value position of the i-th entry in column order).

Conv2d weights (4-D)
    BlockSparse: a block is ``(bn, bk) = (out_channels, in_channels)`` of channels spanning the
    whole kh x kw window, so block pruning removes whole channel blocks and the kernel multiplies
    a kept block for every tap. ``values[nnz_blocks, kh, kw, bk, bn]``: per block, per tap, the
    same transposed [bk][bn] tile as a linear block (input channels major, a contiguous run of
    output channels). The block index is over (C_out / bn) x (C_in / bk) channel blocks.
    CSR: the linear CSR of the (C_out, C_in * kh * kw) view, column = ci * kh * kw + dh * kw + dw
    (torch's flattening order).

N:M (NM)
    Keeps at most N of every M consecutive input weights of each row (along K = in_features, or
    C_in * kh * kw for a conv). Every group of M owns exactly N *slots* (a ragged tail group of
    r = K mod M inputs owns min(N, r)), so every row stores the same count
    S = (K // M) * N + min(N, K mod M) and the format is a CSR with regular rows:
    ``values[rows, S]`` (a row's slots group by group, columns ascending within a group),
    ``col_idx[rows * S]`` and ``kept[rows, S]`` (bool: the slot holds a weight of the mask).
    A group that keeps fewer than N weights fills its free slots with unkept columns of the
    group (lowest first) holding exact zeros, ``kept`` False. The CSR index the kernels read
    (``row_ptr = arange(rows + 1) * S``, and the transposed ``col_ptr``, ``row_idx``, ``perm``)
    is derived from ``col_idx`` on construction, never serialized, so the CPU runs the CSR
    kernels on ``values.view(-1)`` with no copy. For 2:4 with rows a multiple of 32 and K of 64,
    ``values`` *is* CUTLASS's packed [rows, K / 2] operand of torch's semi-structured matmul;
    ``semi_structured_meta`` (int16, CUTLASS's reordered metadata, built once from col_idx) is
    the rest of it.

All indices are int32. ``values`` is what a module trains; the indices never change. The
constructors validate every index they are given (range, order, no duplicates, and the
transposed index against the forward one: an inconsistent one would give a wrong dX); an index
they are not given they build.
"""
from __future__ import annotations

import math
import operator

import torch

BLOCK_SIZES = (8, 16, 32, 64)


def _check_shape(shape, who: str) -> tuple[int, ...]:
    """(out, in) or (C_out, C_in, kh, kw) of integers >= 0 (operator.index: 16.7 is refused,
    not truncated)."""
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        dims = None
    if dims is None or len(dims) not in (2, 4) or min(dims) < 0:
        raise ValueError(f"{who}: shape must be (out, in) or (C_out, C_in, kh, kw) of integers "
                         f">= 0, got {shape!r}")
    return dims


def _check_values(values, who: str, layout: str) -> None:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise ValueError(f"{who}: values must be a floating-point {layout} tensor, got "
                         f"{getattr(values, 'dtype', type(values).__name__)}")


def _check_weight_and_mask(weight: torch.Tensor, mask: torch.Tensor | None, who: str):
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        raise ValueError(f"{who}: weight must be a 2-D linear weight [out_features, in_features] "
                         f"or a 4-D conv weight [C_out, C_in, kh, kw], got "
                         f"{tuple(getattr(weight, 'shape', ())) or type(weight).__name__}")
    if not weight.is_floating_point():
        raise ValueError(f"{who}: weight must be floating point, got dtype {weight.dtype}")
    if weight.is_meta:  # which weights are kept depends on values a meta tensor does not have
        raise ValueError(f"{who}: weight is on the meta device: packing needs its values; pack "
                         f"on a real device, then .to('meta')")
    if mask is None:
        return weight.detach(), weight.detach() != 0
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{who}: mask must be a bool tensor, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != weight.shape:
        raise ValueError(f"{who}: mask shape {tuple(mask.shape)} does not match weight shape "
                         f"{tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{who}: mask is on {mask.device} but weight is on {weight.device}")
    return weight.detach(), mask


def expand_ptr(ptr: torch.Tensor) -> torch.Tensor:
    """[R+1] compressed pointer -> the row of every stored entry."""
    counts = (ptr[1:] - ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device), counts)


def compressed_ptr(counts: torch.Tensor) -> torch.Tensor:
    """Entries per row -> the int32 row pointer; more than an int32 can index is refused, as
    the cast would wrap the pointer around instead."""
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    if int(ptr[-1]) >= 2**31:
        raise ValueError(f"{int(ptr[-1])} stored entries exceed the int32 index range of the "
                         f"formats; split the layer")
    return ptr.to(torch.int32)


def _transposed_index(present: torch.Tensor):
    """For a [R, C] bool pattern stored in row-major order: (col_ptr, row_idx, perm)."""
    rows, cols = present.nonzero(as_tuple=True)
    position = torch.full(present.shape, -1, dtype=torch.int64, device=present.device)
    position[rows, cols] = torch.arange(rows.numel(), device=present.device)
    cols_t, rows_t = present.t().nonzero(as_tuple=True)
    perm = position[rows_t, cols_t]
    return compressed_ptr(present.sum(0)), rows_t.to(torch.int32), perm.to(torch.int32)


class _Format:
    """Shared behaviour: a tensor bundle with a logical dense shape."""

    _tensor_names: tuple[str, ...] = ()

    shape: tuple[int, ...]  # (out, in) of a linear weight, (C_out, C_in, kh, kw) of a conv
    values: torch.Tensor

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """(kh, kw) of a conv weight, () of a linear one."""
        return self.shape[2:]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The 2-D view the format packs: (out, in) or (C_out, C_in * kh * kw)."""
        return self.shape[0], math.prod(self.shape[1:])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._tensor_names}

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's positions that are not stored."""
        total = math.prod(self.shape)
        return 1.0 - self.nnz / total if total else 0.0

    def to(self, *args, **kwargs):
        """Like Tensor.to: a dtype applies to values only, a device to every tensor."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        moved = {name: t.to(device) if device is not None else t
                 for name, t in self.tensors().items()}
        moved["values"] = self.values.to(device=device, dtype=dtype)
        return self._replace(moved)

    def _replace(self, tensors):
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.__dict__.update(tensors)
        return other

    @classmethod
    def _trusted(cls, shape, **attributes):
        """A format over tensors that were validated when they were loaded or built (a module's
        buffers): no checks, no copies, no host syncs. Everything else goes through __init__."""
        made = object.__new__(cls)
        made.__dict__.update(attributes, shape=tuple(shape))
        return made

    def state_dict(self) -> dict:
        state = {name: t.detach().clone() for name, t in self.tensors().items()}
        state["shape"] = torch.tensor(self.shape, dtype=torch.int64)
        return state

    def __repr__(self):
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.3f}, dtype={self.dtype}, device={self.device})")


class BlockSparse(_Format):
    _tensor_names = ("values", "block_row_ptr", "block_col_idx", "block_col_ptr",
                     "block_row_idx", "block_perm")

    def __init__(self, values, block_row_ptr, block_col_idx, shape, block_col_ptr=None,
                 block_row_idx=None, block_perm=None):
        shape = _check_shape(shape, "BlockSparse")
        _check_values(values, "BlockSparse", "[nnz_blocks, (kh, kw,) bk, bn]")
        want = 3 + len(shape[2:])
        if values.dim() != want:
            layout = "[nnz_blocks, kh, kw, bk, bn]" if len(shape) == 4 else "[nnz_blocks, bk, bn]"
            raise ValueError(f"BlockSparse: values must be {layout} for a {len(shape)}-D "
                             f"weight, got {tuple(values.shape)}")
        if tuple(values.shape[1:-2]) != shape[2:]:
            raise ValueError(f"BlockSparse: values taps {tuple(values.shape[1:-2])} do not match "
                             f"the kernel size {shape[2:]}")
        self.values = values
        self.shape = shape
        bk, bn = values.shape[-2], values.shape[-1]
        if bn not in BLOCK_SIZES or bk not in BLOCK_SIZES:
            raise ValueError(f"BlockSparse: block dims must be in {BLOCK_SIZES}, got "
                             f"block=({bn}, {bk})")
        nb, kb = math.ceil(self.shape[0] / bn), math.ceil(self.shape[1] / bk)
        self.block_row_ptr, self.block_col_idx = block_row_ptr, block_col_idx
        _validate_compressed("BlockSparse", "block_row_ptr", "block_col_idx", block_row_ptr,
                             block_col_idx, nb, kb, values.shape[0])
        if block_col_ptr is None:
            present = self.block_pattern()
            block_col_ptr, block_row_idx, block_perm = _transposed_index(present)
        else:
            _validate_transposed("BlockSparse", ("block_row_ptr", "block_col_idx"),
                                 ("block_col_ptr", "block_row_idx", "block_perm"), block_row_ptr,
                                 block_col_idx, block_col_ptr, block_row_idx, block_perm, kb)
        self.block_col_ptr, self.block_row_idx, self.block_perm = (
            block_col_ptr, block_row_idx, block_perm)

    @property
    def block(self) -> tuple[int, int]:
        """(bn, bk): block rows (output features / channels) x block columns (input ones)."""
        return self.values.shape[-1], self.values.shape[-2]

    @property
    def grid(self) -> tuple[int, int]:
        bn, bk = self.block
        return math.ceil(self.shape[0] / bn), math.ceil(self.shape[1] / bk)

    @property
    def nnz(self) -> int:
        """Stored positions inside the weight's shape (padding of ragged edges excluded)."""
        return int(self.mask().sum())

    @classmethod
    def from_dense(cls, weight, mask=None, block=(32, 32)) -> "BlockSparse":
        """Packs the blocks of `weight` that hold at least one kept weight. `weight` is a linear
        [out, in] or a conv [C_out, C_in, kh, kw] weight; `block` = (bn, bk) output x input
        features (channels for a conv, each block spanning the whole kh x kw window).

        Weights masked out inside a kept block are stored as zeros (and would train): the
        effective mask of a block format is the block closure of `mask`, see `mask()`.
        """
        weight, mask = _check_weight_and_mask(weight, mask, "BlockSparse.from_dense")
        bn, bk = check_block(block)
        n, k, taps = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
        nb, kb = math.ceil(n / bn), math.ceil(k / bk)
        padded = weight.new_zeros(nb * bn, kb * bk, *taps)
        padded[:n, :k] = torch.where(mask, weight, torch.zeros_like(weight))
        kept = torch.zeros(nb * bn, kb * bk, *taps, dtype=torch.bool, device=weight.device)
        kept[:n, :k] = mask
        present = kept.view(nb, bn, kb, bk, math.prod(taps)).any(dim=4).any(dim=3).any(dim=1)
        rows, cols = present.nonzero(as_tuple=True)
        tap_dims = tuple(range(4, 4 + len(taps)))
        # [Nb, bn, Kb, bk, *taps] -> [Nb, Kb, *taps, bk, bn]
        blocks = padded.view(nb, bn, kb, bk, *taps).permute(0, 2, *tap_dims, 3, 1)
        values = blocks[rows, cols].contiguous()
        return cls(values, compressed_ptr(present.sum(1)), cols.to(torch.int32), weight.shape)

    def block_pattern(self) -> torch.Tensor:
        """[Nb, Kb] bool: which blocks are stored."""
        nb, kb = self.grid
        rows = expand_ptr(self.block_row_ptr)
        present = torch.zeros(nb, kb, dtype=torch.bool, device=self.device)
        present[rows, self.block_col_idx.long()] = True
        return present

    def _expand(self, blocks: torch.Tensor) -> torch.Tensor:
        """[Nb, Kb, *taps, bk, bn] per-block -> the weight's shape (cropping the padding)."""
        bn, bk = self.block
        nb, kb = self.grid
        taps = len(self.kernel_size)
        tap_dims = tuple(range(2, 2 + taps))
        # -> [Nb, bn, Kb, bk, *taps]
        full = blocks.permute(0, 3 + taps, 1, 2 + taps, *tap_dims)
        full = full.reshape(nb * bn, kb * bk, *self.kernel_size)
        return full[: self.shape[0], : self.shape[1]]

    def to_dense(self) -> torch.Tensor:
        bn, bk = self.block
        nb, kb = self.grid
        grid = self.values.new_zeros(nb, kb, *self.kernel_size, bk, bn)
        grid[expand_ptr(self.block_row_ptr), self.block_col_idx.long()] = self.values
        return self._expand(grid)

    def mask(self) -> torch.Tensor:
        """Bool like the weight: positions stored (the block closure of the mask it was made
        from)."""
        bn, bk = self.block
        pattern = self.block_pattern()
        grid = pattern.view(*pattern.shape, *(1,) * (len(self.kernel_size) + 2)).expand(
            -1, -1, *self.kernel_size, bk, bn)
        return self._expand(grid).contiguous()

    @classmethod
    def from_state_dict(cls, state: dict) -> "BlockSparse":
        """Validates every index tensor, the transposed index against the forward one too."""
        _require(cls, state, (*cls._tensor_names, "shape"))
        return cls(state["values"], state["block_row_ptr"], state["block_col_idx"],
                   tuple(state["shape"].tolist()), state["block_col_ptr"],
                   state["block_row_idx"], state["block_perm"])


class CSR(_Format):
    _tensor_names = ("values", "row_ptr", "col_idx", "col_ptr", "row_idx", "perm")

    def __init__(self, values, row_ptr, col_idx, shape, col_ptr=None, row_idx=None, perm=None):
        _check_values(values, "CSR", "1-D [nnz]")
        if values.dim() != 1:
            raise ValueError(f"CSR: values must be 1-D [nnz], got {tuple(values.shape)}")
        shape = _check_shape(shape, "CSR")
        self.values = values
        self.shape = shape
        self.row_ptr, self.col_idx = row_ptr, col_idx
        rows, cols = self.matrix_shape
        _validate_compressed("CSR", "row_ptr", "col_idx", row_ptr, col_idx, rows, cols,
                             values.shape[0])
        if col_ptr is None:
            col_ptr, row_idx, perm = _transposed_index(self.mask().view(rows, cols))
        else:
            _validate_transposed("CSR", ("row_ptr", "col_idx"), ("col_ptr", "row_idx", "perm"),
                                 row_ptr, col_idx, col_ptr, row_idx, perm, cols)
        self.col_ptr, self.row_idx, self.perm = col_ptr, row_idx, perm

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @classmethod
    def from_dense(cls, weight, mask=None) -> "CSR":
        """Packs the kept scalars of a linear [out, in] or conv [C_out, C_in, kh, kw] weight
        (a conv over its (C_out, C_in * kh * kw) view)."""
        weight, mask = _check_weight_and_mask(weight, mask, "CSR.from_dense")
        rows, cols = weight.shape[0], math.prod(weight.shape[1:])  # not -1: rows may be 0
        matrix, kept = weight.reshape(rows, cols), mask.reshape(rows, cols)
        rows, cols = kept.nonzero(as_tuple=True)
        return cls(matrix[rows, cols].contiguous(), compressed_ptr(kept.sum(1)),
                   cols.to(torch.int32), tuple(weight.shape))

    def to_dense(self) -> torch.Tensor:
        dense = self.values.new_zeros(self.matrix_shape)
        dense[expand_ptr(self.row_ptr), self.col_idx.long()] = self.values
        return dense.view(self.shape)

    def mask(self) -> torch.Tensor:
        present = torch.zeros(self.matrix_shape, dtype=torch.bool, device=self.device)
        present[expand_ptr(self.row_ptr), self.col_idx.long()] = True
        return present.view(self.shape)

    @classmethod
    def from_state_dict(cls, state: dict) -> "CSR":
        """Validates every index tensor, the transposed index against the forward one too."""
        _require(cls, state, (*cls._tensor_names, "shape"))
        return cls(state["values"], state["row_ptr"], state["col_idx"],
                   tuple(state["shape"].tolist()), state["col_ptr"], state["row_idx"],
                   state["perm"])


# torch's CUTLASS 2:4 kernels take an fp16/bf16 sparse operand whose rows are a multiple of 32
# and columns of 64 (SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS, sparse_min_*).
SEMI_STRUCTURED_MULTIPLE = (32, 64)


def check_nm(n, m, who: str) -> tuple[int, int]:
    """(n, m) of an N:M pattern, checked: ints with 0 < n < m."""
    for name, v in (("n", n), ("m", m)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{who}: {name} must be an int, got {v!r}")
    if not 0 < n < m:
        raise ValueError(f"{who}: need 0 < n < m (keep n of every m consecutive inputs), got "
                         f"n={n}, m={m}")
    return n, m


def nm_slots_per_row(in_features: int, n: int, m: int) -> int:
    """Slots of a row: N per full group of M, min(N, r) for a ragged tail group of r inputs."""
    return (in_features // m) * n + min(n, in_features % m)


def nm_group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """[rows, ceil(K / M)] kept weights per group of M consecutive inputs of each row of the
    (rows, K) view of `mask` (the ragged tail group counts its r inputs)."""
    rows, k = mask.shape[0], math.prod(mask.shape[1:])
    kept = mask.reshape(rows, k)
    groups = -(-k // m)
    padded = kept.new_zeros(rows, groups * m)
    padded[:, :k] = kept
    return padded.view(rows, groups, m).sum(-1)


def build_semi_structured_meta(present: torch.Tensor) -> torch.Tensor:
    """CUTLASS's reordered int16 metadata of a [rows, K] pattern with exactly 2 of every 4 set,
    made by torch's own converter (the one SparseSemiStructuredTensorCUTLASS.from_dense uses)
    from a 0/1 fp16 matrix: the kept values of that matrix in row-major order are exactly an NM
    weight's `values`, so this metadata and `values` form the semi-structured operand."""
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass)
    return sparse_semi_structured_from_dense_cutlass(present.to(torch.float16))[1]


def scatter_slots(slots: torch.Tensor, col_idx: torch.Tensor, in_features: int) -> torch.Tensor:
    """[rows, S] per-slot tensor of an NM weight -> the dense [rows, in_features] matrix (zeros
    off the slots). Differentiable in `slots`; no host sync (every row has S slots)."""
    rows = slots.shape[0]
    out = slots.new_zeros(rows, in_features)
    if slots.numel():
        out = out.scatter(1, col_idx.view(rows, -1).long(), slots)
    return out


class NM(_Format):
    """N:M weight: see the module docstring for the layout."""

    _tensor_names = ("values", "col_idx", "kept", "row_ptr", "col_ptr", "row_idx", "perm")
    _stored_names = ("values", "col_idx", "kept")  # the rest is derived from col_idx
    semi_structured_meta = None  # CUTLASS's 2:4 metadata, where semi_structured_ready()

    def __init__(self, values, col_idx, kept, shape, nm=(2, 4), row_ptr=None, col_ptr=None,
                 row_idx=None, perm=None, semi_structured_meta=None):
        """`row_ptr`, `col_ptr`, `row_idx`, `perm` and `semi_structured_meta` are derived from
        `col_idx`: pass them only as this class derived them (modules hold them as buffers);
        None derives them."""
        shape = _check_shape(shape, "NM")
        try:
            n, m = nm
        except (TypeError, ValueError):
            raise ValueError(f"NM: nm must be a pair (n, m), got {nm!r}") from None
        self.n, self.m = check_nm(n, m, "NM")
        self.shape = shape
        rows, k = self.matrix_shape
        s = nm_slots_per_row(k, n, m)
        if rows * s >= 2**31:
            raise ValueError(f"NM: {rows} x {s} slots exceed the int32 index range")
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() \
                or tuple(values.shape) != (rows, s):
            raise ValueError(f"NM: values must be a floating-point [rows, slots] = [{rows}, {s}] "
                             f"tensor for shape {shape} at {n}:{m}, got "
                             f"{getattr(values, 'dtype', type(values).__name__)} "
                             f"{tuple(getattr(values, 'shape', ()))}")
        if not isinstance(kept, torch.Tensor) or kept.dtype != torch.bool \
                or tuple(kept.shape) != (rows, s):
            raise ValueError(f"NM: kept must be a bool [{rows}, {s}] tensor, got "
                             f"{getattr(kept, 'dtype', type(kept).__name__)} "
                             f"{tuple(getattr(kept, 'shape', ()))}")
        for name, t in (("col_idx", col_idx), ("kept", kept)):
            if isinstance(t, torch.Tensor) and t.device != values.device:
                raise ValueError(f"NM: {name} is on {t.device} but values on {values.device}")
        if not isinstance(col_idx, torch.Tensor) or col_idx.dtype != torch.int32 \
                or tuple(col_idx.shape) != (rows * s,):
            raise ValueError(f"NM: col_idx must be a 1-D int32 tensor of {rows * s} entries, got "
                             f"{getattr(col_idx, 'dtype', type(col_idx).__name__)} "
                             f"{tuple(getattr(col_idx, 'shape', ()))}")
        self.values, self.col_idx, self.kept = values, col_idx, kept
        self._check_groups(rows, s)
        if row_ptr is None:
            row_ptr = (torch.arange(rows + 1, device=values.device) * s).to(torch.int32)
        _validate_compressed("NM", "row_ptr", "col_idx", row_ptr, col_idx, rows, k, rows * s)
        if bool((values.detach()[~kept] != 0).any()):
            raise ValueError("NM: values of the free slots (kept False) must be exactly 0")
        self.row_ptr = row_ptr
        if col_ptr is None:
            present = self.slot_pattern()
            col_ptr, row_idx, perm = _transposed_index(present)
            if self.semi_structured_ready():
                semi_structured_meta = build_semi_structured_meta(present)
        else:
            _validate_transposed("NM", ("row_ptr", "col_idx"), ("col_ptr", "row_idx", "perm"),
                                 row_ptr, col_idx, col_ptr, row_idx, perm, k)
        self.col_ptr, self.row_idx, self.perm = col_ptr, row_idx, perm
        self.semi_structured_meta = semi_structured_meta

    def _check_groups(self, rows: int, s: int):
        """Slot j of a row belongs to group j // N: its column must lie in that group."""
        if not rows * s:
            return
        cols = self.col_idx.view(rows, s).long()
        group = torch.arange(s, device=cols.device) // self.n
        wrong = cols // self.m != group
        if bool(wrong.any()):
            r, j = (int(v) for v in wrong.nonzero()[0])
            g = int(group[j])
            raise ValueError(f"NM: col_idx of row {r}, slot {j} is {int(cols[r, j])}, outside "
                             f"its group {g} (inputs {g * self.m}..{g * self.m + self.m - 1}) "
                             f"of {self.n}:{self.m}")

    @property
    def nm(self) -> tuple[int, int]:
        return self.n, self.m

    @property
    def slots_per_row(self) -> int:
        return self.values.shape[1]

    @property
    def nnz(self) -> int:
        """Kept weights (free slots excluded)."""
        return int(self.kept.sum())

    def semi_structured_ready(self) -> bool:
        """Whether this weight's layout is CUTLASS's 2:4 operand (2:4, rows a multiple of 32,
        in_features of 64); the dtype (fp16/bf16) and device are the caller's to check."""
        rows, k = self.matrix_shape
        mr, mk = SEMI_STRUCTURED_MULTIPLE
        return self.nm == (2, 4) and rows > 0 and k > 0 and rows % mr == 0 and k % mk == 0

    def tensors(self) -> dict[str, torch.Tensor]:
        out = super().tensors()
        if self.semi_structured_meta is not None:
            out["semi_structured_meta"] = self.semi_structured_meta
        return out

    @classmethod
    def from_dense(cls, weight, mask=None, n: int = 2, m: int = 4) -> "NM":
        """Packs a linear [out, in] or conv [C_out, C_in, kh, kw] weight (a conv over its
        (C_out, C_in * kh * kw) view) whose mask keeps at most `n` of every `m` consecutive
        inputs of each row; a ragged tail group (K not a multiple of m) is padded internally."""
        weight, mask = _check_weight_and_mask(weight, mask, "NM.from_dense")
        n, m = check_nm(n, m, "NM.from_dense")
        rows = weight.shape[0]
        k = math.prod(weight.shape[1:])
        matrix, kept = weight.reshape(rows, k), mask.reshape(rows, k)
        counts = nm_group_counts(kept, m)
        over = counts > n
        if bool(over.any()):
            r, g = (int(v) for v in over.nonzero()[0])
            what = "output channel" if weight.dim() == 4 else "row"
            raise ValueError(
                f"NM.from_dense: mask keeps {int(counts[r, g])} of the inputs "
                f"{g * m}..{min(g * m + m, k) - 1} of {what} {r} (group {g}); a {n}:{m} weight "
                f"keeps at most {n} of every {m} consecutive inputs ({int(over.sum())} groups "
                f"break it)")
        groups = counts.shape[1]
        padded = kept.new_zeros(rows, groups * m)
        padded[:, :k] = kept
        padded = padded.view(rows, groups, m)
        in_range = (torch.arange(groups * m, device=kept.device) < k).view(1, groups, m)
        # Each group's N slots: its kept inputs first, then its free in-range inputs, lowest
        # first, as many as fit; taken in column order.
        order = torch.where(padded, padded.cumsum(-1) - 1,
                            (in_range & ~padded).cumsum(-1) - 1 + padded.sum(-1, keepdim=True))
        chosen = in_range & (order < n)
        s = nm_slots_per_row(k, n, m)
        cols = torch.arange(groups * m, device=kept.device).view(1, groups, m).expand_as(chosen)
        cols = cols[chosen].view(rows, s)
        slot_kept = padded[chosen].view(rows, s)
        values = torch.where(slot_kept, matrix.gather(1, cols), matrix.new_zeros(()))
        return cls(values.contiguous(), cols.reshape(-1).to(torch.int32), slot_kept.contiguous(),
                   tuple(weight.shape), (n, m))

    def slot_pattern(self) -> torch.Tensor:
        """[rows, K] bool: the positions of all slots (kept and free): what the CSR index and
        the kernels walk."""
        rows, k = self.matrix_shape
        present = torch.zeros(rows, k, dtype=torch.bool, device=self.device)
        if rows * self.slots_per_row:
            present.scatter_(1, self.col_idx.view(rows, -1).long(), True)
        return present

    def to_dense(self) -> torch.Tensor:
        return scatter_slots(self.values, self.col_idx, self.matrix_shape[1]).view(self.shape)

    def mask(self) -> torch.Tensor:
        """Bool like the weight: the kept weights (free slots excluded)."""
        return scatter_slots(self.kept, self.col_idx, self.matrix_shape[1]).view(self.shape)

    def state_dict(self) -> dict:
        state = {name: getattr(self, name).detach().clone() for name in self._stored_names}
        state["shape"] = torch.tensor(self.shape, dtype=torch.int64)
        state["nm"] = torch.tensor(self.nm, dtype=torch.int64)
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "NM":
        _require(cls, state, (*cls._stored_names, "shape", "nm"))
        return cls(state["values"], state["col_idx"], state["kept"],
                   tuple(state["shape"].tolist()), tuple(state["nm"].tolist()))

    def __repr__(self):
        return (f"NM({self.n}:{self.m}, shape={tuple(self.shape)}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.3f}, dtype={self.dtype}, device={self.device})")


def check_block(block) -> tuple[int, int]:
    try:
        bn, bk = (operator.index(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"block must be a pair (bn, bk), got {block!r}") from None
    if bn not in BLOCK_SIZES or bk not in BLOCK_SIZES:
        raise ValueError(f"block=({bn}, {bk}): each dim must be one of {BLOCK_SIZES}")
    return bn, bk


def _require(cls, state: dict, names):
    missing = sorted(set(names) - set(state))
    if missing:
        raise ValueError(f"{cls.__name__}.from_state_dict: state lacks {missing}")


def _validate_transposed(who, forward_names, names, ptr, idx, t_ptr, t_idx, perm, cols):
    """The transposed index that dX reads (t_ptr over columns; per entry in column order its
    row t_idx and its stored position perm) must list exactly the entries of the validated
    forward index (ptr, idx), column by column, rows ascending: the index `_transposed_index`
    builds. In range but inconsistent, it would give a silently wrong dX. O(nnz), vectorised."""
    ptr_name, idx_name = forward_names
    t_ptr_name, t_idx_name, perm_name = names
    nnz = idx.numel()
    for name, t in zip(names, (t_ptr, t_idx, perm)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{who}: {name} must be a 1-D int32 tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.device != idx.device:
            raise ValueError(f"{who}: {name} is on {t.device} but {idx_name} on {idx.device}")
    if t_ptr.numel() != cols + 1:
        raise ValueError(f"{who}: {t_ptr_name} must have {cols + 1} entries, got "
                         f"{t_ptr.numel()}")
    for name, t in ((t_idx_name, t_idx), (perm_name, perm)):
        if t.numel() != nnz:
            raise ValueError(f"{who}: {name} must have {nnz} entries (one per stored "
                             f"value/block), got {t.numel()}")
    counts = torch.bincount(idx.long(), minlength=cols)
    wrong = (t_ptr[1:] - t_ptr[:-1]).long() != counts
    if int(t_ptr[0]) != 0 or bool(wrong.any()):
        c = int(wrong.nonzero()[0]) if bool(wrong.any()) else 0
        raise ValueError(f"{who}: {t_ptr_name} does not match {idx_name}: column {c} holds "
                         f"{int(counts[c])} entries, {t_ptr_name} gives it "
                         f"{int(t_ptr[c + 1] - t_ptr[c])} (starting at {int(t_ptr[0])})")
    if not nnz:
        return
    p = perm.long()
    if int(p.min()) < 0 or int(p.max()) >= nnz:
        raise ValueError(f"{who}: {perm_name} entries must lie in [0, {nnz}), got "
                         f"[{int(p.min())}, {int(p.max())}]")
    uses = torch.bincount(p, minlength=nnz)
    if bool((uses != 1).any()):
        twice = int((uses > 1).nonzero()[0])
        raise ValueError(f"{who}: {perm_name} must be a permutation of 0..{nnz - 1} (every "
                         f"stored entry once); {twice} appears {int(uses[twice])} times")
    column = expand_ptr(t_ptr)
    wrong = idx.long()[p] != column
    if bool(wrong.any()):
        q = int(wrong.nonzero()[0])
        raise ValueError(f"{who}: {perm_name}[{q}] = {int(p[q])} is an entry of column "
                         f"{int(idx[p[q]])} ({idx_name}), but {t_ptr_name} puts position {q} "
                         f"in column {int(column[q])}")
    wrong = expand_ptr(ptr)[p] != t_idx.long()
    if bool(wrong.any()):
        q = int(wrong.nonzero()[0])
        raise ValueError(f"{who}: {t_idx_name}[{q}] = {int(t_idx[q])} does not match the row of "
                         f"entry {perm_name}[{q}] = {int(p[q])} in {ptr_name} "
                         f"({int(expand_ptr(ptr)[p[q]])})")
    if bool(((column[1:] == column[:-1]) & (t_idx[1:] <= t_idx[:-1])).any()):
        raise ValueError(f"{who}: {t_idx_name} must be strictly increasing within each column "
                         f"(with {perm_name} in the same order)")


def _validate_compressed(who, ptr_name, idx_name, ptr, idx, rows, cols, nnz):
    """Index tensors of a compressed format: dtype, lengths, monotone pointers, in-range indices."""
    for name, t in ((ptr_name, ptr), (idx_name, idx)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{who}: {name} must be a 1-D int32 tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if ptr.numel() != rows + 1:
        raise ValueError(f"{who}: {ptr_name} must have {rows + 1} entries, got {ptr.numel()}")
    if idx.numel() != nnz:
        raise ValueError(f"{who}: {idx_name} must have {nnz} entries (one per stored "
                         f"value/block), got {idx.numel()}")
    if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(f"{who}: {ptr_name} must start at 0, never decrease and end at {nnz}")
    if nnz and (int(idx.min()) < 0 or int(idx.max()) >= cols):
        raise ValueError(f"{who}: {idx_name} entries must lie in [0, {cols}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    if nnz > 1:  # strictly increasing within a row: no duplicate entries
        row = expand_ptr(ptr)
        if bool(((row[1:] == row[:-1]) & (idx[1:] <= idx[:-1])).any()):
            raise ValueError(f"{who}: {idx_name} must be strictly increasing within each row "
                             "(sorted, no duplicate entries)")
