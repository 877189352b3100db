"""Tiled VAE with exact GroupNorm statistics (core/vae/tiled.py, core/vae/lockstep.py, docs/vae.md).

Equivalences: tiled == untiled (up to float rounding) for TAEF2 with its real weights and for a
tiny random AutoencoderKL with mid-block attention, compared against diffusers' own forward. The
same tiles with per-tile statistics differ measurably, so the equivalence tests can fail. Golden
numbers (reductions, tile geometry, receptive-field radii) are derived by hand in the comments.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.tiling.rect import Rect
from core.vae import taef2
from core.vae.adapters import KLVae, TinyVae, load_kl_vae
from core.vae.lockstep import (
    TileGroup,
    TileInput,
    in_process,
    run_lockstep,
    run_tiled,
    tiled_decode,
    tiled_encode,
)
from core.vae.tiled import (
    AttentionGlobal,
    AttentionPartial,
    GroupNormGlobal,
    GroupNormPartial,
    VaeGeometry,
    group_norm_partial,
    halo_radius,
    plan_tiles,
    reduce_requests,
    split_tiles,
    stitch,
)
from runner.models import WEIGHTS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-4  # float32 rounding of reordered reductions; observed diffs are ~1e-6


def smooth_images(batch: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Seeded smooth test images in [0, 1]: bilinear upsampling of coarse noise plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, h // 8 + 1, w // 8 + 1, generator=g)
    fine = 0.1 * torch.rand(batch, 3, h, w, generator=g)
    return (0.9 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True) + fine).clamp(0, 1)


def step(program, reply):
    try:
        return program.send(reply), None
    except StopIteration as stop:
        return None, stop.value


def run_with_local_replies(programs, local: tuple[type, ...]) -> list[torch.Tensor]:
    """run_lockstep, except that requests of the `local` kinds get the tile's own statistics
    (per-tile GroupNorm, or attention to the tile's own keys only)."""
    state = [step(p, None) for p in programs]
    while state[0][0] is not None:
        requests = [req for req, _ in state]
        shared = reduce_requests(requests)
        replies = [reduce_requests([r]) if isinstance(r, local) else shared for r in requests]
        state = [step(p, reply) for p, reply in zip(programs, replies, strict=True)]
    return [out for _, out in state]


# --- reductions ----------------------------------------------------------------------------------


def test_reduce_group_norm_golden() -> None:
    # Tile A holds group values {1, 2, 3}, tile B {5}: mean 11/4 = 2.75, var 39/4 - 2.75^2 = 2.1875.
    # Group 1: A {0, 0}, B {4, 4}: mean 2, var 4.
    a = GroupNormPartial(torch.tensor([[3.0, 2.0]]), torch.tensor([[6.0, 0.0]]), torch.tensor([[14.0, 0.0]]))
    b = GroupNormPartial(torch.tensor([[1.0, 2.0]]), torch.tensor([[5.0, 8.0]]), torch.tensor([[25.0, 32.0]]))
    reply = reduce_requests([a, b])
    assert isinstance(reply, GroupNormGlobal)
    torch.testing.assert_close(reply.mean, torch.tensor([[2.75, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(reply.var, torch.tensor([[2.1875, 4.0]], dtype=torch.float64))


def test_group_norm_partial_is_stable_and_counts_the_core_only() -> None:
    g = torch.Generator().manual_seed(1)
    x = 1e4 + torch.randn(2, 8, 12, 10, generator=g, dtype=torch.float64)  # large offset, unit spread
    tiles = [Rect(0, 0, 12, 4), Rect(0, 4, 5, 6), Rect(5, 4, 7, 6)]
    padded = F.pad(x, (3, 3, 3, 3), value=-7.0).float()  # halo values that must not be counted
    cores = [Rect(b.y0 + 3, b.x0 + 3, b.h, b.w) for b in tiles]
    reply = reduce_requests([group_norm_partial(padded, c, 4) for c in cores])
    flat = x.reshape(2, 4, -1)
    torch.testing.assert_close(reply.mean, flat.mean(-1), rtol=1e-7, atol=0)
    torch.testing.assert_close(reply.var, flat.var(-1, unbiased=False), rtol=1e-3, atol=0)


def test_reduce_attention_concatenates_in_tile_order_and_rejects_mixed_rounds() -> None:
    k1, k2 = torch.zeros(1, 2, 3), torch.ones(1, 4, 3)
    reply = reduce_requests([AttentionPartial(k1, -k1), AttentionPartial(k2, -k2)])
    assert isinstance(reply, AttentionGlobal)
    assert torch.equal(reply.k, torch.cat([k1, k2], 1)) and torch.equal(reply.v, -torch.cat([k1, k2], 1))
    gn = GroupNormPartial(torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="one kind"):
        reduce_requests([gn, AttentionPartial(k1, k1)])
    with pytest.raises(ValueError, match="at least one"):
        reduce_requests([])


def test_run_lockstep_counts_rounds_and_rejects_programs_out_of_step() -> None:
    def program(rounds: int, value: float):
        for _ in range(rounds):
            yield GroupNormPartial(torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1))
        return torch.full((1,), value)

    def groups(*members: list[tuple[int, int]]):
        held = [TileGroup([t for t, _ in m], [program(r, float(t)) for t, r in m]) for m in members]
        return lambda reply: [g.advance(reply) for g in held]

    # tiles 0..2 in two groups, listed out of order: outputs come back in tile order
    outputs, rounds = run_lockstep(groups([(2, 3)], [(0, 3), (1, 3)]))
    assert [float(o) for o in outputs] == [0.0, 1.0, 2.0] and rounds == 3
    with pytest.raises(RuntimeError, match=r"out of step: tiles \[0\]"):
        run_lockstep(groups([(0, 1)], [(1, 2)]))  # across groups
    with pytest.raises(RuntimeError, match="out of step"):
        run_lockstep(groups([(0, 1), (1, 2)]))  # inside one group
    with pytest.raises(ValueError, match="one program per tile"):
        TileGroup([], [])


def test_tile_grouping_does_not_change_the_result(tiny_vae: TinyVae, photo: torch.Tensor) -> None:
    """However the tiles are grouped (one group here, one per tile, or blocks as on the pool's
    workers), the round loop reduces in tile order: the same image, bit for bit."""
    latents = tiny_vae.encode(photo[..., :64, :192])  # 8 x 24
    plan = plan_tiles("decode", latents.shape, VaeGeometry.of(tiny_vae), tile_px=64)
    assert len(plan.specs) == 3

    def blocks(size: int):
        def fanout(op, inputs: list[TileInput]):
            held = [TileGroup.start(tiny_vae, op, inputs[i : i + size]) for i in range(0, len(inputs), size)]
            return lambda reply: [g.advance(reply) for g in reversed(held)]

        return fanout

    whole = run_tiled(plan, latents, in_process(tiny_vae))
    assert whole.rounds == 3  # one per GroupNorm of the decoder: the pool branches of blocks 3-5
    for size in (1, 2):
        assert torch.equal(run_tiled(plan, latents, blocks(size)).output, whole.output), size


# --- geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "tile", "pad", "align"),
    [(120, 176, 64, 145, 8), (37, 53, 16, 19, 1), (64, 64, 64, 0, 8), (24, 200, 8, 5, 4), (7, 9, 4, 1, 1)],
)
def test_split_tiles_partitions_and_aligns(height, width, tile, pad, align) -> None:
    specs = split_tiles(height, width, tile=tile, pad=pad, align=align)
    cover = torch.zeros(height, width, dtype=torch.int64)
    for s in specs:
        c, w = s.core, s.window
        s.core.cut(cover).add_(1)
        assert c.y0 % align == 0 and c.x0 % align == 0 and c.h <= tile and c.w <= tile
        assert c.h % align == 0 or c.y0 + c.h == height
        assert c.w % align == 0 or c.x0 + c.w == width
        assert w.y0 % align == 0 and w.x0 % align == 0
        assert (w.y0 + w.h) % align == 0 or w.y0 + w.h == height
        assert (w.x0 + w.w) % align == 0 or w.x0 + w.w == width
        assert w.y0 <= max(0, c.y0 - pad) and w.y0 + w.h >= min(height, c.y0 + c.h + pad)
        assert w.x0 <= max(0, c.x0 - pad) and w.x0 + w.w >= min(width, c.x0 + c.w + pad)
        assert w.y0 + w.h <= height and w.x0 + w.w <= width
    assert bool((cover == 1).all())


def test_split_tiles_golden() -> None:
    # 120 rows in ceil(120/64) = 2 parts of 60 -> 64 aligned: cores [0, 64), [64, 120). Windows grow
    # by 20, floor/ceil to 8 and clip: [0, 88), [40, 120). 176 cols in 3 parts of 59 -> 64: cores
    # [0, 64), [64, 128), [128, 176); windows [0, 88), [40, 152), [104, 176).
    specs = split_tiles(120, 176, tile=64, pad=20, align=8)
    rows = [(0, 64, 0, 88), (64, 56, 40, 80)]
    cols = [(0, 64, 0, 88), (64, 64, 40, 112), (128, 48, 104, 72)]
    expected = [(Rect(r[0], c[0], r[1], c[1]), Rect(r[2], c[2], r[3], c[3])) for r in rows for c in cols]
    assert [(s.core, s.window) for s in specs] == expected
    assert specs[4].core_in_window == Rect(24, 24, 56, 64)


def test_geometry_errors() -> None:
    with pytest.raises(ValueError, match="multiple of align 8, got 12"):
        split_tiles(64, 64, tile=12, pad=0, align=8)
    with pytest.raises(ValueError, match="multiple of align 8, got 4"):
        split_tiles(64, 64, tile=4, pad=0, align=8)
    with pytest.raises(ValueError, match="pad must be >= 0, got -1"):
        split_tiles(64, 64, tile=16, pad=-1, align=1)
    with pytest.raises(ValueError, match="align must be >= 1, got 0"):
        split_tiles(64, 64, tile=16, pad=0, align=0)
    with pytest.raises(ValueError, match="image size"):
        split_tiles(0, 64, tile=16, pad=0, align=1)
    with pytest.raises(ValueError, match="rect size"):
        Rect(0, 0, 0, 4)
    with pytest.raises(ValueError, match="does not scale"):
        Rect(0, 4, 6, 6).scale(1, 4)
    specs = split_tiles(16, 16, tile=8, pad=0, align=1)
    with pytest.raises(ValueError, match="expected size"):
        stitch([torch.zeros(1, 3, 8, 8)] * 4, specs, (1, 3, 32, 32), 2)


def test_halo_radius_golden() -> None:
    assert halo_radius(["conv"]) == 1
    assert halo_radius(["down"]) == 1  # latent 0 owns pixels {0, 1}, reads {-1, 0, 1}
    assert halo_radius(["down_asym"]) == 1  # reads {0, 1, 2}
    assert halo_radius(["up", "conv"]) == 1  # output 0 reads outputs {-1, 0, 1} -> latents {-1, 0}
    # TAEF2 encoder, backwards from latent o: conv14 + 9 convs (blocks 11-13) = [o-10, o+10];
    # stride-2 conv: [2o-21, 2o+21]; 9 convs: +-30; s2: [4o-61, 4o+61]; 9 convs: +-70;
    # s2: [8o-141, 8o+141]; block 1 + conv 0: [8o-145, 8o+145] against the owned [8o, 8o+7].
    assert halo_radius(taef2.layer_ops(taef2.Taef2Encoder())) == 145
    # TAEF2 decoder, backwards from output 8l (worst phase): conv19 + block18 + conv17 = +-5, up:
    # 4l-3; conv12 + 9 convs: 4l-13, up: 2l-7; 10 convs: 2l-17, up: l-9; 9 convs + conv1: l-19.
    assert halo_radius(taef2.layer_ops(taef2.Taef2Decoder())) == 19
    # Flux.1's AutoencoderKL (block_out_channels (128, 256, 512, 512), layers_per_block 2):
    # encoder conv_in, 3 x (4 convs, asymmetric stride 2), 4 convs, mid 4 convs, conv_out -> 108 px;
    # decoder conv_in, mid 4, 3 x (6 convs, up, conv), 6 convs, conv_out -> 18 latent px.
    flux_encoder = ["conv"] + (["conv"] * 4 + ["down_asym"]) * 3 + ["conv"] * 9
    flux_decoder = ["conv"] * 5 + (["conv"] * 6 + ["up", "conv"]) * 3 + ["conv"] * 7
    assert (halo_radius(flux_encoder), halo_radius(flux_decoder)) == (108, 18)
    with pytest.raises(ValueError, match="unknown op"):
        halo_radius(["pool"])


# --- TAEF2 (real weights) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae() -> TinyVae:
    return TinyVae(*taef2.load_taef2(WEIGHTS.taef2), shift=0.1, scale=1.25)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A 136 x 424 crop of a real photo when the shared assets are there, else smooth noise."""
    assets = Path(os.environ.get("TESSERA_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
    path = assets / "images" / "eval" / "kodak" / "kodim20.png"
    if not path.is_file():
        return smooth_images(1, 136, 424, seed=3)
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    return pixels[None, :, 200:336, 100:524].contiguous()


def test_taef2_tiled_encode_matches_untiled(tiny_vae: TinyVae, photo: torch.Tensor) -> None:
    # Cores 72/64 rows x 112/112/112/88 cols; windows +145 px: the middle ones end inside the image.
    assert (tiny_vae.encode_halo, tiny_vae.decode_halo) == (145, 19)
    untiled = tiny_vae.encode(photo)
    tiled = tiled_encode(tiny_vae, photo, tile=128)
    diff = float((tiled - untiled).abs().max())
    print(f"\nTAEF2 encode 136x424, 8 tiles: max |tiled - untiled| = {diff:.2e}")
    assert diff < TOL
    assert float((tiled_encode(tiny_vae, photo, tile=128, pad=0) - untiled).abs().max()) > 0.1


def test_taef2_tiled_decode_matches_untiled_and_per_tile_stats_do_not(tiny_vae, photo) -> None:
    latents = tiny_vae.encode(photo)[:, :, :15]  # 15 x 53: cores 8/7 x 14/14/14/11, windows +19
    untiled = tiny_vae.decode(latents)
    tiled = tiled_decode(tiny_vae, latents, tile=112)  # 14 latent px
    diff = float((tiled - untiled).abs().max())
    print(f"\nTAEF2 decode 15x53 latents, 8 tiles: max |tiled - untiled| = {diff:.2e}")
    assert diff < TOL

    specs = split_tiles(15, 53, tile=14, pad=tiny_vae.decode_halo, align=1)
    assert len(specs) == 8 and specs[-1].core == Rect(8, 42, 7, 11)
    programs = [tiny_vae.decode_program(s.window.cut(latents), s.core_in_window) for s in specs]
    local = stitch(run_with_local_replies(programs, (GroupNormPartial,)), specs, untiled.shape, 8)
    local_diff = float((local - untiled).abs().max())
    print(f"per-tile GroupNorm instead: max diff {local_diff:.2e}")
    assert local_diff > 100 * TOL


# --- AutoencoderKL (tiny, random) ----------------------------------------------------------------


def build_tiny_kl(seed: int = 0, *, block_out_channels=(8, 16, 16), quant_convs: bool = True):
    """A tiny AutoencoderKL: 4 latent channels, 4 groups, mid-block attention; /4 by default.

    Every parameter is redrawn from a seeded CPU generator (N(0, 1/fan_in) weights, 0.2-scale biases,
    GroupNorm gains 1 + 0.2 N), so the module does not depend on the global RNG's state.
    quant_convs=False is Flux.1's layout (no quant_conv / post_quant_conv).
    """
    from diffusers import AutoencoderKL

    blocks = len(block_out_channels)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return vae.eval()


@pytest.fixture(scope="module")
def kl_vae() -> KLVae:
    return KLVae(build_tiny_kl())


def test_kl_adapter_attributes(kl_vae: KLVae) -> None:
    assert (kl_vae.latent_channels, kl_vae.scale_factor) == (4, 4)
    assert (kl_vae.shift, kl_vae.scale) == (0.1159, 0.3611)
    # encoder: conv_in, 2 x (2 convs, asym. stride 2), 2 convs, mid 4, conv_out -> 38 px;
    # decoder: conv_in, mid 4, 2 x (4 convs, up, conv), 4 convs, conv_out -> 13 latent px.
    assert (kl_vae.encode_halo, kl_vae.decode_halo) == (38, 13)


@pytest.mark.parametrize(("block_out_channels", "quant_convs"), [((8, 16, 16), True), ((8, 16), False)])
def test_kl_tiled_encode_and_decode_match_diffusers(block_out_channels, quant_convs) -> None:
    vae = KLVae(build_tiny_kl(1, block_out_channels=block_out_channels, quant_convs=quant_convs))
    f = vae.scale_factor
    images = smooth_images(2, 100, 140, seed=5)  # /4: cores 36/36/28 x 48/48/44 px, windows +38
    untiled = vae.encode(images)
    tiled = tiled_encode(vae, images, tile=48)
    enc_diff = float((tiled - untiled).abs().max())
    latents = untiled[:, :, :25, :29]  # /4: cores 9/9/7 x 10/10/9, windows +13
    decoded = vae.decode(latents)
    assert 0.05 < float(decoded.mean()) < 0.95  # mostly unclamped, so the comparison sees values
    assert float((decoded == decoded.clamp(0.01, 0.99)).float().mean()) > 0.5
    dec_diff = float((tiled_decode(vae, latents, tile=40) - decoded).abs().max())  # 10 latent px
    print(f"\ntiny AutoencoderKL /{f}: max |tiled - untiled| encode {enc_diff:.2e}, decode {dec_diff:.2e}")
    assert enc_diff < TOL and dec_diff < TOL

    specs = split_tiles(25, 29, tile=10, pad=vae.decode_halo, align=1)
    for local in (GroupNormPartial, AttentionPartial):  # each global reduction matters on its own
        programs = [vae.decode_program(s.window.cut(latents), s.core_in_window) for s in specs]
        diff = float(
            (stitch(run_with_local_replies(programs, (local,)), specs, decoded.shape, f) - decoded)
            .abs()
            .max()
        )
        print(f"  per-tile {local.__name__} instead: max diff {diff:.2e}")
        assert diff > 100 * TOL


def test_kl_save_and_load_round_trip(kl_vae: KLVae, tmp_path: Path) -> None:
    kl_vae.vae.save_pretrained(tmp_path / "pipeline" / "vae")
    images = smooth_images(1, 32, 48, seed=7)
    expected = kl_vae.encode(images)
    for source in (tmp_path / "pipeline", tmp_path / "pipeline" / "vae"):  # pipeline dir, bare vae dir
        loaded = load_kl_vae(str(source), dtype=torch.float32, device="cpu")
        assert not loaded.vae.training and (loaded.shift, loaded.scale) == (kl_vae.shift, kl_vae.scale)
        torch.testing.assert_close(loaded.encode(images), expected, rtol=0, atol=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a vae/ subfolder nor a config.json"):
        load_kl_vae(str(tmp_path / "empty"), dtype=torch.float32, device="cpu")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=".safetensors or .ckpt"):
        load_kl_vae(str(tmp_path / "weights.bin"), dtype=torch.float32, device="cpu")


def test_kl_unsupported_options_raise(kl_vae: KLVae) -> None:
    vae = copy.deepcopy(kl_vae.vae)
    vae.decoder.up_blocks[0].resnets[0].time_emb_proj = nn.Linear(4, 16)
    window = torch.zeros(1, 4, 8, 8)
    with pytest.raises(NotImplementedError, match="time embedding"):
        KLVae(vae).decode_program(window, Rect(0, 0, 8, 8))
    vae = copy.deepcopy(kl_vae.vae)
    vae.encoder.mid_block.attentions[0].spatial_norm = nn.Identity()
    with pytest.raises(NotImplementedError, match="spatial norm"):
        KLVae(vae).encode_program(torch.zeros(1, 3, 32, 32), Rect(0, 0, 32, 32))
    with pytest.raises(NotImplementedError, match="training mode"):
        KLVae(copy.deepcopy(kl_vae.vae).train()).decode_program(window, Rect(0, 0, 8, 8))
    with pytest.raises(ValueError, match="multiple of the VAE scale factor 4"):
        tiled_encode(kl_vae, torch.zeros(1, 3, 30, 32))
