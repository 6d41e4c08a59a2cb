"""The plain training loop of `python -m lth.train` and its bookkeeping callbacks.

`fit` runs the steps of one phase, calling the hook providers of `lth.methods.base` around each
step; callbacks evaluate, checkpoint, log and show progress. `exp` in a callback is the
`lth.train.Experiment` running the phase (its evaluate, path, dist and settings).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from lth import checkpoint
from lth.methods import Phase
from lth.sparse import dense_state_dict


@dataclass
class Trainee:
    """What a phase trains; on_step hooks may replace the model and optimizer mid-phase."""
    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def compute_loss(hooks, loss_fn, model, x, y, out, step: int) -> torch.Tensor:
    """The first provider's loss that is not None, else the run's cross-entropy."""
    for hook in hooks:
        loss = hook.loss(model, x, y, out, step)
        if loss is not None:
            return loss
    return loss_fn(out, y)


def rebind_scheduler(scheduler, optimizer):
    """The same lr schedule, at the same point, driving a new optimizer."""
    new = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler.lr_lambdas[0],
                                            last_epoch=scheduler.last_epoch)
    return new


def fit(run: Trainee, hooks, loss_fn, batches, first_step: int, last_step: int,
        steps_per_epoch: int, callbacks=(), wrap=lambda model: model,
        autocast=contextlib.nullcontext) -> int:
    """The plain training loop: steps [first_step, last_step), epoch by epoch.

    batches(epoch, skip) yields the (x, y) batches of an epoch after the first `skip`; the hook
    providers (lth.methods.base) are called in order around each step; callbacks get
    on_step(step, stats) after every optimizer step and on_epoch_end(step, stats) after every
    epoch, where stats = [summed loss, correct, examples] of the epoch so far. autocast() is the
    context the forward and loss run in. A loss that is not a finite number raises Diverged
    (the step is not undone: the run stops there).
    """
    step = first_step
    while step < last_step:
        epoch = step // steps_per_epoch
        stats = [0.0, 0.0, 0.0]
        for x, y in batches(epoch, step - epoch * steps_per_epoch):
            for hook in hooks:
                x, y = hook.batch(x, y, step)
            run.optimizer.zero_grad(set_to_none=True)
            with autocast():
                out = run.net(x)
                loss = compute_loss(hooks, loss_fn, run.model, x, y, out, step)
            loss.backward()
            for hook in hooks:
                hook.after_backward(run.model, step)
            run.optimizer.step()
            run.scheduler.step()
            step += 1
            for hook in hooks:
                changed = hook.on_step(run.model, run.optimizer, step)
                if changed is not None:
                    model, optimizer = changed
                    if optimizer is not run.optimizer:
                        run.scheduler = rebind_scheduler(run.scheduler, optimizer)
                    run.model, run.optimizer = model, optimizer
                    run.net = wrap(model)
            value = loss.item()
            if not math.isfinite(value):
                raise Diverged(step, f"the training loss is {value}")
            labels = y if y.dim() == 1 else y.argmax(1)  # soft targets: their top class
            stats[0] += value * len(y)
            stats[1] += float((out.argmax(1) == labels).sum())
            stats[2] += len(y)
            for cb in callbacks:
                cb.on_step(step, stats)
            if step >= last_step:
                break
        for cb in callbacks:
            cb.on_epoch_end(step, stats)
    return step


class Diverged(Exception):
    """Training stopped being finite (a loss or a weight of NaN / inf) after `step` steps."""

    def __init__(self, step: int, what: str):
        super().__init__(f"{what} after step {step}")
        self.step, self.what = step, what


class Callback:
    """Hooks of the training loop `fit` for the run's bookkeeping; each default does nothing."""

    def on_step(self, step: int, stats: list[float]):
        """After each optimizer step; stats = [loss sum, correct, samples] of the epoch so far."""

    def on_epoch_end(self, step: int, stats: list[float]):
        """After each epoch (or at the phase's last step), with the epoch's stats."""


class EpochEnd(Callback):
    """Evaluate, append the epoch's metrics, checkpoint (rank 0), then log it to metrics.jsonl:
    a kill between the two loses the line, which the resume writes back from the checkpoint."""

    def __init__(self, exp, phase: Phase, run: Trainee, history, save, wall, sparsity: float):
        self.exp, self.phase, self.run = exp, phase, run
        self.history, self.save, self.wall, self.sparsity = history, save, wall, sparsity
        self.start = time.perf_counter()

    def on_epoch_end(self, step, stats):
        exp, d = self.exp, self.exp.dist
        d.average_buffers(self.run.model)
        loss_sum, correct, seen = d.all_sum(list(stats))
        test_loss, test_acc = exp.evaluate(self.run.model)
        now = time.perf_counter()
        self.wall, self.start = self.wall + now - self.start, now
        row = {"phase": self.phase.key, "round": self.phase.round, "branch": self.phase.branch,
               "epoch": -(-step // exp.steps_per_epoch), "step": step,
               "lr": self.run.scheduler.get_last_lr()[0], "train_loss": loss_sum / max(seen, 1),
               "train_acc": correct / max(seen, 1), "test_loss": test_loss, "test_acc": test_acc,
               "sparsity": self.sparsity, "wall_s": self.wall}
        self.history.append(row)
        if d.main:
            self.save(step, self.wall)
            with open(exp.path("metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        d.barrier()


class Progress(Callback):
    """tqdm bar over the phase's steps with live loss / accuracy (rank 0, on a terminal)."""

    def __init__(self, exp, phase: Phase, plan, step, history, sparsity):
        from tqdm import tqdm
        self.history = history
        self.bar = tqdm(total=plan.last_step - plan.first_step, initial=step - plan.first_step,
                        desc=f"{phase.key} {100 * sparsity:5.1f}% sparse", leave=False,
                        disable=None if (exp.c.run.progress and exp.dist.main) else True,
                        dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        self.postfix = {"test": f"{history[-1]['test_acc']:.3f}"} if history else {}

    def on_step(self, step, stats):
        self.bar.update(1)
        self.postfix.update(loss=f"{stats[0] / stats[2]:.3f}", acc=f"{stats[1] / stats[2]:.3f}")
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_epoch_end(self, step, stats):
        self.postfix["test"] = f"{self.history[-1]['test_acc']:.3f}"
        self.bar.set_postfix(self.postfix)

    def close(self):
        self.bar.close()


class SaveRewindPoint(Callback):
    """Saves the dense weights at the method's rewind step (rank 0)."""

    def __init__(self, run: Trainee, at_step: int, path: str, step: int):
        self.run, self.at, self.path = run, at_step, path
        if step == at_step == 0:
            checkpoint.save(dense_state_dict(run.model), path)

    def on_step(self, step, stats):
        if step == self.at:
            checkpoint.save(dense_state_dict(self.run.model), self.path)
