"""Decoding client audio to 16 kHz mono float32, under a duration limit.

WAV, FLAC, OGG and MP3 go through soundfile's bundled libsndfile. Everything else a client plausibly sends (MP4/M4A
with AAC, ADTS AAC, WebM/Matroska with Opus or Vorbis, AMR), and the sound track of a video file, goes through
PyAV, whose wheel bundles FFmpeg: no system libraries either way. Only the resampler needs torch, and it is imported
when a file is not at the target rate already.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

# What libsndfile reads; the rest goes to FFmpeg (PyAV).
_SOUNDFILE_FORMATS = ("wav", "flac", "ogg", "mp3", "aiff")
_SUPPORTED_NAMES = "WAV, FLAC, OGG, MP3, M4A/AAC, WebM/Opus, or a video file with a sound track"
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
    from_video: bool = False  # the sound track of a video file


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


def decode_audio(
    data: bytes, *, target_rate: int = 16000, max_seconds: float, min_seconds: float = 0.0
) -> DecodedAudio:
    """Decode, downmix to mono and resample to `target_rate`.

    The duration in the header is checked before the samples are decoded, so an over-long file costs no decoding;
    the read is capped at the limit as well, for streams whose header does not know their length.
    """
    if not data:
        raise AudioDecodeError("audio is empty")
    kind = sniff_audio_format(data)
    if kind in _SOUNDFILE_FORMATS:
        frames, rate, from_video = _read_soundfile(data, kind, max_seconds)
    else:
        frames, rate, from_video = _read_ffmpeg(data, kind, max_seconds)
    if frames.shape[0] == 0:
        raise AudioDecodeError("audio contains no samples")
    if frames.shape[0] / rate > max_seconds:
        raise AudioTooLongError(frames.shape[0] / rate, max_seconds)
    if frames.shape[0] / rate < min_seconds:
        raise AudioDecodeError(f"audio is {frames.shape[0] / rate:.3f} s long, shorter than {min_seconds:g} s")
    mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    if not np.isfinite(mono).all():
        raise AudioDecodeError("audio contains non-finite samples")
    samples = resample(np.ascontiguousarray(mono, dtype=np.float32), rate, target_rate)
    return DecodedAudio(samples, target_rate, samples.shape[0] / target_rate, from_video)


def _check_rate(rate: int) -> None:
    if not 0 < rate <= _MAX_SOURCE_RATE:
        raise AudioDecodeError(f"audio has an unusable sample rate of {rate} Hz")


def _read_soundfile(data: bytes, kind: str, max_seconds: float) -> tuple[np.ndarray, int, bool]:
    """(frames (n, channels) float32, sample rate, False: libsndfile reads audio-only containers)."""
    import soundfile

    try:
        handle = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioDecodeError(f"cannot decode the {kind.upper()} audio: it is corrupt or truncated") from exc
    with handle:
        rate = int(handle.samplerate)
        _check_rate(rate)
        if 0 < handle.frames < np.iinfo(np.int64).max and handle.frames / rate > max_seconds:
            raise AudioTooLongError(handle.frames / rate, max_seconds)
        try:
            frames = handle.read(frames=math.floor(max_seconds * rate) + 1, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise AudioDecodeError(f"the audio is corrupt or truncated ({exc})") from exc
    return frames, rate, False


def _read_ffmpeg(data: bytes, kind: str | None, max_seconds: float) -> tuple[np.ndarray, int, bool]:
    """(frames (n, channels) float32, sample rate, whether the container has a video stream), via PyAV."""
    import av

    what = f"the {kind.upper()} audio" if kind else "the audio"
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        if kind:
            raise AudioDecodeError(f"cannot decode {what}: it is corrupt or truncated") from exc
        raise AudioDecodeError(f"cannot decode the audio: unrecognised format; send {_SUPPORTED_NAMES}") from exc
    with container:
        if not container.streams.audio:
            raise AudioDecodeError(f"{what} has no sound track")
        stream = container.streams.audio[0]
        rate = int(stream.sample_rate or stream.codec_context.sample_rate or 0)
        _check_rate(rate)
        if container.duration and container.duration / av.time_base > max_seconds:
            raise AudioTooLongError(container.duration / av.time_base, max_seconds)
        # planar float at the source rate and layout; downmixing and resampling happen as for soundfile's formats
        to_float = av.AudioResampler(format="fltp", rate=rate)
        limit = math.floor(max_seconds * rate) + 1
        chunks, total = [], 0
        try:
            for frame in container.decode(stream):
                for out in to_float.resample(frame):
                    chunks.append(out.to_ndarray().T)
                    total += chunks[-1].shape[0]
                if total > limit:
                    break
            else:
                chunks += [out.to_ndarray().T for out in to_float.resample(None)]
        except (av.FFmpegError, ValueError) as exc:
            raise AudioDecodeError(f"{what} is corrupt or truncated") from exc
        from_video = bool(container.streams.video)
    if not chunks:
        return np.zeros((0, 1), np.float32), rate, from_video
    if len({chunk.shape[1] for chunk in chunks}) > 1:
        raise AudioDecodeError(f"{what} changes its channel count midway")
    return np.concatenate(chunks).astype(np.float32, copy=False), rate, from_video


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
