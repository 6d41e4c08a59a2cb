"""Where tickets meet sparsekern: a pruned model is converted with `sparsekern.sparsify` for
training and evaluation, turned back into plain dense modules for pruning and saving, and timed
dense-masked vs sparse in the same process.

Linear and Conv2d layers go through sparsekern: SparseLinear / SparseConv2d where the auto policy
finds sparse faster, else MaskedLinear / MaskedConv2d (dense kernels, fixed mask). Grouped and
depthwise convs always run masked-dense; their decision says why.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern import MaskedConv2d  # noqa: F401  (moved to sparsekern.nn; imported from here)
from sparsekern.timing import measure


def _module_name(param_name: str) -> str:
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else ""


_SUPPORT: dict[str, bool] = {}


def sparse_kernels_run_on(device: torch.device) -> bool:
    """Whether sparsekern's linear and conv kernels (forward and backward) run on `device`; CPU
    always does (C++ kernels or the reference), other devices only if the extension has kernels
    there for both."""
    key = str(device)
    if key not in _SUPPORT:
        try:
            eye = torch.eye(8, dtype=torch.bool, device=device)
            w = torch.ones(8, 8, device=device, requires_grad=True)
            layer = sk.SparseLinear.from_dense(nn.Linear(8, 8).to(device), eye, format="csr")
            layer(w).sum().backward()
            conv = sk.SparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1).to(device),
                                              eye[:, :, None, None].expand(8, 8, 3, 3),
                                              format="bsr")
            conv(torch.ones(1, 8, 4, 4, device=device, requires_grad=True)).sum().backward()
            _SUPPORT[key] = True
        except (RuntimeError, NotImplementedError):
            _SUPPORT[key] = False
    return _SUPPORT[key]


def zero_pruned(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Pruned weights of a plain dense model set to exact zeros."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].masked_fill_(~m.to(params[n].device), 0.0)  # not mul_: inf * 0 is NaN


def sparsify_model(model: nn.Module, masks: dict[str, torch.Tensor], format: str = "auto",
                   policy: str = "auto", block=None, batch_size: int = 256,
                   decisions: dict | None = None, repeats: int | None = None,
                   example_input: torch.Tensor | None = None, nm=None) -> dict[str, dict]:
    """Converts the pruned layers of a plain dense model in place; returns, per pruned weight,
    what runs it: {"kind": linear | conv, "chosen": sparse | dense, "format", "sparsity", ...}.

    decisions: the result of an earlier call for the same masks -- each layer is then rebuilt
    the same way without timing (resume, and every DDP rank following rank 0).
    example_input: a training batch, so the auto policy times each layer on what it really
    receives (the first layer's dX is then not timed: its input needs no gradient).
    nm: the (N, M) of format="nm" layers (sparsekern's pack picks one from each mask if None).
    repeats: the most timing rounds of the auto policy per layer (None: sparsekern's default).
    """
    modules = dict(model.named_modules())
    other = sorted(n for n in masks if not isinstance(modules.get(_module_name(n)),
                                                      (nn.Linear, nn.Conv2d)))
    if other:
        raise ValueError(f"sparsify_model: masks for weights that are not Linear/Conv2d: {other}")
    if not masks:
        return {}
    if decisions is None:
        sk.sparsify(model, masks, format=format, policy=policy, block=block,
                    batch_size=batch_size, example_input=example_input, nm=nm,
                    **({} if repeats is None else {"repeats": repeats}))
    else:
        # "masked-dense": what checkpoints written before sparse conv kernels say for a conv
        was = {n: "dense" if d["chosen"] == "masked-dense" else d["chosen"]
               for n, d in decisions.items()}
        for chosen in ("sparse", "dense"):
            chosen_masks = {n: m for n, m in masks.items() if was[n] == chosen}
            if chosen_masks:
                sk.sparsify(model, chosen_masks, format=format, policy=chosen, block=block,
                            nm=nm)
    found = sk.decisions(model)
    out = {}
    for n in masks:
        d = dict(found[_module_name(n)])
        if decisions is not None:  # keep the measurements (and notes) that led to the choice
            d = {**decisions[n], **{k: d[k] for k in ("chosen", "format", "sparsity")}}
        out[n] = d
    return out


def sparse_block(config):
    """The block the layers are packed with under `config` (sparsify_model / repack): the
    pruning block for --sparse-format bsr, else None."""
    return config.pruning.block if config.sparse.format == "bsr" else None


def densify_model(model: nn.Module) -> nn.Module:
    """Sparse / masked layers back to nn.Linear / nn.Conv2d (in place)."""
    return sk.densify(model)


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state of the equivalent plain dense model (zeros where pruned), detached copies."""
    return {k: v.detach().clone() for k, v in densify_model(copy.deepcopy(model)).state_dict()
            .items()}


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{param name of the dense model: mask} read back from the converted modules."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (sk.SparseLinear, sk.MaskedLinear, sk.SparseConv2d,
                               sk.MaskedConv2d)):
            out[f"{name}.weight" if name else "weight"] = module.mask().clone()
    return out


def check_pruned_zero(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Raises if a pruned weight of a dense state is not exactly zero."""
    for n, m in masks.items():
        bad = int((state[n][~m.to(state[n].device)] != 0).sum())
        if bad:
            raise RuntimeError(f"mask invariant broken: {bad} pruned weights of {n} are nonzero")


def runs_sparse_kernels(model: nn.Module) -> bool:
    """Whether some layer of `model` runs sparsekern's kernels; else it is masked-dense, the
    same computation as masked_dense_copy of it."""
    return any(isinstance(m, (sk.SparseLinear, sk.SparseConv2d)) for m in model.modules())


def masked_dense_copy(dense_model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of a plain dense model where every pruned layer runs masked-dense."""
    m = copy.deepcopy(dense_model)
    sparsify_model(m, masks, policy="dense")
    return m


def time_train_steps(models: dict[str, nn.Module], make_optimizer, batch, loss_fn,
                     warmup: int = 3, repeats: int = 15) -> tuple[dict[str, float], dict]:
    """Median milliseconds of one training step (zero_grad, forward, loss, backward, optimizer
    step) of each model on the same batch, interleaved in this process until every model's
    ratio to the first one settles (sparsekern.timing.measure, at most `repeats` rounds), and
    how they were taken (Measurement.record(): rounds, stable, load_average, cpu_wait, busy).
    The models are trained by the timing, so pass copies."""
    x, y = batch

    def stepper(model):
        model.train()
        opt = make_optimizer(model.parameters())

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        return step

    measured = measure({k: stepper(m) for k, m in models.items()}, warmup=warmup,
                       max_rounds=repeats)
    return {k: v * 1e3 for k, v in measured.seconds.items()}, measured.record()


def cross_entropy(label_smoothing: float = 0.0):
    return lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------- changing masks
# Dynamic sparse training changes masks while a model trains on the sparse kernels. sparsekern's
# modules are built once from a mask (their index tensors never change), so a new mask means a
# new module, and its `values` a new Parameter whose optimizer state must follow it.

def _in_layout(module, values: torch.Tensor):
    """The format object (BSR, CSR or NM, the module's own) of a SparseLinear / SparseConv2d
    holding `values` (shaped like its `values`, e.g. an optimizer state) at the module's stored
    positions."""
    return module._format(values)


def _block_of(module):
    return module.weight_format().block if module.format == "bsr" else None


def _packed_values(dense: torch.Tensor, mask: torch.Tensor, like) -> torch.Tensor:
    """What `values` of `like`, a module built by from_dense(mask), hold for the dense tensor
    `dense` (packed in its format, block and N:M), so optimizer states line up with weights."""
    return sk.nn.pack(dense, mask, like.format, _block_of(like), like.nm).values


def _swap_parameter(optimizer, old: nn.Parameter, new: nn.Parameter, convert) -> None:
    """`new` replaces `old` in the optimizer; per-weight state tensors (shaped like `old`) go
    through `convert`, per-parameter ones (Adam's step) are kept."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {k: convert(v) if torch.is_tensor(v) and v.dim() > 0
                                and v.shape == old.shape else v for k, v in state.items()}


def repack(model: nn.Module, optimizer, masks: dict[str, torch.Tensor],
           reset: dict[str, torch.Tensor], format: str = "auto", block=None) -> list[str]:
    """Gives every converted layer of `model` the mask masks[weight name], in place (model and
    optimizer); returns the weights whose mask changed.

    At positions kept before and after, the weight and its per-weight optimizer state (SGD
    momentum, Adam / AdamW moments) carry over; where `reset` is True (grown) both start at
    exactly zero; dropped positions are gone (sparse) or exact zeros (masked-dense). A sparse
    layer is rebuilt the way `sparsify_model(format=format, block=block)` builds it from the new
    mask, so a model re-sparsified from its masks (a resumed run) has the same layout and takes
    the same optimizer state; a masked-dense layer keeps its module and Parameter. Biases stay
    the same Parameter (and keep their state)."""
    modules = dict(model.named_modules())
    changed = []
    for name, new_mask in masks.items():
        module = modules[_module_name(name)]
        if not isinstance(module, (sk.SparseLinear, sk.SparseConv2d, sk.MaskedLinear,
                                   sk.MaskedConv2d)):
            raise TypeError(f"repack: {name} is a {type(module).__name__}, not a layer "
                            f"converted by sparsify_model")
        old_mask = module.mask()
        new_mask, fresh = new_mask.to(old_mask.device), reset[name].to(old_mask.device)
        if torch.equal(old_mask, new_mask) and not bool(fresh.any()):
            continue
        changed.append(name)
        if isinstance(module, (sk.MaskedLinear, sk.MaskedConv2d)):
            gone = ~new_mask | fresh
            with torch.no_grad():
                module.weight_mask.copy_(new_mask)
                module.weight.masked_fill_(gone, 0.0)
            for value in optimizer.state.get(module.weight, {}).values():
                if torch.is_tensor(value) and value.shape == module.weight.shape:
                    value.masked_fill_(gone, 0.0)
            continue

        plain = module.to_linear() if isinstance(module, sk.SparseLinear) else module.to_conv()
        with torch.no_grad():
            plain.weight.masked_fill_(fresh, 0.0)
        rebuilt = type(module).from_dense(plain, new_mask, format=format, block=block)

        def moved(values, module=module, new_mask=new_mask, fresh=fresh, rebuilt=rebuilt):
            dense = _in_layout(module, values.detach()).to_dense().masked_fill(fresh, 0.0)
            return _packed_values(dense, new_mask, rebuilt)

        rebuilt.bias = module.bias
        rebuilt.train(module.training)
        if hasattr(module, "sparsekern_decision"):
            rebuilt.sparsekern_decision = {**module.sparsekern_decision,
                                           "sparsity": rebuilt.sparsity()}
        _swap_parameter(optimizer, module.values, rebuilt.values, moved)
        model.set_submodule(_module_name(name), rebuilt)
    return changed


def dense_weights_and_gradients(model: nn.Module, batch, loss_fn, names):
    """({weight name: dense weight}, {weight name: d loss / d weight at every position, pruned
    ones included}) on `batch`: one forward and backward of a dense copy of the model (the
    weights as they are, zeros where pruned). What RigL drops and grows by; the model itself
    and its BatchNorm statistics are untouched. Under torch.distributed the gradients are
    averaged over the ranks, so every rank takes the same decision."""
    x, y = batch
    dense = densify_model(copy.deepcopy(model))
    wanted = set(names)
    for n, p in dense.named_parameters():
        p.requires_grad_(n in wanted)
    loss_fn(dense(x), y).backward()
    params = dict(dense.named_parameters())
    grads = {n: params[n].grad for n in names}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for g in grads.values():
            torch.distributed.all_reduce(g)
            g /= torch.distributed.get_world_size()
    return {n: params[n].detach() for n in names}, grads
