"""Track B's audio encoder (HyperCLOVAX-SEED-Omni-8B): continuous features and discrete units for one clip.

Loads a converted `ae/` component folder (see `convert_model.py --track b`):
- `config.json`: `audio_config` (transformers Qwen2AudioEncoderConfig fields), `discrete_audio_config`,
  `text_hidden_size`, `audio_projector_type`;
- weights `audio_model.*` (Qwen2AudioEncoder), `audio_projector.*` (MLP d_model -> d_model -> text hidden, GELU),
  `discrete_audio_model.*` (CosyVoice2 S3 tokenizer), optionally `video_audio_compressor.*` (MambaMia: the
  continuous rows of a video's sound track are compressed to one per second, as OmniServe did);
- `preprocessor_config.json`: the WhisperFeatureExtractor (128 mel, 16 kHz, 30-s chunks).

Continuous branch, as OmniServe computes it: the clip is cut into 30-s chunks, each padded to 3000 mel frames; all
chunks of all clips go through the encoder in one batch with attention masks (computed only as far as the batch's
audio reaches, which gives the same rows), each chunk keeps its valid rows (25 per second), the chunks are
concatenated and projected to the LLM's hidden size. Discrete branch: S3 units, 25 per second, raw codes in
[0, 6561).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hcxserve.models import torch_dtype
from hcxserve.models.mambamia import MambaMiaCompressor
from hcxserve.models.s3_tokenizer import FSQ_DIMS, S3Tokenizer, S3TokenizerConfig, load_strict, log_mel_spectrogram

logger = logging.getLogger(__name__)

PROJECTOR_TYPES = ("mlp", "inverted_mlp", "linear")  # the Omni remote code's VLM_Mlp variants and nn.Linear


@dataclass(frozen=True)
class AudioEncoderConfig:
    d_model: int
    text_hidden_size: int
    num_mel_bins: int
    max_source_positions: int  # encoder positions per chunk after conv2; 2x this many mel frames go in
    projector_type: str = "mlp"
    sample_rate: int = 16000
    chunk_seconds: int = 30
    hop_length: int = 160

    @property
    def chunk_samples(self) -> int:
        return self.chunk_seconds * self.sample_rate

    @property
    def chunk_mel_frames(self) -> int:
        return 2 * self.max_source_positions

    def rows_for_samples(self, n: int) -> int:
        """Continuous rows for one clip of n samples (the sum over its chunks of the encoder's output length)."""
        full, tail = divmod(n, self.chunk_samples)
        sizes = [self.chunk_samples] * full + ([tail] if tail else [])
        return sum(int(output_lengths(torch.tensor(-(-s // self.hop_length)))) for s in sizes)


def output_lengths(mel_frames: torch.Tensor) -> torch.Tensor:
    """Valid encoder rows for a chunk with this many valid mel frames: conv2 (stride 2), then the 2x avg-pool.

    Same arithmetic as transformers' `Qwen2AudioEncoder._get_feat_extract_output_lengths` (second output).
    """
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


@dataclass
class AudioEncoding:
    continuous: torch.Tensor  # (T, text_hidden_size), 25 rows per second, on the model's device
    discrete: torch.Tensor  # (T_d,) int64 raw S3 codes in [0, 3**8), on the CPU
    duration_s: float


def build_projector(kind: str, d_model: int, out_features: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_model, out_features)
    if kind not in PROJECTOR_TYPES:
        raise ValueError(f"audio_projector_type {kind!r} is not one of {', '.join(PROJECTOR_TYPES)}")
    hidden = 2 * d_model if kind == "inverted_mlp" else d_model
    return _MlpProjector(d_model, hidden, out_features)


class _MlpProjector(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AudioEncoderModel:
    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        tokenizer: S3Tokenizer,
        feature_extractor,
        config: AudioEncoderConfig,
        device: torch.device,
        dtype: torch.dtype,
        compressor: MambaMiaCompressor | None = None,
    ) -> None:
        self.encoder = encoder
        self.projector = projector
        self.compressor = compressor
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.config = config
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls, ae_dir: str | Path, *, device: str = "cpu", dtype: str = "float32", attn_implementation: str = "sdpa"
    ) -> AudioEncoderModel:
        from transformers import Qwen2AudioEncoderConfig, WhisperFeatureExtractor
        from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

        from hcxserve.convert import load_state_dict, read_component_config
        from hcxserve.convert.errors import ComponentError

        ae_dir = Path(ae_dir)
        resolved = torch.device(device)
        weights_dtype = torch_dtype(dtype)
        top = read_component_config(ae_dir)
        if not isinstance(top.get("audio_config"), dict):
            raise ComponentError(f"{ae_dir / 'config.json'}: no audio_config")
        encoder_config = Qwen2AudioEncoderConfig.from_dict(top["audio_config"])
        encoder_config._attn_implementation = attn_implementation
        encoder = Qwen2AudioEncoder._from_config(encoder_config, dtype=weights_dtype)
        load_strict(encoder, load_state_dict(ae_dir, prefix="audio_model."), where=f"{ae_dir} (audio_model.*)")

        projector_tensors = load_state_dict(ae_dir, prefix="audio_projector.")
        projector_type = top.get("audio_projector_type") or "mlp"
        out_weight = projector_tensors.get("weight" if projector_type == "linear" else "fc2.weight")
        if out_weight is None:
            raise ComponentError(f"{ae_dir}: audio_projector.* does not look like a {projector_type!r} projector")
        text_hidden = int(out_weight.shape[0])
        if top.get("text_hidden_size") not in (None, text_hidden):
            raise ComponentError(
                f"{ae_dir}: text_hidden_size {top['text_hidden_size']} in config.json, but the audio projector "
                f"outputs {text_hidden}"
            )
        config = AudioEncoderConfig(
            d_model=encoder_config.d_model,
            text_hidden_size=text_hidden,
            num_mel_bins=encoder_config.num_mel_bins,
            max_source_positions=encoder_config.max_source_positions,
            projector_type=projector_type,
        )
        projector = build_projector(projector_type, config.d_model, text_hidden)
        load_strict(projector, projector_tensors, where=f"{ae_dir} (audio_projector.*)")

        feature_extractor = WhisperFeatureExtractor.from_pretrained(ae_dir)
        _check_feature_extractor(feature_extractor, config, ae_dir)
        tokenizer = S3Tokenizer.from_pretrained(ae_dir, device=device, dtype=dtype)
        if tokenizer.config.sample_rate != config.sample_rate:
            raise ComponentError(f"{ae_dir}: the S3 tokenizer and the encoder disagree on the sample rate")
        compressor = MambaMiaCompressor.from_pretrained(ae_dir, device=device, dtype=dtype)
        encoder = encoder.to(device=resolved, dtype=weights_dtype).eval()
        projector = projector.to(device=resolved, dtype=weights_dtype).eval()
        logger.info(
            "audio encoder loaded from %s on %s (%s; %d encoder, %d projector, %d tokenizer params)",
            ae_dir,
            resolved,
            dtype,
            sum(p.numel() for p in encoder.parameters()),
            sum(p.numel() for p in projector.parameters()),
            sum(p.numel() for p in tokenizer.parameters()),
        )
        return cls(encoder, projector, tokenizer, feature_extractor, config, resolved, weights_dtype, compressor)

    @torch.inference_mode()
    def encode(self, waveforms16k: list[np.ndarray], from_video: list[bool] | None = None) -> list[AudioEncoding]:
        """Encode 16 kHz mono float32 clips; a batch gives the same result as one clip at a time. The continuous
        rows of a clip that is a video's sound track (`from_video`) go through the MambaMia compressor when the
        checkpoint has one (one row per second instead of 25)."""
        if not waveforms16k:
            return []
        clips = [np.ascontiguousarray(w, dtype=np.float32) for w in waveforms16k]
        for clip in clips:
            if clip.ndim != 1 or clip.shape[0] == 0:
                raise ValueError(f"expected non-empty 1-D mono waveforms, got shape {clip.shape}")
        continuous = self._continuous(clips)
        if self.compressor is not None and from_video is not None:
            continuous = [self.compressor(c) if video else c for c, video in zip(continuous, from_video)]
        discrete = self.tokenizer.tokenize(clips)
        rate = self.config.sample_rate
        return [AudioEncoding(c, d, clip.shape[0] / rate) for c, d, clip in zip(continuous, discrete, clips)]

    def _continuous(self, clips: list[np.ndarray]) -> list[torch.Tensor]:
        step = self.config.chunk_samples
        chunks = [clip[i : i + step] for clip in clips for i in range(0, clip.shape[0], step)]
        chunk_counts = [-(-clip.shape[0] // step) for clip in clips]
        # Mel of the 30-s-padded chunk, as OmniServe computes it: padded frames keep their values (the trimmed
        # encoder below reads up to two of them past the audio)
        features = self.feature_extractor(
            chunks,
            sampling_rate=self.config.sample_rate,
            padding="max_length",
            return_attention_mask=True,
            return_tensors="pt",
            device=self.device.type,
        )
        mel_frames = features["attention_mask"].sum(-1)
        rows = output_lengths(mel_frames).tolist()
        hidden = self._encode_mel(features["input_features"], (mel_frames - 1) // 2 + 1)
        kept = torch.cat([hidden[i, :n] for i, n in enumerate(rows)])
        projected = self.projector(kept)
        per_chunk = list(projected.split(rows))
        out, start = [], 0
        for count in chunk_counts:
            out.append(torch.cat(per_chunk[start : start + count]))
            start += count
        return out

    def _encode_mel(self, mel: torch.Tensor, conv_lengths: torch.Tensor) -> torch.Tensor:
        """`Qwen2AudioEncoder.forward` on padded 3000-frame mel, computed only as far as the batch's audio reaches.

        `conv_lengths` are each chunk's valid positions after conv2. Keys beyond them are masked (as OmniServe and
        Qwen2-Audio do), so later positions feed no kept row and are not computed: the batch is trimmed to its
        longest chunk plus the convolutions' reach (position j reads mel frames up to 2j + 2). HF's forward
        insists on all 3000 frames, so its submodules are run here in its order; dropout and LayerDrop are left
        out because the encoder only runs in eval.
        """
        from transformers.masking_utils import create_bidirectional_mask

        encoder = self.encoder
        positions = min(int(conv_lengths.max()) + 1, self.config.max_source_positions)
        mel = mel[..., : 2 * positions].to(self.device, self.dtype)
        hidden = nn.functional.gelu(encoder.conv1(mel))
        hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
        hidden = hidden + encoder.embed_positions.weight[:positions]
        valid = torch.arange(positions)[None, :] < conv_lengths[:, None]
        mask = create_bidirectional_mask(
            config=encoder.config, inputs_embeds=hidden, attention_mask=valid.to(self.device)
        )
        for layer in encoder.layers:
            hidden = layer(hidden, mask)
        hidden = encoder.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1)
        return encoder.layer_norm(hidden)


def _check_feature_extractor(extractor, config: AudioEncoderConfig, ae_dir: Path) -> None:
    from hcxserve.convert.errors import ComponentError

    expected = {
        "feature_size": config.num_mel_bins,
        "sampling_rate": config.sample_rate,
        "hop_length": config.hop_length,
        "n_samples": config.chunk_samples,
        "nb_max_frames": config.chunk_mel_frames,
    }
    wrong = {k: getattr(extractor, k, None) for k, v in expected.items() if getattr(extractor, k, None) != v}
    if wrong:
        raise ComponentError(
            f"{ae_dir / 'preprocessor_config.json'}: {wrong} do not match the encoder (expected "
            + ", ".join(f"{k}={expected[k]}" for k in wrong)
            + ")"
        )


def tiny_components(seed: int = 0, llm_hidden_size: int = 576) -> tuple[dict, dict[str, torch.Tensor]]:
    """A tiny random Omni audio stack for CPU tests: (top-level config entries, tensors under unified names).

    Keeps what the service depends on (128 mel bins, 1500 source positions, S3 head size 64, the 3**8 codebook)
    and shrinks the rest. Values come from a seeded generator, so a seed always gives the same tensors.
    """
    from transformers import Qwen2AudioEncoderConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    audio_config = {
        "model_type": "qwen2_audio_encoder",
        "num_mel_bins": 128,
        "d_model": 32,
        "encoder_layers": 2,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "max_source_positions": 1500,
        "activation_function": "gelu",
    }
    discrete_config = {
        "model_type": "cosyvoice2",
        "n_mels": 128,
        "n_audio_state": 64,
        "n_audio_head": 1,
        "n_audio_layer": 1,
    }
    generator = torch.Generator().manual_seed(seed)
    encoder = Qwen2AudioEncoder._from_config(Qwen2AudioEncoderConfig.from_dict(audio_config))
    projector = build_projector("mlp", audio_config["d_model"], llm_hidden_size)
    tokenizer = S3Tokenizer(S3TokenizerConfig.from_dict(discrete_config))
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (
        ("model.audio_model.", encoder),
        ("model.audio_projector.", projector),
        ("model.discrete_audio_model.", tokenizer),
    ):
        for name, value in module.state_dict().items():
            tensors[prefix + name] = _seeded_like(name, value, generator)
    _condition_fsq(tokenizer, tensors, generator)
    config = {"audio_config": audio_config, "discrete_audio_config": discrete_config, "audio_projector_type": "mlp"}
    return config, tensors


def _seeded_like(name: str, value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A float32 tensor shaped like `value`: LayerNorm-like gains near 1, biases small, weights fan-in scaled."""
    noise = torch.randn(value.shape, generator=generator)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return noise * 0.02
    if value.dim() == 1:  # norm gains
        return 1.0 + noise * 0.02
    fan_in = value[0].numel()
    return noise / fan_in**0.5


def _condition_fsq(tokenizer: S3Tokenizer, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Standardise the random FSQ projection on a seeded calibration clip.

    Random blocks leave a large constant offset in the hidden states, which a plain random projection turns into
    saturated digits and one code for every frame; centred unit-variance projections put the digits on both sides
    of the rounding edges, so the codes follow the input.
    """
    prefix = "model.discrete_audio_model."
    tokenizer.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    config = tokenizer.config
    clip = 0.1 * torch.randn(2 * config.sample_rate, generator=generator)
    mel = log_mel_spectrogram(clip, tokenizer._mel_filters, n_fft=config.n_fft, hop_length=config.hop_length)
    with torch.inference_mode():
        hidden, _ = tokenizer.encoder(mel[None], torch.tensor([mel.shape[-1]]), *tokenizer._rope)
    weight = torch.randn(FSQ_DIMS, config.n_audio_state, generator=generator)
    projected = hidden[0] @ weight.T
    scale = projected.std(dim=0)
    tensors[prefix + "quantizer._codebook.project_down.weight"] = weight / scale[:, None]
    tensors[prefix + "quantizer._codebook.project_down.bias"] = -projected.mean(dim=0) / scale
