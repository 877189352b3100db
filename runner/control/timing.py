"""The per-layer attention cost table a rollout worker measures once at start.

One teacher forward at the job's resolution (sigma 0.5) with a capture route keeps each layer's real
q, k, v; then each layer's teacher attention (SDPA) and student are timed on them, alternating, the
median of `repeats` runs after one warm-up. Layers without a servable student get their teacher
time as student time (they never route). On CUDA each timing is bracketed by synchronisations.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch

from core.attention.routes import CaptureRoute, StudentRoute, teacher_attention
from core.attention.student import Student
from core.control.reward import CostTable, LayerTiming
from core.flow.seeds import derive_seed, gaussian_noise
from core.models.attention_hook import AttentionRecord, attach, layer_keys
from core.models.backbone import Cond


def _ms(fn, record: AttentionRecord, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn(record)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


@torch.no_grad()
def measure_cost_table(
    backbone: torch.nn.Module,
    cond: Cond,
    students: Mapping[str, Student],
    *,
    latent_h: int,
    latent_w: int,
    repeats: int,
) -> CostTable:
    records: dict[str, AttentionRecord] = {}

    def keep(record: AttentionRecord, out: torch.Tensor) -> None:
        records[record.layer] = AttentionRecord(
            **{**record.__dict__, "q": record.q.clone(), "k": record.k.clone(), "v": record.v.clone()}
        )

    param = next(backbone.parameters())
    x = gaussian_noise((1, backbone.latent_channels, latent_h, latent_w), derive_seed(0, "cost-table"))
    x = x.to(device=param.device, dtype=param.dtype)
    with attach(backbone.transformer, CaptureRoute(keep)):
        backbone.velocity(x, torch.tensor([0.5], device=param.device), cond, step=0)
    timings = []
    for layer in layer_keys(backbone.transformer):
        record = records[layer]
        student = students.get(layer)
        route = StudentRoute({layer: student}, ready=[layer]) if student is not None else None
        teacher_attention(record)  # warm-up
        if route is not None:
            route(record)
        t_ms, s_ms = [], []
        for _ in range(repeats):
            t_ms.append(_ms(teacher_attention, record, param.device))
            if route is not None:
                s_ms.append(_ms(route, record, param.device))
        teacher = statistics.median(t_ms)
        timings.append(LayerTiming(layer, teacher, statistics.median(s_ms) if s_ms else teacher))
    return CostTable(rows=latent_h // 2, cols=latent_w // 2, timings=tuple(timings))
