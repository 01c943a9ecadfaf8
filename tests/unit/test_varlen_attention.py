"""Packed attention for the vision tower: windows of equal length in one SDPA call, rows equal to one call each."""

import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hcxserve.models import varlen_attention
from hcxserve.models.varlen_attention import PACKED_SDPA, packed_sdpa_attention
from hcxserve.models.vision_tower import VisionTower
from tests.conftest import make_png

HEADS, DIM = 2, 8


def packed(lengths: list[int], seed: int = 0):
    """q, k, v laid out as the Qwen2.5-VL tower passes them: (1, heads, packed, dim) views of a (packed, 3, heads, dim)
    projection; and cu_seqlens."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, HEADS, DIM, generator=generator)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv.permute(1, 0, 2, 3).unbind(0))
    return q, k, v, torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def one_call_per_sequence(q, k, v, cu_seqlens, scale):
    """What transformers does without a flash implementation: one SDPA per sequence."""
    bounds = cu_seqlens.tolist()
    outs = [
        F.scaled_dot_product_attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], scale=scale).transpose(1, 2)
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(
    "lengths",
    [[64, 64, 64, 64], [64, 16, 64, 40, 16, 64], [7], [3, 0, 5], [1, 1, 2]],
    ids=["one-length", "mixed", "single", "empty-sequence", "tiny"],
)
def test_rows_equal_one_call_per_sequence(lengths):
    q, k, v, cu = packed(lengths)
    got, weights = packed_sdpa_attention(None, q, k, v, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert weights is None
    assert got.shape == (1, sum(lengths), HEADS, DIM)
    assert torch.equal(got, one_call_per_sequence(q, k, v, cu, 0.3))


@pytest.mark.parametrize(("lengths", "calls"), [([64] * 16, 1), ([64, 16, 64, 40, 16, 64], 3), ([5, 5, 3], 2)])
def test_one_sdpa_call_per_distinct_length(monkeypatch, lengths, calls):
    seen, sdpa = [], F.scaled_dot_product_attention

    def counting(query, *args, **kwargs):
        seen.append(query.shape)
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(varlen_attention.F, "scaled_dot_product_attention", counting)
    q, k, v, cu = packed(lengths)
    for _ in range(3):  # layers share cu_seqlens: still one call per length each time
        seen.clear()
        packed_sdpa_attention(None, q, k, v, cu_seq_lens_q=cu)
        assert len(seen) == calls
    # each call holds every sequence of one length: (sequences, heads, length, dim)
    assert sorted((shape[0], shape[2]) for shape in seen) == sorted((lengths.count(n), n) for n in set(lengths))


def test_a_sequence_that_does_not_start_at_zero_is_gathered():
    q, k, v, _ = packed([4, 4, 4])
    cu = torch.tensor([4, 8, 12], dtype=torch.int32)  # the first 4 positions belong to no sequence here
    got, _ = packed_sdpa_attention(None, q, k, v, cu_seq_lens_q=cu)
    assert torch.equal(got[:, 4:], one_call_per_sequence(q, k, v, cu, None))


def test_groups_gather_only_when_the_sequences_are_not_one_length_end_to_end():
    cu = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    assert varlen_attention._groups(cu, 12) == [(4, None)]  # a view of the packed sequence, no gather
    [(length, index)] = varlen_attention._groups(torch.tensor([0, 4, 8], dtype=torch.int32), 12)  # 8..12 uncovered
    assert length == 4 and index.tolist() == list(range(8))
    groups = varlen_attention._groups(torch.tensor([0, 2, 5, 7], dtype=torch.int32), 7)
    assert [(n, index.tolist()) for n, index in groups] == [(2, [0, 1, 5, 6]), (3, [2, 3, 4])]


def test_groups_are_computed_once_per_cu_seqlens():
    cu = torch.tensor([0, 2, 5, 7], dtype=torch.int32)
    first = varlen_attention._groups(cu, 7)
    assert varlen_attention._groups(cu, 7) is first  # every layer gets the same tensor: no second device read
    assert varlen_attention._groups(cu.clone(), 7) is not first


def test_refuses_a_mask_or_cross_attention():
    q, k, v, cu = packed([4, 4])
    with pytest.raises(ValueError, match="within each sequence"):
        packed_sdpa_attention(None, q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool), cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="within each sequence"):
        packed_sdpa_attention(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone())


def test_the_tower_runs_packed_attention_with_the_rows_of_the_per_window_loop(track_a_model_dir):
    tower = VisionTower.from_pretrained(track_a_model_dir / "ve", device="cpu", dtype="float32")
    assert tower.model.config._attn_implementation == PACKED_SDPA
    assert all(block.attn.config._attn_implementation == PACKED_SDPA for block in tower.model.blocks)
    # sizes whose windows differ in length (edges), and two full-attention lengths
    images = [Image.open(io.BytesIO(make_png(w, h))) for w, h in [(448, 448), (300, 500), (640, 360)]]
    packed_rows = tower.encode(images)
    tower.model.config._attn_implementation = "sdpa"  # transformers' own loop, one SDPA per window
    loop_rows = tower.encode(images)
    for got, want in zip(packed_rows, loop_rows, strict=True):
        assert got.grid_thw == want.grid_thw
        assert torch.equal(got.features, want.features)
