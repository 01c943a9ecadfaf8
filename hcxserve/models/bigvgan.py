"""BigVGAN's building blocks (NVIDIA, MIT) as OmniServe's unit vocoder builds them
(`decoder/audio/codec/src/audiollm/decoder/unit_bigvgan/modules/{bigvgan,activations}.py`), under its attribute
names so that its checkpoint loads unchanged; `hcxserve.models.unit_vocoder` assembles them into the generator.

- `SnakeBeta`: x + sin(alpha x)^2 / beta per channel, the only activation OmniServe's unit BigVGAN uses.
- `Activation1d`: an anti-aliased SnakeBeta: 2x upsampling, SnakeBeta, 2x downsampling, both with the same 12-tap
  Kaiser-sinc low-pass (`kaiser_sinc_filter`) and replicate padding. It is not causal: OmniServe builds every
  `Activation1d` with causal=False, and the weights were trained that way, so each one reads `ACTIVATION_LOOKAHEAD`
  samples ahead at its own rate.
- `CausalConv1d`, `CausalConvTranspose1d`: left zero padding; the upsampler replicates the first frame and gives
  `rate` output samples per input frame.
- `AMPBlock1`: per dilation, x + conv2(act(conv1(act(x)))).
- `generator_state_dict`: a checkpoint's tensors as these modules' parameters (weight norm folded, the constant
  buffers checked and dropped).

Each block's `stream()` is its incremental evaluation, built from the layer streams of
`hcxserve.models.unit_vocoder_stream`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hcxserve.models.unit_vocoder_stream import (
    ChainStream,
    ConvStream,
    LayerStream,
    MapStream,
    ResidualStream,
    TransposedConvStream,
)

# Activation1d, as OmniServe builds it: 2x up and down, one 12-tap filter (cutoff 0.5 / 2, half-width 0.6 / 2)
ALIAS_RATIO = 2
ALIAS_TAPS = 12
UPSAMPLE_PAD = ALIAS_TAPS // ALIAS_RATIO - 1  # replicated input samples on each side
UPSAMPLE_CROP = UPSAMPLE_PAD * ALIAS_RATIO + (ALIAS_TAPS - ALIAS_RATIO) // 2  # trimmed outputs on each side
DOWNSAMPLE_PAD = (ALIAS_TAPS // 2 - 1, ALIAS_TAPS // 2)  # (left, right), replicated
# output t of an Activation1d reads its input up to t + 5 (derivation in UnitVocoderConfig.lookahead_samples)
ACTIVATION_LOOKAHEAD = 5
# ... and its input back to t - 6: the upsampled signal from 2t - 5 on, which reads the input from t - 5.5 on
ACTIVATION_LOOKBACK = 6

_WEIGHT_NORM = (("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1"))
_ALIAS_FILTERS = ("upsample.filter", "downsample.lowpass.filter")


def kaiser_sinc_filter(cutoff: float, half_width: float, taps: int) -> torch.Tensor:
    """BigVGAN's anti-aliasing low-pass (after julius): a Kaiser-windowed sinc normalised to unit DC gain, (taps,)."""
    half = taps // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(taps, periodic=False, beta=beta)
    time = torch.arange(-half, half) + 0.5 if taps % 2 == 0 else torch.arange(taps) - half
    taps_values = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return taps_values / taps_values.sum()


class SnakeBeta(nn.Module):
    """x + sin(alpha x)^2 / beta per channel; alpha and beta are stored as logs when `logscale`."""

    def __init__(self, channels: int, logscale: bool) -> None:
        super().__init__()
        self.logscale = logscale
        self.alpha = nn.Parameter(torch.zeros(channels) if logscale else torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels) if logscale else torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.alpha[None, :, None], self.beta[None, :, None]
        if self.logscale:
            alpha, beta = alpha.exp(), beta.exp()
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)


class Activation1d(nn.Module):
    """Anti-aliased SnakeBeta: 2x upsample, SnakeBeta, 2x downsample, replicate-padded at both ends (non-causal)."""

    def __init__(self, channels: int, logscale: bool) -> None:
        super().__init__()
        self.act = SnakeBeta(channels, logscale)
        cutoff, half_width = 0.5 / ALIAS_RATIO, 0.6 / ALIAS_RATIO
        self.register_buffer("filter", kaiser_sinc_filter(cutoff, half_width, ALIAS_TAPS), persistent=False)

    def _taps(self, channels: int) -> torch.Tensor:
        return self.filter.view(1, 1, -1).expand(channels, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self._taps(x.shape[1])
        padded = F.pad(x, (UPSAMPLE_PAD, UPSAMPLE_PAD), mode="replicate")
        up = ALIAS_RATIO * F.conv_transpose1d(padded, taps, stride=ALIAS_RATIO, groups=x.shape[1])
        y = self.act(up[..., UPSAMPLE_CROP:-UPSAMPLE_CROP])
        return F.conv1d(F.pad(y, DOWNSAMPLE_PAD, mode="replicate"), taps, stride=ALIAS_RATIO, groups=x.shape[1])

    def stream(self) -> LayerStream:
        channels = self.act.alpha.shape[0]
        taps = self._taps(channels)
        upsample = TransposedConvStream(
            taps,
            None,
            stride=ALIAS_RATIO,
            groups=channels,
            left=UPSAMPLE_PAD,
            right=UPSAMPLE_PAD,
            crop_start=UPSAMPLE_CROP,
            # the full transposed output runs taps - stride past stride * frames; the one-shot cut ends CROP before
            trim_end=UPSAMPLE_CROP - (ALIAS_TAPS - ALIAS_RATIO),
            scale=float(ALIAS_RATIO),
        )
        left, right = DOWNSAMPLE_PAD
        downsample = ConvStream(
            taps, None, stride=ALIAS_RATIO, groups=channels, left=left, replicate_left=True, right=right
        )
        return ChainStream([upsample, MapStream(self.act), downsample])


class CausalConv1d(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, bias: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, bias=bias)
        self.left = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.left, 0)))

    def stream(self) -> LayerStream:
        return ConvStream(self.conv.weight, self.conv.bias, dilation=self.conv.dilation[0], left=self.left)


class CausalConvTranspose1d(nn.Module):
    """`rate` output samples per input frame: the input's first frame is repeated once in front, and `rate` outputs
    are cut from each end (the first ones miss a frame, the last ones wait for the next frame)."""

    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose1d(in_channels, out_channels, 2 * rate, rate)
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv(F.pad(x, (1, 0), mode="replicate"))[..., self.rate : -self.rate]

    def stream(self) -> LayerStream:
        return TransposedConvStream(
            self.deconv.weight, self.deconv.bias, stride=self.rate, left=1, crop_start=self.rate
        )


class AMPBlock1(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int], logscale: bool) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(CausalConv1d(channels, channels, kernel_size, d) for d in dilations)
        self.convs2 = nn.ModuleList(CausalConv1d(channels, channels, kernel_size) for _ in dilations)
        self.activations = nn.ModuleList(Activation1d(channels, logscale) for _ in range(2 * len(dilations)))

    def _per_dilation(self):
        return zip(self.convs1, self.convs2, self.activations[::2], self.activations[1::2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in self._per_dilation():
            x = conv2(act2(conv1(act1(x)))) + x
        return x

    def stream(self) -> LayerStream:
        return ChainStream(
            [
                ResidualStream(ChainStream([a1.stream(), c1.stream(), a2.stream(), c2.stream()]))
                for c1, c2, a1, a2 in self._per_dilation()
            ]
        )


# ---------------------------------------------------------------------------------------------------------------
# Reading a generator checkpoint


def generator_state_dict(tensors: dict[str, torch.Tensor], *, where: str) -> dict[str, torch.Tensor]:
    """A BigVGAN checkpoint as parameters of these blocks: weight-norm pairs folded (w = g * v / |v|, norms over all
    but the first dimension), the zero `pad_buffer`s dropped, the stored anti-aliasing filters checked and dropped."""
    from hcxserve.convert.errors import ComponentError

    expected_filter = kaiser_sinc_filter(0.5 / ALIAS_RATIO, 0.6 / ALIAS_RATIO, ALIAS_TAPS)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(".pad_buffer"):
            continue
        if name.endswith(_ALIAS_FILTERS):
            if tensor.numel() != ALIAS_TAPS or not torch.allclose(tensor.float().flatten(), expected_filter, atol=1e-6):
                raise ComponentError(
                    f"{where}: {name} is not the {ALIAS_TAPS}-tap Kaiser-sinc filter this decoder uses"
                )
            continue
        for magnitude, direction in _WEIGHT_NORM:
            if name.endswith("." + direction):
                if name[: -len(direction)] + magnitude not in tensors:
                    raise ComponentError(f"{where}: {name} has no {magnitude} to go with it")
                break
            if name.endswith("." + magnitude):
                base = name[: -len(magnitude)]
                if base + direction not in tensors:
                    raise ComponentError(f"{where}: {name} has no {direction} to go with it")
                out[base + "weight"] = _fold_weight_norm(tensor, tensors[base + direction])
                break
        else:
            out[name] = tensor
    return out


def _fold_weight_norm(magnitude: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    v = direction.float()
    norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    return v * (magnitude.float() / norm)
