"""Decoding client audio (WAV, FLAC, OGG, MP3) to 16 kHz mono float32, under a duration limit.

soundfile's bundled libsndfile reads all four formats with no system libraries; FFmpeg-backed decoders
(torchaudio.load, torchcodec) are not used because the FFmpeg shared libraries are not a dependency of this
server. Only the resampler needs torch, and it is imported when a file is not at the target rate already.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

# Containers a client may plausibly send that libsndfile cannot read, named so the error can say what was sent.
_UNSUPPORTED = {"mp4": "MP4/M4A (AAC)", "aac": "AAC", "webm": "WebM/Matroska", "amr": "AMR"}
_SUPPORTED_NAMES = "WAV, FLAC, OGG (Vorbis/Opus) or MP3"
# Beyond this the file is not audio a person recorded, and a resampler would be asked for absurd ratios.
_MAX_SOURCE_RATE = 768_000


class AudioDecodeError(ValueError):
    """The bytes are not audio this server can decode; the message is meant for the client."""


class AudioTooLongError(AudioDecodeError):
    def __init__(self, duration_s: float, max_seconds: float) -> None:
        super().__init__(f"audio is {duration_s:.1f} s long, over the limit of {max_seconds:g} s")
        self.duration_s = duration_s
        self.max_seconds = max_seconds


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # (n,) float32 mono in [-1, 1]
    sample_rate: int
    duration_s: float


def sniff_audio_format(data: bytes) -> str | None:
    """The container named by the magic bytes: "wav", "flac", "ogg", "mp3", "aiff", "mp4", "aac", "webm",
    "amr" or None."""
    head = data[:16]
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"ID3"):
        return "mp3"
    if len(head) >= 12 and head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if len(head) >= 8 and head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    if head.startswith(b"#!AMR"):
        return "amr"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        # 11-bit frame sync: MPEG audio has a non-zero layer field, AAC's ADTS header has layer 00.
        return "mp3" if head[1] & 0x06 else "aac"
    return None


def decode_audio(data: bytes, *, target_rate: int = 16000, max_seconds: float) -> DecodedAudio:
    """Decode, downmix to mono and resample to `target_rate`.

    The duration in the header is checked before the samples are decoded, so an over-long file costs no decoding;
    the read is capped at the limit as well, for streams whose header does not know their length.
    """
    import soundfile

    if not data:
        raise AudioDecodeError("audio is empty")
    kind = sniff_audio_format(data)
    if kind in _UNSUPPORTED:
        raise AudioDecodeError(f"{_UNSUPPORTED[kind]} audio is not supported; send {_SUPPORTED_NAMES}")
    try:
        handle = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        if kind:
            raise AudioDecodeError(f"cannot decode the {kind.upper()} audio: it is corrupt or truncated") from exc
        raise AudioDecodeError(f"cannot decode the audio: unrecognised format; send {_SUPPORTED_NAMES}") from exc
    with handle:
        rate = int(handle.samplerate)
        if not 0 < rate <= _MAX_SOURCE_RATE:
            raise AudioDecodeError(f"audio has an unusable sample rate of {rate} Hz")
        if 0 < handle.frames < np.iinfo(np.int64).max and handle.frames / rate > max_seconds:
            raise AudioTooLongError(handle.frames / rate, max_seconds)
        limit = math.floor(max_seconds * rate) + 1
        try:
            frames = handle.read(frames=limit, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise AudioDecodeError(f"the audio is corrupt or truncated ({exc})") from exc
    if frames.shape[0] == 0:
        raise AudioDecodeError("audio contains no samples")
    if frames.shape[0] / rate > max_seconds:
        raise AudioTooLongError(frames.shape[0] / rate, max_seconds)
    mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    if not np.isfinite(mono).all():
        raise AudioDecodeError("audio contains non-finite samples")
    samples = resample(np.ascontiguousarray(mono, dtype=np.float32), rate, target_rate)
    return DecodedAudio(samples=samples, sample_rate=target_rate, duration_s=samples.shape[0] / target_rate)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited (Kaiser-windowed sinc) resampling of a 1-D float32 signal.

    The filter parameters are resampy's "kaiser_best" (as documented by torchaudio): a 64-zero-crossing kernel
    with its cutoff just under the lower Nyquist rate, so a downsampled file does not alias.
    """
    if source_rate == target_rate:
        return samples
    import torch
    import torchaudio.functional

    out = torchaudio.functional.resample(
        torch.from_numpy(samples),
        source_rate,
        target_rate,
        lowpass_filter_width=64,
        rolloff=0.9475937167399596,
        resampling_method="sinc_interp_kaiser",
        beta=14.769656459379492,
    )
    return out.numpy().astype(np.float32, copy=False)
