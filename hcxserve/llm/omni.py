"""vLLM model for HyperCLOVAX-SEED-Omni-8B's LLM fed by external encoders (track B).

The converted `llm/` folder is a plain `HyperCLOVAXForCausalLM` text checkpoint; the LLM service starts vLLM with
`--hf-overrides '{"architectures": ["HCXOmniForCausalLM"]}'`, which picks this class. It wraps vLLM's own text
model and adds a multimodal processor that takes only precomputed inputs:

- image: `{"image_embeds": [N, hidden], "discrete_image_codes": [K]}` (continuous ViT+projector rows and TA-Tok
  codes), video: `{"video_embeds": [N, hidden]}`, audio: `{"audio_embeds": [T, hidden], "discrete_audio_codes":
  [K]}` (Qwen2-Audio+projector rows and CosyVoice codes).
- Discrete codes become ordinary token ids, `unit_0 + code`, embedded by the LLM's own table. (OmniServe looked
  raw codes up as token ids without the offset, i.e. as unrelated text tokens.)
- Continuous rows fill the `<|IMAGE_PAD|>`/`<|VIDEO_PAD|>`/`<|AUDIO_PAD|>` slots. The chat template writes
  `<|DISCRETE_X_PAD|><|discrete_x_end|>\\n<|x_start|><|X_PAD|>` per item; that whole run is replaced, so one
  prompt update per item places both its codes and its embedding slots.

Everything is validated here, in the API server, where a bad item is a 400: a wrong width or an out-of-range code
reaching the engine would kill it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
import torch.nn as nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import DictEmbeddingItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.multimodal.processing.processor import PromptUpdateDetails
from vllm.sequence import IntermediateTensors

from hcxserve.llm.omni_tokens import MODALITIES, ModalityTokens, modality_tokens

ARCHITECTURE = "HCXOmniForCausalLM"
# text_config.model_type -> the vLLM text model this class wraps
_TEXT_MODELS = {"hyperclovax": "HyperCLOVAXForCausalLM", "llama": "LlamaForCausalLM"}


class HCXOmniDataParser(MultiModalDataParser):
    """Precomputed inputs only; each item is a dict of the fields its `Modality` names."""

    embedding_fields = {
        m.name: {
            m.embeds_key: "values",
            **{key: "metadata" for key in (m.grid_key, m.codes_key) if key},
        }
        for m in MODALITIES.values()
    }

    def _parse_dict(self, modality: str, data: Any):
        if not isinstance(data, dict):
            return None
        required, optional = self.embedding_field_sets(modality)
        return DictEmbeddingItems(
            data,
            modality=modality,
            required_fields=required,
            optional_fields=optional,
            fields_factory=lambda _: _fields_config(modality),
        )

    def _parse_image_data(self, data):
        return self._parse_dict("image", data) or super()._parse_image_data(data)

    def _parse_video_data(self, data):
        return self._parse_dict("video", data) or super()._parse_video_data(data)

    def _parse_audio_data(self, data):
        return self._parse_dict("audio", data) or super()._parse_audio_data(data)


def _fields_config(*modalities: str) -> dict[str, MultiModalFieldConfig]:
    fields = {}
    for name in modalities:
        m = MODALITIES[name]
        fields[m.embeds_key] = MultiModalFieldConfig.batched(name)
        for key in (m.grid_key, m.codes_key):
            if key:
                fields[key] = MultiModalFieldConfig.batched(name, keep_on_cpu=True)
    return fields


class HCXOmniProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {name: None for name in MODALITIES}

    def get_data_parser(self) -> MultiModalDataParser:
        return HCXOmniDataParser(
            expected_hidden_size=self.hidden_size,
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # Item sizes are set by the external encoders; one item may fill the whole context.
        return {name: seq_len for name, count in mm_counts.items() if count > 0}

    @property
    def hidden_size(self) -> int:
        return self.get_hf_config().hidden_size

    @cached_property
    def tokens(self) -> dict[str, ModalityTokens]:
        tokenizer = self.get_tokenizer()
        return {name: modality_tokens(tokenizer, m) for name, m in MODALITIES.items()}


class HCXOmniDummyInputsBuilder(BaseDummyInputsBuilder[HCXOmniProcessingInfo]):
    """One-row items in the merged dict form requests arrive in (vLLM only profiles them if asked to)."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: MultiModalDummyOptions | None = None,
        mm_processor_kwargs: Mapping[str, object] | None = None,
    ) -> MultiModalDataDict:
        hidden = self.info.hidden_size
        data: MultiModalDataDict = {}
        for name, count in mm_counts.items():
            if count > 0:
                m = MODALITIES[name]
                item = {m.embeds_key: [torch.zeros(1, hidden)] * count}
                if m.grid_key:
                    item[m.grid_key] = torch.tensor([[1, 2, 2]] * count)
                if m.codes_key:
                    item[m.codes_key] = [torch.zeros(1, dtype=torch.long)] * count
                data[name] = item
        return data


class HCXOmniMultiModalProcessor(BaseMultiModalProcessor[HCXOmniProcessingInfo]):
    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return _fields_config(*MODALITIES)

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        tokens = self.info.tokens
        hidden = self.info.hidden_size

        def replacement(item_idx: int, modality: str) -> PromptUpdateDetails:
            m, t = MODALITIES[modality], tokens[modality]
            item = out_mm_kwargs[modality][item_idx]
            rows = _checked_embeds(item[m.embeds_key].data, hidden, f"{modality}[{item_idx}]")
            seq = [t.embed_id] * rows
            if m.codes_key:
                codes = _checked_codes(item[m.codes_key].data, t.codebook_size, f"{modality}[{item_idx}]")
                seq = [t.unit_0 + c for c in codes] + t.bridge + seq
            return PromptUpdateDetails.select_token_id(seq, embed_token_id=t.embed_id)

        return [
            PromptReplacement(
                modality=name,
                target=tokens[name].target,
                replacement=lambda i, name=name: replacement(i, name),
            )
            for name in MODALITIES
        ]


def _checked_embeds(embeds: Any, hidden: int, what: str) -> int:
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2 or embeds.shape[1] != hidden:
        shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"{what}: embeddings must have shape (rows, {hidden}), got {shape}")
    if embeds.shape[0] == 0:
        raise ValueError(f"{what}: embeddings have no rows")
    if not torch.isfinite(embeds).all():
        raise ValueError(f"{what}: embeddings contain NaN or infinity")
    return int(embeds.shape[0])


def _checked_codes(codes: Any, codebook_size: int, what: str) -> list[int]:
    if not isinstance(codes, torch.Tensor) or codes.ndim != 1 or codes.is_floating_point() or codes.numel() == 0:
        raise ValueError(f"{what}: discrete codes must be a non-empty 1-D integer array")
    if int(codes.min()) < 0 or int(codes.max()) >= codebook_size:
        raise ValueError(f"{what}: discrete codes must lie in [0, {codebook_size})")
    return codes.tolist()


@MULTIMODAL_REGISTRY.register_processor(
    HCXOmniMultiModalProcessor, info=HCXOmniProcessingInfo, dummy_inputs=HCXOmniDummyInputsBuilder
)
class HCXOmniForCausalLM(nn.Module, SupportsMultiModal, SupportsPP):
    """HyperCLOVAX text decoder whose multimodal embeddings arrive precomputed (already projected)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return MODALITIES[modality].embed_token if modality in MODALITIES else None

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        text_arch = _TEXT_MODELS.get(config.model_type)
        if text_arch is None:
            raise ValueError(f"{ARCHITECTURE} wraps a hyperclovax or llama text model, not {config.model_type!r}")
        self.embeds_dtype = vllm_config.model_config.dtype
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config, prefix=maybe_prefix(prefix, "language_model"), architectures=[text_arch]
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        out: list[torch.Tensor] = []
        for m in MODALITIES.values():
            embeds = kwargs.get(m.embeds_key)
            if embeds is not None:
                out.extend(e.to(self.embeds_dtype) for e in embeds)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
