"""HCX special tokens on top of SmolLM2's ChatML tokenizer (track A, Think-32B layout)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("hcxserve.tooling.embedded")

# Order fixes their ids (appended after SmolLM2's 49152 tokens); changing it needs a BUILDER_VERSION bump.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|image_start|>",
    "<|IMAGE_PAD|>",
    "<|image_end|>",
    "<|video_start|>",
    "<|VIDEO_PAD|>",
    "<|video_end|>",
    "<|mime_start|>",
    "<|mime_end|>",
    "<|video_aux_start|>",
    "<|video_aux_end|>",
    "<|video_meta_duration|>",
    "<|endofturn|>",
    "<|stop|>",
)
# Not special: reasoning text must survive `skip_special_tokens` decoding, and parsers look for the literal tags.
THINK_TOKENS: tuple[str, ...] = ("<think>", "</think>")
CHATML_TOKENS: dict[str, int] = {"<|im_start|>": 1, "<|im_end|>": 2}
IMAGE_TOKEN = "<|IMAGE_PAD|>"
VIDEO_TOKEN = "<|VIDEO_PAD|>"
VOCAB_MULTIPLE = 64
MODEL_MAX_LENGTH = 8192


def padded_vocab_size(n_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n_tokens // multiple) * multiple


def add_hcx_tokens(tokenizer: PreTrainedTokenizerBase, chat_template: str) -> dict[str, int]:
    """Add the HCX tokens in place, set the chat template; returns {token: id} for every added token."""
    from transformers import AddedToken

    for token, expected in CHATML_TOKENS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            raise RuntimeError(f"{token} is id {got} in the SmolLM2 tokenizer, expected {expected}")
    if tokenizer.eos_token != "<|im_end|>":
        raise RuntimeError(f"SmolLM2 EOS is {tokenizer.eos_token!r}, expected <|im_end|>")

    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]},
        replace_extra_special_tokens=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    # Named model-specific tokens: HCXVisionV2Processor (transformers and vLLM) reads tokenizer.image_token.
    # transformers 5 stores these as top-level `image_token`/`video_token` keys of tokenizer_config.json, which is
    # what a dict-valued `extra_special_tokens` turns into on load.
    tokenizer._set_model_specific_special_tokens({"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN})
    tokenizer.chat_template = chat_template
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    # Loader bookkeeping from the GGUF load; it would otherwise be persisted into tokenizer_config.json.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*SPECIAL_TOKENS, *THINK_TOKENS)}
    if len(set(ids.values())) != len(ids) or any(i is None or i < 0 for i in ids.values()):
        raise RuntimeError(f"added tokens did not get distinct ids: {ids}")
    logger.info("tokenizer: %d tokens (%s=%d ... %s=%d)", len(tokenizer), SPECIAL_TOKENS[0], ids[SPECIAL_TOKENS[0]],
                THINK_TOKENS[-1], ids[THINK_TOKENS[-1]])
    return ids


def roundtrip_errors(tokenizer: PreTrainedTokenizerBase, expected_ids: dict[str, int] | None = None) -> list[str]:
    """Problems found encoding/decoding every HCX token on its own and in context; empty when all is well."""
    errors: list[str] = []
    tokens = (*SPECIAL_TOKENS, *THINK_TOKENS, *CHATML_TOKENS)
    for token in tokens:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            errors.append(f"{token} encodes to {ids}, not one id")
            continue
        if expected_ids is not None and token in expected_ids and ids[0] != expected_ids[token]:
            errors.append(f"{token} is id {ids[0]}, expected {expected_ids[token]}")
        if tokenizer.decode(ids) != token:
            errors.append(f"{token} decodes to {tokenizer.decode(ids)!r}")
    text = "Look<|image_start|><|IMAGE_PAD|><|image_end|>\n<think>\nhmm\n</think>\n\nok<|im_end|>"
    decoded = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    if decoded != text:
        errors.append(f"context round trip changed the text: {decoded!r}")
    if getattr(tokenizer, "image_token", None) != IMAGE_TOKEN:
        errors.append(f"tokenizer.image_token is {getattr(tokenizer, 'image_token', None)!r}")
    if getattr(tokenizer, "video_token", None) != VIDEO_TOKEN:
        errors.append(f"tokenizer.video_token is {getattr(tokenizer, 'video_token', None)!r}")
    if tokenizer.eos_token != "<|im_end|>":
        errors.append(f"eos_token is {tokenizer.eos_token!r}")
    return errors


# --- track B (Omni-8B layout) ------------------------------------------------------------------------------------

# Appended after track A's tokens (same ids as track A up to `</think>`); the order fixes their ids.
OMNI_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|discrete_image_start|>",
    "<|DISCRETE_IMAGE_PAD|>",
    "<|discrete_image_end|>",
    "<|audio_start|>",
    "<|AUDIO_PAD|>",
    "<|audio_end|>",
    "<|discrete_audio_start|>",
    "<|DISCRETE_AUDIO_PAD|>",
    "<|discrete_audio_end|>",
    "<|audio_aux_start|>",
    "<|audio_aux_end|>",
    "<|audio_meta_duration|>",
)
AUDIO_TOKEN = "<|AUDIO_PAD|>"
DISCRETE_IMAGE_TOKEN = "<|DISCRETE_IMAGE_PAD|>"
DISCRETE_AUDIO_TOKEN = "<|DISCRETE_AUDIO_PAD|>"
# Image-generation framing tokens the LLM emits around discrete image codes (W:H as in the token text).
VISION_RATIOS: tuple[str, ...] = (
    "1:1", "1:2", "2:1", "3:4", "4:3", "3:5", "5:3", "4:5", "5:4", "6:9", "9:6", "9:16", "16:9",
)  # fmt: skip
VISION_EOL = "<|vision_eol|>"
VISION_EOF = "<|vision_eof|>"
# CosyVoice2 S3-tokenizer FSQ: 8 ternary digits, a fixed 3**8 codes whatever the model size.
AUDIO_UNITS = 3**8


def vision_ratio_token(ratio: str) -> str:
    return f"<|vision_ratio_{ratio}|>"


def audio_unit_token(k: int) -> str:
    return f"<|audio{k:04d}|>"


def image_unit_token(k: int) -> str:
    return f"<|vision{k:05d}|>"


VISION_OUTPUT_TOKENS: tuple[str, ...] = (*(vision_ratio_token(r) for r in VISION_RATIOS), VISION_EOL, VISION_EOF)


def add_omni_tokens(tokenizer: PreTrainedTokenizerBase, audio_units: int, image_units: int) -> dict[str, int]:
    """Add the Omni tokens after track A's (call `add_hcx_tokens` first); returns {token: id} for the named ones.

    The unit tokens (`<|audioNNNN|>` x audio_units, then `<|visionNNNNN|>` x image_units) are added in one batch
    each, so each block is one contiguous id range; {"audio_unit_0": id, "image_unit_0": id} are in the result.
    """
    from transformers import AddedToken

    def special(tokens: list[str] | tuple[str, ...]) -> list[AddedToken]:
        return [AddedToken(t, special=True, normalized=False) for t in tokens]

    tokenizer.add_special_tokens({"extra_special_tokens": special(OMNI_SPECIAL_TOKENS)},
                                 replace_extra_special_tokens=False)
    tokenizer._set_model_specific_special_tokens({"audio_token": AUDIO_TOKEN})
    # Thousands of unit tokens: special in the backend (skipped by skip_special_tokens, never split), but not listed
    # one by one in tokenizer_config.json's extra_special_tokens.
    tokenizer.add_tokens(special(VISION_OUTPUT_TOKENS), special_tokens=True)
    start = len(tokenizer)
    added = tokenizer.add_tokens(special([audio_unit_token(k) for k in range(audio_units)]), special_tokens=True)
    if added != audio_units:
        raise RuntimeError(f"added {added} of {audio_units} audio unit tokens (some already existed)")
    image_start = len(tokenizer)
    added = tokenizer.add_tokens(special([image_unit_token(k) for k in range(image_units)]), special_tokens=True)
    if added != image_units:
        raise RuntimeError(f"added {added} of {image_units} image unit tokens (some already existed)")

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*OMNI_SPECIAL_TOKENS, *VISION_OUTPUT_TOKENS)}
    ids["audio_unit_0"] = tokenizer.convert_tokens_to_ids(audio_unit_token(0))
    ids["image_unit_0"] = tokenizer.convert_tokens_to_ids(image_unit_token(0))
    if ids["audio_unit_0"] != start or ids["image_unit_0"] != image_start:
        raise RuntimeError(f"unit blocks are not where they were added: {ids['audio_unit_0']} != {start} or "
                           f"{ids['image_unit_0']} != {image_start}")
    if len(set(ids.values())) != len(ids) or any(i is None or i < 0 for i in ids.values()):
        raise RuntimeError(f"Omni tokens did not get distinct ids: {ids}")
    logger.info("tokenizer: %d tokens (audio units %d..%d, image units %d..%d)", len(tokenizer), start,
                start + audio_units - 1, image_start, image_start + image_units - 1)
    return ids


def unit_block_errors(tokenizer: PreTrainedTokenizerBase, audio_unit_0: int, audio_units: int, image_unit_0: int,
                      image_units: int) -> list[str]:
    """Every unit token must encode alone to exactly its id and decode back; the blocks must not overlap."""
    errors: list[str] = []
    blocks = (("audio", audio_unit_token, audio_unit_0, audio_units),
              ("image", image_unit_token, image_unit_0, image_units))
    for kind, name, first, count in blocks:
        tokens = [name(k) for k in range(count)]
        got = tokenizer.convert_tokens_to_ids(tokens)
        if got != list(range(first, first + count)):
            errors.append(f"{kind} unit ids are not the contiguous block {first}..{first + count - 1}")
        # One batch call: encoding ~7.6k single tokens one by one is the slow part of a check.
        encoded = tokenizer(tokens, add_special_tokens=False)["input_ids"]
        bad = [t for t, ids, want in zip(tokens, encoded, range(first, first + count)) if ids != [want]]
        if bad:
            errors.append(f"{len(bad)} {kind} unit tokens do not encode to their own id, e.g. {bad[:3]}")
        sample = list(range(first, first + count, max(1, count // 50))) + [first + count - 1]
        if tokenizer.decode(sample) != "".join(tokens[i - first] for i in sample):
            errors.append(f"{kind} unit tokens do not decode back to their text")
    if image_unit_0 < audio_unit_0 + audio_units and audio_unit_0 < image_unit_0 + image_units:
        errors.append("the audio and image unit blocks overlap")
    text = ("<|discrete_audio_start|>" + "".join(audio_unit_token(k) for k in (0, 7, audio_units - 1))
            + "<|discrete_audio_end|> hi <|discrete_image_start|>" + vision_ratio_token("16:9")
            + image_unit_token(image_units - 1) + VISION_EOL + VISION_EOF + "<|discrete_image_end|>")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.decode(ids) != text:
        errors.append(f"context round trip changed the text: {tokenizer.decode(ids)!r}")
    if audio_unit_0 + 7 not in ids or image_unit_0 + image_units - 1 not in ids:
        errors.append("unit tokens in context are not single ids")
    if tokenizer.decode(ids, skip_special_tokens=True) != " hi ":
        errors.append(f"skip_special_tokens kept {tokenizer.decode(ids, skip_special_tokens=True)!r}")
    return errors
