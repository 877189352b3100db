"""The runner's side of `tasks.context`: a job's artifacts, and its model pool (Ray or in-process).

Checkpoints go through here, so every task gets the runner's resume rules without code of its own:
a state is written with the job's fingerprint (runner/fingerprint.py) and read back only when the
fingerprint matches; a damaged file, or one from a job that differed, is set aside (renamed) and
recorded, and the previous checkpoint, or a fresh start, takes its place (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.attention.counters import RouteCounters
from core.models.backbone import Cond
from core.models.forward import evaluate_in_process
from core.models.loading import LoadedModel
from core.tiling.views import ViewInput
from core.vae.lockstep import in_process, run_tiled
from core.vae.tiled import VaeOp, plan_tiles
from runner import artifacts
from runner.distill.serving import ServedStudents, StudentsServing, add_counters
from runner.fingerprint import Fingerprint
from runner.models import model_cpu_threads
from runner.tracking import Tracker
from tasks.distill_attention import AttentionConfig


def _fmt_duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class JobArtifacts:
    """Files under the output folder, the job record (job.json), timings, progress lines and metrics.

    fingerprint: the job's (runner/fingerprint.py); checkpoints are stamped with it and only a
      matching one is resumed. None (a task driven directly, in tests) stamps and checks nothing.
    on_checkpoint: called after each checkpoint is written (the runner rewrites job.json then, so a
      killed driver leaves a record of how far it got).
    """

    def __init__(
        self,
        output: Path,
        tracker: Tracker | None = None,
        stream=None,
        *,
        fingerprint: Fingerprint | None = None,
    ) -> None:
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker
        self.stream = stream or sys.stdout
        self.fingerprint = fingerprint
        self.on_checkpoint: Callable[[], None] | None = None
        self.records: dict[str, Any] = {}
        self.fallbacks: list[dict] = []
        self.timings: dict[str, float] = {}
        self.set_aside: list[dict] = []  # checkpoints that were not used, and why
        self.checkpoints: dict[str, dict] = {}  # name -> when it was last written, at which progress
        self.last_progress: dict[str, Any] | None = None
        self._progress_start: dict[str, tuple[float, int]] = {}

    def path(self, name: str) -> Path:
        path = (self.output / name).resolve()
        if self.output.resolve() not in path.parents and path != self.output.resolve():
            raise ValueError(f"artifact name {name!r} leaves the output folder")
        return path

    def read_image(self, path: str) -> torch.Tensor:
        return artifacts.read_image(path)

    def read_images(self, folder: str) -> list[torch.Tensor]:
        return artifacts.read_images(folder)

    def directory(self, name: str) -> str:
        path = self.path(name)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def save_image(self, name: str, image: torch.Tensor | np.ndarray) -> str:
        artifacts.write_png(self.path(name), image)
        return name

    def save_json(self, name: str, data: Any) -> str:
        artifacts.write_json(self.path(name), data)
        return name

    # -- checkpoints -------------------------------------------------------------------------------
    def _stamp(self) -> dict | None:
        return None if self.fingerprint is None else self.fingerprint.as_dict()

    def save_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> str:
        artifacts.write_tensors(self.path(name), tensors, self._stamp())
        self._saved(name)
        return name

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        return self._load(name, artifacts.read_tensors)

    def save_state(self, name: str, state: Mapping[str, Any]) -> str:
        artifacts.write_state(self.path(name), state, self._stamp())
        self._saved(name)
        return name

    def load_state(self, name: str) -> dict[str, Any] | None:
        return self._load(name, artifacts.read_state)

    def _saved(self, name: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.checkpoints[name] = {"time": now, "progress": self.last_progress}
        if self.on_checkpoint is not None:
            self.on_checkpoint()

    def _load(self, name: str, read: Callable[[Path], artifacts.Stored | None]) -> Any:
        """The newest usable checkpoint under `name`: the file, else the one it replaced; a file that
        is damaged or stamped by a job that differed is set aside and recorded."""
        path = self.path(name)
        for candidate in (path, artifacts.previous(path)):
            try:
                stored = read(candidate)
            except artifacts.DamagedFileError as err:
                self._set_aside(candidate, "damaged", str(err))
                continue
            if stored is None:
                continue
            fp = self.fingerprint
            if fp is not None and (stored.fingerprint or {}).get("digest") != fp.digest:
                differs = ", ".join(fp.differences(stored.fingerprint))
                self._set_aside(candidate, "stale", f"written by a job that differed in: {differs}")
                continue
            if candidate != path:
                self.record_fallback(
                    "previous checkpoint", f"{name} was not usable; resuming from the one before it"
                )
            return stored.contents
        return None

    def _set_aside(self, path: Path, why: str, reason: str) -> None:
        moved = artifacts.set_aside(path, why)
        rel = lambda p: str(p.relative_to(self.output.resolve()))  # noqa: E731
        self.set_aside.append({"file": rel(path), "moved_to": rel(moved), "reason": reason})
        self.record_fallback(f"checkpoint set aside ({why})", f"{rel(path)} -> {rel(moved)}: {reason}")

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(metrics, step)

    def progress(
        self, label: str, done: int, total: int, *, unit: str = "views", count: int | None = None
    ) -> None:
        now = time.perf_counter()
        count = done if count is None else count
        start, start_count = self._progress_start.setdefault(label, (now, 0))
        if done == 0:
            self._progress_start[label] = (now, count)
            start, start_count = now, count
        elapsed = now - start
        rate = (count - start_count) / elapsed if elapsed > 0 else float("nan")
        steps_rate = done / elapsed if elapsed > 0 and done else float("nan")
        eta = (total - done) / steps_rate if steps_rate and np.isfinite(steps_rate) else float("nan")
        rate_text = f"{rate:.2f}" if np.isfinite(rate) else "-"  # no rate before the first step ends
        line = f"[{label}] {done}/{total} | {count} {unit} | {rate_text} {unit}/s | ETA {_fmt_duration(eta)}"
        print(line, file=self.stream, flush=True)
        self.last_progress = {"label": label, "done": done, "total": total, "count": count, "unit": unit}

    def record(self, key: str, value: Any) -> None:
        self.records[key] = value

    def record_fallback(self, what: str, reason: str) -> None:
        self.fallbacks.append({"what": what, "reason": reason})
        print(f"[fallback] {what}: {reason}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


class LocalModelPool:
    """A model held by this process: the in-process fan-out, used by tests and by `device` tasks. It
    runs the same per-batch forward and the same tiled-VAE round loop as the Ray pool."""

    def __init__(self, model: LoadedModel, *, max_batch: int = 4) -> None:
        self.model = model
        self.max_batch = max_batch
        self.meta = model.meta
        self.latent_channels = self.meta.latent_channels
        self.native_size = self.meta.native_size
        self.vae_scale_factor = self.meta.vae.scale_factor
        self._cond: Cond | None = None
        self.model_s = 0.0
        self.views = 0
        self.vae_rounds = 0
        self.served: ServedStudents | None = None
        self.serving: StudentsServing | None = None
        self.attention = RouteCounters()

    def serve_students(self, attention: AttentionConfig) -> tuple[str, ...]:
        """Route this pool's forwards through the students of `attention` (as the workers do)."""
        self.serving = StudentsServing.check(attention)
        transformer = self.model.backbone.transformer  # type: ignore[attr-defined]
        self.served = ServedStudents(attention, transformer, next(transformer.parameters()).device)
        self.serving.routed = self.served.layers
        return self.served.layers

    def cond(self) -> Cond:
        if self._cond is None:
            self._cond = self.model.make_cond()
        return self._cond

    def evaluate(self, views: Sequence[ViewInput]) -> list[torch.Tensor]:
        start = time.perf_counter()
        with model_cpu_threads():
            if self.served is None:
                out = evaluate_in_process(self.model.backbone, self.cond(), views, max_batch=self.max_batch)
            else:
                with self.served.routed(self.model.backbone.transformer):  # type: ignore[attr-defined]
                    out = evaluate_in_process(
                        self.model.backbone, self.cond(), views, max_batch=self.max_batch
                    )
                add_counters(self.attention, self.served.take_counters())
                self.serving.note(self.served.take_decisions())  # type: ignore[union-attr]
        self.model_s += time.perf_counter() - start
        self.views += len(views)
        return out

    def encode(self, images: torch.Tensor, *, tile: int = 0) -> torch.Tensor:
        return self._vae("encode", images, tile)

    def decode(self, latents: torch.Tensor, *, tile: int = 0) -> torch.Tensor:
        return self._vae("decode", latents, tile)

    def _vae(self, op: VaeOp, tensor: torch.Tensor, tile: int) -> torch.Tensor:
        vae = self.model.vae
        with model_cpu_threads():
            if not tile:
                with torch.no_grad():
                    return vae.encode(tensor) if op == "encode" else vae.decode(tensor)
            plan = plan_tiles(op, tensor.shape, self.meta.vae, tile_px=tile)
            result = run_tiled(plan, tensor, in_process(vae))
        self.vae_rounds += result.rounds
        return result.output

    def summary(self) -> dict:
        return {
            "views": self.views,
            "model_s": round(self.model_s, 4),
            "vae_reduction_rounds": self.vae_rounds,
            "workers": [{"index": 0, "in_process": True}],
            **({"attention": self.serving.record(self.attention)} if self.serving else {}),
        }


class JobContext:
    """Artifacts plus a model pool: what an upscale task receives as `ctx`."""

    def __init__(self, artifacts_: JobArtifacts, pool) -> None:
        self.artifacts = artifacts_
        self.pool = pool
        self.latent_channels = pool.latent_channels
        self.native_size = pool.native_size
        self.vae_scale_factor = pool.vae_scale_factor
        serving = getattr(pool, "serving", None)  # students served: their step decisions printed here
        if serving is not None:
            serving.console = artifacts_.stream

    # ModelPool
    def cond(self) -> Cond:
        return self.pool.cond()

    def evaluate(self, views: Sequence[ViewInput]) -> list[torch.Tensor]:
        with self.artifacts.timer("evaluate"):
            return self.pool.evaluate(views)

    def encode(self, images: torch.Tensor, *, tile: int = 0) -> torch.Tensor:
        with self.artifacts.timer("vae_encode"):
            return self.pool.encode(images, tile=tile)

    def decode(self, latents: torch.Tensor, *, tile: int = 0) -> torch.Tensor:
        with self.artifacts.timer("vae_decode"):
            return self.pool.decode(latents, tile=tile)

    # Artifacts
    def read_image(self, path):
        return self.artifacts.read_image(path)

    def directory(self, name):
        return self.artifacts.directory(name)

    def save_image(self, name, image):
        return self.artifacts.save_image(name, image)

    def save_json(self, name, data):
        return self.artifacts.save_json(name, data)

    def save_tensors(self, name, tensors):
        return self.artifacts.save_tensors(name, tensors)

    def load_tensors(self, name):
        return self.artifacts.load_tensors(name)

    def save_state(self, name, state):
        return self.artifacts.save_state(name, state)

    def load_state(self, name):
        return self.artifacts.load_state(name)

    def log_metrics(self, metrics, *, step):
        self.artifacts.log_metrics(metrics, step=step)

    def progress(self, label, done, total, *, unit="views", count=None):
        self.artifacts.progress(label, done, total, unit=unit, count=count)

    def record(self, key, value):
        self.artifacts.record(key, value)

    def record_fallback(self, what, reason):
        self.artifacts.record_fallback(what, reason)

    def timer(self, name):
        return self.artifacts.timer(name)
