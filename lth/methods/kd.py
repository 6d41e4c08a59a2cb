"""KD ticket (Ma et al., "Good Students Play Big Lottery Better", arXiv 2101.03255 v1-v2).

IMP whose pruned rounds (and their sanity branches: same recipe, only mask and start differ)
retrain with soft labels from a trained dense teacher -- this run's round 0, or --teacher PATH:

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

with the KL averaged over the examples of the batch ("batchmean": summed over classes; torch's
reduction="mean" would also divide by the number of classes), and T^2 keeping the soft term's
gradient on the scale of the hard one (Hinton et al. 2015). --kd-ce-after E switches to plain
cross-entropy from epoch E of a round's schedule on. Rewinding (--rewind) works as for imp
("KD + rewinding"). The teacher runs in eval mode without gradients, on the sparse kernels when
its checkpoint is pruned.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lth import checkpoint
from lth.hparams import ConfigError, _optional_int, _positive, hp, register_section
from lth.methods.base import METHODS, Phase, derive_seed
from lth.methods.imp import IMP
from lth.sparse import sparse_kernels_run_on, sparsify_model


@register_section("kd", methods=("kd",))
@dataclass
class KDHparams:
    temperature: float = hp(4.0, "kd: softmax temperature T of teacher and student",
                            flag="--kd-temperature", check=_positive)
    alpha: float = hp(0.9, "kd: weight of the distillation term (1 - alpha: cross-entropy)",
                      flag="--kd-alpha", check=lambda v: None if 0 <= v <= 1 else
                      f"must be in [0, 1], got {v}")
    ce_after: int | None = hp(None, "kd: plain cross-entropy from this epoch of a round's "
                              "schedule on; none = distil throughout", flag="--kd-ce-after",
                              parse=_optional_int, check=lambda v: None if v is None or v >= 0
                              else f"must be >= 0, got {v}", metavar="EPOCH")
    teacher: str = hp("", "kd: teacher weights: a checkpoint.pt of a finished lth phase (its "
                      "masks are kept: a pruned teacher runs on sparse kernels) or a state dict "
                      "of this --model; empty = this run's dense round 0", flag="--teacher",
                      metavar="PATH")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float,
            alpha: float, cross_entropy=F.cross_entropy) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student at temperature T), per example, + (1-alpha) * CE."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student.float() / t, dim=1),
                  F.log_softmax(teacher.float() / t, dim=1), reduction="batchmean",
                  log_target=True)
    return alpha * t * t * kl + (1.0 - alpha) * cross_entropy(student, y)


def load_teacher(path: str, ctx) -> nn.Module:
    """The model of --teacher PATH on the run's device, in eval mode, without gradients."""
    c = ctx.config
    try:
        saved = checkpoint.load(path)
    except Exception as e:  # not a torch file, a truncated one, or pickled code
        raise ConfigError(f"--teacher: cannot load {path} as a checkpoint or state_dict "
                          f"(torch.load, weights_only=True): "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:160]}"
                          ) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--teacher: {path} holds a {type(saved).__name__}, not a checkpoint "
                          f"or state_dict")
    state, masks = (saved["model"], saved.get("masks", {})) if "model" in saved else (saved, {})
    model = ctx.fresh_model(derive_seed(c.training.seed, "init"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"--teacher: {path} does not hold weights of --model {c.model.name} "
                          f"for this data: {str(e).splitlines()[0]}") from None
    model.to(ctx.device)
    if masks:
        policy = "sparse" if sparse_kernels_run_on(ctx.device) else "dense"
        sparsify_model(model, {n: m.to(ctx.device) for n, m in masks.items()}, "auto", policy)
    return model


@METHODS.register("kd", "KD ticket: imp whose pruned rounds retrain with soft labels from the "
                  "dense round 0 or --teacher (Ma et al. 2021)")
class KDTicket(IMP):

    @classmethod
    def check(cls, c) -> None:
        k = c.kd
        if k.teacher and not os.path.isfile(k.teacher):
            raise ConfigError(f"--teacher: no such file {k.teacher!r}")
        if k.ce_after is not None and k.ce_after >= c.training.epochs:
            raise ConfigError(f"--kd-ce-after: epoch {k.ce_after} is not before the end of "
                              f"training (--epochs {c.training.epochs})")

    def check_run(self, ctx) -> None:
        super().check_run(ctx)
        if ctx.config.kd.teacher:  # a teacher that does not fit fails now, not after round 0
            load_teacher(ctx.config.kd.teacher, ctx)

    def begin_phase(self, model, optimizer, phase: Phase) -> None:
        self.teacher = None
        if phase.round >= 1:
            k = self.ctx.config.kd
            self.teacher = (load_teacher(k.teacher, self.ctx) if k.teacher
                            else self.ctx.trained_model(Phase(0)))
            self.teacher.eval().requires_grad_(False)

    def distilling(self, step: int) -> bool:
        after = self.ctx.config.kd.ce_after
        return self.teacher is not None and (after is None
                                             or step // self.ctx.steps_per_epoch < after)

    def loss(self, model, x, y, out, step: int):
        if not self.distilling(step):
            return None
        with torch.no_grad():
            teacher_out = self.teacher(x)
        k = self.ctx.config.kd
        return kd_loss(out, teacher_out, y, k.temperature, k.alpha, self.ctx.cross_entropy)

    def summary(self, phase: Phase) -> dict:
        out = super().summary(phase)
        if phase.round >= 1:
            k = self.ctx.config.kd
            out.update(kd_teacher=k.teacher or Phase(0).key, kd_temperature=k.temperature,
                       kd_alpha=k.alpha, kd_ce_after=k.ce_after)
        return out
