"""Embedded track B checkpoint (Omni-8B layout): token blocks, config ids, parity, conversion, component loading.

The module fixture loads SmolLM2 once (~30 s on 2 cores; cached by the track A tests' first run), writes one
unified checkpoint (decoders included) and converts it with `--track b` into llm/ ve/ ae/ vd/ ad/ in a temporary
folder.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from embedded_fixtures import track_fixtures  # noqa: E402

from hcxserve.tooling.embedded import common  # noqa: E402
from hcxserve.tooling.embedded.checks import PARITY_PROMPT, check_mapping_parity, sample_answer  # noqa: E402
from hcxserve.tooling.embedded.checks_b import check_track_b_checkpoint, new_token_mass  # noqa: E402
from hcxserve.tooling.embedded.tokenizer import (  # noqa: E402
    OMNI_SPECIAL_TOKENS,
    VISION_OUTPUT_TOKENS,
    audio_unit_token,
    image_unit_token,
    unit_block_errors,
)
from hcxserve.tooling.embedded.track_b import (  # noqa: E402
    CONFIG_TOKEN_IDS,
    TrackBParts,
    build_identity,
    prepare_track_b,
    write_decoders,
    write_track_b,
)
from hcxserve.tooling.embedded.unit_vocoder import SPEAKERS  # noqa: E402

TRACK_A_IDS = {"<|image_start|>": 49152, "<|IMAGE_PAD|>": 49153, "<|VIDEO_PAD|>": 49156, "<|endofturn|>": 49163,
               "<think>": 49165, "</think>": 49166}
BASE_VOCAB = 49152
AUDIO_UNITS = 6561

parts, checkpoint, saved_tokenizer = track_fixtures(prepare_track_b, write_track_b, build_identity, "track_b")


@pytest.fixture(scope="module")
def converted(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hcxserve.convert import convert

    out = tmp_path_factory.mktemp("track_b_components") / "out"
    convert(checkpoint, out, track="b", verify=True)
    return out


@pytest.fixture(scope="module")
def config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


# --- language model -------------------------------------------------------------------------------------------


def test_text_logits_match_smollm2(parts: TrackBParts) -> None:
    result = check_mapping_parity(parts.llama, parts.language_model, parts.tokenizer, raise_on_failure=False)
    assert result.max_abs_diff <= 1e-4 and result.argmax_equal
    assert result.compared_vocab == BASE_VOCAB
    # ~7.6k added rows must not soak up probability when sampling.
    assert new_token_mass(parts.language_model, parts.tokenizer) < 0.01
    assert sample_answer(parts.language_model, parts.tokenizer, max_new_tokens=12, raise_on_failure=False,
                         skip_reasoning=True).strip()


def test_unit_rows(parts: TrackBParts) -> None:
    lm = parts.language_model
    embed, head = lm.model.embed_tokens.weight, lm.lm_head.weight
    audio0, image0 = parts.token_ids["audio_unit_0"], parts.token_ids["image_unit_0"]
    # Distinct input rows per code (the LM can tell codes apart); output rows stay at the mean (no bias to emit).
    assert (embed[audio0] - embed[audio0 + 1]).abs().max() > 1e-3
    assert (embed[image0] - embed[image0 + 1]).abs().max() > 1e-3
    assert (head[BASE_VOCAB:] - head[:BASE_VOCAB].mean(0)).abs().max() < 1e-6
    assert lm.lm_head.weight.data_ptr() != embed.data_ptr()


# --- tokens and config ids ------------------------------------------------------------------------------------------


def test_token_layout(parts: TrackBParts, config: dict) -> None:
    ids = parts.token_ids
    assert {k: ids[k] for k in TRACK_A_IDS} == TRACK_A_IDS  # track A's ids are kept
    named = [ids[t] for t in (*OMNI_SPECIAL_TOKENS, *VISION_OUTPUT_TOKENS)]
    assert named == list(range(49167, 49167 + len(named)))
    image_units = config["discrete_vision_config"]["codebook_size"]
    assert image_units == 1024
    audio0, image0 = ids["audio_unit_0"], ids["image_unit_0"]
    assert audio0 == named[-1] + 1 and image0 == audio0 + AUDIO_UNITS
    assert len(parts.tokenizer) == image0 + image_units
    vocab = config["text_config"]["vocab_size"]
    assert vocab % 64 == 0 and image0 + image_units <= vocab < image0 + image_units + 64
    assert (config["discrete_audio_unit_0_id"], config["discrete_image_unit_0_id"]) == (audio0, image0)


def test_config_json(config: dict, saved_tokenizer) -> None:
    assert config["architectures"] == ["HCXVisionForCausalLM"] and config["model_type"] == "vlm"
    assert config["mm_projector_type"] == "linear" and config["audio_projector_type"] == "mlp"
    assert config["llm_hidden_size"] == config["text_config"]["hidden_size"] == 576
    assert config["text_config"]["model_type"] == "hyperclovax"
    assert config["vision_config"]["out_hidden_size"] == 576
    assert config["discrete_vision_config"]["model_type"] == "ta_tok"
    assert config["discrete_audio_config"]["model_type"] == "cosyvoice2"
    assert config["audio_config"]["num_mel_bins"] == 128
    for key, token in CONFIG_TOKEN_IDS.items():
        assert config[key] == saved_tokenizer.convert_tokens_to_ids(token), key
    assert config["img_start_id"] == config["image_token_id"] == saved_tokenizer.convert_tokens_to_ids("<|IMAGE_PAD|>")
    ratios = config["discrete_image_ratio_token_ids"]
    assert len(ratios) == 13 and ratios["16:9"] == saved_tokenizer.convert_tokens_to_ids("<|vision_ratio_16:9|>")


def test_saved_tokenizer_unit_blocks(saved_tokenizer, config: dict, checkpoint: Path) -> None:
    import time

    from transformers import AutoTokenizer

    assert unit_block_errors(saved_tokenizer, config["discrete_audio_unit_0_id"], AUDIO_UNITS,
                             config["discrete_image_unit_0_id"], 1024) == []
    assert saved_tokenizer.encode(audio_unit_token(6560), add_special_tokens=False) == [
        config["discrete_audio_unit_0_id"] + 6560]
    assert saved_tokenizer.encode(image_unit_token(1023), add_special_tokens=False) == [
        config["discrete_image_unit_0_id"] + 1023]
    assert saved_tokenizer.audio_token == "<|AUDIO_PAD|>" and saved_tokenizer.image_token == "<|IMAGE_PAD|>"
    start = time.monotonic()
    AutoTokenizer.from_pretrained(str(checkpoint))
    assert time.monotonic() - start < 3.0  # ~0.4 s; thousands of added tokens must not make loading slow


def test_checkpoint_reload_checks(checkpoint: Path, parts: TrackBParts) -> None:
    report = check_track_b_checkpoint(checkpoint, parts, raise_on_failure=False)
    assert report["errors"] == []
    assert report["image_tokens"] <= 256
    assert report["speakers"] == list(SPEAKERS)


def test_chat_template_is_the_repo_template(checkpoint: Path, saved_tokenizer) -> None:
    repo = common.TRACK_B_CHAT_TEMPLATE.read_text(encoding="utf-8")
    assert (checkpoint / "chat_template.jinja").read_text(encoding="utf-8") == repo
    assert saved_tokenizer.chat_template == repo


def test_checkpoint_files_and_prefixes(checkpoint: Path) -> None:
    names = {p.name for p in checkpoint.iterdir()}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "preprocessor_config.json", "video_preprocessor_config.json", common.MARKER_NAME} <= names
    weights = set(json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"])
    roles = ("model.language_model.", "model.vision_model.", "model.mm_projector.", "model.discrete_vision_model.",
             "model.audio_model.", "model.audio_projector.", "model.discrete_audio_model.",
             "model.video_audio_compressor.")
    assert all(n.startswith(roles) for n in weights)
    assert all(any(n.startswith(r) for n in weights) for r in roles)


def test_checkpoint_holds_the_decoders_in_the_real_layout(checkpoint: Path, tmp_path: Path) -> None:
    import zipfile

    vision = checkpoint / "decoder" / "vision"
    assert sorted(p.name for p in vision.iterdir()) == ["model_index.json", "scheduler", "token_embedder",
                                                       "transformer", "transformer2", "vae"]
    assert json.loads((vision / "model_index.json").read_text())["_class_name"] == "VisionTokenToImagePipeline"
    audio = checkpoint / "decoder" / "audio"
    assert sorted(p.name for p in audio.iterdir()) == ["NCCosybigvganDecoder.mar", "NCZSCosybigvganDecoder.mar"]
    for archive, speakers in (("NCCosybigvganDecoder.mar", True), ("NCZSCosybigvganDecoder.mar", False)):
        with zipfile.ZipFile(audio / archive) as z:
            names = set(z.namelist())
            config = json.loads(z.read("config.json"))
        assert {"MAR-INF/MANIFEST.json", "config.json", "generator.pt"} <= names
        assert ("spk_list.txt" in names) == speakers == config["finetune"]
        assert config["num_units"] == AUDIO_UNITS and math.prod(config["upsample_rates"]) == 960
    # Seeded: writing the decoders again gives the same bytes.
    write_decoders(tmp_path)
    files = sorted(p.relative_to(checkpoint) for p in (checkpoint / "decoder").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in (tmp_path / "decoder").rglob("*") if p.is_file())
    assert all((checkpoint / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)


def test_cli_reports_up_to_date(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hcxserve.tooling.embedded.__main__ import main

    assert main(["--track", "b", "--output", str(checkpoint), "-q"]) == 0
    assert "up to date" in capsys.readouterr().out


# --- converted components ---------------------------------------------------------------------------------------


def test_conversion_layout(converted: Path, config: dict) -> None:
    assert sorted(p.name for p in converted.iterdir() if p.is_dir()) == ["ad", "ae", "llm", "vd", "ve"]
    llm = json.loads((converted / "llm" / "config.json").read_text())
    assert llm["architectures"] == ["HyperCLOVAXForCausalLM"] and llm["vocab_size"] == config["text_config"][
        "vocab_size"]
    ve = json.loads((converted / "ve" / "config.json").read_text())
    assert ve["projector"] == {"in_features": 576, "out_features": 576}
    assert ve["image_token_id"] == config["image_token_id"]
    assert (converted / "ae" / "preprocessor_config.json").is_file()
    assert (converted / "llm" / "tokenizer.json").is_file() and (converted / "llm" / "chat_template.jinja").is_file()


def test_converted_llm_matches_smollm2(converted: Path, parts: TrackBParts) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(converted / "llm"), dtype=torch.float32).eval()
    ids = torch.tensor([parts.tokenizer.encode(PARITY_PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        got = lm(input_ids=ids).logits[0, -1]
        ref = parts.llama(input_ids=ids).logits[0, -1]
    assert int(got.argmax()) == int(ref.argmax())  # bf16 weights: same answer, logits within bf16 noise
    assert float((got[:BASE_VOCAB] - ref).abs().max()) < 0.5


def test_ta_tok_codes_land_in_the_image_block(converted: Path, config: dict, saved_tokenizer) -> None:
    from PIL import Image

    from hcxserve.models.ta_tok import TATokEncoder

    encoder = TATokEncoder.from_pretrained(converted / "ve")
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((60, 80, 3)) * 255).astype("uint8")), Image.new("RGB", (30, 40), "red")]
    codes = encoder.encode(images)
    assert codes.shape == (2, config["discrete_vision_config"]["bottleneck_token_num"])
    size = config["discrete_vision_config"]["codebook_size"]
    assert 0 <= int(codes.min()) and int(codes.max()) < size
    token_ids = (codes + config["discrete_image_unit_0_id"]).flatten().tolist()
    assert max(token_ids) < config["text_config"]["vocab_size"]
    text = saved_tokenizer.decode(token_ids)
    assert text == "".join(image_unit_token(int(c)) for c in codes.flatten())


def test_audio_codes_land_in_the_audio_block(converted: Path, config: dict, saved_tokenizer) -> None:
    from hcxserve.models.audio_encoder import AudioEncoderModel

    model = AudioEncoderModel.from_pretrained(converted / "ae")
    tone = (0.3 * np.sin(np.arange(32000) / 16000 * 2 * np.pi * 440)).astype(np.float32)
    (encoding,) = model.encode([tone])
    assert encoding.continuous.shape[1] == config["llm_hidden_size"]
    codes = encoding.discrete
    assert codes.numel() > 0 and 0 <= int(codes.min()) and int(codes.max()) < AUDIO_UNITS
    token_ids = (codes + config["discrete_audio_unit_0_id"]).tolist()
    assert max(token_ids) < config["discrete_image_unit_0_id"]  # inside the audio block
    assert saved_tokenizer.decode(token_ids) == "".join(audio_unit_token(int(c)) for c in codes)


def test_converted_vision_decoder_draws_from_the_llm_codes(converted: Path, config: dict) -> None:
    from hcxserve.models.vision_decoder import VisionDecoder

    decoder = VisionDecoder.from_pretrained(converted / "vd", device="cpu", dtype="float32")
    assert decoder.codebook_size == config["discrete_vision_config"]["codebook_size"]  # the LLM's image unit block
    assert decoder.token_count == 729 and decoder.has_autoguidance
    codes = np.random.default_rng(0).integers(0, decoder.codebook_size, 729).tolist()
    first, again = (decoder.generate([codes], (64, 48), steps=2, seeds=[7])[0] for _ in range(2))
    assert first.size == (64, 48) and np.array_equal(np.asarray(first), np.asarray(again))
    assert np.asarray(first).std() > 0


def test_converted_audio_decoders_speak_the_llm_units(converted: Path) -> None:
    import torch

    from hcxserve.models.unit_vocoder import SAMPLES_PER_UNIT, UnitVocoder

    assert sorted(p.name for p in (converted / "ad").iterdir()) == ["finetuned", "zeroshot"]
    assert sorted(p.name for p in (converted / "ad" / "finetuned").iterdir()) == ["config.json", "model.safetensors",
                                                                                  "spk_list.txt"]
    units = torch.tensor([[0, 1, 6560, 42, 3000]])
    finetuned = UnitVocoder.from_pretrained(converted / "ad" / "finetuned")
    assert finetuned.speakers == list(SPEAKERS) and finetuned.default_speaker == "fkms"
    assert finetuned.config.num_units == AUDIO_UNITS
    voices = [finetuned(units, finetuned.speaker_embedding(name)) for name in ("fkms", "mhwj")]
    assert all(v.shape == (1, 5 * SAMPLES_PER_UNIT) for v in voices)
    assert 0.01 < float(voices[0].std()) and float(voices[0].abs().max()) < 1.0  # audible, not clipped
    assert not torch.equal(voices[0], voices[1])  # each speaker has its own voice
    zeroshot = UnitVocoder.from_pretrained(converted / "ad" / "zeroshot")
    assert not zeroshot.config.finetune and zeroshot.config.num_units == AUDIO_UNITS
    clip = (0.3 * np.sin(np.arange(24000) / 24000 * 2 * np.pi * 220)).astype(np.float32)
    wave = zeroshot(units, zeroshot.speaker_embedding(reference=clip, sample_rate=24000))
    assert wave.shape == (1, 5 * SAMPLES_PER_UNIT) and bool(torch.isfinite(wave).all())
