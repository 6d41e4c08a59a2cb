"""Dynamic sparse training: RigL (Evci et al. 2020, "Rigging the Lottery") and SET (Mocanu et
al. 2018), `--method rigl` / `--method set`.

Round 0 trains the dense network (the reference the report compares with); round 1 trains a
sparse network from scratch at --target-sparsity: random masks with the layerwise densities of
--density-distribution (ERK by default), the run's initialisation, the full schedule. Every
--dst-update-every steps until --dst-end of training, each layer drops its smallest-magnitude
weights and grows as many elsewhere (RigL: largest dense-gradient magnitude; SET: at random),
a fraction that decays with a cosine from --dst-drop-fraction (`lth.pruning.dst`). Block masks
(--granularity block) are updated in whole blocks (block-RigL).

Between updates the model trains on the sparse kernels: `values` of each SparseLinear /
SparseConv2d is its only weight Parameter. An update costs one dense forward/backward of the
step's batch (the grow scores; SET skips it) and a re-pack of the changed layers that carries
the optimizer state over at kept positions and starts grown weights and their state at zero
(`lth.sparse.repack`); both are timed and reported in the summary (dst_*). Branches of round 1
(--branches) train the final mask statically: random_reinit is RigL's mask from a fresh
initialisation, random_ticket a random mask at the same layerwise densities (static sparse
training, the baseline RigL's paper beats). Under torchrun the dense gradients are averaged over
the ranks (and SET's draws are seeded by the step), so every rank takes the same decision.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from lth.hparams import ConfigError, _at_least, hp, register_section
from lth.methods.base import METHODS, Method, Phase
from lth.pruning import dst
from lth.pruning.erk import DISTRIBUTIONS, layer_densities, random_masks
from lth.sparse import (current_masks, dense_state_dict, dense_weights_and_gradients, repack,
                        sparse_block)


@register_section("dst", methods=("rigl", "set"))
@dataclass
class DynamicSparseHparams:
    distribution: str = hp("erk", "rigl/set: layerwise densities of the sparse network: uniform, "
                           "er (Erdos-Renyi) or erk (Erdos-Renyi-Kernel)",
                           flag="--density-distribution", choices=DISTRIBUTIONS)
    update_every: int = hp(100, "rigl/set: optimizer steps between mask updates (dT)",
                           flag="--dst-update-every", check=_at_least(1))
    drop_fraction: float = hp(0.3, "rigl/set: fraction of each layer's kept weights replaced at "
                              "the first update (alpha)", flag="--dst-drop-fraction",
                              check=lambda v: None if 0 < v < 1 else
                              f"must be in (0, 1), got {v}")
    drop_decay: str = hp("cosine", "rigl/set: how the drop fraction decays to 0 at --dst-end",
                         flag="--dst-drop-decay", choices=("cosine", "constant"))
    end: float = hp(0.75, "rigl/set: fraction of the training steps after which masks stop "
                    "changing", flag="--dst-end", check=lambda v: None if 0 < v <= 1 else
                    f"must be in (0, 1], got {v}")


class DynamicSparse(Method):
    """Sparse from scratch, masks updated while training; subclasses say how weights grow."""

    takes_target_sparsity = True
    grows_by_gradient = True

    @classmethod
    def last_round(cls, config) -> int:
        return 1

    @classmethod
    def check(cls, c) -> None:
        name = c.method.name
        if c.pruning.target_sparsity is None:
            raise ConfigError(f"--target-sparsity: --method {name} trains at a fixed sparsity; "
                              f"give it (e.g. --target-sparsity 0.9)")
        if c.pruning.granularity not in dst.GRANULARITIES:
            raise ConfigError(f"--granularity: --method {name} updates "
                              f"{' or '.join(dst.GRANULARITIES)} masks, not "
                              f"{c.pruning.granularity}")

    def check_run(self, ctx) -> None:
        every, end = ctx.config.dst.update_every, self.end_step()
        if every >= end:
            raise ConfigError(f"--dst-update-every {every}: no mask update before --dst-end "
                              f"(step {end} of {ctx.total_steps}); lower it or train longer")

    def end_step(self) -> int:
        return int(self.ctx.config.dst.end * self.ctx.total_steps)

    def round_masks(self, round_index: int):
        ctx, c = self.ctx, self.ctx.config
        params = dict(ctx.template.named_parameters())
        shapes = {n: tuple(params[n].shape) for n in ctx.prunable}
        densities = layer_densities(shapes, 1.0 - c.pruning.target_sparsity,
                                    c.dst.distribution)
        return random_masks(shapes, densities, c.pruning.granularity, c.pruning.block,
                            ctx.generator("dst-masks", round_index))

    # ------------------------------------------------------------------ training hooks
    def begin_phase(self, model, optimizer, phase: Phase) -> None:
        self.updating = phase == Phase(1)  # branches and round 0 train fixed masks
        self.pending = None
        self.stats = {"updates": 0, "swapped": 0, "scores_s": 0.0, "mask_s": 0.0,
                      "repack_s": 0.0}

    def _updates_after(self, step: int) -> bool:
        return self.updating and dst.is_update_step(step, self.ctx.config.dst.update_every,
                                                    self.end_step())

    def batch(self, x, y, step: int):
        if self.grows_by_gradient and self._updates_after(step + 1):
            self.pending = (x, y)  # the grow scores are the dense gradient of this batch
        return x, y

    def on_step(self, model, optimizer, step: int):
        if not self._updates_after(step):
            return None
        c, ctx = self.ctx.config, self.ctx
        start = time.perf_counter()
        masks = current_masks(model)
        names = list(masks)
        if self.grows_by_gradient:
            weights, grads = dense_weights_and_gradients(model, self.pending, ctx.cross_entropy,
                                                         names)
            scores = {n: g.abs() for n, g in grads.items()}
            self.pending = None
        else:
            state = dense_state_dict(model)
            weights = {n: state[n] for n in names}
            scores = dst.random_scores(masks, ctx.generator("set-grow", step))
        scored = time.perf_counter()
        fraction = dst.drop_fraction(step, c.dst.drop_fraction, self.end_step(),
                                     c.dst.drop_decay)
        new, grown = dst.update_masks(masks, weights, scores, fraction, c.pruning.granularity,
                                      c.pruning.block)
        updated = time.perf_counter()
        # re-packed as the loop's sparsify packs a mask, so a resumed run has the same layout
        repack(model, optimizer, new, grown, c.sparse.format, sparse_block(c))
        done = time.perf_counter()
        s = self.stats
        s["updates"] += 1
        s["swapped"] += sum(int(g.sum()) for g in grown.values())
        s["scores_s"] += scored - start
        s["mask_s"] += updated - scored
        s["repack_s"] += done - updated
        return model, optimizer

    def summary(self, phase: Phase) -> dict:
        if phase != Phase(1):
            return {}
        c, s = self.ctx.config, self.stats
        ms = 1e3 / max(s["updates"], 1)  # seconds in total -> ms per update
        return {"dst_grow": "gradient" if self.grows_by_gradient else "random",
                "density_distribution": c.dst.distribution,
                "dst_update_every": c.dst.update_every, "dst_end_step": self.end_step(),
                "dst_drop_fraction": c.dst.drop_fraction, "dst_updates": s["updates"],
                "dst_swapped_weights": s["swapped"],
                "dst_scores_ms": s["scores_s"] * ms, "dst_mask_ms": s["mask_s"] * ms,
                "dst_repack_ms": s["repack_s"] * ms,
                # the updates' cost spread over the round: what it adds to step_ms_sparse
                "dst_ms_per_step": 1e3 * (s["scores_s"] + s["mask_s"] + s["repack_s"])
                / self.ctx.total_steps}

    def state_dict(self) -> dict:
        return dict(self.stats)

    def load_state_dict(self, state: dict) -> None:
        self.stats.update(state)


@METHODS.register("rigl", "RigL: sparse from scratch, drop by magnitude, grow by dense-gradient "
                  "magnitude (Evci et al. 2020)")
class RigL(DynamicSparse):
    grows_by_gradient = True


@METHODS.register("set", "SET: sparse from scratch, drop by magnitude, grow at random (Mocanu "
                  "et al. 2018)")
class SET(DynamicSparse):
    grows_by_gradient = False
