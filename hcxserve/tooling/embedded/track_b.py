"""Track B embedded default: a tiny checkpoint in the HyperCLOVAX-SEED-Omni-8B unified layout.

Text: SmolLM2-135M-Instruct mapped onto HyperCLOVAX exactly as in track A, its vocabulary grown by the Omni special
tokens and two contiguous unit blocks (CosyVoice audio units, TA-Tok image units).
Vision: track A's seeded tiny Qwen2.5-VL ViT + `mm_projector` (to the LLM width), plus the tiny TA-Tok from
`hcxserve.models.ta_tok`. Audio: the tiny Qwen2-Audio encoder, projector and CosyVoice tokenizer from
`hcxserve.models.audio_encoder`. Everything is saved under the real unified names (`model.language_model.`,
`model.vision_model.`, `model.mm_projector.`, `model.discrete_vision_model.`, `model.audio_model.`,
`model.audio_projector.`, `model.discrete_audio_model.`) that `convert_model.py --track b` splits.
Decoders, in the unified checkpoint's own sub-folders: `decoder/vision/` a tiny diffusers-layout vision decoder
(`vision_decoder`, its codebook the TA-Tok's), `decoder/audio/` OmniServe's two TorchServe archives holding tiny unit
vocoders over the 6561 audio units (`unit_vocoder`); the converter turns them into `vd/` and `ad/`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import check_mapping_parity, sample_answer
from .checks_b import check_track_b_checkpoint, new_token_mass
from .common import (
    TRACK_B_BUILDER_VERSION,
    TRACK_B_CHAT_TEMPLATE,
    BuildIdentity,
    BuildResult,
    Timer,
    build,
    sha256_text,
)
from .tokenizer import (
    AUDIO_TOKEN,
    AUDIO_UNITS,
    DISCRETE_AUDIO_TOKEN,
    DISCRETE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    THINK_TOKENS,
    VIDEO_TOKEN,
    VISION_EOF,
    VISION_EOL,
    VISION_RATIOS,
    add_hcx_tokens,
    add_omni_tokens,
    padded_vocab_size,
    vision_ratio_token,
)

if TYPE_CHECKING:
    import torch
    from transformers import HyperCLOVAXForCausalLM, LlamaForCausalLM, PreTrainedTokenizerBase

logger = logging.getLogger("hcxserve.tooling.embedded")

TRACK = "b"
SEED = 0
# Unit-token input rows are the mean row plus seeded noise of this fraction of the mean text-embedding norm, so
# different codes reach the LM as different inputs (a mean row for all of them would make codes invisible).
UNIT_EMBED_NOISE = 0.5

LM_PREFIX = "model.language_model."
VISION_PREFIX = "model.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
DISCRETE_VISION_PREFIX = "model.discrete_vision_model."
AUDIO_PREFIXES = ("model.audio_model.", "model.audio_projector.", "model.discrete_audio_model.",
                  "model.video_audio_compressor.")
DECODER_DIR = "decoder"  # decoder/vision/ and decoder/audio/, as in the released checkpoint

# Config keys naming token ids, and the token each names. Two vocabularies of names are in use for the Omni model:
# the HF remote code (`modeling_vlm.py`: positions equal to `*_start_id` take the features, one per position, so
# those are the PAD tokens) and the later vLLM port (`*_start_token_id`/`*_end_token_id` framing ids).
# `image_token_id`/`video_token_id`/`audio_token_id` are what the converter and vLLM-style processors read.
CONFIG_TOKEN_IDS: dict[str, str] = {
    "img_start_id": IMAGE_TOKEN,
    "video_start_id": VIDEO_TOKEN,
    "audio_start_id": AUDIO_TOKEN,
    "discrete_image_start_id": DISCRETE_IMAGE_TOKEN,
    "discrete_audio_start_id": DISCRETE_AUDIO_TOKEN,
    "image_token_id": IMAGE_TOKEN,
    "video_token_id": VIDEO_TOKEN,
    "audio_token_id": AUDIO_TOKEN,
    "image_start_token_id": "<|image_start|>",
    "image_end_token_id": "<|image_end|>",
    "video_start_token_id": "<|video_start|>",
    "video_end_token_id": "<|video_end|>",
    "audio_start_token_id": "<|audio_start|>",
    "audio_end_token_id": "<|audio_end|>",
    "discrete_image_start_token_id": "<|discrete_image_start|>",
    "discrete_image_end_token_id": "<|discrete_image_end|>",
    "discrete_audio_start_token_id": "<|discrete_audio_start|>",
    "discrete_audio_end_token_id": "<|discrete_audio_end|>",
    "discrete_image_eol_token_id": VISION_EOL,
    "discrete_image_eof_token_id": VISION_EOF,
}


def image_codebook_size(discrete_vision_config: dict[str, Any]) -> int:
    """TA-Tok codebook size: a top-level `codebook_size`, else the SimVQ regularizer's (real TA-Tok layout)."""
    size = discrete_vision_config.get("codebook_size")
    if size is None:
        try:
            size = discrete_vision_config["bottleneck"]["args"]["regularizer"]["args"]["codebook_size"]
        except (KeyError, TypeError):
            size = None
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"no codebook_size in the TA-Tok config: {sorted(discrete_vision_config)}")
    return size


def audio_codebook_size(discrete_audio_config: dict[str, Any] | None) -> int | None:
    """The CosyVoice codebook size when the config states one (it must be 3**8)."""
    for key in ("codebook_size", "n_codebook_size"):
        if isinstance((discrete_audio_config or {}).get(key), int):
            return discrete_audio_config[key]
    return None


def omni_config_dict(text_config: dict[str, Any], vision_config: dict[str, Any], discrete_vision_config: dict,
                     audio_entries: dict[str, Any], token_ids: dict[str, int]) -> dict[str, Any]:
    """Top-level config.json: `vlm` / `HCXVisionForCausalLM` with the Omni sub-configs and token ids."""
    config: dict[str, Any] = {
        "architectures": ["HCXVisionForCausalLM"],
        "model_type": "vlm",
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "llm_hidden_size": text_config["hidden_size"],
        "mm_projector_type": "linear",
    }
    extra = {k: v for k, v in audio_entries.items() if k not in ("audio_config", "discrete_audio_config")}
    config.update(extra)  # audio_projector_type (+ any video_audio_compressor_* the component defines)
    config.update({key: token_ids[token] for key, token in CONFIG_TOKEN_IDS.items()})
    config["discrete_image_ratio_token_ids"] = {r: token_ids[vision_ratio_token(r)] for r in VISION_RATIOS}
    config["discrete_audio_unit_0_id"] = token_ids["audio_unit_0"]
    config["discrete_image_unit_0_id"] = token_ids["image_unit_0"]
    config.update({
        "text_config": text_config,
        "vision_config": vision_config,
        "discrete_vision_config": discrete_vision_config,
        "audio_config": audio_entries["audio_config"],
        "discrete_audio_config": audio_entries.get("discrete_audio_config"),
    })
    return config


def vision_config_b(hidden_size: int) -> dict[str, Any]:
    """Track A's tiny tower; `qwen2_5_vl_visual` is the model_type the Omni remote code checks for."""
    from .track_a import vision_config_dict

    return {**vision_config_dict(hidden_size), "model_type": "qwen2_5_vl_visual"}


@dataclass
class TrackBParts:
    """The checkpoint in memory: fp32 LM, ViT and projector, the components' own tensors, plus SmolLM2."""

    llama: LlamaForCausalLM
    language_model: HyperCLOVAXForCausalLM
    vision: torch.nn.Module
    projector: torch.nn.Linear
    component_tensors: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase
    token_ids: dict[str, int]
    unit_counts: dict[str, int]
    chat_template: str
    config: dict[str, Any]
    stats: dict[str, float] = field(default_factory=dict)


def load_chat_template(path: Path | None = None) -> str:
    path = path or TRACK_B_CHAT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"track B chat template not found at {path}")
    return path.read_text(encoding="utf-8")


def build_identity(chat_template: str) -> BuildIdentity:
    return BuildIdentity(track=TRACK, builder_version=TRACK_B_BUILDER_VERSION,
                         chat_template_sha256=sha256_text(chat_template))


def tiny_components(llm_hidden_size: int) -> tuple[dict, dict[str, Any], dict[str, torch.Tensor]]:
    """(discrete_vision_config, audio config entries, tensors) from the component modules, prefixes checked."""
    from hcxserve.models import audio_encoder, mambamia, ta_tok

    discrete_vision_config, vision_tensors = ta_tok.tiny_components(SEED)
    audio_entries, audio_tensors = audio_encoder.tiny_components(SEED, llm_hidden_size)
    compressor_entries, compressor_tensors = mambamia.tiny_components(SEED, llm_hidden_size)
    audio_entries, audio_tensors = {**audio_entries, **compressor_entries}, {**audio_tensors, **compressor_tensors}
    for key in ("audio_config", "discrete_audio_config", "audio_projector_type"):
        if key not in audio_entries:
            raise ValueError(f"audio_encoder.tiny_components gave no {key!r} (keys: {sorted(audio_entries)})")
    bad = [n for n in vision_tensors if not n.startswith(DISCRETE_VISION_PREFIX)]
    bad += [n for n in audio_tensors if not n.startswith(AUDIO_PREFIXES)]
    if bad:
        raise ValueError(f"component tensors outside their prefixes: {bad[:5]}")
    for prefix in (DISCRETE_VISION_PREFIX, *AUDIO_PREFIXES):
        if not any(n.startswith(prefix) for n in (*vision_tensors, *audio_tensors)):
            raise ValueError(f"the tiny components hold no {prefix}* tensors")
    return dict(discrete_vision_config), dict(audio_entries), {**vision_tensors, **audio_tensors}


def spread_unit_rows(language_model: HyperCLOVAXForCausalLM, first: int, count: int, text_vocab: int,
                     generator: torch.Generator) -> float:
    """Give the `count` unit rows from `first` distinct input embeddings (lm_head rows stay at the mean)."""
    import torch

    weight = language_model.model.embed_tokens.weight
    with torch.no_grad():
        text_rows = weight[:text_vocab]
        text_norm = float(text_rows.norm(dim=-1).mean())
        noise = torch.randn(count, weight.shape[1], generator=generator)
        noise *= UNIT_EMBED_NOISE * text_norm / math.sqrt(weight.shape[1])
        weight[first:first + count] += noise
        return float(weight[first:first + count].norm(dim=-1).mean())


def prepare_track_b(cache_dir: Path, chat_template_path: Path | None = None) -> TrackBParts:
    """Load SmolLM2 and the tiny components; derive every part of the track B checkpoint in memory."""
    import torch

    from .smollm2 import ORIGINAL_VOCAB, load_smollm2
    from .track_a import make_language_model, make_vision, text_config_dict

    chat_template = load_chat_template(chat_template_path)
    llama, tokenizer = load_smollm2(cache_dir)
    hidden = llama.config.hidden_size
    discrete_vision_config, audio_entries, component_tensors = tiny_components(hidden)
    image_units = image_codebook_size(discrete_vision_config)
    stated = audio_codebook_size(audio_entries.get("discrete_audio_config"))
    if stated is not None and stated != AUDIO_UNITS:
        raise ValueError(f"the CosyVoice codebook is {stated} codes; the FSQ always has {AUDIO_UNITS}")

    timer = Timer()
    pieces = {t: tokenizer.encode(t, add_special_tokens=False) for t in THINK_TOKENS}
    token_ids = add_hcx_tokens(tokenizer, chat_template)
    token_ids.update(add_omni_tokens(tokenizer, AUDIO_UNITS, image_units))
    logger.info("tokenizer grown to %d tokens in %.2f s", len(tokenizer), timer())
    text_init = {token_ids[t]: ids for t, ids in pieces.items()}
    vocab_size = padded_vocab_size(len(tokenizer))
    text_config = text_config_dict(llama.config, vocab_size)
    config = omni_config_dict(text_config, vision_config_b(hidden), discrete_vision_config, audio_entries,
                              token_ids)
    language_model = make_language_model(llama, text_config, text_init)
    generator = torch.Generator().manual_seed(SEED + 1)
    stats = {
        "audio_unit_row_norm": spread_unit_rows(language_model, token_ids["audio_unit_0"], AUDIO_UNITS,
                                                ORIGINAL_VOCAB, generator),
        "image_unit_row_norm": spread_unit_rows(language_model, token_ids["image_unit_0"], image_units,
                                                ORIGINAL_VOCAB, generator),
    }
    logger.info("HyperCLOVAX LM built (vocab %d -> %d)", llama.config.vocab_size, vocab_size)
    embed = llama.get_input_embeddings().weight.detach()
    with torch.no_grad():
        vision, projector, vision_stats = make_vision(config, embed)
    stats.update(vision_stats)
    return TrackBParts(llama=llama, language_model=language_model, vision=vision, projector=projector,
                       component_tensors=component_tensors, tokenizer=tokenizer, token_ids=token_ids,
                       unit_counts={"audio": AUDIO_UNITS, "image": image_units}, chat_template=chat_template,
                       config=config, stats=stats)


def unified_state_dict(parts: TrackBParts) -> dict[str, torch.Tensor]:
    """LM, ViT and projector in bf16 (as track A), then the components' tensors; floating ones stored as bf16."""
    import torch

    from .track_a import unified_state_dict as track_a_state_dict

    out = track_a_state_dict(parts)  # type: ignore[arg-type]  # same attributes: language_model/vision/projector
    for name, tensor in parts.component_tensors.items():
        if name in out:
            raise ValueError(f"component tensor {name} clashes with an LM/vision tensor")
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16)
        out[name] = tensor.contiguous().clone()
    return out


def write_decoders(directory: Path, *, seed: int = SEED) -> None:
    """`decoder/vision/` (diffusers layout) and `decoder/audio/` (the two .mar archives), seeded: the same weights
    on every build."""
    from .unit_vocoder import write_tiny_archives
    from .vision_decoder import write_tiny_folder

    timer = Timer()
    write_tiny_folder(directory / DECODER_DIR / "vision", seed=seed)
    write_tiny_archives(directory / DECODER_DIR / "audio", seed=seed)
    logger.info("decoders written in %.1f s", timer())


def write_track_b(parts: TrackBParts, directory: Path, max_shard_bytes: int | None = None) -> None:
    """Write the unified checkpoint files, decoders included, into an existing (empty) directory."""
    from .track_a import MAX_SHARD_BYTES, make_image_processors, save_image_processors, write_checkpoint

    # No processor_config.json: the Omni processor is remote code with no transformers class to name.
    write_checkpoint(parts, directory, unified_state_dict(parts),  # type: ignore[arg-type]  # same attributes
                     lambda folder: save_image_processors(folder, *make_image_processors()),
                     max_shard_bytes or MAX_SHARD_BYTES)
    write_decoders(directory)


def summary_token_ids(parts: TrackBParts) -> dict[str, Any]:
    """The ids worth printing: named tokens plus each unit block's range (not 7.6k entries)."""
    audio0, image0 = parts.token_ids["audio_unit_0"], parts.token_ids["image_unit_0"]
    named = {k: v for k, v in parts.token_ids.items() if not k.endswith("unit_0")}
    return {**named, "audio_units": [audio0, audio0 + parts.unit_counts["audio"] - 1],
            "image_units": [image0, image0 + parts.unit_counts["image"] - 1],
            "tokenizer_len": len(parts.tokenizer), "vocab_size": parts.config["text_config"]["vocab_size"]}


def check_parts(parts: TrackBParts) -> dict[str, Any]:
    """Mapping parity, the probability mass on the added tokens and a sample answer of the LM in memory."""
    parity = check_mapping_parity(parts.llama, parts.language_model, parts.tokenizer).as_dict()
    parity["new_token_probability"] = new_token_mass(parts.language_model, parts.tokenizer)
    parity["sample_answer"] = sample_answer(parts.language_model, parts.tokenizer, thinking=False)
    return parity


def build_track_b(output: Path, cache_dir: Path, *, check: bool = True, force: bool = False,
                  chat_template_path: Path | None = None) -> BuildResult:
    """Build the unified track B checkpoint into `output` atomically; a no-op when it is already up to date."""
    return build(output, build_identity(load_chat_template(chat_template_path)),
                 lambda: prepare_track_b(cache_dir, chat_template_path), write_track_b, check_parts,
                 check_track_b_checkpoint, check=check, force=force, token_ids=summary_token_ids)
