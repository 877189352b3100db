"""The capture builder on real attention calls of the reference model: the capture's rows are the
record's at the query index, its teacher rows are softmax attention of its own q_sub over its full
k, v, its tensors are independent copies, its meta comes from the call; masked or step-less calls
are refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.attention.routes import CaptureRoute
from core.distill.capture_builder import CaptureSource, build_capture
from core.distill.plan import query_subsample
from core.models.attention_hook import LayerSet, attach
from core.models.reference import load_reference

pytestmark = pytest.mark.cpu

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "models" / "reference"


@pytest.fixture(scope="module")
def calls():
    """(record, teacher output) of single:1 for two 128 px views at sigmas 0.9 and 0.35, step 2."""
    backbone, cond, _ = load_reference(REFERENCE_DIR)
    kept = []
    route = CaptureRoute(lambda record, out: kept.append((record, out)))
    x = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    with attach(backbone.transformer, route, LayerSet.parse("single:1")), torch.inference_mode():
        backbone.velocity(x, torch.tensor([0.9, 0.35]), cond, step=2)
    return kept


def test_capture_rows_are_the_records_and_the_teacher_is_its_own_softmax(calls):
    record, out = calls[0]
    n = record.q.shape[1]
    idx = query_subsample(n, 24, "random", seed=3)
    cap = build_capture(record, out, idx, CaptureSource(prompt_id=1, seed_id=4), item=1, dtype=torch.float32)
    assert cap.q_sub.shape == (1, 6, 24, 64) and cap.k.shape == (1, 6, n, 64)
    assert torch.equal(cap.q_sub, record.q[1:2, idx].permute(0, 2, 1, 3).float())
    assert torch.equal(cap.k, record.k[1:2].permute(0, 2, 1, 3).float())
    assert torch.equal(cap.v, record.v[1:2].permute(0, 2, 1, 3).float())
    # the teacher rows are softmax attention of the kept queries over every key and value
    assert (cap.teacher_sub - F.scaled_dot_product_attention(cap.q_sub, cap.k, cap.v)).abs().max() <= 1e-5
    m = cap.meta
    assert (m.layer, m.step, m.sigma, m.cfg, m.text_len, m.latent_h, m.latent_w) == (
        "single:1",
        2,
        pytest.approx(0.35),
        1.0,
        4,
        8,
        8,
    )
    assert (m.prompt_id, m.seed_id) == (1, 4)
    assert all(t.is_contiguous() for t in (cap.q_sub, cap.k, cap.v, cap.teacher_sub))


def test_capture_tensors_are_independent_copies(calls):
    record, out = calls[0]
    idx = torch.arange(0, record.q.shape[1], 5)
    cap = build_capture(record, out, idx, CaptureSource(prompt_id=0, seed_id=0))
    assert cap.dtype == record.q.dtype
    ptrs = {t.untyped_storage().data_ptr() for t in (record.q, record.k, record.v, out)}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in (cap.q_sub, cap.k, cap.v, cap.teacher_sub)}
    bf16 = build_capture(record, out, idx, CaptureSource(prompt_id=0, seed_id=0), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.k, cap.k.bfloat16())


def test_masked_or_stepless_calls_and_bad_items_are_refused(calls):
    record, out = calls[0]
    idx = torch.arange(4)
    src = CaptureSource(prompt_id=0, seed_id=0)
    with pytest.raises(ValueError, match="attention mask"):
        build_capture(replace(record, mask=torch.ones(2, record.q.shape[1], dtype=torch.bool)), out, idx, src)
    with pytest.raises(ValueError, match="no sampler step"):
        build_capture(replace(record, step=None), out, idx, src)
    with pytest.raises(ValueError, match=r"item must be in \[0, 2\)"):
        build_capture(record, out, idx, src, item=2)
    with pytest.raises(ValueError, match="query_index must lie in"):
        build_capture(record, out, torch.tensor([record.q.shape[1]]), src)
