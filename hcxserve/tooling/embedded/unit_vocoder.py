"""Tiny seeded track B audio decoders: the unified checkpoint's `decoder/audio/` in the real layout, OmniServe's two
TorchServe archives (see `hcxserve.models.unit_vocoder` for the generator and `hcxserve.convert.audio_decoder` for
how the converter unpacks them into `ad/`).

    NCCosybigvganDecoder.mar     the finetuned variant: speakers by name (spk_list.txt)
    NCZSCosybigvganDecoder.mar   the zero-shot variant: an ECAPA-TDNN embeds a reference clip

Each archive is a zip holding `MAR-INF/MANIFEST.json`, `config.json` (the generator's hparams), the generator
checkpoint `generator.pt` (`torch.save({"generator": state_dict})`, under the original's names: weight norm split
into magnitude and direction, the zero `pad_buffer`s and the Kaiser filters the original saves), a placeholder
`handler.py` where the original ships its handler's source, and `spk_list.txt` for the finetuned variant.

The generators keep the real model's interface (6561 units in, 960 samples at 24 kHz per unit out) with a few
thousand channels-times-taps, so 100 units decode in well under a second on a CPU. The same seed gives the same
bytes on any machine (fixed zip timestamps, seeded weights).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch

from hcxserve.convert.tables import AUDIO_DECODER_ARCHIVES
from hcxserve.models.bigvgan import ALIAS_RATIO, ALIAS_TAPS, kaiser_sinc_filter
from hcxserve.models.unit_vocoder import SAMPLE_RATE, SPEAKER_LIST, UnitVocoder, UnitVocoderConfig

from .tokenizer import AUDIO_UNITS

# the released archives' names (hcxserve.convert.tables), finetuned first
FINETUNED_ARCHIVE, ZERO_SHOT_ARCHIVE = AUDIO_DECODER_ARCHIVES
SPEAKERS = ("fkms", "mhwj", "fphj", "mphw")  # OmniServe's voices; fkms is its default
GENERATOR_MEMBER = "generator.pt"
WEIGHT_NORM_NAMES = ("parametrizations.weight.original0", "parametrizations.weight.original1")  # (g, v)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same archive bytes on every build
# conv_post's magnitude and bias are scaled by this, so random weights give noise peaking near 0.5 (std ~0.13)
# rather than a tanh-saturated full-scale square wave.
OUTPUT_GAIN = 0.03

# The generator's hparams as config.json holds them. Channels 32 -> 16 -> 8 -> 4 -> 2 over four upsamplers whose
# rates multiply to 960 (one 25 Hz unit = 960 samples at 24 kHz); one resblock kernel per stage.
GENERATOR_HPARAMS: dict = {
    "num_units": AUDIO_UNITS,
    "unit_emb_dim": 16,
    "spk_emb_dim": 8,
    "upsample_rates": [8, 6, 5, 4],
    "upsample_kernel_sizes": [16, 12, 10, 8],
    "upsample_initial_channel": 32,
    "resblock": "1",
    "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1, 3]],
    "activation": "snakebeta",
    "snake_logscale": True,
    "causal": True,
    "use_bias_at_final": True,
    "use_tanh_at_final": True,
    "sampling_rate": SAMPLE_RATE,
    "segment_size": 9600,  # a training key the loader ignores, as in the real file
}
FINETUNED_HPARAMS: dict = {**GENERATOR_HPARAMS, "finetune": True, "num_spk": len(SPEAKERS)}
# The reference clip's log-mel keeps the real STFT (24 kHz, 1024 / 256) with few bands.
ZERO_SHOT_HPARAMS: dict = {
    **GENERATOR_HPARAMS,
    "finetune": False,
    "num_mels": 16,
    "spk_hidden_dim": 32,
    "global_context_att": False,
    "n_fft": 1024,
    "hop_size": 256,
    "win_size": 1024,
    "fmin": 0,
    "fmax": 12000,
}


def original_state_dict(h: dict, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random generator weights for the hparams `h`, under the names OmniServe's checkpoint uses."""
    model = UnitVocoder(UnitVocoderConfig.from_dict(h), SPEAKERS[: h.get("num_spk") or 0])
    generator = torch.Generator().manual_seed(seed)
    magnitude, direction = WEIGHT_NORM_NAMES
    taps = kaiser_sinc_filter(0.5 / ALIAS_RATIO, 0.6 / ALIAS_RATIO, ALIAS_TAPS).view(1, 1, -1)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if not value.is_floating_point():  # BatchNorm's num_batches_tracked
            tensors[name] = value.clone()
        elif name.endswith(("conv.weight", "deconv.weight")) and not name.startswith("spk_emb."):
            base = name.removesuffix("weight")
            tensors[base + direction] = torch.randn(value.shape, generator=generator)
            tensors[base + magnitude] = 0.5 + torch.rand(value.shape[0], 1, 1, generator=generator)
            owner = base.removesuffix("conv.").removesuffix("de")  # `X.conv.` / `X.deconv.` -> `X.`
            tensors[owner + "pad_buffer"] = torch.zeros(1, value.shape[1], 1)
        elif name.endswith("running_var"):
            tensors[name] = 0.5 + torch.rand(value.shape, generator=generator)
        else:
            tensors[name] = 0.2 * torch.randn(value.shape, generator=generator)
        if name.endswith("act.alpha"):
            base = name.removesuffix("act.alpha")
            tensors[base + "upsample.filter"] = taps.clone()
            tensors[base + "downsample.lowpass.filter"] = taps.clone()
    for name in ("conv_post.conv." + magnitude, "conv_post.conv.bias"):
        if name in tensors:
            tensors[name] *= OUTPUT_GAIN
    return tensors


def write_archive(
    path: str | Path,
    h: dict,
    tensors: dict[str, torch.Tensor],
    *,
    speakers: tuple[str, ...] | list[str] | None = None,
    generator_member: str = GENERATOR_MEMBER,
    extra_members: dict[str, bytes] | None = None,
) -> Path:
    """A TorchServe-style `.mar` holding config.json, `{"generator": tensors}` and spk_list.txt (when given)."""
    path = Path(path)
    checkpoint = io.BytesIO()
    torch.save({"generator": tensors}, checkpoint)
    manifest = {
        "createdOn": "01/01/1980 00:00:00",
        "runtime": "python",
        "model": {
            "modelName": path.stem,
            "serializedFile": generator_member,
            "handler": "handler.py",
            "modelVersion": "1.0",
        },
        "archiverVersion": "0.12.0",
    }
    members = {
        "MAR-INF/MANIFEST.json": json.dumps(manifest, indent=2).encode(),
        "config.json": json.dumps(h, indent=2).encode(),
        generator_member: checkpoint.getvalue(),
        "handler.py": b"# Placeholder: OmniServe ships its TorchServe handler's source here; nothing reads it.\n",
    }
    if speakers is not None:
        members[SPEAKER_LIST] = ("\n".join(speakers) + "\n").encode()
    members.update(extra_members or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return path


def write_tiny_archives(folder: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """`decoder/audio/`: both archives, finetuned (speakers SPEAKERS) and zero-shot; variant -> archive path."""
    folder = Path(folder)
    return {
        "finetuned": write_archive(
            folder / FINETUNED_ARCHIVE,
            FINETUNED_HPARAMS,
            original_state_dict(FINETUNED_HPARAMS, seed=seed),
            speakers=SPEAKERS,
        ),
        "zeroshot": write_archive(
            folder / ZERO_SHOT_ARCHIVE, ZERO_SHOT_HPARAMS, original_state_dict(ZERO_SHOT_HPARAMS, seed=seed + 1)
        ),
    }
