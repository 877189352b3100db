"""The student's branches against exact references: landmarks over every key and a window over every
token are softmax attention; the tile-gather local branch equals a dense-mask softmax; the chunked
kernel readout equals the one-piece formula; landmark and mask indices are hand-derived goldens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.attention.geometry import TokenGeometry
from core.attention.kernel import FeatureMap, kernel_attention, kernel_attention_reference
from core.attention.landmarks import landmark_attention, landmark_count, landmark_indices
from core.attention.local import local_attention, local_index, local_mask

pytestmark = pytest.mark.cpu


def qkv(geometry: TokenGeometry, *, batch: int = 2, heads: int = 3, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, batch, heads, geometry.n, dim, generator=g).unbind(0)


def sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---- landmarks -------------------------------------------------------------------------------------


def test_landmarks_over_all_keys_equal_sdpa():
    geometry = TokenGeometry(3, 5, 7)
    index = landmark_indices(geometry, geometry.n_img)
    assert torch.equal(index, torch.arange(geometry.n))
    q, k, v = qkv(geometry)
    assert (landmark_attention(q, k, v, index) - sdpa(q, k, v)).abs().max() <= 1e-5


def test_landmark_indices_golden():
    # 4 x 6 grid, M = 6: m_r = round(sqrt(6 * 4 / 6)) = 2, m_c = 6 // 2 = 3; strata centres
    # rows floor((i + 1/2) 4 / 2) = 1, 3 and cols floor((j + 1/2) 6 / 3) = 1, 3, 5; index 3 + 6 r + c.
    assert landmark_indices(TokenGeometry(3, 4, 6), 6).tolist() == [0, 1, 2, 10, 12, 14, 22, 24, 26]
    # 5 x 5, M = 4: a 2 x 2 grid at rows and cols floor(1.25) = 1, floor(3.75) = 3; index 2 + 5 r + c.
    assert landmark_indices(TokenGeometry(2, 5, 5), 4).tolist() == [0, 1, 8, 10, 18, 20]
    # 2 x 8, M = 4: m_r = round(sqrt(4 * 2 / 8)) = 1, m_c = 4: row 1, cols 1, 3, 5, 7. Raster-order
    # linspace would have put half of them in row 0.
    assert landmark_indices(TokenGeometry(0, 2, 8), 4).tolist() == [9, 11, 13, 15]


@pytest.mark.parametrize(
    "n_text,rows,cols,m", [(4, 16, 16, 64), (512, 64, 64, 328), (7, 3, 50, 20), (1, 1, 1, 9)]
)
def test_landmarks_always_hold_every_text_token(n_text, rows, cols, m):
    geometry = TokenGeometry(n_text, rows, cols)
    index = landmark_indices(geometry, m)
    assert index[:n_text].tolist() == list(range(n_text))
    image = index[n_text:]
    assert image.unique().numel() == image.numel() <= min(m, geometry.n_img)
    assert image.min() >= n_text and image.max() < geometry.n
    assert image.numel() >= min(m, geometry.n_img) // 2  # the grid uses at least half the budget


def test_landmark_count_golden():
    # clamp(round(0.08 n_img), 64, 512), at most n_img
    assert landmark_count(4096, fraction=0.08, minimum=64, maximum=512) == 328  # 327.68
    assert landmark_count(65536, fraction=0.08, minimum=64, maximum=512) == 512  # 5242.9, capped
    assert landmark_count(256, fraction=0.08, minimum=64, maximum=512) == 64  # 20.5, raised to the min
    assert landmark_count(30, fraction=0.08, minimum=64, maximum=512) == 30  # every image token


# ---- local window ----------------------------------------------------------------------------------


def test_local_window_covering_all_tokens_equals_sdpa():
    geometry = TokenGeometry(3, 6, 10)  # tiles of 4: 2 x 3 tiles, radius 2 reaches every tile
    q, k, v = qkv(geometry)
    out = local_attention(q, k, v, geometry, tile=4, radius=2)
    assert (out - sdpa(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize("tile,radius", [(4, 1), (4, 0), (3, 1), (1, 2)])
def test_local_tile_gather_equals_dense_mask_reference(tile, radius):
    geometry = TokenGeometry(3, 9, 11)  # partial tiles on both axes
    q, k, v = qkv(geometry)
    reference = sdpa(q, k, v, local_mask(geometry, tile=tile, radius=radius))
    for chunk_elements in (1, 1 << 24):  # one tile per chunk, and all tiles in one chunk
        out = local_attention(q, k, v, geometry, tile=tile, radius=radius, chunk_elements=chunk_elements)
        assert (out - reference).abs().max() <= 1e-5


def test_local_mask_golden():
    # 1 text token, a 4 x 4 grid in 2 x 2 tiles, radius 0: a query sees the text token and its own tile.
    mask = local_mask(TokenGeometry(1, 4, 4), tile=2, radius=0)
    assert mask[0].all()  # text queries attend globally
    assert mask[:, 0].all()  # every query sees the text key
    assert torch.nonzero(mask[1]).flatten().tolist() == [0, 1, 2, 5, 6]  # query (0, 0): tile (0, 0)
    assert torch.nonzero(mask[16]).flatten().tolist() == [0, 11, 12, 15, 16]  # query (3, 3): tile (1, 1)


def test_local_index_pads_partial_tiles():
    geometry = TokenGeometry(2, 3, 3)  # one full tile of 2 x 2 and partial ones
    index = local_index(geometry, tile=2, radius=0)
    assert index.query.shape == (4, 4)
    # tile (1, 1) holds only the token (2, 2) = 2 + 8; its other slots point past the end (n = 11)
    assert index.query[3].tolist() == [10, 11, 11, 11]
    assert index.key_valid[3].tolist() == [True, True, True, False, False, False]
    assert index.key[3].tolist()[:3] == [0, 1, 10]


# ---- kernel regression -----------------------------------------------------------------------------


def test_kernel_regression_golden_with_identity_features():
    # phi(x) = x: y_i = q_i (sum_j k_j v_j^T) / q_i (sum_j k_j). Keys e1, e2 with values 2 and 4:
    # q = e1 reads 2 / 1 = 2; q = (1, 1) reads (2 + 4) / 2 = 3; q = (3, 1) reads (6 + 4) / 4 = 2.5.
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 1.0]])[None, None]
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]
    v = torch.tensor([[2.0], [4.0]])[None, None]
    result = kernel_attention(q, k, v, torch.nn.Identity(), torch.nn.Identity(), key_chunk=1, query_chunk=2)
    assert result.out.flatten().tolist() == [2.0, 3.0, 2.5]
    assert result.min_denominator.item() == 1.0


def test_kernel_chunked_readout_equals_unchunked_formula():
    torch.manual_seed(0)
    phi_q, phi_k = FeatureMap(16, 64, 2), FeatureMap(16, 64, 2)
    geometry = TokenGeometry(3, 5, 7)
    q, k, v = qkv(geometry)
    reference = kernel_attention_reference(q, k, v, phi_q, phi_k)
    den = (phi_q(q) @ phi_k(k).sum(dim=2).unsqueeze(-1)).min()
    for key_chunk, query_chunk in ((5, 7), (1, 38), (1024, 1024)):
        result = kernel_attention(q, k, v, phi_q, phi_k, key_chunk=key_chunk, query_chunk=query_chunk)
        assert torch.allclose(result.out, reference, rtol=1e-5, atol=1e-6)
        assert torch.allclose(result.min_denominator, den, rtol=1e-5)


def test_feature_map_shape_positivity_and_norm():
    phi = FeatureMap(64, 128, 2)
    widths = [m.out_features for m in phi.mlp if isinstance(m, torch.nn.Linear)]
    assert widths == [256, 256, 128]  # d -> h -> h -> F with h = max(d, 2F)
    assert [m.out_features for m in FeatureMap(512, 64, 1).mlp if isinstance(m, torch.nn.Linear)] == [512, 64]
    y = phi(torch.randn(10, 64) * 5)
    assert (y > 0).all()
    assert torch.allclose(y.norm(dim=-1), torch.ones(10), atol=1e-6)
