"""Where the Omni LLM's modalities sit in its vocabulary: the tokens the chat template writes for each item, and the
contiguous blocks of unit tokens (`<|audioNNNN|>`, `<|visionNNNNN|>`) whose ids are `unit_0 + code`. Read from the
tokenizer, never hard-coded (they differ per checkpoint); shared by the model (`hcxserve.llm.omni`, input side) and
the output-format logits processor (`hcxserve.llm.media_format`), without vLLM's model machinery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    """How one modality's item appears in the prompt and in the request."""

    name: str
    embeds_key: str
    embed_token: str  # the continuous slot, repeated once per row
    grid_key: str | None = None  # the ViT patch grid, sent by the gateway for both tracks' LLMs (not needed here)
    codes_key: str | None = None  # discrete codes, if the modality has them
    code_pad: str | None = None  # placeholder the codes replace
    code_end: str | None = None
    slot_start: str | None = None
    unit_pattern: str | None = None  # the unit tokens' spelling; their ids must be contiguous


MODALITIES: dict[str, Modality] = {
    "image": Modality(
        "image",
        "image_embeds",
        "<|IMAGE_PAD|>",
        grid_key="image_grid_thw",
        codes_key="discrete_image_codes",
        code_pad="<|DISCRETE_IMAGE_PAD|>",
        code_end="<|discrete_image_end|>",
        slot_start="<|image_start|>",
        unit_pattern=r"<\|vision(\d{5})\|>",
    ),
    "video": Modality("video", "video_embeds", "<|VIDEO_PAD|>", grid_key="video_grid_thw"),
    "audio": Modality(
        "audio",
        "audio_embeds",
        "<|AUDIO_PAD|>",
        codes_key="discrete_audio_codes",
        code_pad="<|DISCRETE_AUDIO_PAD|>",
        code_end="<|discrete_audio_end|>",
        slot_start="<|audio_start|>",
        unit_pattern=r"<\|audio(\d{4})\|>",
    ),
}


@dataclass(frozen=True)
class ModalityTokens:
    """Token ids of one modality, read from the tokenizer (never hard-coded: they differ per checkpoint)."""

    target: list[int]  # the run the template writes, replaced per item
    embed_id: int
    bridge: list[int]  # what stays between the codes and the slots (code end, newline, slot start)
    unit_0: int | None
    codebook_size: int


def token_id(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer has no single token for {token!r}: not an Omni checkpoint?")
    return ids[0]


def unit_block(tokenizer, pattern: str) -> tuple[int, int]:
    """(id of unit 0, number of units); the ids must form one contiguous block for `unit_0 + code` to hold."""
    regex = re.compile(pattern)
    units = {int(m.group(1)): i for tok, i in tokenizer.get_vocab().items() if (m := regex.fullmatch(tok))}
    if not units or 0 not in units:
        raise ValueError(f"the tokenizer has no unit tokens matching {pattern}")
    size = len(units)
    unit_0 = units[0]
    if any(units.get(k) != unit_0 + k for k in range(size)):
        raise ValueError(f"unit tokens {pattern} do not have contiguous ids")
    return unit_0, size


def modality_tokens(tokenizer, modality: Modality) -> ModalityTokens:
    embed_id = token_id(tokenizer, modality.embed_token)
    if modality.codes_key is None:
        return ModalityTokens([embed_id], embed_id, [], None, 0)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    bridge = [token_id(tokenizer, modality.code_end), *newline, token_id(tokenizer, modality.slot_start)]
    unit_0, size = unit_block(tokenizer, modality.unit_pattern)
    return ModalityTokens([token_id(tokenizer, modality.code_pad), *bridge, embed_id], embed_id, bridge, unit_0, size)
