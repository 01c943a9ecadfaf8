"""HCX special tokens on top of SmolLM2's ChatML tokenizer (track A, Think-32B layout)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("hcxserve.embedded")

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
