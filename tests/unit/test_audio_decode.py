"""hcxserve.media.audio: client audio bytes -> 16 kHz mono float32, with user-facing errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from hcxserve.media.audio import AudioDecodeError, AudioTooLongError, decode_audio, sniff_audio_format
from tests.conftest import make_av_media, make_video


def _tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def _encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.shape[0])))
    return float(np.fft.rfftfreq(samples.shape[0], 1 / rate)[spectrum.argmax()])


def test_wav_8k_mono_is_upsampled_to_16k() -> None:
    audio = decode_audio(_encode(_tone(440, 1.5, 8000), 8000, "WAV", "PCM_16"), max_seconds=10)
    assert audio.sample_rate == 16000
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.samples.shape[0] == 24000
    assert audio.duration_s == pytest.approx(1.5)


def test_wav_44k_stereo_is_downmixed_and_downsampled() -> None:
    left = _tone(440, 2.0, 44100)
    stereo = np.stack([left, 0.5 * left], axis=1)
    audio = decode_audio(_encode(stereo, 44100, "WAV", "FLOAT"), max_seconds=10)
    assert audio.samples.shape == (32000,)
    assert audio.duration_s == pytest.approx(2.0)
    # the mean of the two channels: amplitude 0.75 * 0.5
    assert np.abs(audio.samples[1000:-1000]).max() == pytest.approx(0.375, rel=0.02)


def test_16k_input_is_passed_through_unchanged() -> None:
    tone = _tone(300, 0.5, 16000)
    audio = decode_audio(_encode(tone, 16000, "WAV", "FLOAT"), max_seconds=10)
    np.testing.assert_array_equal(audio.samples, tone)


def test_resampling_keeps_the_frequency_and_removes_what_cannot_be_represented() -> None:
    audio = decode_audio(_encode(_tone(440, 2.0, 44100), 44100, "WAV", "FLOAT"), max_seconds=10)
    assert _peak_hz(audio.samples, 16000) == pytest.approx(440, abs=1)
    # 10 kHz is above the 8 kHz Nyquist limit of the output: a band-limited resampler removes it instead of
    # folding it down to 6 kHz
    aliased = decode_audio(_encode(_tone(10000, 1.0, 44100), 44100, "WAV", "FLOAT"), max_seconds=10)
    assert np.sqrt(np.mean(aliased.samples[2000:-2000] ** 2)) < 1e-3


@pytest.mark.parametrize(("fmt", "subtype"), [("FLAC", "PCM_16"), ("MP3", None), ("OGG", "VORBIS")])
def test_compressed_formats_decode(fmt: str, subtype: str | None) -> None:
    data = _encode(_tone(440, 1.0, 22050), 22050, fmt, subtype)
    assert sniff_audio_format(data) == fmt.lower()
    audio = decode_audio(data, max_seconds=10)
    assert audio.sample_rate == 16000
    assert audio.duration_s == pytest.approx(1.0, abs=0.06)  # MP3 frames may pad the end
    assert _peak_hz(audio.samples, 16000) == pytest.approx(440, abs=2)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "wav"),
        (b"fLaC\x00\x00\x00\x22", "flac"),
        (b"OggS\x00\x02", "ogg"),
        (b"ID3\x04\x00\x00", "mp3"),
        (b"\xff\xfb\x90\x64", "mp3"),
        (b"\xff\xf1\x50\x80", "aac"),
        (b"\x00\x00\x00\x20ftypM4A ", "mp4"),
        (b"\x1a\x45\xdf\xa3\x01", "webm"),
        (b"hello world", None),
        (b"", None),
    ],
)
def test_sniff_audio_format(head: bytes, expected: str | None) -> None:
    assert sniff_audio_format(head) == expected


def test_empty_bytes() -> None:
    with pytest.raises(AudioDecodeError, match="empty"):
        decode_audio(b"", max_seconds=10)


def test_garbage_bytes() -> None:
    with pytest.raises(AudioDecodeError, match="unrecognised format"):
        decode_audio(b"this is not audio at all" * 50, max_seconds=10)


def test_corrupt_container_is_named() -> None:
    with pytest.raises(AudioDecodeError, match="MP4 audio: it is corrupt"):
        decode_audio(b"\x00\x00\x00\x20ftypM4A " + bytes(200), max_seconds=10)


@pytest.mark.parametrize(
    ("container", "codec", "rate"), [("mp4", "aac", 44100), ("webm", "libopus", 48000), ("adts", "aac", 22050)]
)
def test_ffmpeg_formats_decode_like_soundfile_ones(container, codec, rate) -> None:
    decoded = decode_audio(make_av_media(container, codec, seconds=2.0, rate=rate), max_seconds=10)
    assert decoded.sample_rate == 16000 and not decoded.from_video
    assert abs(decoded.duration_s - 2.0) < 0.1  # encoder priming/padding adds a few ms
    # stereo is averaged, not summed: a 0.3 tone stays about 0.3 loud, as through soundfile
    assert 0.25 < float(np.abs(decoded.samples[4000:-4000]).max()) < 0.35
    spectrum = np.abs(np.fft.rfft(decoded.samples[:16000]))
    assert abs(int(np.argmax(spectrum)) - 440) <= 2  # 1-s window: bins are 1 Hz


def test_sound_track_of_a_video() -> None:
    decoded = decode_audio(make_av_media("mp4", "aac", seconds=2.0, video=True), max_seconds=10)
    assert decoded.from_video and abs(decoded.duration_s - 2.0) < 0.1


def test_video_without_sound_track() -> None:
    with pytest.raises(AudioDecodeError, match="no sound track"):
        decode_audio(make_video(seconds=1), max_seconds=10)


def test_long_container_is_refused_before_decoding() -> None:
    with pytest.raises(AudioTooLongError):
        decode_audio(make_av_media("mp4", "aac", seconds=6.0, rate=8000), max_seconds=5)


def test_truncated_wav_header() -> None:
    data = _encode(_tone(440, 1.0, 16000), 16000, "WAV", "PCM_16")
    with pytest.raises(AudioDecodeError, match="WAV"):
        decode_audio(data[:30], max_seconds=10)


def test_wav_with_header_but_no_samples() -> None:
    data = _encode(_tone(440, 1.0, 16000), 16000, "WAV", "PCM_16")
    with pytest.raises(AudioDecodeError):
        decode_audio(data[:44], max_seconds=10)


def test_wav_cut_mid_data_decodes_what_is_there() -> None:
    data = _encode(_tone(440, 1.0, 16000), 16000, "WAV", "PCM_16")
    audio = decode_audio(data[: 44 + 2 * 8000], max_seconds=10)
    assert audio.duration_s == pytest.approx(0.5)


def test_too_long() -> None:
    data = _encode(_tone(440, 3.0, 8000), 8000, "WAV", "PCM_16")
    with pytest.raises(AudioTooLongError, match="3.0 s long, over the limit of 2.5 s") as info:
        decode_audio(data, max_seconds=2.5)
    assert isinstance(info.value, AudioDecodeError) and info.value.duration_s == pytest.approx(3.0)
    assert decode_audio(data, max_seconds=3.0).duration_s == pytest.approx(3.0)


def test_too_long_mp3() -> None:
    data = _encode(_tone(440, 3.0, 16000), 16000, "MP3")
    with pytest.raises(AudioTooLongError):
        decode_audio(data, max_seconds=1.0)
