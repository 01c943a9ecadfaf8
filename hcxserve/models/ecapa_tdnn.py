"""The zero-shot unit vocoder's speaker encoder: an ECAPA-TDNN (Desplanques et al. 2020) as OmniServe configures it
(`decoder/audio/codec/src/audiollm/decoder/unit_bigvgan/modules/ecapa_tdnn.py`, attribute names kept so that its
checkpoint loads unchanged), and the conditioning of the reference clip it embeds: resampling, a 70 Hz high-pass,
the gain to -26 dBFS RMS, and HiFi-GAN's log-mel.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from hcxserve.models.unit_vocoder import UnitVocoderConfig

# ECAPA-TDNN sizes OmniServe hard-codes (its config names only the hidden width and the embedding size)
ECAPA_RES2_SCALE = 8
ECAPA_SE_BOTTLENECK = 128
ECAPA_ATTENTION_CHANNELS = 128

# Reference-clip conditioning of the zero-shot variant
REFERENCE_HIGHPASS_HZ = 70.0
REFERENCE_LEVEL = 10 ** (-26 / 20)  # RMS target, -26 dBFS
MEL_LOG_FLOOR = 1e-5


class _Conv1dReluBn(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


class _Res2Conv1dReluBn(nn.Module):
    """Res2Net: channel groups convolved in a cascade (each adds the previous group's output), the last passed on."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, scale: int) -> None:
        super().__init__()
        self.width = channels // scale
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, kernel_size, padding=dilation, dilation=dilation, bias=False)
            for _ in range(scale - 1)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(x, self.width, dim=1)
        outputs, carried = [], None
        for group, conv, bn in zip(groups, self.convs, self.bns):
            carried = group if carried is None else carried + group
            carried = bn(F.relu(conv(carried)))
            outputs.append(carried)
        return torch.cat([*outputs, groups[-1]], dim=1)


class _SEConnect(nn.Module):
    def __init__(self, channels: int, bottleneck: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))
        return x * gate[:, :, None]


class _SERes2Block(nn.Module):
    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.Conv1dReluBn1 = _Conv1dReluBn(channels, channels)
        self.Res2Conv1dReluBn = _Res2Conv1dReluBn(channels, 3, dilation, ECAPA_RES2_SCALE)
        self.Conv1dReluBn2 = _Conv1dReluBn(channels, channels)
        self.SE_Connect = _SEConnect(channels, ECAPA_SE_BOTTLENECK)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SE_Connect(self.Conv1dReluBn2(self.Res2Conv1dReluBn(self.Conv1dReluBn1(x)))) + x


class _AttentiveStatsPool(nn.Module):
    """Attention-weighted mean and standard deviation over time; with global context the attention also sees each
    channel's plain mean and standard deviation."""

    def __init__(self, channels: int, attention_channels: int, global_context: bool) -> None:
        super().__init__()
        self.global_context = global_context
        self.linear1 = nn.Conv1d(channels * (3 if global_context else 1), attention_channels, kernel_size=1)
        self.linear2 = nn.Conv1d(attention_channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention_input = x
        if self.global_context:
            mean = x.mean(dim=-1, keepdim=True).expand_as(x)
            std = torch.sqrt(x.var(dim=-1, keepdim=True) + 1e-10).expand_as(x)
            attention_input = torch.cat([x, mean, std], dim=1)
        weights = torch.softmax(self.linear2(torch.tanh(self.linear1(attention_input))), dim=2)
        mean = (weights * x).sum(dim=2)
        variance = (weights * x**2).sum(dim=2) - mean**2
        return torch.cat([mean, variance.clamp(min=1e-9).sqrt()], dim=1)


class EcapaTdnn(nn.Module):
    """Log-mel (B, num_mels, frames) -> speaker embedding (B, emb_dim). Three SE-Res2 blocks (dilations 2, 3, 4),
    their outputs concatenated (multi-layer aggregation), attentive statistics pooling, a linear projection."""

    def __init__(self, in_channels: int, hidden: int, emb_dim: int, global_context: bool) -> None:
        super().__init__()
        self.layer1 = _Conv1dReluBn(in_channels, hidden, kernel_size=5, padding=2)
        self.layer2 = _SERes2Block(hidden, dilation=2)
        self.layer3 = _SERes2Block(hidden, dilation=3)
        self.layer4 = _SERes2Block(hidden, dilation=4)
        self.conv = nn.Conv1d(3 * hidden, 3 * hidden, kernel_size=1)
        self.pooling = _AttentiveStatsPool(3 * hidden, ECAPA_ATTENTION_CHANNELS, global_context)
        self.bn = nn.BatchNorm1d(6 * hidden)
        self.linear = nn.Linear(6 * hidden, emb_dim)
        self.bn_out = nn.BatchNorm1d(emb_dim)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        out2 = self.layer2(self.layer1(mel))
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        features = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
        return self.bn_out(self.linear(self.bn(self.pooling(features))))


def butterworth_highpass(samples: np.ndarray, sample_rate: int, cutoff_hz: float = REFERENCE_HIGHPASS_HZ) -> np.ndarray:
    """2nd-order Butterworth high-pass (bilinear transform, cutoff pre-warped), run forward from rest: the filter
    OmniServe applies with `scipy.signal.butter(2, 70, "highpass", output="sos")` and `sosfilt`."""
    import torchaudio.functional

    k = math.tan(math.pi * cutoff_hz / sample_rate)
    norm = 1 + math.sqrt(2) * k + k * k
    b = torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64) / norm
    a = torch.tensor([1.0, 2 * (k * k - 1) / norm, (1 - math.sqrt(2) * k + k * k) / norm], dtype=torch.float64)
    signal = torch.from_numpy(np.asarray(samples, dtype=np.float64))[None]
    return torchaudio.functional.lfilter(signal, a, b, clamp=False)[0].numpy().astype(np.float32)


def prepare_reference(waveform: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """OmniServe's conditioning of a zero-shot reference clip: resample, high-pass at 70 Hz, then the gain that
    brings the RMS to -26 dBFS unless that would push the peak past full scale."""
    from hcxserve.media.audio import resample

    clip = np.ascontiguousarray(waveform, dtype=np.float32)
    if clip.ndim != 1 or clip.size == 0:
        raise ValueError(f"the reference clip must be non-empty mono samples, got shape {clip.shape}")
    if not np.isfinite(clip).all() or not np.any(clip):
        raise ValueError("the reference clip is silent or not finite")
    filtered = butterworth_highpass(resample(clip, sample_rate, target_rate), target_rate)
    rms, peak = float(np.sqrt(np.mean(filtered.astype(np.float64) ** 2))), float(np.max(np.abs(filtered)))
    if rms == 0.0:
        raise ValueError("the reference clip has no sound above 70 Hz")
    return filtered * np.float32(min(REFERENCE_LEVEL / rms, 1.0 / peak))


def reference_log_mel(samples: np.ndarray, config: UnitVocoderConfig) -> torch.Tensor:
    """HiFi-GAN's log-mel of one clip, (1, num_mels, frames): reflect padding of (n_fft - hop) / 2 on each side, an
    uncentred STFT with a Hann window, magnitudes, Slaney mel filters (librosa's), log with a 1e-5 floor."""
    import torchaudio.functional

    n_fft, hop, win = config.n_fft, config.hop_size, config.win_size
    pad = (n_fft - hop) // 2
    if samples.shape[-1] + 2 * pad < n_fft + hop or samples.shape[-1] <= pad:
        raise ValueError(f"the reference clip is too short: {samples.shape[-1]} samples at {config.sampling_rate} Hz")
    signal = F.pad(torch.from_numpy(samples).float()[None, None], (pad, pad), mode="reflect")[:, 0]
    window = torch.hann_window(win)
    spec = torch.stft(signal, n_fft, hop, win, window, center=False, onesided=True, return_complex=True)
    magnitude = torch.sqrt((spec * spec.conj()).real + 1e-9)
    filters = torchaudio.functional.melscale_fbanks(
        n_fft // 2 + 1,
        f_min=float(config.fmin),
        f_max=float(config.fmax or config.sampling_rate / 2),
        n_mels=config.num_mels,
        sample_rate=config.sampling_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.log(torch.clamp(filters.T @ magnitude, min=MEL_LOG_FLOOR))
