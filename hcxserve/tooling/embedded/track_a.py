"""Track A embedded default: a tiny checkpoint in the HyperCLOVAX-SEED-Think-32B unified layout.

Text: SmolLM2-135M-Instruct mapped onto HyperCLOVAX (MuP multipliers neutral, no post-norms, untied lm_head).
Vision: a seeded-random tiny Qwen2.5-VL ViT plus a `mm_projector` Linear, both saved as `model.vision_model.*` and
`model.mm_projector.*` exactly like the real unified checkpoint that `convert_model.py --track a` splits.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import check_mapping_parity, check_unified_checkpoint, sample_answer
from .common import BUILDER_VERSION, TRACK_A_CHAT_TEMPLATE, BuildIdentity, BuildResult, Timer, build, sha256_text
from .tokenizer import IMAGE_TOKEN, THINK_TOKENS, VIDEO_TOKEN, add_hcx_tokens, padded_vocab_size

if TYPE_CHECKING:
    import torch
    from transformers import HyperCLOVAXForCausalLM, LlamaForCausalLM, PreTrainedTokenizerBase

logger = logging.getLogger("hcxserve.tooling.embedded")

TRACK = "a"
SEED = 0
MAX_SHARD_BYTES = 100 * 1000 * 1000

# Real Think-32B image preprocessing (CLIP statistics, bicubic, /255, 14 px patches, 2x2 merge, 2 frames per
# temporal patch) with a small pixel budget so a 2-core CPU stays fast: at most 448x448 = 256 image tokens.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MIN_PIXELS = 56 * 56
MAX_PIXELS = 448 * 448
# Per video frame pair; smaller than images because a video has many of them.
VIDEO_MAX_PIXELS = 128 * 28 * 28
IMAGE_SIZE = 448

# Tiny Qwen2.5-VL ViT; out_hidden_size equals the text hidden size as in the real 32B (5120 == 5120).
VISION_DEPTH = 2
VISION_HIDDEN = 64
VISION_HEADS = 2
VISION_INTERMEDIATE = 128
PROJECTOR_STD_GAIN = 0.9

LM_PREFIX = "model.language_model."
VISION_PREFIX = "model.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."


def vision_config_dict(out_hidden_size: int) -> dict[str, Any]:
    return {
        "model_type": "qwen2_5_vl",
        "depth": VISION_DEPTH,
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_INTERMEDIATE,
        "num_heads": VISION_HEADS,
        "in_channels": 3,
        "hidden_act": "silu",
        "patch_size": 14,
        "spatial_patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [VISION_DEPTH - 1],
        "out_hidden_size": out_hidden_size,
        "tokens_per_second": 2,
        "image_size": IMAGE_SIZE,
        "initializer_range": 0.02,
    }


def text_config_dict(llama_config: Any, vocab_size: int) -> dict[str, Any]:
    """HyperCLOVAX config equal in function to the Llama one: every MuP knob neutral, no Peri-LN post norms."""
    head_dim = llama_config.head_dim or llama_config.hidden_size // llama_config.num_attention_heads
    rope = dict(llama_config.rope_parameters or {})
    rope.setdefault("rope_type", "default")
    return {
        # Lets the converter's llm/config.json name a class vLLM has natively, instead of a remote-code auto_map.
        "architectures": ["HyperCLOVAXForCausalLM"],
        "model_type": "hyperclovax",
        "vocab_size": vocab_size,
        "hidden_size": llama_config.hidden_size,
        "intermediate_size": llama_config.intermediate_size,
        "num_hidden_layers": llama_config.num_hidden_layers,
        "num_attention_heads": llama_config.num_attention_heads,
        "num_key_value_heads": llama_config.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": llama_config.hidden_act,
        "max_position_embeddings": llama_config.max_position_embeddings,
        "rms_norm_eps": llama_config.rms_norm_eps,
        "rope_parameters": rope,
        "attention_bias": bool(llama_config.attention_bias),
        "attention_dropout": 0.0,
        "mlp_bias": bool(llama_config.mlp_bias),
        "initializer_range": 0.02,
        "use_cache": True,
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "logits_scaling": 1.0,
        "attention_multiplier": head_dim**-0.5,
        "use_post_norm": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


def unified_config_dict(text_config: dict[str, Any], image_token_id: int, video_token_id: int) -> dict[str, Any]:
    return {
        "architectures": ["HCXVisionV2ForCausalLM"],
        "model_type": "hyperclovax_vision_v2",
        "image_token_id": image_token_id,
        "video_token_id": video_token_id,
        "mm_projector_type": "linear",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": text_config,
        "vision_config": vision_config_dict(text_config["hidden_size"]),
    }


@dataclass
class TrackAParts:
    """Everything the checkpoint is made of, in memory (fp32), plus the SmolLM2 model it was derived from."""

    llama: LlamaForCausalLM
    language_model: HyperCLOVAXForCausalLM
    vision: torch.nn.Module
    projector: torch.nn.Linear
    tokenizer: PreTrainedTokenizerBase
    token_ids: dict[str, int]
    chat_template: str
    config: dict[str, Any]
    stats: dict[str, float] = field(default_factory=dict)


def make_language_model(llama: LlamaForCausalLM, text_config: dict[str, Any],
                        text_init: dict[int, list[int]] | None = None) -> HyperCLOVAXForCausalLM:
    """HyperCLOVAX with SmolLM2's weights: same tensor names, lm_head untied, vocab padded with mean rows.

    `text_init` maps a new token id to the SmolLM2 ids of its literal text; that token's *input* embedding becomes
    their average instead of the mean row.
    """
    import torch
    from transformers import HyperCLOVAXConfig, HyperCLOVAXForCausalLM

    state = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    embed = state["model.embed_tokens.weight"]
    # Written explicitly (the GGUF model ties them): HCX checkpoints carry their own lm_head.
    head = state.get("lm_head.weight", embed).clone()
    new_vocab = text_config["vocab_size"]
    old_vocab = embed.shape[0]
    if new_vocab < old_vocab:
        raise ValueError(f"vocab {new_vocab} < SmolLM2's {old_vocab}")

    def grow(matrix: torch.Tensor) -> torch.Tensor:
        # New rows = mean of the old rows: deterministic, and new tokens start with an unremarkable embedding/logit.
        extra = matrix.mean(dim=0, keepdim=True).expand(new_vocab - old_vocab, -1)
        return torch.cat([matrix, extra], dim=0).contiguous()

    state["model.embed_tokens.weight"] = grow(embed)
    state["lm_head.weight"] = grow(head)
    # The track A template closes an empty think block (`<think>\n\n</think>\n\n`) before every answer. With
    # mean-row embeddings for the tags SmolLM2 answers that prompt with an immediate <|im_end|> (empty replies);
    # with the average of the tags' literal-text pieces it answers fluently. lm_head rows stay at the mean, so
    # the model does not start emitting the tags on its own.
    for token_id, piece_ids in (text_init or {}).items():
        state["model.embed_tokens.weight"][token_id] = embed[piece_ids].mean(dim=0)

    config = HyperCLOVAXConfig(**text_config)
    model = HyperCLOVAXForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    if model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("HyperCLOVAX lm_head is tied to embed_tokens; the checkpoint must carry its own")
    return model


def _init_vision(vision: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded init with fan-in scaled std: keeps activations O(1) through the tiny ViT."""
    import torch

    with torch.no_grad():
        for name, param in vision.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_q" in name:
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.02, generator=generator)
            else:
                fan_in = param[0].numel()
                # Residual-branch outputs get half the gain so the residual stream grows slowly with depth.
                gain = 0.5 if name.endswith(("attn.proj.weight", "mlp.down_proj.weight")) else 1.0
                param.normal_(0.0, gain / math.sqrt(fan_in), generator=generator)


def make_vision(config: dict[str, Any], text_embed: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Linear, dict]:
    """Seeded tiny ViT + projector whose image rows have about the norm of SmolLM2's token embeddings."""
    import torch
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vcfg = dict(config["vision_config"])
    vcfg.pop("model_type")
    vision_config = Qwen2_5_VLVisionConfig(**vcfg)
    vision_config._attn_implementation = "sdpa"
    generator = torch.Generator().manual_seed(SEED)
    vision = Qwen2_5_VisionTransformerPretrainedModel(vision_config).float().eval()
    _init_vision(vision, generator)

    text_hidden = config["text_config"]["hidden_size"]
    out_hidden = vision_config.out_hidden_size
    projector = torch.nn.Linear(out_hidden, text_hidden)
    with torch.no_grad():
        projector.weight.normal_(0.0, PROJECTOR_STD_GAIN / math.sqrt(out_hidden), generator=generator)
        projector.bias.normal_(0.0, 0.01, generator=generator)

    # Calibrate the merger's last Linear on a fixed pseudo-image so projected image rows land near the mean
    # text-embedding norm: the LM then sees image rows of a familiar scale instead of huge or vanishing inputs.
    pixels, grid = calibration_pixels(vision_config, generator)
    text_norm = float(text_embed.norm(dim=-1).mean())
    with torch.no_grad():
        for _ in range(2):  # the bias makes the scale slightly non-linear; a second pass settles it
            rows = projector(vision(pixels, grid_thw=grid).pooler_output)
            scale = text_norm / float(rows.norm(dim=-1).mean())
            vision.merger.mlp[2].weight.mul_(scale)
            vision.merger.mlp[2].bias.mul_(scale)
        image_norm = float(projector(vision(pixels, grid_thw=grid).pooler_output).norm(dim=-1).mean())
    stats = {"text_embedding_norm": text_norm, "image_row_norm": image_norm}
    logger.info("vision: %d params; mean row norm text %.3f, projected image %.3f",
                sum(p.numel() for p in vision.parameters()), text_norm, image_norm)
    return vision, projector, stats


def calibration_pixels(vision_config: Any, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random 224x224 image as flattened Qwen2.5-VL patches (normalised scale), with its grid."""
    import torch
    import torch.nn.functional as F

    side = 224
    coarse = torch.rand(1, 3, 8, 8, generator=generator)
    image = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)[0]
    image = (image - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    return patchify(image, vision_config)


def patchify(image: torch.Tensor, vision_config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) normalised image -> Qwen2-VL flattened patches (H/14*W/14, 3*2*14*14) and grid_thw [[1, h, w]]."""
    import torch

    p = vision_config.patch_size
    m = vision_config.spatial_merge_size
    t = vision_config.temporal_patch_size
    c, height, width = image.shape
    gh, gw = height // p, width // p
    frames = image.unsqueeze(0).expand(t, -1, -1, -1)  # a still image fills the temporal patch
    x = frames.reshape(1, t, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixels = x.reshape(gh * gw, c * t * p * p).contiguous()
    return pixels, torch.tensor([[1, gh, gw]])


def load_chat_template(path: Path | None = None) -> str:
    path = path or TRACK_A_CHAT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"track A chat template not found at {path}")
    return path.read_text(encoding="utf-8")


def build_identity(chat_template: str) -> BuildIdentity:
    return BuildIdentity(track=TRACK, builder_version=BUILDER_VERSION, chat_template_sha256=sha256_text(chat_template))


def prepare_track_a(cache_dir: Path, chat_template_path: Path | None = None) -> TrackAParts:
    """Load SmolLM2 and derive every component of the track A checkpoint in memory."""
    import torch

    from .smollm2 import load_smollm2

    chat_template = load_chat_template(chat_template_path)
    llama, tokenizer = load_smollm2(cache_dir)
    # Literal-text pieces under SmolLM2's own BPE, taken before the tags become single added tokens.
    pieces = {t: tokenizer.encode(t, add_special_tokens=False) for t in THINK_TOKENS}
    token_ids = add_hcx_tokens(tokenizer, chat_template)
    text_init = {token_ids[t]: ids for t, ids in pieces.items()}
    vocab_size = padded_vocab_size(len(tokenizer))
    text_config = text_config_dict(llama.config, vocab_size)
    config = unified_config_dict(text_config, token_ids[IMAGE_TOKEN], token_ids[VIDEO_TOKEN])
    timer = Timer()
    language_model = make_language_model(llama, text_config, text_init)
    logger.info("HyperCLOVAX LM built in %.1f s (vocab %d -> %d)", timer(), llama.config.vocab_size, vocab_size)
    embed = llama.get_input_embeddings().weight.detach()
    with torch.no_grad():
        vision, projector, stats = make_vision(config, embed)
    return TrackAParts(llama=llama, language_model=language_model, vision=vision, projector=projector,
                       tokenizer=tokenizer, token_ids=token_ids, chat_template=chat_template, config=config,
                       stats=stats)


def unified_state_dict(parts: TrackAParts) -> dict[str, torch.Tensor]:
    """bf16 tensors under the real unified names, in a stable order (LM, vision, projector)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for prefix, module in ((LM_PREFIX, parts.language_model), (VISION_PREFIX, parts.vision),
                           (PROJECTOR_PREFIX, parts.projector)):
        for name, tensor in module.state_dict().items():
            # A fresh contiguous copy per tensor: safetensors refuses shared storage.
            out[prefix + name] = tensor.detach().to(torch.bfloat16).contiguous().clone()
    return out


def write_sharded(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> int:
    """Greedy shards `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`; returns total bytes."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
        logger.info("wrote %s (%d tensors)", filename, len(names))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total


def make_image_processors() -> tuple[Any, Any]:
    """The Qwen2-VL image and video processors of the real checkpoints, on the small pixel budget."""
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    common = dict(image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, do_rescale=True, rescale_factor=1 / 255,
                  do_normalize=True, do_resize=True, do_convert_rgb=True, patch_size=14, merge_size=2,
                  temporal_patch_size=2)
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **common)
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS, **common)
    return image_processor, video_processor


def save_processors(directory: Path, tokenizer: PreTrainedTokenizerBase, chat_template: str) -> None:
    """preprocessor_config.json, video_preprocessor_config.json and processor_config.json (transformers' output)."""
    from transformers import HyperCLOVAXVisionV2Processor

    image_processor, video_processor = make_image_processors()
    processor = HyperCLOVAXVisionV2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                             video_processor=video_processor, chat_template=chat_template)
    processor.save_pretrained(str(directory))
    save_image_processors(directory, image_processor, video_processor)


def save_image_processors(directory: Path, image_processor: Any, video_processor: Any) -> None:
    """preprocessor_config.json (with the flat min/max_pixels keys) and video_preprocessor_config.json."""
    image_processor.save_pretrained(str(directory))
    video_processor.save_pretrained(str(directory))
    # transformers 5 folds min/max_pixels into `size`; the flat keys (as in the Hub's Think-32B file) keep older
    # readers, e.g. a transformers 4.x encoder, on the same pixel budget.
    path = directory / "preprocessor_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_checkpoint(parts: TrackAParts, directory: Path, tensors: dict[str, torch.Tensor],
                     save_track_processors: Callable[[Path], None], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write a unified checkpoint (either track's parts) into an existing (empty) directory."""
    from transformers import GenerationConfig

    timer = Timer()
    (directory / "config.json").write_text(json.dumps(parts.config, indent=2) + "\n", encoding="utf-8")
    GenerationConfig(bos_token_id=1, eos_token_id=[2], pad_token_id=2).save_pretrained(str(directory))
    total = write_sharded(tensors, directory, max_shard_bytes)
    # Processors first (a processor also writes tokenizer files), then the tokenizer itself so its files are the
    # plain tokenizer's own output.
    save_track_processors(directory)
    parts.tokenizer.save_pretrained(str(directory))
    (directory / "chat_template.jinja").write_text(parts.chat_template, encoding="utf-8")
    logger.info("checkpoint files written in %.1f s (%.1f MB of weights)", timer(), total / 1e6)


def write_track_a(parts: TrackAParts, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write the unified checkpoint files into an existing (empty) directory."""
    write_checkpoint(parts, directory, unified_state_dict(parts),
                     lambda folder: save_processors(folder, parts.tokenizer, parts.chat_template), max_shard_bytes)


def check_parts(parts: TrackAParts) -> dict[str, Any]:
    """Mapping parity and a sample answer of the LM in memory."""
    parity = check_mapping_parity(parts.llama, parts.language_model, parts.tokenizer).as_dict()
    parity["sample_answer"] = sample_answer(parts.language_model, parts.tokenizer)
    return parity


def build_track_a(output: Path, cache_dir: Path, *, check: bool = True, force: bool = False,
                  chat_template_path: Path | None = None) -> BuildResult:
    """Build the unified track A checkpoint into `output` atomically; a no-op when it is already up to date."""
    return build(output, build_identity(load_chat_template(chat_template_path)),
                 lambda: prepare_track_a(cache_dir, chat_template_path), write_track_a, check_parts,
                 lambda directory, parts: check_unified_checkpoint(directory, expected_ids=parts.token_ids),
                 check=check, force=force)
