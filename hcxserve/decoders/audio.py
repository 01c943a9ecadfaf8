"""The audio decoder's work: units -> speech, in the voice asked for, as a file in the format asked for.

Two vocoders may be loaded from `ad/`: `finetuned/` (named voices, `spk_list.txt`) and `zeroshot/` (the voice of a
reference clip, through its ECAPA-TDNN). Requests of a batch that use the same vocoder and have as many units are
decoded in one forward pass, each with its own voice. (Not across lengths: the convolutions are causal but the
anti-aliasing filters look a few samples ahead, so padding a shorter request would change its last samples.) A part
of a stream (`SpeechRequest.start_sample`, `final`) decodes only the window of units its samples depend on
(`UnitVocoderConfig.span`), so the decoder keeps no state between a stream's calls.
Files: WAV, FLAC, OGG (Vorbis) and MP3 through libsndfile, and raw pcm16.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from hcxserve.config import AudioDecoderConfig
from hcxserve.encoders import ItemRefused, encode_batch
from hcxserve.media.audio import AudioDecodeError, decode_audio
from hcxserve.protocol.payloads import UNKNOWN_VOICE, SpeechAudio, SpeechRequest

logger = logging.getLogger(__name__)

# format -> (libsndfile container, subtype); pcm16 is written without a container
SPEECH_FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "pcm16": None,
}
_REFERENCE_RATE = 16000  # reference clips are decoded at this rate; the speaker encoder resamples them
_MIN_REFERENCE_SECONDS = 0.5  # shorter clips carry too little of a voice to embed


def encode_speech(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Float samples in [-1, 1] as a file (or raw little-endian pcm16). Quantised once, here, so every format holds
    the same 16-bit samples (libsndfile scales floats differently per container)."""
    ints = pcm16(samples)
    if fmt == "pcm16":
        return ints.tobytes()
    import soundfile

    container, subtype = SPEECH_FORMATS[fmt]
    buffer = io.BytesIO()
    soundfile.write(buffer, ints, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")


class AudioDecoderPipeline:
    def __init__(self, finetuned, zeroshot, cfg: AudioDecoderConfig) -> None:
        if finetuned is None and zeroshot is None:
            raise ValueError("the audio decoder folder holds neither finetuned/ nor zeroshot/")
        self.finetuned, self.zeroshot, self.cfg = finetuned, zeroshot, cfg

    @classmethod
    def from_pretrained(cls, ad_dir: Path, cfg: AudioDecoderConfig) -> AudioDecoderPipeline:
        from hcxserve.models import apply_process_settings  # here, not at module level (see hcxserve.encoders.vision)
        from hcxserve.models.unit_vocoder import UnitVocoder

        options = {"device": cfg.device, "dtype": cfg.dtype}
        variants = {
            name: UnitVocoder.from_pretrained(ad_dir / name, **options) if (ad_dir / name).is_dir() else None
            for name in ("finetuned", "zeroshot")
        }
        apply_process_settings(cfg)
        return cls(variants["finetuned"], variants["zeroshot"], cfg)

    @property
    def voices(self) -> list[str]:
        return list(self.finetuned.speakers) if self.finetuned is not None else []

    def decode(self, requests: list[SpeechRequest]) -> list[SpeechAudio]:
        """One file per request; a request that cannot be decoded (bad units, unknown voice, bad clip) is refused
        alone."""

        def refused(exc: ItemRefused) -> SpeechAudio:
            return SpeechAudio(error=exc.message, status=exc.status)

        return encode_batch(requests, self._prepare, self._speak, refused)

    def _prepare(self, request: SpeechRequest):
        """(vocoder, speaker vector, the window of units, the samples wanted of it, format, the reference clip's
        speaker vector to send back or None), or ItemRefused."""
        import torch

        from hcxserve.models.unit_vocoder import InvalidUnitError, UnknownSpeakerError

        if request.format not in SPEECH_FORMATS:
            raise ItemRefused(f"audio format {request.format!r} is not supported ({', '.join(SPEECH_FORMATS)})")
        if not 1 <= len(request.units) <= self.cfg.max_units:
            raise ItemRefused(f"{len(request.units)} units to speak; between 1 and {self.cfg.max_units} are accepted")
        computed = None
        try:
            if request.speaker is not None:
                vocoder = self._variant(self.zeroshot, "a reference clip's voice (zero-shot)")
                speaker = torch.tensor([request.speaker], dtype=vocoder.unit_emb.weight.dtype)
                if speaker.shape[1] != vocoder.config.spk_emb_dim or not torch.isfinite(speaker).all():
                    raise ItemRefused(f"a speaker vector has {vocoder.config.spk_emb_dim} finite values")
                speaker = speaker.to(vocoder.unit_emb.weight.device)
            elif request.reference is not None:
                vocoder = self._variant(self.zeroshot, "a reference clip's voice (zero-shot)")
                clip = decode_audio(
                    request.reference,
                    target_rate=_REFERENCE_RATE,
                    max_seconds=self.cfg.max_reference_seconds,
                    min_seconds=_MIN_REFERENCE_SECONDS,
                )
                speaker = vocoder.speaker_embedding(reference=clip.samples, sample_rate=_REFERENCE_RATE)
                computed = speaker[0].float().tolist()
            else:
                vocoder = self._variant(self.finetuned, "named voices")
                speaker = vocoder.speaker_embedding(request.voice or self.cfg.default_voice)
            units = vocoder.check_units([request.units])
        except UnknownSpeakerError as exc:
            raise ItemRefused(str(exc), UNKNOWN_VOICE) from None
        except (AudioDecodeError, InvalidUnitError) as exc:
            raise ItemRefused(str(exc)) from None
        partial = request.start_sample > 0 or not request.final
        if partial and request.format != "pcm16":
            raise ItemRefused("a part of a stream is raw pcm16; files are decoded whole")
        try:
            first, lo, hi = vocoder.config.span(len(request.units), request.start_sample, final=request.final)
        except ValueError as exc:
            raise ItemRefused(str(exc)) from None
        return vocoder, speaker, units[:, first:], (lo, hi), request.format, computed

    @staticmethod
    def _variant(vocoder, what: str):
        if vocoder is None:
            raise ItemRefused(f"this deployment's audio decoder has no {what}")
        return vocoder

    def _speak(self, prepared: list) -> list[SpeechAudio]:
        import torch

        results: list[SpeechAudio | None] = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (vocoder, _, units, *_) in enumerate(prepared):
            groups.setdefault((id(vocoder), units.shape[1]), []).append(i)
        for positions in groups.values():
            vocoder = prepared[positions[0]][0]
            units = torch.cat([prepared[i][2] for i in positions])
            speakers = torch.cat([prepared[i][1] for i in positions])
            waves = vocoder(units, speakers).float().cpu().numpy()
            for row, i in enumerate(positions):
                (lo, hi), fmt, speaker = prepared[i][3:]
                data = encode_speech(waves[row, lo:hi], vocoder.sample_rate, fmt)
                results[i] = SpeechAudio(data=data, sample_rate=vocoder.sample_rate, samples=hi - lo, speaker=speaker)
        return results
