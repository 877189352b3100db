"""Tests for core.eval.lpips (LPIPS-Alex) and runner.perceptual (finding and verifying its weights).

The trunk here is random (seeded, He-scaled normal); the heads are the real v0.1 file kept in
models/lpips. Golden distances were computed once with this implementation in float64 and pinned;
`reference_lpips` re-computes the formula independently (functional convolutions with the AlexNet
hyper-parameters typed out, then per-position loops for the normalisation, heads and means), so
the golden numbers are not only self-consistency.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.lpips_parity import lpips_to_tessera
from core.eval.lpips import (
    MIN_SIDE,
    LpipsAlex,
    build_lpips_alex,
    lpips_distance,
    trunk_state_dict,
)
from core.flow.seeds import cpu_generator
from runner.artifacts import read_image
from runner.perceptual import (
    ALEXNET_FILE,
    ALEXNET_SHA256,
    HEADS_SHA256,
    REPO_HEADS,
    LpipsColumn,
    LpipsUnavailableError,
    LpipsWeights,
    hub_checkpoint,
    load_lpips,
    lpips_column,
    perceptual_term,
    require_lpips,
    resolve_lpips,
)

pytestmark = pytest.mark.cpu

# torchvision's AlexNet `features` parameters: index -> (out, in, kernel, stride, padding).
CONVS = {0: (64, 3, 11, 4, 2), 3: (192, 64, 5, 1, 2), 6: (384, 192, 3, 1, 1), 8: (256, 384, 3, 1, 1)}
CONVS[10] = (256, 256, 3, 1, 1)
HEAD_CHANNELS = (64, 192, 384, 256, 256)
# The scaling constants as float32 numbers (the reference package stores them so; a float64 module
# keeps those values): -0.030 -> -0.029999999329447746 etc.
F32_SHIFT = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float32).double().tolist()
F32_SCALE = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float32).double().tolist()


def seeded_trunk(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout AlexNet trunk: He-scaled normal weights, small normal biases (float32)."""
    g = cpu_generator(seed)
    out = {}
    for i, (c_out, c_in, k, _, _) in CONVS.items():
        out[f"features.{i}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) * math.sqrt(
            2 / (c_in * k * k)
        )
        out[f"features.{i}.bias"] = 0.01 * torch.randn(c_out, generator=g)
    return out


def torchvision_alexnet(trunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole torchvision AlexNet state dict: the trunk plus its classifier (meta tensors: no memory)."""
    classifier = {1: (4096, 256 * 6 * 6), 4: (4096, 4096), 6: (1000, 4096)}
    out = dict(trunk)
    for i, (n_out, n_in) in classifier.items():
        out[f"classifier.{i}.weight"] = torch.empty(n_out, n_in, device="meta")
        out[f"classifier.{i}.bias"] = torch.empty(n_out, device="meta")
    return out


def repo_heads() -> dict[str, torch.Tensor]:
    return torch.load(REPO_HEADS, map_location="cpu", weights_only=True)


def images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=cpu_generator(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def weights():
    return seeded_trunk(0), repo_heads()


@pytest.fixture(scope="module")
def model64(weights):
    return build_lpips_alex(*weights).double()


def reference_lpips(trunk, heads, a: torch.Tensor, b: torch.Tensor) -> float:
    """d(a, b) for single images [3, H, W] in [0, 1], written out from the definition in float64."""
    shift, scale = F32_SHIFT, F32_SCALE

    def scaled(x):
        return torch.stack([((2 * x[c] - 1) - shift[c]) / scale[c] for c in range(3)]).unsqueeze(0)

    def conv_relu(x, i):
        _, _, _, stride, padding = CONVS[i]
        w, bias = trunk[f"features.{i}.weight"].double(), trunk[f"features.{i}.bias"].double()
        return F.relu(F.conv2d(x, w, bias, stride=stride, padding=padding))

    def relus(x):
        r1 = conv_relu(x, 0)
        r2 = conv_relu(F.max_pool2d(r1, 3, 2), 3)
        r3 = conv_relu(F.max_pool2d(r2, 3, 2), 6)
        r4 = conv_relu(r3, 8)
        return [r1, r2, r3, r4, conv_relu(r4, 10)]

    total = 0.0
    for layer, (fa, fb) in enumerate(zip(relus(scaled(a)), relus(scaled(b)), strict=True)):
        w = heads[f"lin{layer}.model.1.weight"].double().flatten()
        _, _, h, wd = fa.shape
        acc = 0.0
        for y in range(h):
            for x in range(wd):
                va, vb = fa[0, :, y, x], fb[0, :, y, x]
                ua = va / (math.sqrt(float((va * va).sum())) + 1e-10)
                ub = vb / (math.sqrt(float((vb * vb).sum())) + 1e-10)
                acc += float((w * (ua - ub) ** 2).sum())
        total += acc / (h * wd)
    return total


# --------------------------------------------------------------------------------------- the formula


def test_matches_independent_recomputation_on_a_tiny_input(weights, model64):
    # 36 x 40 px: relu1 is 8 x 9, relu2 3 x 4, relu3..5 1 x 1 (non-square catches an H/W swap).
    a, b = images((2, 3, 36, 40), 1), images((2, 3, 36, 40), 2)
    got = model64(a, b)
    for i in range(2):
        assert got[i].item() == pytest.approx(reference_lpips(*weights, a[i], b[i]), rel=1e-12, abs=1e-15)


def test_golden_distances_seeded_trunk(model64):
    # Pinned from this implementation (float64), cross-checked by the test above on small inputs.
    a, b = images((2, 3, 64, 64), 3), images((2, 3, 64, 64), 4)
    near = (a + 0.05 * torch.randn(a.shape, generator=cpu_generator(5), dtype=torch.float64)).clamp(0, 1)
    assert model64(a, b).tolist() == pytest.approx(GOLDEN_FAR, rel=1e-9)
    assert model64(a, near).tolist() == pytest.approx(GOLDEN_NEAR, rel=1e-9)
    terms = model64.layer_distances(a, b)
    assert terms.shape == (2, 5)
    assert terms[0].tolist() == pytest.approx(GOLDEN_FAR_TERMS, rel=1e-9)
    assert terms.sum(dim=1).tolist() == pytest.approx(GOLDEN_FAR, rel=1e-12)


# Computed once with LpipsAlex (float64, torch 2.13 CPU); reference_lpips gives 0.10768823593538 too.
GOLDEN_FAR = [0.107688235935, 0.0994521962553]
GOLDEN_NEAR = [0.00409691060058, 0.00428208261265]
GOLDEN_FAR_TERMS = [0.0473613551087, 0.0298181938246, 0.0113991423593, 0.0108612488756, 0.00824829576726]


def test_float32_module_agrees_with_float64(weights, model64):
    model32 = build_lpips_alex(*weights)
    a, b = images((2, 3, 64, 96), 6), images((2, 3, 64, 96), 7)
    d32 = model32(a.float(), b.float())
    assert d32.dtype == torch.float32
    assert d32.tolist() == pytest.approx(model64(a, b).tolist(), rel=1e-5)
    # float64 images go to the module's dtype; the batch mean is a float
    assert lpips_distance(model32, a, b) == pytest.approx(d32.mean().item(), rel=1e-6)


def test_identical_images_give_zero_and_the_distance_is_symmetric(model64):
    a, b = images((3, 3, 48, 48), 8), images((3, 3, 48, 48), 9)
    assert model64(a, a).tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(model64(a, b), model64(b, a))
    assert bool((model64(a, b) > 0).all())
    # [3, H, W] is one image
    assert model64(a[0], b[0]).tolist() == pytest.approx([model64(a, b)[0].item()], rel=1e-12)


def test_input_conversion_from_unit_range(weights, model64):
    # The module maps [0, 1] to [-1, 1] (x' = 2x - 1) before the scaling layer: the reference
    # re-computation above types that out; here the endpoints are checked against the trunk input.
    black, white = (
        torch.zeros(1, 3, 32, 32, dtype=torch.float64),
        torch.ones(1, 3, 32, 32, dtype=torch.float64),
    )
    expected_black = [(-1 - s) / c for s, c in zip(F32_SHIFT, F32_SCALE, strict=True)]
    expected_white = [(1 - s) / c for s, c in zip(F32_SHIFT, F32_SCALE, strict=True)]
    assert model64._prepare(black, "a")[0, :, 0, 0].tolist() == pytest.approx(expected_black, rel=1e-12)
    assert model64._prepare(white, "a")[0, :, 0, 0].tolist() == pytest.approx(expected_white, rel=1e-12)
    # a slight decoder overshoot is scored as it is; a [-1, 1] or [0, 255] image is refused
    a = images((1, 3, 32, 32), 10)
    model64(a * 1.0005, a)
    with pytest.raises(ValueError, match=r"b must hold an image in \[0, 1\], got values in \[-0.99"):
        model64(a, 2 * a - 1)
    with pytest.raises(ValueError, match=r"a must hold an image in \[0, 1\]"):
        model64(a * 255, a)


def test_shape_errors(model64):
    a = images((1, 3, 40, 40), 11)
    with pytest.raises(ValueError, match="equal shapes"):
        model64(a, images((1, 3, 40, 48), 12))
    with pytest.raises(
        ValueError, match=r"b must be \[B, 3, H, W\] or \[3, H, W\], got shape \(1, 1, 40, 40\)"
    ):
        model64(a, a[:, :1])
    with pytest.raises(ValueError, match=f"at least {MIN_SIDE}x{MIN_SIDE} px, got \\(30, 40\\)"):
        model64(images((1, 3, 30, 40), 13), images((1, 3, 30, 40), 14))
    model64(images((1, 3, MIN_SIDE, MIN_SIDE), 15), images((1, 3, MIN_SIDE, MIN_SIDE), 16))  # smallest size


def test_gradients_reach_the_inputs(weights):
    # Used as a loss (the controller's perceptual term): the frozen module passes gradients to images.
    model = build_lpips_alex(*weights)
    assert not any(p.requires_grad for p in model.parameters())
    a = images((1, 3, 40, 40), 17).float().requires_grad_(True)
    model(a, images((1, 3, 40, 40), 18).float()).sum().backward()
    assert a.grad is not None and a.grad.abs().sum().item() > 0


# ------------------------------------------------------------------------------------ state dicts


def test_state_dict_keys_are_torchvision_features_and_lpips_heads():
    expected = {f"features.{i}.{p}" for i in CONVS for p in ("weight", "bias")}
    expected |= {f"lin{k}.model.1.weight" for k in range(5)}
    sd = LpipsAlex().state_dict()
    assert set(sd) == expected
    for i, (c_out, c_in, k, _, _) in CONVS.items():
        assert tuple(sd[f"features.{i}.weight"].shape) == (c_out, c_in, k, k)
    assert [tuple(sd[f"lin{k}.model.1.weight"].shape) for k in range(5)] == [
        (1, c, 1, 1) for c in HEAD_CHANNELS
    ]


def test_torchvision_and_head_state_dicts_load_strictly(weights):
    trunk, heads = weights
    model = build_lpips_alex(torchvision_alexnet(trunk), heads)  # the classifier is dropped
    assert not model.training
    assert torch.equal(model.features[0].weight, trunk["features.0.weight"])
    assert torch.equal(model.lin2.model[1].weight, heads["lin2.model.1.weight"])
    # strict: a missing head, an extra tensor or a wrong shape is an error naming the key
    with pytest.raises(RuntimeError, match="lin4.model.1.weight"):
        build_lpips_alex(trunk, {k: v for k, v in heads.items() if not k.startswith("lin4")})
    with pytest.raises(RuntimeError, match="features.12.weight"):
        build_lpips_alex({**trunk, "features.12.weight": torch.zeros(1)}, heads)
    with pytest.raises(RuntimeError, match="features.3.weight"):
        build_lpips_alex({**trunk, "features.3.weight": torch.zeros(192, 64, 3, 3)}, heads)
    with pytest.raises(ValueError, match="no 'features.\\*' keys"):
        trunk_state_dict({"conv1.weight": torch.zeros(1)})


def test_lpips_package_state_dict_maps_onto_the_module(weights):
    # The parity script copies lpips.LPIPS's state dict: its trunk is split into slices 1..5 at the
    # torchvision indices [0, 2), [2, 5), [5, 8), [8, 10), [10, 12); heads (also as lins.K) and buffers.
    trunk, heads = weights
    slice_of = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    package = {
        k.replace("features.", f"net.slice{slice_of[int(k.split('.')[1])]}."): v for k, v in trunk.items()
    }
    aliases = {k.replace("lin", "lins.", 1): v for k, v in heads.items()}  # its ModuleList of the heads
    package |= {
        **heads,
        **aliases,
        "scaling_layer.shift": torch.zeros(1, 3, 1, 1),
        "scaling_layer.scale": torch.ones(1, 3, 1, 1),
    }
    LpipsAlex().load_state_dict(lpips_to_tessera(package), strict=True)
    with pytest.raises(
        ValueError, match="lins.2.model.1.weight is not the same tensor as lin2.model.1.weight"
    ):
        lpips_to_tessera({**package, "lins.2.model.1.weight": torch.zeros(1, 384, 1, 1)})
    with pytest.raises(ValueError, match="unexpected key"):
        lpips_to_tessera({"net.features.0.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------- weight files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_repository_heads_are_the_published_file():
    assert _sha256(REPO_HEADS) == HEADS_SHA256
    assert (REPO_HEADS.parents[1] / "LICENSE").read_text().startswith("Copyright (c) 2018, Richard Zhang")


def test_missing_backbone_is_unavailable_and_a_job_that_asks_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / ALEXNET_FILE
    assert hub_checkpoint() == expected
    found = resolve_lpips()
    assert (found.available, found.backbone, found.backbone_source) == (False, expected, "torch hub cache")
    assert found.reason == f"AlexNet backbone (torch hub cache) {str(expected)!r} does not exist"
    assert found.record()["measured"] is False and found.record()["backbone_sha256"] is None
    with pytest.raises(
        LpipsUnavailableError, match=f"asked for but is unavailable.*{expected}.*{ALEXNET_SHA256}"
    ):
        require_lpips()
    configured = tmp_path / "nowhere" / ALEXNET_FILE
    with pytest.raises(
        LpipsUnavailableError, match=f"backbone \\(configured\\) '{configured}' does not exist"
    ):
        lpips_column(configured, required=True)
    column = lpips_column(configured)  # a report: not measured, with the reason
    assert not column.measured
    assert column.score(images((1, 3, 32, 32), 1), images((1, 3, 32, 32), 2)) is None
    assert column.record()["reason"].endswith("does not exist")


def test_backbone_with_another_digest_is_refused(tmp_path, weights):
    path = tmp_path / ALEXNET_FILE
    torch.save(weights[0], path)  # the right layout, but not the published weights
    found = resolve_lpips(path)
    assert not found.available
    assert found.reason == (
        f"AlexNet backbone (configured) {str(path)!r} has SHA-256 {_sha256(path)}, expected {ALEXNET_SHA256}"
    )
    with pytest.raises(LpipsUnavailableError, match="has SHA-256 .*, expected " + ALEXNET_SHA256):
        require_lpips(path)
    with pytest.raises(LpipsUnavailableError, match="LPIPS is unavailable: AlexNet backbone"):
        load_lpips(found)


def test_damaged_heads_are_refused(tmp_path):
    heads = tmp_path / "alex.pth"
    heads.write_bytes(REPO_HEADS.read_bytes()[:-1])
    backbone = tmp_path / ALEXNET_FILE
    found = resolve_lpips(backbone, heads=heads)  # both problems are reported
    assert not found.available
    assert found.reason == (
        f"AlexNet backbone (configured) {str(backbone)!r} does not exist; "
        f"LPIPS v0.1 heads {str(heads)!r} has SHA-256 {_sha256(heads)}, expected {HEADS_SHA256}"
    )


def test_verified_files_load_through_torch_load_weights_only(tmp_path, weights, model64):
    # The digest check is bypassed by handing load_lpips a verified record (the real backbone is not
    # on CI machines); what is tested is the loading: torch.load(weights_only=True) and a strict build.
    backbone = tmp_path / ALEXNET_FILE
    torch.save(torchvision_alexnet(weights[0]), backbone)
    record = LpipsWeights(
        available=True, reason="", backbone=backbone, backbone_source="configured", heads=REPO_HEADS
    )
    model = load_lpips(record)
    a, b = images((1, 3, 40, 40), 20), images((1, 3, 40, 40), 21)
    assert model(a, b).item() == pytest.approx(model64(a, b).item(), rel=1e-5)
    # a pickle of anything but tensors and containers is refused by weights_only
    evil = tmp_path / "evil.pth"
    torch.save({"features.0.weight": Path("x")}, evil)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_lpips(
            LpipsWeights(
                available=True, reason="", backbone=evil, backbone_source="configured", heads=REPO_HEADS
            )
        )


def test_perceptual_term_weight_is_zero_when_unavailable(tmp_path, weights):
    missing = lpips_column(tmp_path / ALEXNET_FILE)
    term = perceptual_term(0.5, missing)
    assert (term.requested_weight, term.weight, term.measured) == (0.5, 0.0, False)
    assert term.record()["reason"].endswith("does not exist")
    record = LpipsWeights(
        available=True, reason="", backbone=tmp_path, backbone_source="configured", heads=REPO_HEADS
    )
    present = LpipsColumn(record, build_lpips_alex(*weights))
    assert perceptual_term(0.5, present).record() == {
        "requested_weight": 0.5,
        "weight": 0.5,
        "measured": True,
        "reason": "",
    }
    with pytest.raises(ValueError, match="perceptual weight must be >= 0, got -1"):
        perceptual_term(-1.0, present)


def test_real_weights_when_the_backbone_is_in_the_hub_cache(assets):
    # Only where torchvision's checkpoint is cached (GPU clusters): more blur, larger distance.
    found = resolve_lpips()
    if not found.available:
        pytest.skip(found.reason)
    photo = read_image(sorted(Path(assets).rglob("*.png"))[0])[..., :256, :256]
    model = load_lpips(found)
    blurred = [F.avg_pool2d(photo, k, stride=1, padding=k // 2, count_include_pad=False) for k in (3, 7)]
    d_small, d_large = (lpips_distance(model, photo, x) for x in blurred)
    assert lpips_distance(model, photo, photo) == 0.0
    assert 0 < d_small < d_large
