"""The output-format logits processor: which tokens each request may write next, from what it wrote so far, and
which `vllm_xargs` the API server refuses. (Served by real vLLM in tests/e2e/test_track_b.py.)"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from hcxserve.llm.media_format import (
    IMAGE_RATIOS,
    IMAGE_TOKEN_COUNT,
    FormatMasks,
    FormatTokens,
    ImageFormat,
    MediaFormatLogitsProcessor,
    SpeechFormat,
    constrain,
)

# a toy vocabulary: 0-9 text, 10 end of turn, 11/12 audio start/end, 13-20 units, 21/22 image start/end,
# 23-24 ratios, 25-40 image codes, 41-47 other special tokens; 48-49 padding rows of the logits
TOKENS = FormatTokens(
    audio_start=11, audio_end=12, audio_units=range(13, 21), image_start=21, image_end=22, image_ratios=[23, 24],
    image_codes=range(25, 41), special=[10, *range(11, 48)], end_of_turn=[10], size=48,
)  # fmt: skip
VOCAB = 50
MASKS = FormatMasks(TOKENS, VOCAB, torch.device("cpu"))


def allowed(constraint, output_ids: list[int]) -> set[int]:
    """The tokens a request may write next, having written `output_ids` (the constraint follows incrementally)."""
    logits = torch.zeros(VOCAB)
    constrain(logits, constraint, output_ids[constraint.seen :])
    return {i for i in range(VOCAB) if logits[i] != float("-inf")}


TEXT = set(range(10))
UNITS = set(range(13, 21))


def speech(min_units=2, max_units=3, max_text=2) -> SpeechFormat:
    return SpeechFormat(TOKENS, MASKS, min_units=min_units, max_units=max_units, max_text=max_text)


def test_speech_is_text_then_a_bounded_run_of_units_then_the_end():
    constraint = speech()
    assert allowed(constraint, []) == TEXT  # at least one word of transcript
    assert allowed(constraint, [1]) == TEXT | {11}
    assert allowed(constraint, [1, 2]) == {11}  # the transcript's budget is spent
    assert allowed(constraint, [1, 2, 11]) == UNITS
    assert allowed(constraint, [1, 2, 11, 13]) == UNITS
    assert allowed(constraint, [1, 2, 11, 13, 14]) == UNITS | {12}  # the least units reached
    assert allowed(constraint, [1, 2, 11, 13, 14, 15]) == {12}  # the most
    assert allowed(constraint, [1, 2, 11, 13, 14, 15, 12]) == {10}


def test_speech_state_follows_the_output_incrementally_and_from_scratch():
    steps = [[], [3], [3, 11], [3, 11, 13], [3, 11, 13, 20], [3, 11, 13, 20, 12]]
    incremental = speech(min_units=1, max_units=5, max_text=4)
    for output in steps:
        assert allowed(incremental, output) == allowed(speech(min_units=1, max_units=5, max_text=4), output)


def test_an_image_is_start_ratio_729_codes_end():
    constraint = ImageFormat(TOKENS, MASKS)
    codes = set(range(25, 41))
    assert allowed(constraint, []) == {21}
    assert allowed(constraint, [21]) == {23, 24}
    assert allowed(constraint, [21, 23]) == codes
    assert allowed(constraint, [21, 23] + [25] * (IMAGE_TOKEN_COUNT - 1)) == codes
    assert allowed(constraint, [21, 23] + [25] * IMAGE_TOKEN_COUNT) == {22}
    assert allowed(constraint, [21, 23] + [25] * IMAGE_TOKEN_COUNT + [22]) == {10}


def test_padding_rows_and_special_tokens_are_never_text():
    assert not {41, 47, 48, 49} & allowed(speech(), [])


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"hcx_output": "video"}, "hcx_output must be 'speech' or 'image'"),
        ({"hcx_output": "speech", "hcx_max_units": 0}, "hcx_max_units must be an integer in [1, 4096]"),
        ({"hcx_output": "speech", "hcx_min_units": "9"}, "hcx_min_units must be an integer"),
        ({"hcx_output": "speech", "hcx_min_units": 10, "hcx_max_units": 5}, "must not be above hcx_max_units"),
        ({"hcx_output": "speech", "hcx_max_text_tokens": True}, "hcx_max_text_tokens must be an integer"),
    ],
)
def test_bad_parameters_are_refused_in_the_api_server(extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MediaFormatLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


def test_requests_without_the_switch_are_not_touched():
    MediaFormatLogitsProcessor.validate_params(SamplingParams())
    MediaFormatLogitsProcessor.validate_params(SamplingParams(extra_args={"other": 1}))


# ---------------------------------------------------------------------------------------------- in vLLM's runners
def engine_config(tokenizer: Path, vocab: int) -> SimpleNamespace:
    """The parts of vLLM's config the processor reads."""
    model = SimpleNamespace(
        tokenizer=str(tokenizer), trust_remote_code=False, hf_config=SimpleNamespace(eos_token_id=None),
        try_get_generation_config=lambda: {"eos_token_id": [2]}, get_vocab_size=lambda: vocab,
    )  # fmt: skip
    return SimpleNamespace(model_config=model)


@pytest.fixture(scope="module")
def track_b_tokenizer(track_b_model_dir) -> Path:
    return track_b_model_dir / "llm"


def test_the_embedded_track_b_tokenizer_has_every_format_token(track_b_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(track_b_tokenizer)
    tokens = FormatTokens.from_tokenizer(tokenizer, [2])
    assert tokenizer.convert_ids_to_tokens(tokens.audio_units.start) == "<|audio0000|>"
    assert tokenizer.convert_ids_to_tokens(tokens.image_codes.start) == "<|vision00000|>"
    assert len(tokens.audio_units) == 6561 and len(tokens.image_codes) >= 729  # (the embedded codebook is small)
    assert tokenizer.convert_ids_to_tokens(tokens.image_ratios) == [f"<|vision_ratio_{r}|>" for r in IMAGE_RATIOS]
    assert {tokens.audio_start, tokens.audio_end, *tokens.audio_units} <= set(tokens.special)
    assert tokens.size == len(tokenizer)


def test_an_engine_without_media_tokens_constrains_nothing(track_a_model_dir):
    processor = MediaFormatLogitsProcessor(engine_config(track_a_model_dir / "llm", 1000), torch.device("cpu"), False)
    assert processor.tokens is None
    assert not processor.add_request(0, SamplingParams(extra_args={"hcx_output": "speech"}))


def test_the_v1_runner_keeps_requests_by_batch_index(track_b_tokenizer):
    vocab = 57000
    processor = MediaFormatLogitsProcessor(engine_config(track_b_tokenizer, vocab), torch.device("cpu"), False)
    image, plain = SamplingParams(extra_args={"hcx_output": "image"}), SamplingParams()
    outputs = [[], []]
    processor.update_state(BatchUpdate(2, removed=[], added=[(0, plain, [1], outputs[0]), (1, image, [1], outputs[1])],
                                       moved=[]))  # fmt: skip
    logits = torch.zeros(2, vocab)
    processor.apply(logits)
    assert (logits[0] == 0).all()  # not asked: untouched
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [processor.tokens.image_start]
    outputs[1].append(processor.tokens.image_start)  # vLLM appends to the live list
    processor.update_state(BatchUpdate(2, removed=[], added=[], moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    logits = torch.zeros(1, vocab)
    processor.apply(logits)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == processor.tokens.image_ratios


def test_the_v2_runner_keeps_requests_by_slot_and_reads_its_token_buffer(track_b_tokenizer):
    vocab = 57000
    tokens_buffer = torch.zeros(8, 16, dtype=torch.int32)
    states = SimpleNamespace(
        device=torch.device("cpu"), prompt_len=SimpleNamespace(np=np.full(8, 3)),
        total_len=SimpleNamespace(gpu=torch.full((8,), 3, dtype=torch.int32)),
        all_token_ids=SimpleNamespace(gpu=tokens_buffer),
    )  # fmt: skip
    processor = MediaFormatLogitsProcessor(engine_config(track_b_tokenizer, vocab), states)
    speech = SamplingParams(extra_args={"hcx_output": "speech", "hcx_max_text_tokens": 1})
    assert processor.add_request(5, speech) and not processor.add_request(2, SamplingParams())
    ctx = SimpleNamespace(expanded_idx_mapping=torch.tensor([2, 5]))
    logits = torch.zeros(2, vocab)
    processor.apply(logits, ctx)
    assert (logits[0] == 0).all() and torch.isfinite(logits[1]).sum() > 1000  # slot 5: any text
    tokens_buffer[5, 3] = 42  # slot 5 wrote one word: its transcript budget is spent
    states.total_len.gpu[5] = 4
    logits = torch.zeros(2, vocab)
    processor.apply(logits, ctx)
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [processor.tokens.audio_start]
    assert not processor.add_request(5, SamplingParams())  # the slot's next occupant is not constrained
    logits = torch.zeros(2, vocab)
    processor.apply(logits, ctx)
    assert (logits == 0).all()
