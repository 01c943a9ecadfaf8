"""CosyVoice2's "S3Tokenizer v2": speech to discrete units, 25 per second (track B's discrete audio branch).

A reimplementation of the inference path of xingchensong/S3Tokenizer `s3tokenizer/model_v2.py` (Apache-2.0), the
code OmniServe ships as `CosyvoiceEncoder`. Module names follow that code, so the checkpoint's
`discrete_audio_model.*` tensors load unchanged:
    encoder.conv1, encoder.conv2                                    (stride 2 each: 100 mel frames/s -> 25/s)
    encoder.blocks.N.attn.{query, key (no bias), value, out, fsmn_block}, .attn_ln, .mlp.{0,2}, .mlp_ln
    quantizer._codebook.project_down                                (n_audio_state -> 8, then FSQ with 3 levels)
The codes are raw FSQ indices in [0, 3**8); the LLM vocabulary offset is applied by whoever builds the prompt.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hcxserve.models import known_fields, state_dict_mismatch, torch_dtype

logger = logging.getLogger(__name__)

FSQ_LEVELS = 3  # each of the 8 projected dimensions is rounded to -1, 0 or +1
FSQ_DIMS = 8


@dataclass(frozen=True)
class S3TokenizerConfig:
    n_mels: int = 128
    n_audio_ctx: int = 1500  # part of the original config, which never reads it either; kept for round-tripping
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 6
    n_codebook_size: int = FSQ_LEVELS**FSQ_DIMS
    fsmn_kernel_size: int = 31
    mlp_ratio: int = 4
    rope_head_dim: int = 64  # the original precomputes its rotary table for 64 dims whatever the head size
    rope_positions: int = 2048
    rope_theta: float = 10000.0
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    chunk_seconds: int = 80  # longer audio is tokenized in independent pieces of this length, as OmniServe does

    def __post_init__(self) -> None:
        if self.n_audio_state % self.n_audio_head or self.n_audio_state // self.n_audio_head != self.rope_head_dim:
            raise ValueError(
                f"S3 tokenizer: n_audio_state / n_audio_head must be {self.rope_head_dim} (the rotary table's size), "
                f"got {self.n_audio_state} / {self.n_audio_head}"
            )
        if self.n_codebook_size != FSQ_LEVELS**FSQ_DIMS:
            raise ValueError(
                f"S3 tokenizer: the FSQ codebook has {FSQ_LEVELS**FSQ_DIMS} entries, not {self.n_codebook_size}"
            )
        if self.tokens_for_samples(self.chunk_samples) > self.rope_positions:
            raise ValueError(
                f"S3 tokenizer: {self.chunk_seconds} s chunks exceed {self.rope_positions} rotary positions"
            )

    @classmethod
    def from_dict(cls, data: dict | None) -> S3TokenizerConfig:
        """Defaults overridden by the known keys of `discrete_audio_config` (the real one names no sizes)."""
        return cls(**known_fields(cls, data))

    @property
    def chunk_samples(self) -> int:
        return self.chunk_seconds * self.sample_rate

    @property
    def tokens_per_second(self) -> float:
        return self.sample_rate / self.hop_length / 4

    def tokens_for_samples(self, n: int) -> int:
        """Units for one chunk of n samples: n // hop mel frames, then two stride-2 convolutions."""
        frames = n // self.hop_length
        return math.ceil(math.ceil(frames / 2) / 2)


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the Slaney mel scale with Slaney area normalisation.

    The same matrix as `librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)`, which the original uses
    (librosa is not a dependency here).
    """
    f_sp = 200.0 / 3  # linear part: 3 mels per 200 Hz below 1 kHz
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        safe = np.maximum(hz, min_log_hz)
        return np.where(hz >= min_log_hz, min_log_mel + np.log(safe / min_log_hz) / logstep, hz / f_sp)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)

    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges_mel = np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sample_rate / 2)), n_mels + 2)
    edges = mel_to_hz(edges_mel)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


def log_mel_spectrogram(waveform: torch.Tensor, filters: torch.Tensor, *, n_fft: int, hop_length: int) -> torch.Tensor:
    """Whisper's log-mel (dynamic range 8 decades below the clip's peak, scaled to about [-1, 1]) of one clip:
    (n_mels, len // hop_length)."""
    frames = waveform.shape[-1] // hop_length
    if waveform.shape[-1] <= n_fft // 2:
        # torch.stft's reflect padding needs more samples than half a window; zeros change only the one frame
        waveform = F.pad(waveform, (0, n_fft // 2 + 1 - waveform.shape[-1]))
    window = torch.hann_window(n_fft, device=waveform.device)
    stft = torch.stft(waveform.float(), n_fft, hop_length, window=window, return_complex=True)
    power = stft[..., :frames].abs() ** 2
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def fsq_indices(projected: torch.Tensor) -> torch.Tensor:
    """FSQ code of each 8-dim row: every dim is squashed into (-1, 1), rounded to {-1, 0, 1}, shifted to a base-3
    digit, and digit i weighs 3**i. (..., 8) float -> (...) int64 in [0, 3**8)."""
    digits = (projected.float().tanh() * 0.999).round() + 1
    powers = FSQ_LEVELS ** torch.arange(FSQ_DIMS, device=projected.device, dtype=torch.float32)
    return (digits * powers).sum(-1).long()


def _non_pad_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form, in float32; x (B, T, H, D), cos/sin (T, D)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]).to(x.dtype)


class _FloatLayerNorm(nn.LayerNorm):
    """LayerNorm statistics in float32 whatever the weights' dtype, as in the original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class _FSMNAttention(nn.Module):
    """Self-attention plus an FSMN memory: a depthwise convolution over the values, added to the output."""

    def __init__(self, n_state: int, n_head: int, kernel_size: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)
        self.fsmn_block = nn.Conv1d(n_state, n_state, kernel_size, groups=n_state, bias=False)
        self.left_padding = (kernel_size - 1) // 2
        self.right_padding = kernel_size - 1 - self.left_padding

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, valid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        b, t, c = x.shape
        q = _rotate(self.query(x).view(b, t, self.n_head, -1), cos, sin)
        k = _rotate(self.key(x).view(b, t, self.n_head, -1), cos, sin)
        v = self.value(x)
        # padded frames must not leak into the valid ones through the convolution's window
        masked_v = v * valid
        memory = self.fsmn_block(F.pad(masked_v.transpose(1, 2), (self.left_padding, self.right_padding)))
        memory = (memory.transpose(1, 2) + masked_v) * valid
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, self.n_head, -1).transpose(1, 2), attn_mask=key_mask
        )
        return self.out(attn.transpose(1, 2).reshape(b, t, c)) + memory


class _Block(nn.Module):
    def __init__(self, config: S3TokenizerConfig) -> None:
        super().__init__()
        n = config.n_audio_state
        self.attn = _FSMNAttention(n, config.n_audio_head, config.fsmn_kernel_size)
        self.attn_ln = _FloatLayerNorm(n, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(n, n * config.mlp_ratio), nn.GELU(), nn.Linear(n * config.mlp_ratio, n))
        self.mlp_ln = _FloatLayerNorm(n)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, valid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), key_mask, valid, cos, sin)
        return x + self.mlp(self.mlp_ln(x))


class _Encoder(nn.Module):
    def __init__(self, config: S3TokenizerConfig) -> None:
        super().__init__()
        n = config.n_audio_state
        self.conv1 = nn.Conv1d(config.n_mels, n, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(n, n, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_audio_layer))

    def forward(
        self, mel: torch.Tensor, lengths: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, n_mels, T) zero-padded, lengths (B,) -> hidden (B, T', n_state), lengths (B,)."""
        # Masking before each convolution makes a padded batch row compute exactly what the clip alone would.
        x = mel * _non_pad_mask(lengths, mel.shape[-1])[:, None, :]
        x = F.gelu(self.conv1(x))
        lengths = (lengths - 1) // 2 + 1
        x = F.gelu(self.conv2(x * _non_pad_mask(lengths, x.shape[-1])[:, None, :]))
        lengths = (lengths - 1) // 2 + 1
        x = x.transpose(1, 2)
        valid = _non_pad_mask(lengths, x.shape[1])
        key_mask = valid[:, None, None, :]
        t = x.shape[1]
        for block in self.blocks:
            x = block(x, key_mask, valid[:, :, None].to(x.dtype), cos[:t], sin[:t])
        return x, lengths


class _FSQCodebook(nn.Module):
    def __init__(self, n_state: int) -> None:
        super().__init__()
        self.project_down = nn.Linear(n_state, FSQ_DIMS)


class _FSQ(nn.Module):
    def __init__(self, n_state: int) -> None:
        super().__init__()
        self._codebook = _FSQCodebook(n_state)

    def encode(self, hidden: torch.Tensor) -> torch.Tensor:
        proj = self._codebook.project_down
        # float32 whatever the model dtype: a bf16 projection would flip codes whose value sits near a rounding edge
        return fsq_indices(F.linear(hidden.float(), proj.weight.float(), proj.bias.float()))


class S3Tokenizer(nn.Module):
    def __init__(self, config: S3TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _Encoder(config)
        self.quantizer = _FSQ(config.n_audio_state)
        # float32 tables kept out of the state dict and out of `.to(dtype)`
        self._mel_filters = torch.from_numpy(slaney_mel_filters(config.sample_rate, config.n_fft, config.n_mels))
        self._rope = _rope_tables(config)

    @classmethod
    def from_pretrained(
        cls, ae_dir: str | Path, *, device: str = "cpu", dtype: str = "float32", prefix: str = "discrete_audio_model."
    ) -> S3Tokenizer:
        """From a converted `ae/` folder: sizes from `discrete_audio_config`, weights under `prefix`."""
        from hcxserve.convert import load_state_dict, read_component_config

        config = S3TokenizerConfig.from_dict(read_component_config(ae_dir).get("discrete_audio_config"))
        model = cls(config)
        load_strict(model, load_state_dict(ae_dir, prefix=prefix), where=f"{ae_dir} ({prefix}*)")
        return model.to(device=torch.device(device), dtype=torch_dtype(dtype)).eval()

    @torch.inference_mode()
    def tokenize(self, waveforms: list[np.ndarray]) -> list[torch.Tensor]:
        """16 kHz mono clips -> one int64 code tensor each (25 per second), all chunks in one forward pass."""
        config = self.config
        device = self.encoder.conv1.weight.device
        dtype = self.encoder.conv1.weight.dtype
        filters = self._mel_filters.to(device)
        mels: list[torch.Tensor] = []
        owners: list[int] = []
        for index, waveform in enumerate(waveforms):
            samples = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).to(device)
            for start in range(0, samples.shape[0], config.chunk_samples):
                chunk = samples[start : start + config.chunk_samples]
                if chunk.shape[0] >= config.hop_length:  # a shorter tail makes no mel frame, hence no unit
                    mels.append(log_mel_spectrogram(chunk, filters, n_fft=config.n_fft, hop_length=config.hop_length))
                    owners.append(index)
        codes: list[list[torch.Tensor]] = [[] for _ in waveforms]
        if mels:
            lengths = torch.tensor([m.shape[-1] for m in mels], device=device)
            batch = torch.zeros(len(mels), config.n_mels, int(lengths.max()), device=device)
            for row, mel in enumerate(mels):
                batch[row, :, : mel.shape[-1]] = mel
            cos, sin = (table.to(device) for table in self._rope)
            hidden, out_lengths = self.encoder(batch.to(dtype), lengths, cos, sin)
            indices = self.quantizer.encode(hidden).cpu()
            for row, (owner, n) in enumerate(zip(owners, out_lengths.tolist())):
                codes[owner].append(indices[row, :n])
        return [torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long) for parts in codes]


def _rope_tables(config: S3TokenizerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, head_dim) cos and sin, the two halves sharing frequencies (rotate-half layout)."""
    dim = config.rope_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(config.rope_positions).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], *, where: str) -> None:
    """`load_state_dict(strict=True)` with a ComponentError that names what is missing, extra or mis-shaped."""
    from hcxserve.convert.errors import ComponentError, few

    problems = [f"{label}: {few(items)}" for label, items in state_dict_mismatch(module, tensors).items() if items]
    if problems:
        raise ComponentError(f"{where}: weights do not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(tensors, strict=True)
