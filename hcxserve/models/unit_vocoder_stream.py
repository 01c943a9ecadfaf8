"""Causal streaming of the unit vocoder: units decoded as the LLM emits them, with the one-shot result.

`UnitVocoder.start()` returns a `UnitVocoderStream`, which runs every layer incrementally. Each layer becomes a
`LayerStream` (the BigVGAN blocks' `stream()`, chained by `UnitVocoder._stream_layers` as `forward` chains the
layers) that computes only the samples whose whole receptive field has arrived and holds back the rest until more
units come or `finish()` pads the end as the one-shot forward does. So the streamed chunks, concatenated, equal
`forward()` up to float rounding, and a stream's latency is `UnitVocoderConfig.lookahead_samples`. (OmniServe's own
`hidden_states` path is not exact: it replicate-pads each chunk's right edge. Its handlers never stream.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from hcxserve.models.unit_vocoder import UnitVocoder

# Incremental evaluation. Each LayerStream is one layer run on a growing input: push() returns the outputs no later
# input can change, finish() pads the end as the one-shot layer does and returns the rest. All tensors are
# (B, C, time).


class LayerStream:
    def push(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self) -> torch.Tensor:
        raise NotImplementedError


class ConvStream(LayerStream):
    """A Conv1d over the input padded at its start (`left` zeros, or copies of the first sample) and its end
    (`right` copies of the last sample), computed as each output's whole window arrives."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        left: int = 0,
        replicate_left: bool = False,
        right: int = 0,
    ) -> None:
        self.weight, self.bias, self.stride, self.dilation, self.groups = weight, bias, stride, dilation, groups
        self.span = dilation * (weight.shape[-1] - 1) + 1
        self.left, self.replicate_left, self.right = left, replicate_left, right
        self.buffer: torch.Tensor | None = None  # padded input from the next output's first tap on

    def push(self, x: torch.Tensor) -> torch.Tensor:
        if self.buffer is None:
            if x.shape[-1] == 0:
                return x.new_zeros(x.shape[0], self.weight.shape[0], 0)
            start = (
                x[..., :1].expand(-1, -1, self.left) if self.replicate_left else x.new_zeros(*x.shape[:2], self.left)
            )
            self.buffer = torch.cat([start, x], dim=-1)
        else:
            self.buffer = torch.cat([self.buffer, x], dim=-1)
        return self._drain()

    def finish(self) -> torch.Tensor:
        if self.right:
            self.buffer = torch.cat([self.buffer, self.buffer[..., -1:].expand(-1, -1, self.right)], dim=-1)
        return self._drain()

    def _drain(self) -> torch.Tensor:
        available = self.buffer.shape[-1]
        count = (available - self.span) // self.stride + 1 if available >= self.span else 0
        if count == 0:
            return self.buffer.new_zeros(self.buffer.shape[0], self.weight.shape[0], 0)
        window = self.buffer[..., : (count - 1) * self.stride + self.span]
        out = F.conv1d(window, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        self.buffer = self.buffer[..., count * self.stride :]
        return out


class TransposedConvStream(LayerStream):
    """`scale * ConvTranspose1d` over the input with `left`/`right` copies of its first/last sample, keeping outputs
    from `crop_start` to `trim_end` before the last fully computed one. An output is emitted once every input
    frame under its taps has arrived; frames no pending output needs are dropped."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        stride: int,
        groups: int = 1,
        left: int = 0,
        right: int = 0,
        crop_start: int = 0,
        trim_end: int = 0,
        scale: float = 1.0,
    ) -> None:
        taps = weight.shape[-1]
        if crop_start < taps - stride or trim_end > right * stride:
            raise ValueError("the crop would emit outputs with missing taps")  # a bug in the caller, not in data
        self.weight, self.bias, self.stride, self.groups, self.taps = weight, bias, stride, groups, taps
        self.left, self.right, self.trim_end, self.scale = left, right, trim_end, scale
        self.buffer: torch.Tensor | None = None
        self.first = 0  # padded-input index of buffer[..., 0]
        self.received = 0  # padded input frames so far
        self.next_out = crop_start  # index (in the uncropped output) of the next sample to emit

    def push(self, x: torch.Tensor) -> torch.Tensor:
        if self.buffer is None:
            if x.shape[-1] == 0:
                return x.new_zeros(x.shape[0], self.weight.shape[1] * self.groups, 0)
            self.buffer = torch.cat([x[..., :1].expand(-1, -1, self.left), x], dim=-1)
        else:
            self.buffer = torch.cat([self.buffer, x], dim=-1)
        self.received = self.first + self.buffer.shape[-1]
        return self._drain(self.stride * self.received)

    def finish(self) -> torch.Tensor:
        self.buffer = torch.cat([self.buffer, self.buffer[..., -1:].expand(-1, -1, self.right)], dim=-1)
        self.received += self.right
        return self._drain(self.stride * self.received - self.trim_end)

    def _drain(self, end: int) -> torch.Tensor:
        if end <= self.next_out:
            return self.buffer.new_zeros(self.buffer.shape[0], self.weight.shape[1] * self.groups, 0)
        full = F.conv_transpose1d(self.buffer, self.weight, self.bias, self.stride, groups=self.groups)
        offset = self.stride * self.first
        out = full[..., self.next_out - offset : end - offset]
        self.next_out = end
        # the next output's lowest tap reads frame ceil((next_out - taps + 1) / stride)
        keep_from = max(self.first, -((self.taps - 1 - self.next_out) // self.stride))
        self.buffer = self.buffer[..., keep_from - self.first :]
        self.first = keep_from
        return self.scale * out if self.scale != 1.0 else out


class MapStream(LayerStream):
    """A pointwise function: no delay, nothing held."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.function = function
        self.empty: torch.Tensor | None = None

    def push(self, x: torch.Tensor) -> torch.Tensor:
        out = self.function(x)
        self.empty = out[..., :0]
        return out

    def finish(self) -> torch.Tensor:
        return self.empty


class ChainStream(LayerStream):
    def __init__(self, stages: Sequence[LayerStream]) -> None:
        self.stages = list(stages)

    def push(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage.push(x)
        return x

    def finish(self) -> torch.Tensor:
        out = self.stages[0].finish()
        for stage in self.stages[1:]:  # a stage sees all of its input before its own end padding
            out = torch.cat([stage.push(out), stage.finish()], dim=-1)
        return out


class ResidualStream(LayerStream):
    """branch(x) + x, the skip path waiting for the (delayed) branch."""

    def __init__(self, branch: LayerStream) -> None:
        self.branch = branch
        self.skip: torch.Tensor | None = None

    def push(self, x: torch.Tensor) -> torch.Tensor:
        self.skip = x if self.skip is None else torch.cat([self.skip, x], dim=-1)
        return self._add(self.branch.push(x))

    def finish(self) -> torch.Tensor:
        return self._add(self.branch.finish())

    def _add(self, y: torch.Tensor) -> torch.Tensor:
        n = y.shape[-1]
        out = y + self.skip[..., :n]
        self.skip = self.skip[..., n:]
        return out


class MeanStream(LayerStream):
    """The mean of parallel branches on the same input, emitted as far as the slowest branch has got."""

    def __init__(self, branches: Sequence[LayerStream]) -> None:
        self.branches = list(branches)
        self.pending: list[torch.Tensor | None] = [None] * len(self.branches)

    def push(self, x: torch.Tensor) -> torch.Tensor:
        return self._combine([branch.push(x) for branch in self.branches])

    def finish(self) -> torch.Tensor:
        return self._combine([branch.finish() for branch in self.branches])

    def _combine(self, outs: list[torch.Tensor]) -> torch.Tensor:
        self.pending = [o if p is None else torch.cat([p, o], dim=-1) for p, o in zip(self.pending, outs)]
        n = min(p.shape[-1] for p in self.pending)
        out = sum(p[..., :n] for p in self.pending) / len(self.pending)  # the original's order of operations
        self.pending = [p[..., n:] for p in self.pending]
        return out


class UnitVocoderStream:
    """Decodes units as they arrive: `decode(new_units)` returns the samples they complete, `finish()` the rest.

    The outputs, concatenated, equal `UnitVocoder.forward` on all the units. Each call returns what the units so far
    determine, so the audio trails the units by `config.lookahead_samples` until `finish()`.
    """

    def __init__(self, model: UnitVocoder, speaker: torch.Tensor) -> None:
        if speaker.dim() != 2:
            raise ValueError(f"speaker must be (batch, {model.config.spk_emb_dim}), got {tuple(speaker.shape)}")
        self.model = model
        self.speaker = speaker
        self.layers = model._stream_layers()
        self.units_received = 0  # per row
        self.batch = len(speaker)
        self.samples_emitted = 0
        self.finished = False

    @torch.inference_mode()
    def decode(self, units) -> torch.Tensor:
        """New units, (B, n) or (n,) -> new samples, (B, m) or (m,)."""
        if self.finished:
            raise RuntimeError("this audio decoder stream has finished")
        tensor = torch.as_tensor(units)
        flat = tensor.dim() == 1
        checked = self.model.check_units(tensor[None] if flat else tensor, offset=self.units_received)
        if self.units_received and len(checked) != self.batch:
            raise ValueError(f"this stream decodes {self.batch} row(s) of units, got {len(checked)}")
        self.batch = len(checked)
        if checked.shape[-1] == 0:
            out = self._empty(len(checked))
        else:
            out = self.layers.push(self.model._embed(checked, self.speaker))[:, 0]
            self.units_received += checked.shape[-1]
        self.samples_emitted += out.shape[-1]
        return out[0] if flat else out

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """The held-back samples, (B, m); afterwards the stream takes no more units."""
        if self.finished:
            raise RuntimeError("this audio decoder stream has finished")
        self.finished = True
        out = self.layers.finish()[:, 0] if self.units_received else self._empty(len(self.speaker))
        self.samples_emitted += out.shape[-1]
        return out

    def _empty(self, batch: int) -> torch.Tensor:
        weight = self.model.unit_emb.weight
        return weight.new_zeros(batch, 0)
