"""Attention over packed variable-length sequences with one SDPA call per distinct length.

The Qwen2.5-VL vision tower packs every image of a batch, and every attention window of every image, into one
sequence delimited by `cu_seqlens`. Unless a flash-attention implementation is configured, transformers runs one
`scaled_dot_product_attention` per window: a 448x448 image has 16 windows, 8 images 128, in each of the 28 window
layers. On a GPU those thousands of small calls are what a forward pass spends its time on, and their number grows
with the batch, so batching buys little (measured on an H200 at the released sizes: 24 images/s one at a time, 42
in batches of 8, against a forward pass whose arithmetic takes a few milliseconds).

`packed_sdpa_attention` takes the flash-attention calling convention (`cu_seq_lens_q`, the packed sequence) and
stacks the windows of equal length into one batch per length: a few calls per layer whatever the batch size. Each
window still attends only to itself, with the same kernel, so the rows equal the per-window loop's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# transformers hands `cu_seqlens` only to implementations whose name contains "flash"
# (`is_flash_attention_requested`), so the name has to carry that word.
PACKED_SDPA = "hcx_packed_sdpa_flash_convention"


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor,
    cu_seq_lens_k: torch.Tensor | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """(1, heads, packed, head_dim) x3 -> ((1, packed, heads, head_dim), None), each sequence attending to itself."""
    if attention_mask is not None or (cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q):
        raise ValueError("packed_sdpa_attention computes self-attention within each sequence only")
    q, k, v = query[0], key[0], value[0]  # (heads, packed, head_dim)
    out = torch.empty_like(q)
    heads, packed, dim = q.shape
    for length, index in _groups(cu_seq_lens_q, packed):
        # index None: one length for the whole sequence, read as a view with no gather
        picked = [t if index is None else t.index_select(1, index) for t in (q, k, v)]
        parts = [t.view(heads, -1, length, dim).transpose(0, 1) for t in picked]
        result = F.scaled_dot_product_attention(*parts, scale=scaling).transpose(0, 1).reshape(heads, -1, dim)
        if index is None:
            out.copy_(result)
        else:
            out.index_copy_(1, index, result)
    return out.transpose(0, 1).unsqueeze(0), None


def _groups(cu_seqlens: torch.Tensor, packed: int) -> list[tuple[int, torch.Tensor | None]]:
    """(length, packed positions of every sequence of that length) per distinct length; positions None when the
    packed sequence is sequences of one length end to end. Computed once per `cu_seqlens` tensor: the tower passes
    the same two tensors to every layer, and reading them is a device-to-host copy."""
    cached = getattr(cu_seqlens, "_hcx_packed_groups", None)
    if cached is not None:
        return cached
    bounds = cu_seqlens.tolist()
    starts: dict[int, list[int]] = {}
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            starts.setdefault(end - start, []).append(start)
    if len(starts) == 1 and bounds[0] == 0 and bounds[-1] == packed:
        groups = [(next(iter(starts)), None)]
    else:
        groups = []
        for length, firsts in starts.items():
            offsets = torch.tensor(firsts, device=cu_seqlens.device)[:, None]
            groups.append((length, (offsets + torch.arange(length, device=cu_seqlens.device)).flatten()))
    cu_seqlens._hcx_packed_groups = groups
    return groups


def register() -> str:
    """Register the function with transformers' attention implementations; returns its name for `config`."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    return PACKED_SDPA
