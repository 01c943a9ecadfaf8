"""Holding the Omni LLM to its own media formats, per request: a vLLM v1 logits processor.

When a client asks for speech or an image, the answer must be decodable, so generation is constrained to the
model's format (and a model that never learned it, like the embedded default, still exercises the whole path):

- speech (`hcx_output: "speech"`): transcript text (any non-special tokens, the model's own tags included, at least
  one and at most `hcx_max_text_tokens`), then `<|discrete_audio_start|>`, then between `hcx_min_units` and
  `hcx_max_units` unit tokens `<|audioNNNN|>`, then `<|discrete_audio_end|>` and the end of the turn;
- image (`hcx_output: "image"`): `<|discrete_image_start|>`, one ratio token `<|vision_ratio_W:H|>` of the decoder's
  table, exactly 729 code tokens `<|visionNNNNN|>`, `<|discrete_image_end|>` and the end of the turn.

The gateway switches it on through `vllm_xargs` (vLLM's `SamplingParams.extra_args`); requests without them are not
touched. Registered as a `vllm.logits_processors` entry point (pyproject.toml), so every engine loads it; an engine
whose tokenizer has no media tokens (track A) ignores the switch. Parameters are checked in the API server
(`validate_params`, a 400), never in the engine, where an exception would stop it.

vLLM 0.32 has two model runners with two logits-processor interfaces, and loads the same entry point for either:
V1 (the CPU build, and GPUs without a usable Triton) keeps requests by batch index and tells of changes in
`update_state`; V2 (GPUs by default) keeps them by slot (`add_request`) and hands `apply` the step's row -> slot
map, with the tokens in its own buffers. `MediaFormatLogitsProcessor` implements both; the formats themselves
(`SpeechFormat`, `ImageFormat`) only see the tokens a request generated, in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from hcxserve.llm.omni_tokens import MODALITIES, token_id, unit_block

logger = logging.getLogger(__name__)

OUTPUT_KEY = "hcx_output"
SPEECH, IMAGE = "speech", "image"
IMAGE_TOKEN_COUNT = 729  # 27 x 27 codes per image
# the vision decoder's ratio table (hcxserve.models.vision_decoder.VISION_RATIOS, not imported: it loads torch models)
IMAGE_RATIOS = ("1:1", "1:2", "2:1", "3:4", "4:3", "3:5", "5:3", "4:5", "5:4", "6:9", "9:6", "9:16", "16:9")
# speech parameters: name -> (default, lowest, highest)
SPEECH_LIMITS = {
    "hcx_min_units": (1, 1, 4096),
    "hcx_max_units": (750, 1, 4096),  # 30 s at 25 units/s
    "hcx_max_text_tokens": (512, 1, 8192),
}


def speech_params(extra: dict) -> dict[str, int]:
    """The speech bounds a request gives (defaults where it gives none); ValueError names a bad one."""
    values = {}
    for name, (default, low, high) in SPEECH_LIMITS.items():
        value = extra.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"vllm_xargs.{name} must be an integer in [{low}, {high}], not {value!r}")
        values[name] = value
    if values["hcx_min_units"] > values["hcx_max_units"]:
        raise ValueError("vllm_xargs.hcx_min_units must not be above hcx_max_units")
    return values


@dataclass(frozen=True)
class FormatTokens:
    """The ids the formats are made of, from the engine's tokenizer."""

    audio_start: int
    audio_end: int
    audio_units: range
    image_start: int
    image_end: int
    image_ratios: list[int]
    image_codes: range
    special: list[int]  # every added or special token: never part of the transcript text
    end_of_turn: list[int]
    size: int  # the tokenizer's: rows of the (padded) logits beyond it are no tokens at all

    @classmethod
    def from_tokenizer(cls, tokenizer, end_of_turn: list[int]) -> FormatTokens:
        audio_0, audio_n = unit_block(tokenizer, MODALITIES["audio"].unit_pattern)
        image_0, image_n = unit_block(tokenizer, MODALITIES["image"].unit_pattern)
        special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        return cls(
            audio_start=token_id(tokenizer, "<|discrete_audio_start|>"),
            audio_end=token_id(tokenizer, "<|discrete_audio_end|>"),
            audio_units=range(audio_0, audio_0 + audio_n),
            image_start=token_id(tokenizer, "<|discrete_image_start|>"),
            image_end=token_id(tokenizer, "<|discrete_image_end|>"),
            image_ratios=[token_id(tokenizer, f"<|vision_ratio_{r}|>") for r in IMAGE_RATIOS],
            image_codes=range(image_0, image_0 + image_n),
            special=sorted(special | set(end_of_turn)),
            end_of_turn=list(end_of_turn),
            size=len(tokenizer),
        )


class FormatMasks:
    """Boolean masks over a logits row (its length is the model's padded vocabulary), made once per engine."""

    def __init__(self, tokens: FormatTokens, vocab: int, device: torch.device) -> None:
        def allowed(*groups) -> torch.Tensor:
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            for group in groups:
                if isinstance(group, range):
                    mask[group.start : group.stop] = True
                else:
                    mask[list(group)] = True
            return mask

        text = torch.ones(vocab, dtype=torch.bool, device=device)
        text[tokens.special] = False
        text[tokens.size :] = False
        self.text = text
        self.text_or_audio_start = text | allowed([tokens.audio_start])
        self.audio_start = allowed([tokens.audio_start])
        self.units = allowed(tokens.audio_units)
        self.units_or_end = allowed(tokens.audio_units, [tokens.audio_end])
        self.audio_end = allowed([tokens.audio_end])
        self.image_start = allowed([tokens.image_start])
        self.ratios = allowed(tokens.image_ratios)
        self.codes = allowed(tokens.image_codes)
        self.image_end = allowed([tokens.image_end])
        self.end_of_turn = allowed(tokens.end_of_turn)


class SpeechFormat:
    """One request's speech constraint: which tokens may come next, given those it generated so far."""

    def __init__(
        self, tokens: FormatTokens, masks: FormatMasks, *, min_units: int, max_units: int, max_text: int
    ) -> None:
        self.tokens, self.masks = tokens, masks
        self.min_units, self.max_units, self.max_text = min_units, max_units, max_text
        self.seen = 0  # output tokens taken into account
        self._text = self._units = 0
        self._phase = "text"

    def advance(self, new_tokens: list[int]) -> None:
        for token in new_tokens:
            if self._phase == "text":
                if token == self.tokens.audio_start:
                    self._phase = "units"
                else:
                    self._text += 1
            elif self._phase == "units":
                if token == self.tokens.audio_end:
                    self._phase = "end"
                else:
                    self._units += 1
        self.seen += len(new_tokens)

    def mask(self) -> torch.Tensor:
        masks = self.masks
        if self._phase == "text":
            if self._text >= self.max_text:
                return masks.audio_start
            return masks.text_or_audio_start if self._text else masks.text
        if self._phase == "units":
            if self._units >= self.max_units:
                return masks.audio_end
            return masks.units_or_end if self._units >= self.min_units else masks.units
        return masks.end_of_turn


class ImageFormat:
    """One request's image constraint: start, a ratio, exactly 729 codes, end, end of turn."""

    def __init__(self, tokens: FormatTokens, masks: FormatMasks) -> None:
        self.masks = masks
        self.seen = 0

    def advance(self, new_tokens: list[int]) -> None:
        self.seen += len(new_tokens)

    def mask(self) -> torch.Tensor:
        n, masks = self.seen, self.masks
        if n == 0:
            return masks.image_start
        if n == 1:
            return masks.ratios
        if n < 2 + IMAGE_TOKEN_COUNT:
            return masks.codes
        if n == 2 + IMAGE_TOKEN_COUNT:
            return masks.image_end
        return masks.end_of_turn


Format = SpeechFormat | ImageFormat


def constrain(row: torch.Tensor, constraint: Format, new_tokens: list[int]) -> None:
    """Bring the request's state up to date and mask its logits row in place."""
    constraint.advance(new_tokens)
    mask = constraint.mask()
    row.masked_fill_(~mask[: row.shape[-1]], float("-inf"))


class MediaFormatLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """Builds each constrained request's format from its `vllm_xargs`, under either model runner."""

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        extra = params.extra_args or {}
        kind = extra.get(OUTPUT_KEY)
        if kind is None:
            return
        if kind not in (SPEECH, IMAGE):
            raise ValueError(f"vllm_xargs.{OUTPUT_KEY} must be {SPEECH!r} or {IMAGE!r}, not {kind!r}")
        if kind == SPEECH:
            speech_params(extra)

    def __init__(self, vllm_config, *runner_args) -> None:
        # V1: (vllm_config, device, is_pin_memory); V2: (vllm_config, req_states)
        self._v2_states = runner_args[0] if len(runner_args) == 1 else None
        device = self._v2_states.device if self._v2_states is not None else runner_args[0]
        self._v1_requests: dict[int, tuple[Format, list[int]]] = {}  # batch index -> format, live output tokens
        self._v2_requests: dict[int, Format] = {}  # slot -> format
        self.tokens: FormatTokens | None = None
        self._masks: FormatMasks | None = None
        try:
            from transformers import AutoTokenizer

            model = vllm_config.model_config
            tokenizer = AutoTokenizer.from_pretrained(model.tokenizer, trust_remote_code=model.trust_remote_code)
            self.tokens = FormatTokens.from_tokenizer(tokenizer, _end_of_turn(model, tokenizer))
            self._masks = FormatMasks(self.tokens, model.get_vocab_size(), device)
        except (ValueError, OSError) as exc:  # no media tokens (track A): nothing to constrain
            logger.debug("media formats off for this engine: %s", exc)

    def _format_for(self, params: SamplingParams) -> Format | None:
        kind = (params.extra_args or {}).get(OUTPUT_KEY)
        if kind is None or self.tokens is None:
            return None
        if kind == IMAGE:
            return ImageFormat(self.tokens, self._masks)
        bounds = speech_params(params.extra_args)
        return SpeechFormat(
            self.tokens,
            self._masks,
            min_units=bounds["hcx_min_units"],
            max_units=bounds["hcx_max_units"],
            max_text=bounds["hcx_max_text_tokens"],
        )

    def is_argmax_invariant(self) -> bool:
        return False

    # ------------------------------------------------------------------------------------------ V1 runner
    def update_state(self, batch_update) -> None:
        def new_state(params, _prompt_ids, output_ids):
            constraint = self._format_for(params)
            return None if constraint is None else (constraint, output_ids)

        process_dict_updates(self._v1_requests, batch_update, new_state)

    # ------------------------------------------------------------------------------------------ V2 runner
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        constraint = self._format_for(sampling_params)
        if constraint is None:
            self._v2_requests.pop(req_idx, None)  # the slot's previous occupant
            return False
        self._v2_requests[req_idx] = constraint
        return True

    # ------------------------------------------------------------------------------------------ both
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is None:  # V1: rows are batch indices
            for index, (constraint, outputs) in self._v1_requests.items():
                constrain(logits[index], constraint, outputs[constraint.seen :])
            return logits
        if not self._v2_requests:
            return logits
        states = self._v2_states
        for row, slot in enumerate(ctx.expanded_idx_mapping.tolist()):
            constraint = self._v2_requests.get(slot)
            if constraint is None:
                continue
            start = int(states.prompt_len.np[slot]) + constraint.seen
            end = int(states.total_len.gpu[slot])
            constrain(logits[row], constraint, states.all_token_ids.gpu[slot, start:end].tolist())
        return logits


def _end_of_turn(model_config, tokenizer) -> list[int]:
    """The tokens that end the model's turn: its generation config's EOS ids, else the tokenizer's."""
    ids = getattr(model_config.hf_config, "eos_token_id", None)
    generation = model_config.try_get_generation_config() or {}
    ids = generation.get("eos_token_id", ids)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    if not ids:
        raise ValueError("the model names no end-of-turn token")
    return ids
