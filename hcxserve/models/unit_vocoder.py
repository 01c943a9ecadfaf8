"""Track B's audio decoder (HyperCLOVAX-SEED-Omni-8B): 25 Hz speech units -> 24 kHz mono waveform, in one call or
incrementally as the LLM emits the units.

A reimplementation of the inference path of the unit vocoder OmniServe ships in TorchServe archives
(`decoder/audio/codec/src/audiollm/decoder/unit_bigvgan/modules/{bigvgan,activations,ecapa_tdnn}.py`): NVIDIA's
BigVGAN (MIT) fed with unit and speaker embeddings instead of a mel spectrogram. Module names follow that code, so
its checkpoint loads unchanged:

    unit_emb             Embedding(num_units, unit_emb_dim), output scaled by unit_emb_dim ** -0.5
    spk_emb              Embedding(num_spk, spk_emb_dim) (finetuned variant) or an ECAPA-TDNN over the log-mel of a
                         reference clip (zero-shot variant); the speaker vector is repeated over time and
                         concatenated to the unit embeddings along channels
    conv_pre.conv        Conv1d(unit_emb_dim + spk_emb_dim -> upsample_initial_channel, kernel 7)
    ups.I.0.deconv       ConvTranspose1d(C / 2**I -> C / 2**(I+1), kernel 2 * rate, stride rate), one per rate
    resblocks.I*K+J      AMPBlock1 (K = len(resblock_kernel_sizes)): per dilation, x + conv2(act(conv1(act(x)))) with
                         convs1.N.conv (dilated), convs2.N.conv and activations.M.act.{alpha,beta} (SnakeBeta); the
                         K blocks of a stage are averaged
    activation_post.act  SnakeBeta, then conv_post.conv (-> 1 channel, kernel 7), then tanh (or a clamp)

Every SnakeBeta is anti-aliased (`Activation1d`) and every convolution is causal (`h.causal`, the default and the
only variant supported here), but the anti-aliasing filters are not (`hcxserve.models.bigvgan`), so the decoder as a
whole looks `UnitVocoderConfig.lookahead_samples` output samples into the future (a few units). `UnitVocoder.start()`
decodes incrementally with that latency and the one-shot result (`hcxserve.models.unit_vocoder_stream`).

Modules: this one holds the config, the generator and its loading; `bigvgan` the generator's building blocks and the
folding of its checkpoint; `ecapa_tdnn` the zero-shot speaker encoder and the conditioning of its reference clip;
`unit_vocoder_stream` the incremental evaluation.

Component folder (`ad/`), one per variant:
- `config.json`: the generator's hparams `h` as the archive ships them (`UnitVocoderConfig` lists the keys read;
  training keys are ignored);
- the weights: `model.safetensors` (or sharded with `model.safetensors.index.json`), or the original torch checkpoint
  `{"generator": state_dict}` (`generator.pt`, or the one `*.pt`/`*.pth`/`*.ckpt`/`g_<step>` file), read with
  `weights_only=True`. Weight-norm pairs (`weight_g`/`weight_v` or `parametrizations.weight.original0/1`) are
  folded into plain weights; the constant buffers (`pad_buffer`, the Kaiser filters) are checked and dropped;
- `spk_list.txt` (finetuned variant): one speaker name per line; a name's line number is its `spk_emb` row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hcxserve.models import known_fields, resolve_device, torch_dtype
from hcxserve.models.bigvgan import (
    ACTIVATION_LOOKAHEAD,
    ACTIVATION_LOOKBACK,
    Activation1d,
    AMPBlock1,
    CausalConv1d,
    CausalConvTranspose1d,
    generator_state_dict,
)
from hcxserve.models.ecapa_tdnn import ECAPA_RES2_SCALE, EcapaTdnn, prepare_reference, reference_log_mel
from hcxserve.models.s3_tokenizer import load_strict
from hcxserve.models.unit_vocoder_stream import ChainStream, LayerStream, MapStream, MeanStream, UnitVocoderStream

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000
UNITS_PER_SECOND = 25
SAMPLES_PER_UNIT = SAMPLE_RATE // UNITS_PER_SECOND
DEFAULT_SPEAKER = "fkms"  # OmniServe's default voice of the finetuned variant
SPEAKER_LIST = "spk_list.txt"
TORCH_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")

_REQUIRED = (
    "num_units",
    "unit_emb_dim",
    "spk_emb_dim",
    "upsample_rates",
    "upsample_kernel_sizes",
    "upsample_initial_channel",
    "resblock_kernel_sizes",
    "resblock_dilation_sizes",
    "snake_logscale",
)


class InvalidUnitError(ValueError):
    """Units the decoder cannot take: not integers, or an id outside [0, num_units). `value` and `position` name the
    first bad id (its position counted from the start of the stream for `UnitVocoderStream.decode`)."""

    def __init__(self, message: str, *, value: int | None = None, position: int | None = None, row: int = 0) -> None:
        super().__init__(message)
        self.value, self.position, self.row = value, position, row

    @classmethod
    def out_of_range(cls, value: int, position: int, num_units: int, *, row: int, count: int) -> InvalidUnitError:
        where = f"position {position}" + (f" of row {row}" if row else "")
        more = f" ({count - 1} more out of range)" if count > 1 else ""
        return cls(
            f"unit {value} at {where} is outside [0, {num_units}){more}", value=value, position=position, row=row
        )


class UnknownSpeakerError(ValueError):
    """A speaker name not in the checkpoint's spk_list.txt."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        if known:
            super().__init__(f"unknown speaker {name!r}; this audio decoder knows {', '.join(known)}")
        else:
            super().__init__(f"unknown speaker {name!r}: this audio decoder is zero-shot, it takes a reference clip")


@dataclass(frozen=True)
class UnitVocoderConfig:
    """The generator's hparams `h` (config.json). Required: the keys OmniServe reads without a fallback (`_REQUIRED`,
    and per variant `num_spk`, or the reference mel's and the ECAPA-TDNN's sizes). Defaults: OmniServe's fallbacks
    (causal, finetune, use_*_at_final) and the only values it supports (resblock, activation)."""

    num_units: int
    unit_emb_dim: int
    spk_emb_dim: int
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    snake_logscale: bool
    resblock: str = "1"
    activation: str = "snakebeta"
    causal: bool = True
    use_bias_at_final: bool = True
    use_tanh_at_final: bool = True
    finetune: bool = False
    num_spk: int | None = None  # finetuned variant: rows of spk_emb
    # zero-shot variant: the reference clip's log-mel and the ECAPA-TDNN that embeds it
    num_mels: int | None = None
    spk_hidden_dim: int | None = None
    global_context_att: bool = False
    sampling_rate: int = SAMPLE_RATE  # of the reference clip's mel
    n_fft: int | None = None
    hop_size: int | None = None
    win_size: int | None = None
    fmin: float = 0.0
    fmax: float | None = None  # None: the Nyquist frequency

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("audio decoder config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        rates, kernels = self.upsample_rates, self.upsample_kernel_sizes
        problems = []
        if self.resblock != "1" or self.activation != "snakebeta":
            problems.append("only resblock '1' with activation 'snakebeta' exists in OmniServe's unit BigVGAN")
        if not self.causal:
            problems.append("causal=false is not supported (the shipped generator is causal; streaming relies on it)")
        if not rates or len(rates) != len(kernels) or any(k != 2 * r for r, k in zip(rates, kernels)):
            problems.append(
                f"upsample_kernel_sizes {list(kernels)} must be twice upsample_rates {list(rates)}: only then does "
                "a causal transposed convolution give `rate` samples per input frame"
            )
        if math.prod(rates) != SAMPLES_PER_UNIT:
            problems.append(f"upsample_rates {list(rates)} multiply to {math.prod(rates)}, not {SAMPLES_PER_UNIT}")
        if self.upsample_initial_channel >> len(rates) < 1:
            problems.append(f"upsample_initial_channel {self.upsample_initial_channel} halves to 0 channels")
        if not self.resblock_kernel_sizes or len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            problems.append("resblock_kernel_sizes and resblock_dilation_sizes must pair up")
        if self.num_units < 1:
            problems.append("num_units must be positive")
        if self.finetune and not (self.num_spk or 0) >= 1:
            problems.append("the finetuned variant (finetune=true) needs num_spk")
        if not self.finetune:
            absent = [
                k for k in ("num_mels", "spk_hidden_dim", "n_fft", "hop_size", "win_size") if not getattr(self, k)
            ]
            if absent:
                problems.append(f"the zero-shot variant (finetune=false) needs {', '.join(absent)}")
            elif self.spk_hidden_dim % ECAPA_RES2_SCALE:
                problems.append(f"spk_hidden_dim {self.spk_hidden_dim} is not a multiple of {ECAPA_RES2_SCALE}")
        return problems

    @classmethod
    def from_dict(cls, h: dict) -> UnitVocoderConfig:
        """From the hparams dict of config.json; unknown (training) keys are ignored, lists become tuples."""
        missing = [key for key in _REQUIRED if key not in h]
        if missing:
            raise ValueError(f"audio decoder config: missing {', '.join(missing)}")
        values = known_fields(cls, h)
        for key in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
            values[key] = tuple(int(v) for v in values[key])
        values["resblock_dilation_sizes"] = tuple(tuple(int(d) for d in ds) for ds in values["resblock_dilation_sizes"])
        return cls(**values)

    @property
    def stage_channels(self) -> list[int]:
        return [self.upsample_initial_channel >> (i + 1) for i in range(len(self.upsample_rates))]

    @property
    def lookahead_samples(self) -> int:
        """Output samples after time t that the sample at t depends on: what a stream holds back.

        An Activation1d's output t reads its upsampled signal up to 2t + 6, which reads the input up to t + 5. The
        AMPBlock1 units of a stage run two of them in series per dilation, the stage's blocks run side by side (the
        longest sets the delay), and later stages multiply a delay by their upsampling rates. The causal convolutions
        and transposed convolutions add none; activation_post adds 5 at the output rate.
        """
        rates = self.upsample_rates
        per_stage = 2 * ACTIVATION_LOOKAHEAD * max(len(d) for d in self.resblock_dilation_sizes)
        return sum(per_stage * math.prod(rates[i + 1 :]) for i in range(len(rates))) + ACTIVATION_LOOKAHEAD

    @property
    def context_units(self) -> int:
        """Units before a sample's own unit that the sample depends on (its left receptive field), rounded up.

        At the unit rate conv_pre reads 6 frames back; a stage's transposed convolution reads less than 2 of its
        input frames back, its resblocks (the deepest sets the reach) per dilation two Activation1d's
        (`ACTIVATION_LOOKBACK` each) and two causal convolutions ((k - 1) * d and k - 1); activation_post and
        conv_post add 6 + 6 at the output rate. Each reach is in frames of its own rate, so it is divided by the
        samples per unit at that rate; one unit more covers the rounding of the sample's position within its unit.
        """
        reach, frames_per_unit = 6.0, 1
        for rate in self.upsample_rates:
            reach += 2 / frames_per_unit
            frames_per_unit *= rate
            deepest = max(
                sum(2 * ACTIVATION_LOOKBACK + (k - 1) * d + (k - 1) for d in dilations)
                for k, dilations in zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes)
            )
            reach += deepest / frames_per_unit
        reach += (ACTIVATION_LOOKBACK + 6) / frames_per_unit
        return math.ceil(reach) + 1

    def span(self, units: int, start: int, *, final: bool) -> tuple[int, int, int]:
        """Where samples [start, end) of the decode of `units` units come from when only a window of the units is
        decoded: (first unit of the window, start and end within the window's samples). `end` is every sample when
        `final`, else the ones no later unit can change (all but `lookahead_samples`); it is never before `start`.
        """
        total = units * SAMPLES_PER_UNIT
        end = total if final else max(0, total - self.lookahead_samples)
        if not 0 <= start <= total:
            raise ValueError(f"start sample {start} is outside the {total} samples of {units} units")
        first = max(0, start // SAMPLES_PER_UNIT - self.context_units)
        offset = first * SAMPLES_PER_UNIT
        return first, start - offset, max(start, end) - offset


class UnitVocoder(nn.Module):
    """Units (B, T) and speaker vectors (B, spk_emb_dim) -> waveform (B, T * 960) in [-1, 1] at 24 kHz."""

    units_per_second = UNITS_PER_SECOND
    sample_rate = SAMPLE_RATE

    def __init__(self, config: UnitVocoderConfig, speakers: Sequence[str] = ()) -> None:
        super().__init__()
        self.config = config
        self.speakers = list(speakers)
        if config.finetune:
            self.spk_emb: nn.Module = nn.Embedding(config.num_spk, config.spk_emb_dim)
        else:
            self.spk_emb = EcapaTdnn(
                config.num_mels, config.spk_hidden_dim, config.spk_emb_dim, config.global_context_att
            )
        self.unit_emb = nn.Embedding(config.num_units, config.unit_emb_dim)
        channels = [config.upsample_initial_channel, *config.stage_channels]
        self.conv_pre = CausalConv1d(config.unit_emb_dim + config.spk_emb_dim, channels[0], 7)
        self.ups = nn.ModuleList(
            nn.ModuleList([CausalConvTranspose1d(channels[i], channels[i + 1], rate)])
            for i, rate in enumerate(config.upsample_rates)
        )
        self.resblocks = nn.ModuleList(
            AMPBlock1(channels[i + 1], k, d, config.snake_logscale)
            for i in range(len(config.upsample_rates))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)
        )
        self.activation_post = Activation1d(channels[-1], config.snake_logscale)
        self.conv_post = CausalConv1d(channels[-1], 1, 7, bias=config.use_bias_at_final)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str = "cpu", dtype: str = "float32") -> UnitVocoder:
        from hcxserve.convert import read_component_config
        from hcxserve.convert.errors import ComponentError

        folder = Path(folder)
        try:
            config = UnitVocoderConfig.from_dict(read_component_config(folder))
        except (ValueError, TypeError) as exc:
            raise ComponentError(f"{folder / 'config.json'}: {exc}") from exc
        model = cls(config, read_speaker_list(folder, config.num_spk) if config.finetune else ())
        tensors, source = read_generator_weights(folder)
        load_strict(model, generator_state_dict(tensors, where=source), where=source)
        device = resolve_device(device)
        model = model.to(device=torch.device(device), dtype=torch_dtype(dtype)).eval()
        logger.info(
            "audio decoder loaded from %s on %s (%s; %s, %d params, lookahead %d samples)",
            folder,
            device,
            dtype,
            f"speakers {', '.join(model.speakers)}" if config.finetune else "zero-shot",
            sum(p.numel() for p in model.parameters()),
            config.lookahead_samples,
        )
        return model

    @property
    def default_speaker(self) -> str | None:
        if not self.speakers:
            return None
        return DEFAULT_SPEAKER if DEFAULT_SPEAKER in self.speakers else self.speakers[0]

    @torch.inference_mode()
    def speaker_embedding(
        self, name: str | None = None, *, reference: np.ndarray | None = None, sample_rate: int | None = None
    ) -> torch.Tensor:
        """(1, spk_emb_dim): a named speaker of the finetuned variant (default `fkms`), or the zero-shot variant's
        embedding of a mono float reference clip at `sample_rate`."""
        if self.config.finetune:
            if reference is not None:
                raise ValueError("this audio decoder has fixed speakers; pass a speaker name, not a reference clip")
            name = self.default_speaker if name is None else name
            if name not in self.speakers:
                raise UnknownSpeakerError(name, self.speakers)
            return self.spk_emb.weight[self.speakers.index(name)][None].clone()
        if name is not None:
            raise UnknownSpeakerError(name, [])
        if reference is None or sample_rate is None:
            raise ValueError("the zero-shot audio decoder needs a reference clip and its sample rate")
        clip = prepare_reference(reference, sample_rate, self.config.sampling_rate)
        mel = reference_log_mel(clip, self.config).to(self.unit_emb.weight.device, self.unit_emb.weight.dtype)
        return self.spk_emb(mel)

    @torch.inference_mode()
    def forward(self, units: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        x = self._embed(self.check_units(units), speaker)
        x = self.conv_pre(x)
        kernels = len(self.config.resblock_kernel_sizes)
        for i, (upsample,) in enumerate(self.ups):
            x = upsample(x)
            x = sum(self.resblocks[i * kernels + j](x) for j in range(kernels)) / kernels
        return self._bound(self.conv_post(self.activation_post(x)))[:, 0]

    def start(self, speaker: torch.Tensor) -> UnitVocoderStream:
        """An incremental decode for one speaker vector (1 or B rows): see `UnitVocoderStream`."""
        return UnitVocoderStream(self, speaker)

    def check_units(self, units, *, offset: int = 0) -> torch.Tensor:
        """Unit ids as a (B, T) int64 tensor on the model's device; InvalidUnitError names the first bad one."""
        tensor = torch.as_tensor(units, device=self.unit_emb.weight.device)
        is_integer = not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)
        if tensor.numel() and not is_integer:  # an empty list comes in as float32
            raise InvalidUnitError(f"unit ids must be integers, got {tensor.dtype}")
        if tensor.dim() != 2:
            raise ValueError(f"units must be (batch, time), got shape {tuple(tensor.shape)}")
        bad = (tensor < 0) | (tensor >= self.config.num_units)
        if bool(bad.any()):
            row, column = (int(i) for i in bad.nonzero()[0])
            count = int(bad.sum())
            value, position = int(tensor[row, column]), offset + column
            raise InvalidUnitError.out_of_range(value, position, self.config.num_units, row=row, count=count)
        return tensor.long()

    def _embed(self, units: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        x = self.unit_emb(units).transpose(1, 2) * (self.config.unit_emb_dim**-0.5)
        speaker = speaker.to(x.device, x.dtype)
        if speaker.dim() != 2 or speaker.shape[1] != self.config.spk_emb_dim or speaker.shape[0] not in (1, len(x)):
            raise ValueError(f"speaker must be (1 or {len(x)}, {self.config.spk_emb_dim}), got {tuple(speaker.shape)}")
        return torch.cat([x, speaker[:, :, None].expand(len(x), -1, x.shape[-1])], dim=1)

    def _bound(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) if self.config.use_tanh_at_final else torch.clamp(x, -1.0, 1.0)

    def _stream_layers(self) -> LayerStream:
        kernels = len(self.config.resblock_kernel_sizes)
        stages: list[LayerStream] = [self.conv_pre.stream()]
        for i, (upsample,) in enumerate(self.ups):
            stages.append(upsample.stream())
            stages.append(MeanStream([self.resblocks[i * kernels + j].stream() for j in range(kernels)]))
        stages += [self.activation_post.stream(), self.conv_post.stream(), MapStream(self._bound)]
        return ChainStream(stages)


# ---------------------------------------------------------------------------------------------------------------
# Reading the component folder


def read_speaker_list(folder: Path, num_spk: int) -> list[str]:
    from hcxserve.convert.errors import ComponentError

    path = folder / SPEAKER_LIST
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError as exc:
        raise ComponentError(f"{path} not found: the finetuned audio decoder names its speakers there") from exc
    while names and not names[-1]:
        names.pop()
    if not names or "" in names or len(set(names)) != len(names) or len(names) > num_spk:
        raise ComponentError(f"{path}: expected up to {num_spk} distinct non-empty names, one a line, got {names}")
    return names


def read_generator_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The generator's tensors, from safetensors if there are any, else from the torch checkpoint; and their file."""
    from hcxserve.convert import load_state_dict
    from hcxserve.convert.errors import ComponentError
    from hcxserve.convert.tables import SINGLE_WEIGHTS, WEIGHTS_INDEX

    if (folder / SINGLE_WEIGHTS).is_file() or (folder / WEIGHTS_INDEX).is_file():
        return load_state_dict(folder), str(folder / SINGLE_WEIGHTS)
    preferred = folder / "generator.pt"
    candidates = (
        [preferred]
        if preferred.is_file()
        else sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and (p.suffix in TORCH_CHECKPOINT_SUFFIXES or p.name.startswith("g_"))
        )
    )
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise ComponentError(f"{folder}: expected {SINGLE_WEIGHTS} or one generator checkpoint, found {found}")
    try:
        checkpoint = torch.load(candidates[0], map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for anything but tensors and containers, or a corrupt file
        raise ComponentError(f"{candidates[0]}: not a readable tensor checkpoint ({exc})") from exc
    tensors = checkpoint.get("generator", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ComponentError(f"{candidates[0]}: expected {{'generator': state_dict}} or a state dict")
    return dict(tensors), str(candidates[0])
