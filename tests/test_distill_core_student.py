"""The student's query-subset forward (what distillation trains on: a capture's queries with every key
and value) equals the full forward restricted to those queries; the local window's subset gather
equals the tiled one."""

from __future__ import annotations

import pytest
import torch

from core.attention.config import StudentConfig
from core.attention.geometry import TokenGeometry
from core.attention.local import local_attention, local_attention_at
from core.attention.student import Student, build_student, gate_probes

pytestmark = pytest.mark.cpu

GEOMETRY = TokenGeometry(3, 6, 10)  # partial 4 x 4 tiles in both directions
CONFIG = StudentConfig(heads=2, head_dim=16, features=64, landmark_min=8, local_tile=4)
# fp32 rounding: the subset runs the same formulas with other matrix shapes (one query per window
# gather instead of a tile's 16, a shorter kernel readout), so sums may be ordered differently.
ATOL = 2e-6


def qkv(geometry: TokenGeometry = GEOMETRY, *, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, batch, CONFIG.heads, geometry.n, CONFIG.head_dim, generator=g).unbind(0)


@pytest.fixture(scope="module")
def trained() -> Student:
    """A student away from its initialisation: conditioner on, gates of both signs, open logits."""
    s = build_student(CONFIG, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        s.conditioner.net[-1].weight.copy_(0.3 * torch.randn(s.conditioner.net[-1].weight.shape, generator=g))
        s.gamma_kernel.copy_(torch.tensor([3.0, -2.0]))
        s.logit_landmark.copy_(torch.tensor([0.5, -1.0]))
    return s


def forward(s: Student, q, k, v, geometry=GEOMETRY, **kw):
    b = k.shape[0]
    sigma, cfg = torch.linspace(0.2, 0.9, b), torch.full((b,), 3.5)
    with torch.no_grad():
        return s(q, k, v, geometry, sigma, cfg, **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_query_subset_forward_equals_the_full_forward_restricted(trained, seed):
    q, k, v = qkv(seed=seed)
    full = forward(trained, q, k, v)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(GEOMETRY.n, generator=g)[:17]  # unsorted, text and image queries
    idx = torch.cat([idx, torch.tensor([0, GEOMETRY.n - 1, idx[3].item()])])  # ends and a repeat
    sub = forward(trained, q[:, :, idx], k, v, query_index=idx)
    assert sub.out.shape == (2, CONFIG.heads, len(idx), CONFIG.head_dim)
    assert (sub.out - full.out[:, :, idx]).abs().max().item() <= ATOL
    assert sub.nonfinite == () and sub.min_denominator >= full.min_denominator
    # the subset output is not the local branch alone: the gates are open and act on these rows
    local = trained.branches(q[:, :, idx], k, v, GEOMETRY, idx).local
    assert (sub.out - local).abs().max().item() > 1e-3


def test_a_query_does_not_depend_on_the_other_queries(trained):
    q, k, v = qkv()
    other = q.clone()
    other[:, :, 5:] = 10 * torch.randn_like(other[:, :, 5:])  # every query but the first five changes
    a, b = forward(trained, q, k, v).out, forward(trained, other, k, v).out
    assert (a[:, :, :5] - b[:, :, :5]).abs().max().item() <= ATOL
    assert (a[:, :, 5:] - b[:, :, 5:]).abs().max().item() > 1e-2


@pytest.mark.parametrize(("tile", "radius"), [(4, 1), (3, 0), (8, 2)])
@pytest.mark.parametrize("mask_elements", [0, 10**6], ids=["gathered", "masked"])
def test_local_subset_equals_the_tiled_local_attention(tile, radius, mask_elements):
    q, k, v = qkv()
    full = local_attention(q, k, v, GEOMETRY, tile=tile, radius=radius)
    idx = torch.tensor([62, 0, 2, 3, 10, 17, 40, 41, 12, 3])  # text queries 0, 2, a repeat
    sub = local_attention_at(
        q[:, :, idx], k, v, GEOMETRY, idx, tile=tile, radius=radius, chunk_elements=4096,
        mask_elements=mask_elements,
    )  # fmt: skip
    assert (sub - full[:, :, idx]).abs().max().item() <= ATOL


def test_gate_probes_are_a_2d_grid_of_image_tokens():
    # 6 x 10 grid, 64 probes wanted: all 60 image tokens
    assert gate_probes(GEOMETRY).tolist() == list(range(3, 63))
    # 32 x 32 grid: an 8 x 8 stride grid, rows/cols 2, 6, ..., 30
    rc = [2 + 4 * i for i in range(8)]
    assert gate_probes(TokenGeometry(4, 32, 32)).tolist() == [4 + r * 32 + c for r in rc for c in rc]


def test_query_subset_validates_the_index(trained):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="query_index must lie in"):
        forward(trained, q[:, :, :2], k, v, query_index=torch.tensor([0, GEOMETRY.n]))
    with pytest.raises(ValueError, match=r"q \[B, 2, 3, 16\]"):
        forward(trained, q[:, :, :2], k, v, query_index=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="int64"):
        forward(trained, q[:, :, :2], k, v, query_index=torch.tensor([0, 1], dtype=torch.int32))
