"""Track B's audio encoder on a tiny random checkpoint written as a converted ae/ folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hcxserve.convert.errors import ComponentError
from hcxserve.convert.tables import WHISPER_PREPROCESSOR
from hcxserve.models.audio_encoder import AudioEncoderModel, output_lengths, tiny_components
from hcxserve.models.s3_tokenizer import (
    S3Tokenizer,
    S3TokenizerConfig,
    fsq_indices,
    log_mel_spectrogram,
    slaney_mel_filters,
)

RATE = 16000
LLM_HIDDEN = 48
PREPROCESSOR = WHISPER_PREPROCESSOR  # what the converter writes into ae/


def write_ae(folder: Path, *, drop: str | None = None, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """An ae/ folder as the converter writes it: unified names minus the leading `model.`."""
    config, tensors = tiny_components(seed=0, llm_hidden_size=LLM_HIDDEN)
    weights = {name.removeprefix("model."): t.contiguous() for name, t in tensors.items() if name != drop}
    weights.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config, "text_hidden_size": LLM_HIDDEN}))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return folder


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ae(tmp_path_factory.mktemp("ae"))


@pytest.fixture(scope="module")
def model(ae_dir: Path) -> AudioEncoderModel:
    return AudioEncoderModel.from_pretrained(ae_dir)


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(np.float32)


def test_two_seconds_give_50_rows_and_50_units(model: AudioEncoderModel) -> None:
    (enc,) = model.encode([tone(2.0)])
    assert enc.continuous.shape == (50, LLM_HIDDEN)
    assert enc.continuous.dtype == torch.float32
    assert enc.discrete.shape == (50,) and enc.discrete.dtype == torch.int64
    assert 0 <= int(enc.discrete.min()) and int(enc.discrete.max()) < 3**8
    assert enc.duration_s == pytest.approx(2.0)
    assert torch.isfinite(enc.continuous).all()


def test_forty_seconds_span_two_chunks(model: AudioEncoderModel) -> None:
    (enc,) = model.encode([noise(40.0)])
    assert enc.continuous.shape == (750 + 250, LLM_HIDDEN)  # a full 30-s chunk, then 10 s
    assert model.config.rows_for_samples(40 * RATE) == 1000
    assert enc.discrete.shape == (1000,)


def test_output_lengths_match_transformers(model: AudioEncoderModel) -> None:
    frames = torch.tensor([1, 2, 3, 4, 5, 199, 200, 201, 1000, 2999, 3000])
    _, expected = model.encoder._get_feat_extract_output_lengths(frames)
    assert torch.equal(output_lengths(frames), expected)
    assert model.config.rows_for_samples(2 * RATE) == 50


def test_batch_equals_one_by_one(model: AudioEncoderModel) -> None:
    clips = [tone(2.0), noise(33.0, seed=1), tone(0.51, freq=1000), noise(3.3, seed=2)]
    batch = model.encode(clips)
    for clip, together in zip(clips, batch):
        (alone,) = model.encode([clip])
        torch.testing.assert_close(together.continuous, alone.continuous, atol=1e-5, rtol=1e-5)
        assert torch.equal(together.discrete, alone.discrete)
        assert together.duration_s == alone.duration_s


def test_deterministic(model: AudioEncoderModel) -> None:
    first, second = model.encode([noise(1.5)]), model.encode([noise(1.5)])
    assert torch.equal(first[0].continuous, second[0].continuous)
    assert torch.equal(first[0].discrete, second[0].discrete)
    config_a, tensors_a = tiny_components(seed=3)
    config_b, tensors_b = tiny_components(seed=3)
    assert config_a == config_b and tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    _, tensors_c = tiny_components(seed=4)
    assert not torch.equal(
        tensors_a["model.audio_projector.fc1.weight"], tensors_c["model.audio_projector.fc1.weight"]
    )


def test_codes_vary_with_the_input(model: AudioEncoderModel) -> None:
    a, b = model.encode([noise(2.0, seed=5), tone(2.0, freq=220)])
    assert len(set(a.discrete.tolist())) > 5
    assert not torch.equal(a.discrete, b.discrete)


def test_tiny_components_use_the_unified_names() -> None:
    config, tensors = tiny_components()
    assert {name.split(".")[1] for name in tensors} == {"audio_model", "audio_projector", "discrete_audio_model"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["model.audio_projector.fc2.weight"].shape == (576, 32)
    assert tensors["model.discrete_audio_model.quantizer._codebook.project_down.weight"].shape == (8, 64)
    assert "model.discrete_audio_model.encoder.blocks.0.attn.fsmn_block.weight" in tensors
    assert "model.discrete_audio_model.encoder.blocks.0.attn.key.bias" not in tensors
    assert config["audio_config"]["model_type"] == "qwen2_audio_encoder"
    assert config["discrete_audio_config"]["n_audio_state"] // config["discrete_audio_config"]["n_audio_head"] == 64


def test_padding_is_masked_and_attention_backends_agree(model: AudioEncoderModel, ae_dir: Path) -> None:
    clip = noise(2.0, seed=6)
    (sdpa,) = model.encode([clip])
    (eager,) = AudioEncoderModel.from_pretrained(ae_dir, attn_implementation="eager").encode([clip])
    torch.testing.assert_close(sdpa.continuous, eager.continuous, atol=1e-5, rtol=1e-5)
    # without the mask the 28 s of padding would change the rows of the 2 s of audio
    features = model.feature_extractor([clip], sampling_rate=RATE, padding="max_length", return_tensors="pt")
    unmasked = model.encoder(features["input_features"]).last_hidden_state[0, :50]
    assert not torch.allclose(model.projector(unmasked), sdpa.continuous, atol=1e-3)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def attention_model(request: pytest.FixtureRequest, model: AudioEncoderModel, ae_dir: Path) -> AudioEncoderModel:
    return model if request.param == "sdpa" else AudioEncoderModel.from_pretrained(ae_dir, attn_implementation="eager")


def padded_reference(model: AudioEncoderModel, clips: list[np.ndarray]) -> list[torch.Tensor]:
    """OmniServe's computation: HF's forward on every chunk padded to 3000 mel frames, padded keys masked."""
    from transformers.masking_utils import create_bidirectional_mask

    step, positions = model.config.chunk_samples, model.config.max_source_positions
    chunks = [clip[i : i + step] for clip in clips for i in range(0, clip.shape[0], step)]
    features = model.feature_extractor(
        chunks, sampling_rate=RATE, padding="max_length", return_attention_mask=True, return_tensors="pt"
    )
    frames = features["attention_mask"].sum(-1)
    valid = torch.arange(positions)[None, :] < ((frames - 1) // 2 + 1)[:, None]
    mask = create_bidirectional_mask(
        config=model.encoder.config, inputs_embeds=torch.zeros(len(chunks), positions, 1), attention_mask=valid
    )
    with torch.inference_mode():
        hidden = model.encoder(features["input_features"], attention_mask=mask).last_hidden_state
        rows = output_lengths(frames).tolist()
        per_chunk = model.projector(torch.cat([hidden[i, :n] for i, n in enumerate(rows)])).split(rows)
    counts = [-(-clip.shape[0] // step) for clip in clips]
    bounds = np.cumsum([0, *counts])
    return [torch.cat(per_chunk[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def test_trimmed_encoder_equals_the_padded_forward(attention_model: AudioEncoderModel) -> None:
    # 0.51 s has an odd number of mel frames (51): its last position reads two padded frames; 40 s is 30 s + 10 s
    clips = [noise(0.5, seed=9), tone(3.0), noise(29.9, seed=10), noise(40.0, seed=11), tone(0.51, freq=880)]
    frames_seen = []
    hook = attention_model.encoder.conv1.register_forward_hook(lambda _m, args, _o: frames_seen.append(args[0].shape))
    try:
        with torch.inference_mode():
            together = attention_model._continuous(clips)
            alone = [attention_model._continuous([clip])[0] for clip in clips]
    finally:
        hook.remove()
    for clip, batched, single, expected in zip(clips, together, alone, padded_reference(attention_model, clips)):
        assert batched.shape == (attention_model.config.rows_for_samples(clip.shape[0]), LLM_HIDDEN)
        torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single, expected, atol=1e-5, rtol=1e-5)
    # The batch holds a full 30-s chunk, so it runs on all 3000 frames; alone, each clip stops two frames past its
    # audio's last conv2 position (3 s: 300 frames, 150 positions -> 302 frames)
    assert [shape[-1] for shape in frames_seen] == [3000, 52, 302, 2992, 3000, 54]
    assert frames_seen[0][0] == 6


def test_mel_matches_the_whisper_feature_extractor(model: AudioEncoderModel) -> None:
    from transformers.audio_utils import mel_filter_bank

    reference = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=128,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=RATE,
        norm="slaney",
        mel_scale="slaney",
    ).T
    filters = slaney_mel_filters(RATE, 400, 128)
    np.testing.assert_allclose(filters, reference, atol=1e-7)
    # For exactly 30 s there is no padding, so Whisper's features and the S3 tokenizer's log-mel are the same thing
    clip = noise(30.0, seed=7) + tone(30.0)
    whisper = model.feature_extractor([clip], sampling_rate=RATE, return_tensors="pt")["input_features"][0]
    ours = log_mel_spectrogram(torch.from_numpy(clip), torch.from_numpy(filters), n_fft=400, hop_length=160)
    assert ours.shape == (128, 3000)
    torch.testing.assert_close(ours, whisper, atol=1e-4, rtol=1e-4)


def test_fsq_index_math() -> None:
    # tanh then x0.999 then round: +9 -> +1, -9 -> -1, 0, +-0.3 -> 0, 0.6 -> tanh 0.537 -> +1, -0.6 -> -1, 5 -> +1
    projected = torch.tensor([[9.0, -9.0, 0.0, 0.3, -0.3, 0.6, -0.6, 5.0]])
    # digits (value + 1): 2, 0, 1, 1, 1, 2, 0, 2 with weights 3**0 .. 3**7
    assert fsq_indices(projected).tolist() == [2 + 0 + 9 + 27 + 81 + 2 * 243 + 0 + 2 * 2187]
    assert fsq_indices(torch.full((1, 8), -50.0)).tolist() == [0]
    assert fsq_indices(torch.full((1, 8), 50.0)).tolist() == [3**8 - 1]


def test_s3_config_from_dict() -> None:
    assert S3TokenizerConfig.from_dict(None) == S3TokenizerConfig()
    config = S3TokenizerConfig.from_dict({"model_type": "cosyvoice2", "n_audio_state": 128, "n_audio_head": 2})
    assert (config.n_audio_state, config.n_audio_head, config.n_audio_layer) == (128, 2, 6)
    assert config.tokens_per_second == 25
    with pytest.raises(ValueError, match="must be 64"):
        S3TokenizerConfig(n_audio_state=64, n_audio_head=2)
    with pytest.raises(ValueError, match="6561"):
        S3TokenizerConfig(n_codebook_size=4096)


def test_long_audio_is_tokenized_in_80_second_pieces(model: AudioEncoderModel) -> None:
    tokenizer: S3Tokenizer = model.tokenizer
    clip = noise(85.0, seed=8)
    (codes,) = tokenizer.tokenize([clip])
    assert codes.shape == (2000 + 125,)
    (head,) = tokenizer.tokenize([clip[: 80 * RATE]])
    (tail,) = tokenizer.tokenize([clip[80 * RATE :]])
    assert torch.equal(codes, torch.cat([head, tail]))


def test_tiny_clips(model: AudioEncoderModel) -> None:
    short, shorter = model.encode([np.full(170, 0.1, np.float32), np.full(50, 0.1, np.float32)])
    assert short.discrete.shape == (1,) and shorter.discrete.shape == (0,)
    with pytest.raises(ValueError, match="non-empty"):
        model.encode([np.zeros(0, np.float32)])


def test_missing_weight_is_a_clear_error(tmp_path: Path) -> None:
    name = "model.discrete_audio_model.encoder.blocks.0.attn.key.weight"
    folder = write_ae(tmp_path / "ae", drop=name)
    with pytest.raises(ComponentError, match=r"missing: encoder\.blocks\.0\.attn\.key\.weight"):
        AudioEncoderModel.from_pretrained(folder)


def test_missing_projector_is_a_clear_error(tmp_path: Path) -> None:
    folder = write_ae(tmp_path / "ae", drop="model.audio_projector.fc2.weight")
    with pytest.raises(ComponentError, match="audio_projector"):
        AudioEncoderModel.from_pretrained(folder)


def test_video_sound_tracks_go_through_the_compressor(tmp_path: Path) -> None:
    from hcxserve.models import mambamia

    entries, tensors = mambamia.tiny_components(seed=0, llm_hidden_size=LLM_HIDDEN)
    folder = write_ae(tmp_path / "ae", extra={name.removeprefix("model."): t for name, t in tensors.items()})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **entries}))
    model = AudioEncoderModel.from_pretrained(folder)
    assert model.compressor is not None
    clip = noise(2.0)
    plain, video = model.encode([clip, clip], from_video=[False, True])
    assert plain.continuous.shape == (50, LLM_HIDDEN)
    assert video.continuous.shape == (2, LLM_HIDDEN)  # one row per second of sound track
    assert torch.allclose(video.continuous, model.compressor(plain.continuous), atol=1e-5)
    assert torch.equal(plain.discrete, video.discrete)  # the codes are not compressed
    assert model.encode([clip])[0].continuous.shape == (50, LLM_HIDDEN)  # no flags: audio files


def test_no_compressor_without_its_weights(model: AudioEncoderModel) -> None:
    assert model.compressor is None
    assert model.encode([tone(1.0)], from_video=[True])[0].continuous.shape == (25, LLM_HIDDEN)
