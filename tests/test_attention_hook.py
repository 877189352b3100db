"""The attention route hook on real Flux transformers: teacher-routed layers give the plain model's
velocity bit for bit (and again after detach), capture records carry the true text length and the
forward's sigma/step/cfg/views, students serve only when ready and finite, and fallbacks are counted."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn

from core.attention.config import StudentConfig
from core.attention.routes import CaptureRoute, StudentRoute, TeacherRoute, teacher_attention
from core.attention.student import build_student
from core.models.attention_hook import AttentionCall, AttentionRecord, LayerSet, attach, layer_keys
from core.models.backbone import Cond
from core.models.flux import FLUX_DEV_CONFIG, FluxBackbone, tiny_flux_config
from core.models.forward import evaluate_in_process
from core.models.reference import load_reference
from core.tiling.views import ViewInput

pytestmark = pytest.mark.cpu

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "models" / "reference"
REFERENCE_LAYERS = ["double:0", "double:1", "single:0", "single:1", "single:2", "single:3"]


@pytest.fixture(scope="module")
def reference():
    backbone, cond, _ = load_reference(REFERENCE_DIR)
    return backbone, cond


@pytest.fixture(scope="module")
def views():
    """Two 128 px views (8 x 8 tokens) at different sigmas, as an upscale step batches them."""
    x = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([0.9, 0.35])


def velocity(backbone, cond, x, sigma, **kwargs):
    with torch.no_grad():
        return backbone.velocity(x, sigma, cond, **kwargs)


class Recorder:
    """A capture callback that keeps (record, teacher output) pairs."""

    def __init__(self) -> None:
        self.calls: list[tuple[AttentionRecord, torch.Tensor]] = []

    def __call__(self, record: AttentionRecord, out: torch.Tensor) -> None:
        self.calls.append((record, out.clone()))


def tiny_flux(text_tokens: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**{**tiny_flux_config(4), "guidance_embeds": True}).eval()
    g = torch.Generator().manual_seed(1)
    cond = Cond(torch.randn(text_tokens, 32, generator=g), torch.randn(32, generator=g), guidance=3.5)
    return FluxBackbone(model, native_size=16), cond


# ---- layer keys and selection ----------------------------------------------------------------------


def test_every_flux_dev_and_reference_layer_is_eligible(reference):
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**FLUX_DEV_CONFIG)
    keys = list(layer_keys(flux))
    assert len(keys) == 57
    assert keys[:19] == [f"double:{i}" for i in range(19)] and keys[19:] == [f"single:{i}" for i in range(38)]
    assert LayerSet.all().select(keys) == tuple(keys)
    assert LayerSet.parse("single:30-37,double:3").select(keys) == ("double:3",) + tuple(
        f"single:{i}" for i in range(30, 38)
    )
    assert list(layer_keys(reference[0].transformer)) == REFERENCE_LAYERS


def test_layer_set_parse_and_select_golden():
    assert LayerSet.parse("double").select(REFERENCE_LAYERS) == ("double:0", "double:1")
    assert LayerSet.parse("single:1-2, double:0").select(REFERENCE_LAYERS) == (
        "double:0",
        "single:1",
        "single:2",
    )
    assert LayerSet.parse("all").select(REFERENCE_LAYERS) == tuple(REFERENCE_LAYERS)
    with pytest.raises(ValueError, match="has 4 single layers"):
        LayerSet.parse("single:4").select(REFERENCE_LAYERS)
    with pytest.raises(ValueError, match="'triple:1'"):
        LayerSet.parse("double,triple:1")


# ---- teacher route: bitwise the plain model --------------------------------------------------------


def test_teacher_attention_equals_diffusers_dispatch_bitwise():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 2, 37, 4, 16, generator=g).unbind(0)
    mask = torch.rand(2, 37, generator=g) > 0.2
    for m in (None, mask):
        record = AttentionRecord("single:0", q, k, v, m, 5, 4, 8, torch.zeros(2), None, None, None)
        assert torch.equal(teacher_attention(record), dispatch_attention_fn(q, k, v, attn_mask=m))


def test_teacher_route_on_every_layer_is_bitwise_the_plain_model(reference, views):
    backbone, cond = reference
    transformer = backbone.transformer
    x, sigma = views
    originals = transformer.attn_processors
    plain = velocity(backbone, cond, x, sigma)
    route = TeacherRoute()
    handle = attach(transformer, route)
    assert handle.layers == tuple(REFERENCE_LAYERS)
    routed = velocity(backbone, cond, x, sigma, step=4, view_ids=[10, 11])
    handle.detach()
    after = velocity(backbone, cond, x, sigma)
    assert torch.equal(routed, plain) and torch.equal(after, plain)
    assert all(p is originals[name] for name, p in transformer.attn_processors.items())
    assert {k: c.teacher for k, c in route.counters.layers.items()} == dict.fromkeys(REFERENCE_LAYERS, 1)


def test_teacher_route_with_fused_projections_is_bitwise_the_plain_model():
    backbone, cond = tiny_flux(7)
    backbone.transformer.fuse_qkv_projections()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.6, 0.2])
    plain = velocity(backbone, cond, x, sigma)
    with attach(backbone.transformer, TeacherRoute()):
        assert torch.equal(velocity(backbone, cond, x, sigma), plain)


def test_routed_views_in_the_upscale_batching_are_bitwise_the_plain_ones(reference):
    backbone, cond = reference
    g = torch.Generator().manual_seed(5)
    views = [ViewInput(torch.randn(32, 16, 16, generator=g), s) for s in (0.9, 0.6, 0.3)]
    plain = evaluate_in_process(backbone, cond, views, max_batch=2)
    recorder = Recorder()
    with attach(backbone.transformer, CaptureRoute(recorder), LayerSet.parse("single:3")):
        routed = evaluate_in_process(backbone, cond, views, max_batch=2)
    assert all(torch.equal(a, b) for a, b in zip(plain, routed, strict=True))
    # two forwards (a batch of 2, then 1): each record carries its own views' sigmas
    assert [r.sigma.tolist() for r, _ in recorder.calls] == [pytest.approx([0.9, 0.6]), pytest.approx([0.3])]


def test_plain_layers_get_no_unknown_kwargs_warning(reference, views):
    backbone, cond = reference
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: seen.append(rec.getMessage())  # type: ignore[method-assign]
    flux_logger = logging.getLogger("diffusers.models.transformers.transformer_flux")
    flux_logger.addHandler(handler)
    try:
        with attach(backbone.transformer, TeacherRoute(), LayerSet.parse("single:1")):
            velocity(backbone, cond, *views)
    finally:
        flux_logger.removeHandler(handler)
    assert seen == []


# ---- attach / detach rules -------------------------------------------------------------------------


def test_disjoint_routes_compose_and_overlapping_ones_are_refused(reference, views):
    backbone, cond = reference
    transformer = backbone.transformer
    originals = transformer.attn_processors
    plain = velocity(backbone, cond, *views)
    first = attach(transformer, TeacherRoute(), LayerSet.parse("double"))
    with pytest.raises(ValueError, match="double:1 is already routed"):
        attach(transformer, TeacherRoute(), LayerSet.parse("double:1"))
    second = attach(transformer, TeacherRoute(), LayerSet.parse("single"))
    assert torch.equal(velocity(backbone, cond, *views), plain)
    first.detach()
    second.detach()
    first.detach()  # idempotent
    assert all(p is originals[name] for name, p in transformer.attn_processors.items())


def test_a_routed_layer_without_call_context_raises(reference, views):
    backbone, cond = reference
    transformer = backbone.transformer
    x, sigma = views
    with attach(transformer, TeacherRoute(), LayerSet.parse("single:0")):
        with pytest.raises(ValueError, match="single:0 is routed but the forward passed no AttentionCall"):
            with torch.no_grad():
                transformer(
                    hidden_states=torch.randn(1, 64, 128),
                    encoder_hidden_states=cond.tokens[None],
                    pooled_projections=cond.pooled[None],
                    timestep=sigma[:1],
                    img_ids=torch.zeros(64, 3),
                    txt_ids=torch.zeros(4, 3),
                    return_dict=False,
                )


# ---- capture records -------------------------------------------------------------------------------


def test_capture_records_of_the_reference_model(reference, views):
    backbone, cond = reference
    x, sigma = views
    plain = velocity(backbone, cond, x, sigma)
    recorder = Recorder()
    route = CaptureRoute(recorder)
    with attach(backbone.transformer, route):
        captured = velocity(backbone, cond, x, sigma, step=7, view_ids=(3, 4))
    assert torch.equal(captured, plain)
    assert [r.layer for r, _ in recorder.calls] == REFERENCE_LAYERS
    for record, out in recorder.calls:
        assert record.n_text == 4 and (record.rows, record.cols) == (8, 8)
        assert record.q.shape == record.k.shape == record.v.shape == (2, 4 + 64, 6, 64)
        assert torch.equal(record.sigma, sigma) and record.step == 7 and record.view_ids == (3, 4)
        assert record.cfg is None and record.mask is None
        assert torch.equal(out, teacher_attention(record))
    assert route.counters.total().captures == 6


def test_capture_records_carry_512_text_tokens_on_a_flux_shaped_model():
    backbone, cond = tiny_flux(512)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    recorder = Recorder()
    with attach(backbone.transformer, CaptureRoute(recorder)):
        velocity(backbone, cond, x, torch.tensor([0.5]))
    assert [r.layer for r, _ in recorder.calls] == ["double:0", "single:0"]
    for record, _ in recorder.calls:
        assert record.n_text == 512 and record.q.shape == (1, 512 + 16, 2, 16)
        assert record.cfg == 3.5  # the Cond's distilled guidance


# ---- student route ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_student():
    config = StudentConfig(heads=6, head_dim=64, landmark_min=16, local_tile=4)
    return build_student(config, seed=0).eval()


def test_a_ready_student_serves_its_layer_and_stays_finite(reference, views, reference_student):
    backbone, cond = reference
    plain = velocity(backbone, cond, *views)
    route = StudentRoute({"single:2": reference_student}, ready=["single:2"])
    with attach(backbone.transformer, route, LayerSet.parse("single:2")):
        served = velocity(backbone, cond, *views)
    assert torch.isfinite(served).all()
    assert 1e-4 < (served - plain).abs().max() < 10  # the student, not the teacher, served
    counts = route.counters.layers["single:2"]
    assert (counts.calls, counts.student, counts.fallbacks) == (1, 1, 0)
    assert counts.min_denominator is not None and counts.min_denominator > 0
    assert list(route.counters.layers) == ["single:2"]


def test_a_nan_student_falls_back_to_the_teacher_and_is_counted(reference, views):
    backbone, cond = reference
    plain = velocity(backbone, cond, *views)
    broken = build_student(StudentConfig(heads=6, head_dim=64), seed=1).eval()
    with torch.no_grad():
        broken.phi_q.mlp[0].weight.fill_(float("nan"))
    route = StudentRoute({"single:0": broken, "single:1": broken}, ready=["single:0"])
    with attach(backbone.transformer, route, LayerSet.parse("single")):
        served = velocity(backbone, cond, *views)
    assert torch.equal(served, plain)
    layers = route.counters.layers
    assert (layers["single:0"].nonfinite, layers["single:0"].nonfinite_kernel) == (1, 1)
    assert layers["single:0"].nonfinite_local == 0
    assert layers["single:1"].not_ready == 1  # a student not marked ready never runs
    assert layers["single:2"].no_student == 1 and layers["single:3"].no_student == 1
    record = route.counters.as_record()
    assert record["total"]["fallbacks"] == 4 and record["total"]["student"] == 0


def test_calls_below_min_image_tokens_keep_the_teacher_and_are_counted(reference, views, reference_student):
    backbone, cond = reference
    plain = velocity(backbone, cond, *views)  # 8 x 8 = 64 image tokens per view
    small = StudentRoute({"single:2": reference_student}, ready=["single:2"], min_image_tokens=65)
    with attach(backbone.transformer, small, LayerSet.parse("single:2")):
        assert torch.equal(velocity(backbone, cond, *views), plain)
    counts = small.counters.layers["single:2"]
    assert (counts.small, counts.teacher, counts.student, counts.fallbacks) == (1, 1, 0, 0)
    served = StudentRoute({"single:2": reference_student}, ready=["single:2"], min_image_tokens=64)
    with attach(backbone.transformer, served, LayerSet.parse("single:2")):
        assert not torch.equal(velocity(backbone, cond, *views), plain)
    assert served.counters.layers["single:2"].student == 1


def test_a_masked_call_falls_back_to_the_teacher(reference, views, reference_student):
    backbone, cond = reference
    recorder = Recorder()
    with attach(backbone.transformer, CaptureRoute(recorder), LayerSet.parse("single:2")):
        velocity(backbone, cond, *views)
    record, teacher_out = recorder.calls[0]
    masked = dataclasses.replace(record, mask=torch.ones(2, record.k.shape[1], dtype=torch.bool))
    route = StudentRoute({"single:2": reference_student}, ready=["single:2"])
    with torch.no_grad():
        assert torch.equal(route(masked), teacher_out)
        assert not torch.equal(route(record), teacher_out)
    assert (route.counters.layers["single:2"].mask, route.counters.layers["single:2"].student) == (1, 1)


def test_attention_call_validates_its_batch():
    with pytest.raises(ValueError, match="view_ids has 3 ids for a batch of 2"):
        AttentionCall(4, 8, 8, torch.zeros(2), view_ids=(0, 1, 2))
