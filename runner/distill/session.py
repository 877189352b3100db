"""A distillation worker's share of a job: the trainers of its layers, and its teacher runs.

A pool worker (runner/pool/worker.py) holds one `DistillSession` per distillation job. The session
owns, for every layer of the layer groups assigned to its worker, a `LayerTrainer`, a
`LayerReadiness` and an `OomLadder` (core/distill/), and a client of its node's replay store
(runner/replay). One teacher run (`run`) is, on this worker and this worker only:

    sample: generation from noise with a CaptureRoute on the run's group; per step the plan's swap
            set of that group is captured (a query subsample with every key and value) into the
            node's replay store, written by a thread beside the sampling (capture_writer.py)
    train:  per layer of the group, updates_per_capture x its new training captures (capped by the
            budget left) optimizer updates on captures sampled from the store
    validate: each layer on held-out captures; readiness observes them and flushes once
    report: per-layer statistics and the group's layer states (the driver checkpoints them)

So a layer's captures never leave its node, and everything a layer's training sees is a function of
its own group's runs and its own seeds, whatever the number of workers (docs/distill.md).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from core.attention.routes import CaptureRoute
from core.attention.student import build_student
from core.distill.capture import CAPTURE_DTYPES
from core.distill.capture_builder import CaptureSource, build_capture
from core.distill.oom_ladder import OomLadder
from core.distill.plan import TeacherRun
from core.distill.readiness import LayerReadiness
from core.distill.trainer import LayerTrainer, UpdateStats
from core.flow.generation import generation_noise, generation_sigmas
from core.flow.sampling import sample_euler
from core.flow.seeds import derive_seed
from core.models.attention_hook import AttentionRecord, LayerSet, attach, layer_keys
from core.models.backbone import Cond
from core.models.forward import forward_batch
from core.models.loading import LoadedModel
from core.rope.spec import RopeSpec
from runner.distill.capture_writer import CaptureWriter, StagingPool, WriterReport
from runner.replay import client_for_node
from tasks.distill_config import DistillConfig
from tasks.distill_records import LayerReport, RunReport

INSERT_TIMEOUT_S = 600.0
SAMPLE_TIMEOUT_S = 600.0
ROPE = RopeSpec(method="yarn")  # teacher runs above the native size extend RoPE as generation does


@dataclass
class LayerSlot:
    """One layer's training state on this worker."""

    key: str
    group: int
    trainer: LayerTrainer
    readiness: LayerReadiness
    ladder: OomLadder
    attempts: int = 0  # optimizer updates attempted (the budget counts these; skipped ones included)
    last: UpdateStats | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "trainer": self.trainer.state_dict(),
            "readiness": self.readiness.state_dict(),
            "ladder": self.ladder.state_dict(),
            "attempts": self.attempts,
            "last": None if self.last is None else self.last._asdict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.readiness.load_state_dict(state["readiness"])
        self.ladder.load_state_dict(state["ladder"])
        self.attempts = int(state["attempts"])
        self.last = None if state["last"] is None else UpdateStats(**state["last"])


@dataclass
class _RunCaptures:
    """What one run inserted, per layer: training and validation captures, bytes."""

    train: dict[str, int] = field(default_factory=dict)
    val: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0
    writer: WriterReport = field(default_factory=WriterReport)


class DistillSession:
    """The layers of `groups` (group index -> layer keys) trained on this worker."""

    def __init__(
        self,
        cfg: DistillConfig,
        groups: Mapping[int, tuple[str, ...]],
        model: LoadedModel,
        conds: Mapping[int, Cond],
        device: torch.device,
        states: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """conds: the conditioning of each prompt id of the plan."""
        self.cfg, self.model, self.device = cfg, model, device
        transformer = model.backbone.transformer  # type: ignore[attr-defined]
        self.plan = cfg.plan(tuple(layer_keys(transformer)))
        self.groups = {int(g): tuple(keys) for g, keys in groups.items()}
        for g, keys in self.groups.items():
            if self.plan.groups[g] != keys:
                raise ValueError(f"layer group {g} is {keys} here, the plan says {self.plan.groups[g]}")
        param = next(transformer.parameters())
        self.conds = {i: c.to(device, param.dtype) for i, c in conds.items()}
        self.store = client_for_node()
        self.staging = StagingPool(cfg.capture.staging_bytes) if device.type == "cuda" else None
        t = transformer.config
        self.slots: dict[str, LayerSlot] = {}
        for g, keys in self.groups.items():
            for key in keys:
                self.slots[key] = self._new_slot(key, g, t.num_attention_heads, t.attention_head_dim)
        for key, state in (states or {}).items():
            if key in self.slots and state is not None:
                self.slots[key].load_state_dict(state)

    def _new_slot(self, key: str, group: int, heads: int, head_dim: int) -> LayerSlot:
        cfg = self.cfg
        config = cfg.student.for_layer(heads, head_dim)
        student = build_student(config, seed=derive_seed(cfg.seed, "student", key)).to(self.device)
        training = cfg.training
        trainer = LayerTrainer(
            student, training.trainer, training.loss, seed=derive_seed(cfg.seed, "trainer", key)
        )
        # rung 0: the captures' query cap and the student's own chunks and landmark cap
        ladder = OomLadder(trainer.default_caps(cfg.capture.query_cap), landmark_floor=config.landmark_min)
        return LayerSlot(key, group, trainer, LayerReadiness(training.readiness), ladder)

    # -- one teacher run -------------------------------------------------------------------------
    def run(self, run: TeacherRun, worker: int) -> RunReport:
        keys = self.groups[run.group]
        start = time.perf_counter()
        captured = self._sample(run, keys)
        sampled_s = time.perf_counter() - start
        layers = {key: self._train_and_validate(self.slots[key], captured) for key in keys}
        return RunReport(
            run=run.index,
            group=run.group,
            worker=worker,
            layers=layers,
            states={key: self.slots[key].state_dict() for key in keys},
            captures=sum(captured.train.values()) + sum(captured.val.values()),
            capture_bytes=captured.nbytes,
            sample_s=sampled_s,
            train_s=time.perf_counter() - start - sampled_s,
            capture_stall_s=captured.writer.stall_s,
            capture_close_s=captured.writer.close_s,
            capture_write_s=captured.writer.write_s,
        )

    def _sample(self, run: TeacherRun, keys: tuple[str, ...]) -> _RunCaptures:
        """The run's generation from noise with its group's layers captured per the plan."""
        cfg, backbone, plan = self.cfg, self.model.backbone, self.plan
        f = self.model.vae.scale_factor
        h, w = run.height // f, run.width // f
        captured = _RunCaptures()
        swaps: dict[int, frozenset[str]] = {}
        dtype = CAPTURE_DTYPES[cfg.capture.dtype]
        writer = CaptureWriter(self._store_insert, self.staging, limit_bytes=cfg.capture.staging_bytes)

        def keep(record: AttentionRecord, out: torch.Tensor) -> None:
            step = int(record.step)
            if step not in swaps:
                swaps[step] = frozenset(plan.swap_set(run.index, step))
            # a layer whose out-of-memory ladder stopped it trains no more: its captures would only
            # take the store's bytes from the layers that still train
            if record.layer in swaps[step] and not self.slots[record.layer].ladder.stopped:
                idx = plan.query_index(run.index, step, record.layer, record.q.shape[1])
                source = CaptureSource(prompt_id=run.prompt_id, seed_id=run.seed_id)
                for b in range(record.q.shape[0]):  # one capture per batch item
                    writer.submit(build_capture(record, out, idx, source, item=b, dtype=dtype))

        sigmas = generation_sigmas(h, w, cfg.teacher.steps)
        x = generation_noise(backbone.latent_channels, h, w, run.seed).to(self.device)
        cond = self.conds[run.prompt_id]

        def model_fn(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
            s = torch.full((1,), sigma, dtype=torch.float32)
            return forward_batch(backbone, cond, x, s, ROPE, step=step, view_ids=(0,))

        route = CaptureRoute(keep)
        with writer, attach(backbone.transformer, route, LayerSet.parse(",".join(keys))):  # type: ignore[attr-defined]
            sample_euler(model_fn, x, sigmas)
        for layer, inserted, nbytes in writer.report.inserted:
            table = captured.train if inserted.split == "train" else captured.val
            table[layer] = table.get(layer, 0) + 1
            captured.nbytes += nbytes
        captured.writer = writer.report
        return captured

    def _store_insert(self, capture):
        return self.store.insert(capture, timeout_s=INSERT_TIMEOUT_S)

    # -- training --------------------------------------------------------------------------------
    def _train_and_validate(self, slot: LayerSlot, captured: _RunCaptures) -> LayerReport:
        training = self.cfg.training
        new = captured.train.get(slot.key, 0)
        todo = min(training.updates_per_capture * new, training.updates - slot.attempts)
        done, losses, start = 0, [], time.perf_counter()
        while done < todo and not slot.ladder.stopped:
            stats = self._update(slot)
            if stats is None:  # out of memory: the ladder stepped down (or stopped the layer) and the
                break  # layer's captures were cleared; it trains again on its next run's captures
            slot.attempts += 1
            slot.last = stats
            losses.append(stats.loss)
            done += 1
        train_s = time.perf_counter() - start
        evaluation = self._validate(slot)
        # the readiness ceiling is on the unweighted parts (the Kendall total goes below 0 as it learns)
        last = slot.last
        last_loss = last.smooth_l1 + last.cosine_distance if last is not None else None
        if last_loss is not None:  # once per run; a layer never trained has nothing to decide on
            slot.readiness.flush(slot.attempts, last_loss)
        ready = slot.readiness.ready
        finite = slot.last is None or slot.last.finite
        finite = finite and (evaluation is None or evaluation.finite)
        return LayerReport(
            key=slot.key,
            group=slot.group,
            updates=slot.attempts,
            new_updates=done,
            train_captures=new,
            val_captures=captured.val.get(slot.key, 0),
            loss=slot.last.loss if slot.last is not None else None,
            smooth_l1=slot.last.smooth_l1 if slot.last is not None else None,
            cosine_distance=slot.last.cosine_distance if slot.last is not None else None,
            nmse=slot.last.nmse if slot.last is not None else None,
            gate=slot.last.gate if slot.last is not None else None,
            mean_loss=sum(losses) / len(losses) if losses else None,
            val_cosine_distance=None if evaluation is None else evaluation.cosine_distance,
            val_nmse=None if evaluation is None else evaluation.nmse,
            ema_cosine_distance=slot.readiness.ema,
            ready=bool(ready),
            may_serve=bool(slot.readiness.may_serve(last_loss, finite)),
            skipped=slot.trainer.skipped,
            ladder=[r.to_json() for r in slot.ladder.record()[1:]],
            train_s=train_s,
        )

    def _update(self, slot: LayerSlot) -> UpdateStats | None:
        """One optimizer update of the layer at its ladder's caps (query cap, chunks, landmark cap);
        None after an out-of-memory error: the ladder stepped down (or stopped the layer, sticky) and
        the layer's captures were deleted from the node's store (the rung's clear_buffer)."""
        batch = self.store.sample(
            slot.key, n=self.cfg.training.trainer.captures_per_update, timeout_s=SAMPLE_TIMEOUT_S
        )
        captures = [s.capture for s in batch]
        try:
            return slot.trainer.update(captures, caps=slot.ladder.caps)
        except torch.OutOfMemoryError:
            pass
        # outside the except block: its traceback holds the failed step's activations
        del batch, captures
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        rung = slot.ladder.on_oom(slot.attempts)
        if rung.clear_buffer:
            self.store.clear_layer(slot.key)
        return None

    def _validate(self, slot: LayerSlot):
        held_out = self.store.sample_validation(slot.key, self.cfg.training.validation_captures)
        if not held_out:
            return None
        evaluation = slot.trainer.evaluate([s.capture for s in held_out])
        for d in evaluation.cosine_distances:
            slot.readiness.observe(d)
        return evaluation

    def states(self) -> dict[str, dict[str, Any]]:
        return {key: slot.state_dict() for key, slot in self.slots.items()}
