"""`python -m lth.train`: find lottery tickets, train them on sparse kernels, report.

A run is the phases its method lays out (`lth.methods`: the ticket line, round 0 then one phase
per pruned round, and the sanity-check branches); the method answers which masks, start weights
and part of the schedule each phase trains, and its hooks (and the modifiers' hooks) shape the
training. `Experiment.train_phase` runs each phase with the one training loop (`lth.loop.fit`).
This module owns everything else:

- after each prune the model is `sparsekern.sparsify`'d (policy auto per linear and conv
  layer) for training and evaluation, and turned back into a plain dense model only to save
  and to prune;
- a training step of the whole model is timed dense-masked vs as trained, interleaved, in this
  process (`step_ms_dense`, `step_ms_sparse`);
- a checkpoint (dense weights, masks, optimizer, scheduler, RNG states, per-layer kernel choices)
  is written atomically at the end of every epoch; a rerun resumes after the last finished epoch
  and skips finished phases; a finished run is reported, not redone;
- under torchrun, DistributedDataParallel (gloo on CPU, nccl on GPU): rank 0 decides the masks
  and the kernels, every rank checks it has the same, and only rank 0 writes.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import warnings

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    # OpenMP threads spin ~300k cycles between parallel regions by default; on a machine shared
    # with another busy process that makes every step ~10x slower (a spinning thread holds the
    # core the other needs). A short spin keeps the quiet-machine speed within a few percent.
    # Must be set before torch loads libgomp; set either variable yourself to override.
    os.environ["GOMP_SPINCOUNT"] = "50000"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lth import checkpoint, distributed, pruning, run_files
from lth.cli import parse_config
from lth.datasets import DataError, load_dataset
from lth.datasets.loader import epoch_order, iterate, num_batches
from lth.hparams import Config, ConfigError
from lth.methods import Phase, Plan, RunContext, derive_seed, providers
from lth.methods.base import lr_factor
from lth.loop import Diverged, EpochEnd, Progress, SaveRewindPoint, Trainee, fit
from lth.models import build_model
from lth.precision import Autocast, autocast_context
from lth.pruning.signal import outputs_reached
from lth.requirements import lth_extra_problem
from lth.results import format_table, write_summary
from lth.sparse import (check_pruned_zero, cross_entropy, current_masks, dense_state_dict,
                        densify_model, masked_dense_copy, runs_sparse_kernels, sparse_block,
                        sparse_kernels_run_on, sparsify_model, time_train_steps, zero_pruned)

CHECKPOINT_FORMAT = 1
EVAL_BATCH = 512


class UsageError(Exception):
    """A setting that cannot work with this data/model; reported like a bad flag."""


def make_optimizer(t, params):
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                               weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def _fully_pruned(empty: list[str]) -> str:
    return f" ({', '.join(empty)} fully pruned)" if empty else ""


def no_signal_note(reached: int, outputs: int, empty: list[str]) -> str:
    """The end of a phase's log line when kept weights join not every output to the input."""
    if reached == 0:
        return f"  NO SIGNAL: no output joined to the input{_fully_pruned(empty)}"
    return f"  signal reaches {reached} of {outputs} outputs" if reached < outputs else ""


class Experiment:
    def __init__(self, config: Config, dist: distributed.Dist | None = None, argv=None,
                 run_dir: str | None = None, read_only: bool = False):
        """read_only (lth.report): an unreadable result.json is left out, never removed."""
        self.c = c = config
        self.read_only = read_only
        self._states_like: dict[str, dict] = {}
        self.dist = dist or distributed.Dist()
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.device = resolve_device(c.run.device, self.dist.local_rank)
        if c.run.threads:
            torch.set_num_threads(c.run.threads)
        elif self.dist.enabled and self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.dist.local_world))
        if c.training.batch_size % self.dist.world:
            raise UsageError(f"--batch-size {c.training.batch_size} is not divisible by the "
                             f"{self.dist.world} DDP processes")
        self.batch_size = c.training.batch_size // self.dist.world
        try:
            self.data = load_dataset(c.dataset)
        except DataError as e:
            raise UsageError(str(e)) from None
        self.template = self.fresh_model(derive_seed(c.training.seed, "init"))
        try:
            self.prunable = pruning.prunable_names(self.template, c.pruning.exclude,
                                                   c.pruning.granularity)
            if c.pruning.granularity == "nm":
                for n in self.prunable:
                    pruning.nm_groups(dict(self.template.named_parameters())[n], c.pruning.nm[1],
                                      n)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.steps_per_epoch = num_batches(
            len(epoch_order(len(self.data.train), 0, True, self.dist.rank, self.dist.world)),
            self.batch_size)
        total = c.training.epochs * self.steps_per_epoch
        if c.training.warmup_steps >= total:
            raise UsageError(f"--warmup-steps {c.training.warmup_steps} is not shorter than a "
                             f"round's training ({c.training.epochs} epochs of "
                             f"{self.steps_per_epoch} steps = {total}): the lr would never "
                             f"reach --lr")
        self.run_dir = run_dir or os.path.join(c.run.runs_dir, c.run_name())
        self.ctx = RunContext(
            config=c, device=self.device, steps_per_epoch=self.steps_per_epoch,
            prunable=self.prunable, template=self.template, fresh_model=self.fresh_model,
            phase_masks=self.final_masks, final_state=self.final_state,
            rewind_state=lambda: self.finished_file(
                Phase(0), "rewind.pt",
                lambda state: run_files.check_state(state, self.state_like(Phase(0)),
                                                    "the rewind point")),
            trained_model=self.trained_model,
            cross_entropy=cross_entropy(c.training.label_smoothing), log=self.log)
        self.hooks = providers(self.ctx)
        self.method = self.hooks[0]
        if not self.prunable and self.method.last_round(c) >= 1:
            raise UsageError("--prune-exclude leaves no layer to prune")
        if c.pruning.granularity == "block" and self.method.last_round(c) >= 1:
            self.check_blocks()
        try:
            self.method.check_run(self.ctx)
            if self.method.last_round(c):  # a tweak that cannot transform this model says so
                for hook in self.hooks[1:]:  # now, not after round 0 has trained
                    hook.model_transform(copy.deepcopy(self.template), Phase(1))
        except ConfigError as e:
            raise UsageError(str(e)) from None
        self.phases = self.method.phases(c)
        self.loss_fn = self.ctx.cross_entropy
        self.policy = c.sparse.policy
        if self.policy != "dense" and not sparse_kernels_run_on(self.device):
            warnings.warn(f"sparsekern has no kernels for {self.device}: pruned layers train "
                          f"masked-dense (--sparse-policy dense)", RuntimeWarning, stacklevel=2)
            self.policy = "dense"
        self.autocast = autocast_context(self.device, c.training.autocast)

    def check_blocks(self):
        """A layer that is one block can never be pruned (pruning keeps a unit per layer): an
        error when that is every prunable layer (rounds at 0% sparsity), else a warning."""
        params = dict(self.template.named_parameters())
        bn, bk = self.c.pruning.block
        single = [n for n in self.prunable if pruning.block_pattern(
            torch.ones(params[n].shape, dtype=torch.bool), (bn, bk)).numel() == 1]
        if not single:
            return
        shapes = ", ".join(f"{n} {'x'.join(map(str, params[n].shape))}" for n in single)
        if len(single) == len(self.prunable):
            raise UsageError(f"--block {bn}x{bk}: every prunable layer is a single block "
                             f"({shapes}) and pruning keeps at least one block per layer, so it "
                             f"would remove nothing; use a smaller --block")
        warnings.warn(f"--block {bn}x{bk}: {shapes} is a single block and is never pruned "
                      f"(pruning keeps at least one block per layer)", RuntimeWarning,
                      stacklevel=2)

    # ------------------------------------------------------------------ small helpers
    def log(self, msg: str):
        if self.dist.main:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def path(self, *parts) -> str:
        return os.path.join(self.run_dir, *parts)

    def fresh_model(self, seed: int) -> nn.Module:
        return build_model(self.c.model, self.data.input_shape, self.data.num_classes, seed)

    def done(self, phase: Phase) -> bool:
        return self.result(phase) is not None

    def result(self, phase: Phase) -> dict | None:
        """A finished phase's result.json; None while unfinished. An unreadable one is removed
        (rank 0) so the phase is redone: from its checkpoint, which holds everything the result
        is made of, or from the start without one."""
        path = self.path(phase.key, "result.json")
        if not os.path.isfile(path):
            return None
        try:
            return run_files.read(checkpoint.read_json, path,
                         lambda r: run_files.check_result(r, phase.round, phase.branch))
        except run_files.UnreadableFile as e:
            if self.read_only:
                self.log(f"{e}: left out (rerun the run's python -m lth.train command to redo "
                         f"{phase.key})")
            elif self.dist.main:
                self.log(f"{e}: removed; {phase.key} is redone (from its checkpoint where that "
                         f"is readable)")
                os.remove(path)
            return None

    # ------------------------------------------------------------------ run
    def run(self) -> list[dict]:
        finished = all(self.done(p) for p in self.phases)
        if finished:
            self.prepare_run_dir(finished=True)  # an unreadable config.json is written again
            self.log(f"run already finished: {self.run_dir} (delete it to train again)")
        else:
            self.prepare_run_dir()
            for phase in self.phases:
                if not self.done(phase):
                    self.train_phase(phase)
                self.dist.barrier()
        entries = [self.result(p) for p in self.phases]
        if self.dist.main:
            write_summary(self.run_dir, entries)
            from lth.plots import plot_run
            from lth.report import report_text, verdicts
            plots = plot_run(self.run_dir, entries)
            rows = verdicts(entries)
            text = report_text(rows)
            checkpoint.write_text(text + "\n", self.path("report.txt"))
            checkpoint.write_json(rows, self.path("report.json"))
            self.log("")
            self.log(format_table(entries))
            self.log("")
            self.log(text)
            self.log("")
            self.log(f"run dir:  {self.run_dir}")
            self.log(f"summary:  {self.path('summary.json')} (+ summary.csv, metrics.jsonl)")
            if plots:
                self.log("plots:    " + ", ".join(plots))
            self.log(f"report:   python -m lth.report {self.run_dir}")
        return entries

    def prepare_run_dir(self, finished: bool = False):
        info = {"name": self.c.run_name(), "hash": self.c.hash(),
                "non_default": self.c.non_default(), "config": self.c.to_dict(),
                "command": ["python", "-m", "lth.train", *self.argv],
                "world_size": self.dist.world, "sparsekern_extension":
                    __import__("sparsekern")._extension.available()}
        existing = self.path("config.json")
        old = None
        if os.path.isfile(existing):
            try:
                old = run_files.read(checkpoint.read_json, existing, run_files.check_config)
            except run_files.UnreadableFile as e:
                # the folder's name holds the hash of these settings: writing it again is safe
                if self.dist.main:
                    self.log(f"{e}: written again from these settings (the folder name's hash "
                             f"pins them)")
                    checkpoint.write_json(info, existing)
                old = info
        if old is not None:
            if old.get("non_default") != info["non_default"]:
                raise UsageError(f"{self.run_dir} holds a run with other settings "
                                 f"({old.get('non_default')}); pass another --name or delete it")
            started = any(os.path.isdir(self.path(p.key)) for p in self.phases)
            if not finished:
                self.log(f"resuming {self.run_dir}" if started else f"run dir: {self.run_dir}")
            if self.dist.main:  # files a kill left half-written
                for name in os.listdir(self.run_dir):
                    if ".tmp." in name:
                        os.remove(self.path(name))
        elif self.dist.main:
            try:
                os.makedirs(self.run_dir, exist_ok=True)
            except OSError as e:
                raise UsageError(f"--runs-dir {self.c.run.runs_dir}: cannot make the run folder "
                                 f"{self.run_dir} ({e.strerror})") from None
            checkpoint.write_json(info, existing)
            self.log(f"run dir: {self.run_dir}")
        self.dist.barrier()

    # ------------------------------------------------------------------ finished phases
    def final_checkpoint(self, phase: Phase) -> dict:
        return self.finished_file(phase, "checkpoint.pt", self.checkpoint_check(phase))

    def checkpoint_check(self, phase: Phase):
        return lambda ckpt: run_files.check_checkpoint(ckpt, CHECKPOINT_FORMAT, phase.key,
                                                       self.c.hash(), self.state_like(phase))

    def state_like(self, phase: Phase) -> dict[str, torch.Tensor]:
        """The state (names, shapes) of this phase's dense model, which its files must match."""
        if phase.key not in self._states_like:
            model = self.transformed(copy.deepcopy(self.template), phase)
            self._states_like[phase.key] = model.state_dict()
        return self._states_like[phase.key]

    def finished_file(self, phase: Phase, name: str, check=None):
        """A file of a finished phase that a later phase starts from; unreadable: one line
        saying how to train that phase again."""
        try:
            return run_files.read(checkpoint.load, self.path(phase.key, name), check)
        except run_files.UnreadableFile as e:
            raise UsageError(f"{e}: delete {self.path(phase.key)} and rerun the same command "
                             f"to train {phase.key} again") from None

    def final_state(self, phase: Phase) -> dict[str, torch.Tensor]:
        return self.final_checkpoint(phase)["model"]

    def final_masks(self, phase: Phase) -> dict[str, torch.Tensor]:
        """The masks a finished phase ended with (round 0: none)."""
        return self.final_checkpoint(phase)["masks"]

    def signal(self, model: nn.Module, masks) -> tuple[int, int]:
        """(output units that kept weights join to the input, output units) of a phase's model
        (as it trains: packed or masked) under `masks` (lth.pruning.signal)."""
        return outputs_reached(densify_model(copy.deepcopy(model)), masks,
                               self.timing_batch()[0])

    def transformed(self, model: nn.Module, phase: Phase) -> nn.Module:
        for hook in self.hooks:
            model = hook.model_transform(model, phase)
        return model

    def final_dense(self, phase: Phase, ckpt: dict) -> nn.Module:
        """A finished phase's final weights in the plain dense model (zeros where pruned)."""
        model = self.transformed(self.fresh_model(derive_seed(self.c.training.seed, "init")),
                                 phase)
        model.load_state_dict(ckpt["model"])
        return model.to(self.device)

    def trained_model(self, phase: Phase) -> nn.Module:
        """A finished phase's final model as it trained: transformed, packed, on the device."""
        ckpt = self.final_checkpoint(phase)
        model = self.final_dense(phase, ckpt)
        masks = {n: m.to(self.device) for n, m in ckpt["masks"].items()}
        sparsify_model(model, masks, self.c.sparse.format, self.policy, sparse_block(self.c),
                       decisions=ckpt["decisions"], nm=self._nm(masks))
        return model

    def phase_masks(self, phase: Phase) -> dict[str, torch.Tensor]:
        """Masks of a pruned phase: computed once by rank 0, saved to masks.pt, read back by
        every rank and checked to be identical everywhere."""
        if phase.round == 0:
            return {}
        path = self.path(phase.key, "masks.pt")
        like = self.state_like(phase)
        if self.dist.main and os.path.isfile(path):
            try:
                run_files.read(checkpoint.load, path, lambda m: run_files.check_masks(m, like))
            except run_files.UnreadableFile as e:  # made from finished phases: computed again
                self.log(f"{e}: computed again")
                os.remove(path)
        if self.dist.main and not os.path.isfile(path):
            checkpoint.save(self.method.masks(phase), path)
        self.dist.barrier()
        masks = run_files.read(checkpoint.load, path)
        digest = sum(float((m.flatten().double() * torch.arange(1, m.numel() + 1,
                                                                 dtype=torch.float64)).sum())
                     for m in masks.values())
        if not self.dist.same_everywhere(digest):
            raise RuntimeError(f"{phase.key}: masks differ between DDP ranks")
        return masks

    # ------------------------------------------------------------------ timing
    def timing_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first training batch (fixed order): what step timings run on."""
        order = epoch_order(len(self.data.train), 0, False)[: self.batch_size]
        x, y = next(iterate(self.data.train, order, self.batch_size))
        return x.to(self.device), y.to(self.device)

    def measure(self, dense: nn.Module, trained: nn.Module, masks) -> dict:
        """Median ms of one training step: dense-masked, as trained (sparse), unmasked parent;
        timed until the ratios to dense-masked settle, and how busy the machine was."""
        batch = self.timing_batch()
        s = self.c.sparse
        models = {}
        if masks:  # dense-masked first: the baseline of the ratios that must settle
            models["dense"] = masked_dense_copy(dense, masks)
            if runs_sparse_kernels(trained):  # else it is the dense-masked model: 1.00x
                models["sparse"] = copy.deepcopy(trained)
        models["unmasked"] = copy.deepcopy(dense)
        models = {k: Autocast(m, self.autocast) for k, m in models.items()}
        times, how = time_train_steps(models, lambda p: make_optimizer(self.c.training, p),
                                      batch, self.loss_fn, s.timing_warmup, s.timing_repeats)
        times.setdefault("dense", times["unmasked"])
        times.setdefault("sparse", times["dense"])
        return {"step_ms_dense": times["dense"], "step_ms_sparse": times["sparse"],
                "step_ms_unmasked": times["unmasked"], "timing_batch": len(batch[1]),
                "timing_threads": torch.get_num_threads(), "timing_rounds": how["rounds"],
                "timing_stable": how["stable"], "load_average": how["load_average"],
                "busy": how["busy"]}

    def retime(self) -> dict:
        """Every finished phase's final model timed again, all interleaved in this one process
        (`python -m lth.report --time`): dense-masked and as it trained, and the unmasked parent
        once, so a resume or a busy moment during one round cannot skew the speedup column."""
        finished = [p for p in self.phases if self.done(p)]
        if not finished:
            raise UsageError(f"{self.run_dir}: no finished phase to time")
        models, keys = {}, {}
        for phase in finished:
            ckpt = self.final_checkpoint(phase)
            dense = self.final_dense(phase, ckpt)
            models.setdefault("unmasked", copy.deepcopy(dense))
            if ckpt["masks"]:
                masks = {n: m.to(self.device) for n, m in ckpt["masks"].items()}
                trained, dense_key = self.trained_model(phase), f"{phase.key}:dense"
                models[dense_key] = masked_dense_copy(dense, masks)
                if runs_sparse_kernels(trained):
                    models[f"{phase.key}:sparse"] = trained
                    keys[phase.key] = (dense_key, f"{phase.key}:sparse")
                else:  # masked-dense as trained: the same model, timed once
                    keys[phase.key] = (dense_key, dense_key)
            else:
                keys[phase.key] = ("unmasked", "unmasked")
        s = self.c.sparse
        times, how = time_train_steps(
            {k: Autocast(m, self.autocast) for k, m in models.items()},
            lambda p: make_optimizer(self.c.training, p), self.timing_batch(), self.loss_fn,
            s.timing_warmup, s.timing_repeats)
        rows = []
        for phase in finished:
            result = self.result(phase)
            dense, sparse = (times[k] for k in keys[phase.key])
            rows.append({"phase": phase.key, "round": phase.round, "branch": phase.branch,
                         "sparsity": result["sparsity"], "step_ms_dense": dense,
                         "step_ms_sparse": sparse, "speedup": dense / sparse,
                         "step_ms_unmasked": times["unmasked"],
                         "in_run_step_ms_dense": result["step_ms_dense"],
                         "in_run_step_ms_sparse": result["step_ms_sparse"],
                         "in_run_speedup": result["speedup"]})
        return {"rows": rows, "step_ms_unmasked": times["unmasked"],
                "timing_batch": self.batch_size, "timing_threads": torch.get_num_threads(),
                "timing_repeats": s.timing_repeats, "timing_warmup": s.timing_warmup,
                "timing_rounds": how["rounds"], "timing_stable": how["stable"],
                "load_average": how["load_average"], "cpu_wait": how["cpu_wait"],
                "busy": how["busy"], "device": str(self.device),
                "autocast": self.c.training.autocast}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        model.eval()
        order = epoch_order(len(self.data.test), 0, False, self.dist.rank, self.dist.world,
                            equal_shards=False)
        loss = correct = count = 0.0
        for x, y in iterate(self.data.test, order, EVAL_BATCH, self.c.dataset.num_workers):
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                out = model(x)
            loss += float(F.cross_entropy(out.float(), y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            count += len(y)
        model.train()
        loss, correct, count = self.dist.all_sum([loss, correct, count])
        return loss / count, correct / count

    # ------------------------------------------------------------------ one phase
    def train_phase(self, phase: Phase):
        c, d = self.c, self.dist
        pdir = self.path(phase.key)
        spe = self.steps_per_epoch
        plan = self.method.plan(phase)
        if d.main and os.path.isdir(pdir):  # files a kill left half-written
            for name in os.listdir(pdir):
                if ".tmp." in name:
                    os.remove(os.path.join(pdir, name))
        d.barrier()
        ckpt = None
        if os.path.isfile(os.path.join(pdir, "checkpoint.pt")):
            try:
                ckpt = run_files.read(checkpoint.load, os.path.join(pdir, "checkpoint.pt"),
                             self.checkpoint_check(phase))
            except run_files.UnreadableFile as e:  # only a resume point: the phase starts over
                self.log(f"{e}: {phase.key} starts over")
                d.barrier()
                if d.main:
                    os.remove(e.path)
                    self._rewrite_metrics(phase, [])
        # a resumed phase trains the masks it was checkpointed with (a dynamic method moves them)
        masks = ckpt["masks"] if ckpt else self.phase_masks(phase)
        model, decisions, timing = self.prepare_model(phase, plan, ckpt, masks)
        signal = self.signal(model, masks)
        if masks and signal[0] == 0:
            self.log(f"{phase.key}: no path of kept weights joins its input to any output"
                     f"{_fully_pruned(pruning.empty_layers(masks))}: it trains a constant "
                     f"function, and its accuracy is reported as no result")

        optimizer = make_optimizer(c.training, model.parameters())
        if plan.constant_lr is not None:
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] = plan.constant_lr
            factor = (lambda i: 1.0)
        else:
            factor = (lambda i, first=plan.first_step: lr_factor(c.training, first + i, spe))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        step, history, wall = plan.first_step, [], 0.0
        if ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            checkpoint.set_rng_state(ckpt["rng"])
            step, history, wall = ckpt["step"], list(ckpt["history"]), ckpt["wall_s"]
            self.log(f"{phase.key}: resuming after epoch {step // spe} (step {step})")
            self._rewrite_metrics(phase, history)
        else:
            torch.manual_seed(derive_seed(c.training.seed, "train", phase.key))
        for hook in self.hooks:
            hook.begin_phase(model, optimizer, phase)
        if ckpt:
            for hook, state in zip(self.hooks, ckpt["hooks"]):
                hook.load_state_dict(state)
        run = Trainee(model, self._wrap(model), optimizer, scheduler)

        def save_checkpoint(step: int, wall: float):
            state = dense_state_dict(run.model)
            nonfinite = sorted(n for n, v in state.items()
                               if v.is_floating_point() and not bool(torch.isfinite(v).all()))
            if nonfinite:  # a finite loss can still leave inf weights behind
                raise Diverged(step, f"weights of {', '.join(nonfinite[:3])} are not finite")
            masks_now = current_masks(run.model) if masks else {}
            check_pruned_zero(state, masks_now)
            checkpoint.save({
                "format": CHECKPOINT_FORMAT, "phase": phase.key, "round": phase.round,
                "branch": phase.branch, "config_hash": c.hash(), "step": step,
                "epoch": -(-step // spe), "first_step": plan.first_step,
                "last_step": plan.last_step, "model": state,
                "masks": {n: m.cpu() for n, m in masks_now.items()}, "decisions": decisions,
                "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                "rng": checkpoint.rng_state(), "timing": timing, "history": history,
                "hooks": [h.state_dict() for h in self.hooks], "wall_s": wall},
                os.path.join(pdir, "checkpoint.pt"))

        sparsity = pruning.sparsity(masks) if masks else 0.0
        progress = Progress(self, phase, plan, step, history, sparsity)
        callbacks = [EpochEnd(self, phase, run, history, save_checkpoint, wall, sparsity),
                     progress]
        rewind_at = self.method.rewind_step(phase)
        if rewind_at is not None and d.main:
            callbacks.append(SaveRewindPoint(run, rewind_at, os.path.join(pdir, "rewind.pt"),
                                             step))

        def batches(epoch: int, skip: int):
            order = epoch_order(len(self.data.train),
                                derive_seed(c.training.seed, "data", phase.key, epoch),
                                True, d.rank, d.world)
            for x, y in iterate(self.data.train, order, self.batch_size,
                                c.dataset.num_workers, skip=skip):
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

        try:
            fit(run, self.hooks, self.loss_fn, batches, step, plan.last_step, spe, callbacks,
                wrap=self._wrap, autocast=self.autocast)
        except Diverged as e:
            progress.close()
            flag = plan.lr_flag
            now = c.method.finetune_lr if flag == "--finetune-lr" else c.training.lr
            raise UsageError(f"{phase.key} (round {phase.round}) diverged in epoch "
                             f"{-(-e.step // spe)} (step {e.step}): {e.what}; lower {flag} "
                             f"(now {now:g}) and run again") from None
        progress.close()
        if d.enabled:  # DDP kept every rank's weights identical, or something is badly wrong
            digest = sum(float(p.detach().double().sum()) for p in run.model.parameters())
            if not d.same_everywhere(digest):
                raise RuntimeError(f"{phase.key}: weights differ between DDP ranks")
        if not history:  # a phase with nothing to train cannot happen with validated settings
            raise RuntimeError(f"{phase.key}: no training steps")
        final_masks = current_masks(run.model) if masks else {}
        if any(not torch.equal(final_masks[n].cpu(), m.cpu()) for n, m in masks.items()):
            signal = self.signal(run.model, final_masks)  # a dynamic method moved the masks
        self.finish_phase(phase, plan, final_masks, decisions, timing, history, signal)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """What the loop calls forward on: the model, or its DDP wrapper under torchrun."""
        if not self.dist.enabled:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=False)

    def prepare_model(self, phase: Phase, plan: Plan, ckpt, masks):
        """The model a phase trains: plain dense weights (start state or checkpoint, zeros where
        pruned) through the providers' model_transform, sparsified per layer (rank 0 decides, or
        the checkpoint's decisions), plus the dense-vs-sparse step timing of this round."""
        c, d = self.c, self.dist
        model = self.fresh_model(derive_seed(c.training.seed, "init"))
        if ckpt:  # the architecture first, then the checkpoint's weights
            model = self.transformed(model, phase)
            model.load_state_dict(ckpt["model"])
        else:
            model.load_state_dict(self.method.start_state(phase, plan))
            zero_pruned(model, masks)
            model = self.transformed(model, phase)
            zero_pruned(model, masks)
        model.to(self.device)
        masks = {n: m.to(self.device) for n, m in masks.items()}
        dense = copy.deepcopy(model)
        decisions = ckpt["decisions"] if ckpt else None
        if masks:
            if decisions is None:
                if d.main:
                    decisions = sparsify_model(model, masks, c.sparse.format, self.policy,
                                               sparse_block(self.c), self.batch_size,
                                               example_input=self.timing_batch()[0],
                                               nm=self._nm(masks))
                decisions = d.broadcast(decisions)
            if not (d.main and ckpt is None):
                sparsify_model(model, masks, c.sparse.format, self.policy, sparse_block(self.c),
                               decisions=decisions, nm=self._nm(masks))
        decisions = decisions or {}
        timing = ckpt["timing"] if ckpt else d.broadcast(
            self.measure(dense, model, masks) if d.main else None)
        if (ckpt is None and self.policy == "auto"
                and any(v["chosen"] == "sparse" for v in decisions.values())
                and timing["step_ms_sparse"] > timing["step_ms_dense"]):
            # sparsify's auto policy times each layer alone; when the whole training step is
            # still slower with the sparse kernels, this round trains masked-dense instead
            note = (f"whole training step slower with sparse kernels "
                    f"({timing['step_ms_sparse']:.2f} vs {timing['step_ms_dense']:.2f} ms)")
            decisions = {n: {**v, "chosen": "dense", "note": note} if v["chosen"] == "sparse"
                         else v for n, v in decisions.items()}
            model = dense
            sparsify_model(model, masks, c.sparse.format, self.policy, sparse_block(self.c),
                           decisions=decisions, nm=self._nm(masks))
            timing = {**timing, "step_ms_sparse_kernels": timing["step_ms_sparse"],
                      "step_ms_sparse": timing["step_ms_dense"]}
        return model, decisions, timing

    def finish_phase(self, phase, plan, masks, decisions, timing, history, signal):
        c, d, spe = self.c, self.dist, self.steps_per_epoch
        last = history[-1]
        kernels = sum(1 for v in decisions.values() if v["chosen"] == "sparse")
        sparsity = pruning.sparsity(masks) if masks else 0.0
        empty = pruning.empty_layers(masks)
        # masks that join no output to the input train a constant: its accuracy is no result
        reached, outputs = signal
        result = {
            "round": phase.round, "branch": phase.branch,
            "method": c.method.name if phase.branch == "ticket" else phase.branch,
            "sparsity": sparsity, "test_acc": last["test_acc"],
            "best_test_acc": max(h["test_acc"] for h in history),
            "test_loss": last["test_loss"], "train_acc": last["train_acc"],
            "train_loss": last["train_loss"],
            "epochs": (plan.last_step - plan.first_step) / spe,
            "steps": plan.last_step - plan.first_step, "first_step": plan.first_step,
            "step_ms_dense": timing["step_ms_dense"], "step_ms_sparse": timing["step_ms_sparse"],
            "step_ms_unmasked": timing["step_ms_unmasked"],
            "step_ms_sparse_kernels": timing.get("step_ms_sparse_kernels",
                                                 timing["step_ms_sparse"]),
            "speedup": timing["step_ms_dense"] / timing["step_ms_sparse"],
            "timing_batch": timing["timing_batch"], "timing_threads": timing["timing_threads"],
            # checkpoints written before the timing recorded how it was taken have None here
            **{k: timing.get(k) for k in ("timing_rounds", "timing_stable", "load_average",
                                          "busy")},
            "sparse_layers": f"{kernels}/{len(decisions)}",
            "layers": {n: {k: v[k] for k in ("kind", "chosen", "format", "nm", "block",
                                             "sparsity", "reason") if k in v}
                       for n, v in decisions.items()},
            "wall_s": last["wall_s"], "world_size": d.world,
            "device": str(self.device), "autocast": c.training.autocast,
            "dense_reference": phase == Phase(0) and self.method.dense_round0,
            "empty_layers": empty, "signal_outputs": reached, "outputs": outputs,
        }
        for hook in self.hooks:
            extra = hook.summary(phase)
            clash = sorted(set(extra) & set(result))
            if clash:
                raise RuntimeError(f"{type(hook).__name__}.summary: {clash} are written by the "
                                   f"loop")
            result.update(extra)
        if d.main:
            checkpoint.write_json(result, self.path(phase.key, "result.json"))
            entries = [e for e in map(self.result, self.phases) if e is not None]
            write_summary(self.run_dir, entries)
        self.log(f"{phase.key:<26} sparsity {100 * sparsity:5.1f}%  test acc "
                 f"{100 * last['test_acc']:6.2f}%  step dense {timing['step_ms_dense']:7.2f} ms"
                 f"  sparse {timing['step_ms_sparse']:7.2f} ms  ({result['speedup']:.2f}x, "
                 f"{kernels}/{len(decisions)} layers sparse)  {last['wall_s']:6.1f} s"
                 + (f"  [timed over {result['timing_rounds']} rounds"
                    f"{'' if result['timing_stable'] else ', ratio not settled'}"
                    f"{', busy machine' if result['busy'] else ''}]"
                    if result["timing_rounds"] is not None else "")
                 + no_signal_note(reached, outputs, empty))
        d.barrier()

    def _nm(self, masks):
        """--sparse-format nm: the N:M the masks follow, N:M pruning reaching --nm over the
        rounds (2:4 at --prune-fraction 0.2 keeps 3 of 4 after its first round)."""
        if self.c.sparse.format != "nm":
            return None
        n, m = self.c.pruning.nm
        return max([n] + [int(pruning.nm_counts(mask, m).max()) for mask in masks.values()]), m

    def _rewrite_metrics(self, phase: Phase, history: list[dict]):
        """metrics.jsonl after a resume: this phase's lines are exactly the checkpoint's."""
        if not self.dist.main:
            return
        path = self.path("metrics.jsonl")
        rows = []
        if os.path.isfile(path):
            with open(path, errors="replace") as f:  # bytes a disk error left: lines dropped
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill
                        continue
                    if isinstance(row, dict) and row.get("phase") != phase.key:
                        rows.append(row)  # not a dict: no line this loop wrote, dropped
        rows += history
        checkpoint.write_text("".join(json.dumps(r) + "\n" for r in rows), path)


# ----------------------------------------------------------------------------- the loop

def main(argv: list[str] | None = None) -> int:
    if (problem := lth_extra_problem()) is not None:
        print(problem, file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_config(argv)
    try:
        device = resolve_device(config.run.device,
                                int(os.environ.get("LOCAL_RANK", "0")))
    except UsageError as e:
        print(f"python -m lth.train: error: {e}", file=sys.stderr)
        return 2
    dist = distributed.setup(device.type)
    try:
        Experiment(config, dist, argv).run()
        # Every rank reaches the end before any tears gloo down: rank 0 writes the run's last
        # files alone, and a rank that destroyed its group meanwhile was seen to abort in
        # gloo's teardown ("terminate called without an active exception", SIGABRT).
        dist.barrier()
    except (UsageError, run_files.UnreadableFile) as e:
        if dist.main:
            print(f"python -m lth.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: what was saved stays; a traceback would say nothing
        if os.environ.get("RANK", "0") == "0":
            print("python -m lth.train: interrupted; rerun the same command to resume after the "
                  "last finished epoch", file=sys.stderr)
        sys.exit(130)
