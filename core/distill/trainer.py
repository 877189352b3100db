"""LayerTrainer: the optimiser of one layer's attention student, trained on replayed captures.

One update draws on a few captures (the caller samples them from the layer's replay store): for each,
the student's query-subset forward on (q_sub at query_index, every k, v) is compared with the
teacher's rows by the Kendall-weighted loss (core/distill/loss.py); the gradients of the captures
are averaged, clipped by global norm, and AdamW takes one step. That step is what the job's budget
counts.

- fp32 throughout, in a grad-enabled context (`torch.inference_mode(False)` + `torch.enable_grad()`),
  whatever the caller runs under: a worker samples the teacher under inference mode and trains
  between runs. Captures are copied to fp32 tensors made outside inference mode; a student whose
  parameters were created under inference mode gets plain copies of them (inference tensors cannot
  take part in autograd).
- AdamW parameter groups: the student's feature maps and conditioner (lr, weight decay); the gate
  logits and slopes (gate_lr, no weight decay: decay would pull every gate towards alpha_max / 2);
  the two log-variances (lr, no weight decay).
- A non-finite loss or gradient norm skips the step (the weights stay as they were), is counted and
  reported `finite=False`: readiness then fails closed (core/distill/readiness.py).
- Caps (`TrainCaps`, what an out-of-memory ladder sets, core/distill/oom_ladder.py): each update
  trains on at most `query_cap` of a capture's queries and runs the student's forward with the
  ladder's query chunk, key chunk and landmark cap as per-call limits (core/attention/config.py
  ForwardLimits): the student's config, and what it serves, stay as they are.
- Memory budget (`memory_budget_mib`, 0 = off): before each capture's forward the step's estimated
  bytes at the caps (core/distill/memory.py) are checked against it, and a step over it raises
  torch.OutOfMemoryError before anything is allocated: the caller's ladder handles it as it handles
  the allocator's own.
- Randomness: only the query thinning (a capture holding more queries than the `query_cap` an OOM
  ladder set), from a CPU generator seeded by `seed`, which state_dict() carries, so a resumed
  trainer continues exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from core.attention.config import ForwardLimits
from core.attention.geometry import TokenGeometry
from core.attention.kernel import KEY_CHUNK, QUERY_CHUNK
from core.attention.student import Student
from core.distill.capture import Capture
from core.distill.loss import DistillLossConfig, KendallWeights, cosine_distance, distill_loss, nmse
from core.distill.memory import StepShape, training_step_bytes
from core.distill.oom_ladder import TrainCaps

TRAINER_FORMAT = 1
GATE_PARAMETERS = ("logit_kernel", "logit_landmark", "gamma_kernel", "gamma_landmark")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """lr: feature maps and conditioner (and the log-variances); gate_lr: the gate logits and slopes.
    captures_per_update: captures the caller draws for one update (their gradients are averaged).
    memory_budget_mib: the most a training step may take by the estimate of core/distill/memory.py
    (0 = no check): over it, the step raises torch.OutOfMemoryError and the OOM ladder steps down."""

    lr: float = 5e-4
    gate_lr: float = 2.5e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    captures_per_update: int = 1
    memory_budget_mib: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lr", "gate_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"trainer.{name} must be > 0, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise ValueError(f"trainer.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"trainer.betas must be two values in [0, 1), got {self.betas}")
        if self.captures_per_update < 1:
            raise ValueError(f"trainer.captures_per_update must be >= 1, got {self.captures_per_update}")
        if not self.memory_budget_mib >= 0:
            raise ValueError(
                f"trainer.memory_budget_mib must be >= 0 (0 = off), got {self.memory_budget_mib}"
            )


class UpdateStats(NamedTuple):
    """One update's means over its captures; gate: alpha_max sigmoid(logit) summed over both global
    branches, mean over heads (their weight at the neutral disagreement, before the conditioner)."""

    loss: float
    smooth_l1: float
    cosine_distance: float
    nmse: float
    gate: float
    grad_norm: float
    finite: bool


class EvalStats(NamedTuple):
    """Means over the evaluated captures, and each capture's cosine distance (readiness observes them)."""

    cosine_distance: float
    nmse: float
    cosine: float
    finite: bool
    cosine_distances: tuple[float, ...]


def capture_geometry(capture: Capture) -> TokenGeometry:
    """The student's view of a capture's sequence: every token before the latent grid is conditioning."""
    h, w = capture.meta.latent_h, capture.meta.latent_w
    return TokenGeometry(capture.tokens - h * w, h, w)


class LayerTrainer:
    """Trains `student` in place (it must be fp32); `seed` keys the trainer's own randomness."""

    def __init__(
        self, student: Student, cfg: TrainerConfig, loss_cfg: DistillLossConfig, *, seed: int
    ) -> None:
        self.student = student
        self.cfg = cfg
        self.loss_cfg = loss_cfg
        self.seed = seed
        with torch.inference_mode(False):
            _plain_parameters(student)
            if any(p.dtype != torch.float32 for p in student.parameters()):
                raise ValueError("LayerTrainer trains fp32 students; this one holds another dtype")
            device = next(student.parameters()).device
            self.weights = KendallWeights().to(device)
            named = dict(student.named_parameters())
            gate = [named[n] for n in GATE_PARAMETERS]
            rest = [p for n, p in named.items() if n not in GATE_PARAMETERS]
            self.optimizer = torch.optim.AdamW(
                [
                    {"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                    {"params": gate, "lr": cfg.gate_lr, "weight_decay": 0.0},
                    {"params": list(self.weights.parameters()), "lr": cfg.lr, "weight_decay": 0.0},
                ],
                betas=cfg.betas,
            )
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0
        self.skipped = 0

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def default_caps(self, query_cap: int) -> TrainCaps:
        """An OOM ladder's rung 0: `query_cap` and the student's own chunk sizes and landmark cap, so a
        trainer at rung 0 computes what a call without caps does."""
        return TrainCaps(
            query_cap=query_cap,
            query_chunk=QUERY_CHUNK,
            key_chunk=KEY_CHUNK,
            landmark_cap=self.student.config.landmark_max,
        )

    def update(self, captures: Sequence[Capture], *, caps: TrainCaps | None = None) -> UpdateStats:
        """One optimiser update on `captures` (their losses averaged). caps: an OOM ladder's rung: at
        most caps.query_cap of each capture's queries (a seeded random subset), and the student's
        forward at its chunk sizes and landmark cap; None: every query, the student's defaults.
        Raises torch.OutOfMemoryError, before any forward, when a capture's step is over the budget."""
        if not captures:
            raise ValueError("LayerTrainer.update needs at least one capture")
        for capture in captures:
            self._check_memory(capture, caps)
        with torch.inference_mode(False), torch.enable_grad():
            self.student.train()
            self.optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(4, device=self.device)
            for capture in captures:
                parts = distill_loss(*self._forward(capture, caps), self.weights, self.loss_cfg)
                (parts.total / len(captures)).backward()
                sums += torch.stack(
                    [parts.total.detach(), parts.smooth_l1, parts.cosine_distance, parts.nmse]
                )
            grad_norm = nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
            means = sums / len(captures)
            finite = bool(torch.isfinite(means).all() and torch.isfinite(grad_norm))
            if finite:
                self.optimizer.step()
                self.weights.project_(self.loss_cfg)
                self.updates += 1
            else:
                self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.student.eval()
            values = torch.cat([means, grad_norm.reshape(1).float(), self._gate().reshape(1)]).tolist()
        loss, l1, cos, err, norm, gate = values
        return UpdateStats(loss, l1, cos, err, gate, norm, finite)

    def evaluate(self, captures: Sequence[Capture]) -> EvalStats:
        """Cosine distance, NMSE and finiteness of the student on `captures` (validation), without grad."""
        if not captures:
            raise ValueError("LayerTrainer.evaluate needs at least one capture")
        # no_grad inside: inference_mode(False) turns grad mode back on, whatever was outside it
        with torch.inference_mode(False), torch.no_grad():
            self.student.eval()
            rows = []
            for capture in captures:
                out, teacher = self._forward(capture, None)
                rows.append(torch.stack([cosine_distance(out, teacher), nmse(out, teacher)]))
            values = torch.stack(rows)  # [n, 2]
            finite = bool(torch.isfinite(values).all())
            dists = values[:, 0].tolist()
            mean_dist, mean_nmse = values.mean(dim=0).tolist()
        return EvalStats(mean_dist, mean_nmse, 1.0 - mean_dist, finite, tuple(dists))

    def step_bytes(self, capture: Capture, caps: TrainCaps | None) -> int:
        """The estimated bytes of a training step on `capture` at `caps` (core/distill/memory.py)."""
        b, h, nq, d = capture.q_sub.shape
        geometry = capture_geometry(capture)
        shape = StepShape(b, h, d, nq, geometry.n, geometry.n_text, geometry.n_img)
        caps = caps or self.default_caps(nq)
        parameters = sum(p.numel() for p in self.student.parameters()) + 2
        return training_step_bytes(shape, self.student.config, caps, parameters=parameters)

    def _check_memory(self, capture: Capture, caps: TrainCaps | None) -> None:
        budget = self.cfg.memory_budget_mib
        if budget and (need := self.step_bytes(capture, caps)) > budget * 2**20:
            raise torch.OutOfMemoryError(
                f"training step of layer {capture.meta.layer!r} at {caps}: an estimated {need} bytes, over "
                f"trainer.memory_budget_mib={budget:g} ({int(budget * 2**20)} bytes)"
            )

    def _forward(self, capture: Capture, caps: TrainCaps | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(student output, teacher rows), both [B, H, Nq, D] fp32, for one capture."""
        device = self.device
        index = capture.query_index
        keep = None
        if caps is not None and index.shape[0] > caps.query_cap:
            keep = torch.randperm(index.shape[0], generator=self.generator)[: caps.query_cap].sort().values
            index = index[keep]
        q, t = capture.q_sub, capture.teacher_sub
        if keep is not None:
            q, t = q[:, :, keep], t[:, :, keep]
        # clone(): fp32 tensors made here, outside inference mode, whatever the capture was made under
        q, k, v, t = (x.to(device, torch.float32).clone() for x in (q, capture.k, capture.v, t))
        b = k.shape[0]
        sigma = torch.full((b,), capture.meta.sigma, device=device)
        cfg = torch.full((b,), capture.meta.cfg, device=device)
        limits = None
        if caps is not None:
            limits = ForwardLimits(
                query_chunk=caps.query_chunk, key_chunk=caps.key_chunk, landmark_cap=caps.landmark_cap
            )
        geometry = capture_geometry(capture)
        out = self.student(q, k, v, geometry, sigma, cfg, query_index=index.to(device), limits=limits)
        return out.out, t

    def _gate(self) -> torch.Tensor:
        s = self.student
        alpha = torch.sigmoid(torch.stack([s.logit_kernel, s.logit_landmark])).sum(dim=0)
        return (s.config.alpha_max * alpha).mean().detach().float()

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": TRAINER_FORMAT,
            "config": asdict(self.cfg),
            "loss_config": asdict(self.loss_cfg),
            "seed": self.seed,
            "student": self.student.state_dict(),
            "weights": self.weights.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
            "skipped": self.skipped,
            "rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != TRAINER_FORMAT:
            raise ValueError(
                f"trainer state has format {state.get('format')!r}, this code reads {TRAINER_FORMAT}"
            )
        config = {**state["config"], "betas": tuple(state["config"]["betas"])}
        if TrainerConfig(**config) != self.cfg or DistillLossConfig(**state["loss_config"]) != self.loss_cfg:
            raise ValueError(
                f"trainer state is for {state['config']} / {state['loss_config']}, this trainer is "
                f"{asdict(self.cfg)} / {asdict(self.loss_cfg)}"
            )
        with torch.inference_mode(False):
            self.student.load_state_dict(state["student"])
            self.weights.load_state_dict(state["weights"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.seed = state["seed"]
        self.updates = state["updates"]
        self.skipped = state["skipped"]
        self.generator.set_state(state["rng"])


def _plain_parameters(module: nn.Module) -> None:
    """Replace parameters created under inference mode by plain copies (call outside inference mode)."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_inference():
                mod._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
