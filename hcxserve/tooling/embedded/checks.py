"""Checks for the embedded track A checkpoint: Llama→HyperCLOVAX mapping parity and a reload of the saved files."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import Timer
from .tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, roundtrip_errors

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("hcxserve.tooling.embedded")

PARITY_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)
PARITY_TOLERANCE = 1e-4
IMAGE_BLOCK = "<|image_start|><|IMAGE_PAD|><|image_end|>"
# Files of every unified checkpoint; each track's REQUIRED_FILES adds its own processor files.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)
REQUIRED_FILES = (*CHECKPOINT_FILES, "processor_config.json")


class EmbeddedCheckError(RuntimeError):
    """The built checkpoint is not what the services expect."""


@dataclass
class ParityResult:
    max_abs_diff: float
    argmax_equal: bool
    positions: int
    compared_vocab: int
    next_token: str

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= PARITY_TOLERANCE and self.argmax_equal

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check_mapping_parity(llama: torch.nn.Module, hcx: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                         prompt: str = PARITY_PROMPT, raise_on_failure: bool = True) -> ParityResult:
    """Logits of HyperCLOVAX (fp32) vs the source Llama on a fixed prompt, over the Llama's vocabulary."""
    import torch

    timer = Timer()
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        ref = llama(input_ids=ids).logits.float()
        got = hcx(input_ids=ids).logits.float()
    vocab = ref.shape[-1]
    # The HCX vocab is padded; the padded rows are new tokens the Llama does not have, so compare the shared part.
    diff = float((ref - got[..., :vocab]).abs().max())
    argmax_equal = bool(torch.equal(ref.argmax(-1), got[..., :vocab].argmax(-1))) and bool(
        torch.equal(ref.argmax(-1), got.argmax(-1)))
    result = ParityResult(max_abs_diff=diff, argmax_equal=argmax_equal, positions=ids.shape[1],
                          compared_vocab=vocab, next_token=tokenizer.decode([int(got[0, -1].argmax())]))
    logger.info("parity: max|llama-hcx| logits = %.3g over %d positions, argmax equal: %s (%.1f s)", diff,
                ids.shape[1], argmax_equal, timer())
    if raise_on_failure and not result.ok:
        raise EmbeddedCheckError(f"Llama -> HyperCLOVAX mapping parity failed: {result}")
    return result


ANSWER_QUESTION = "What is the capital of France?"


def sample_answer(hcx: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, question: str = ANSWER_QUESTION,
                  max_new_tokens: int = 16, raise_on_failure: bool = True, **template_kwargs: Any) -> str:
    """Greedy answer of the HyperCLOVAX LM to a chat-templated question (think block closed by default)."""
    import torch

    prompt = render_chat(tokenizer, [{"role": "user", "content": question}], **template_kwargs)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = ids
    step_input, past = ids, None
    with torch.no_grad():
        for _ in range(max_new_tokens):  # plain greedy loop: independent of generate()'s config handling
            result = hcx(input_ids=step_input, past_key_values=past, use_cache=True)
            past = result.past_key_values
            step_input = result.logits[0, -1].argmax().view(1, 1)
            out = torch.cat([out, step_input], dim=1)
            if int(step_input) == eos:
                break
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    logger.info("sample answer %s: %r", template_kwargs or "", answer)
    if raise_on_failure and not answer.strip():
        raise EmbeddedCheckError(f"the LM answers {question!r} with nothing (ids {out[0, ids.shape[1]:].tolist()})")
    return answer


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def template_errors(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    errors: list[str] = []
    text_only = [{"role": "user", "content": "Hi"}]
    on = render_chat(tokenizer, text_only, thinking=True)
    off = render_chat(tokenizer, text_only, thinking=False)
    if not on.endswith("<|im_start|>assistant\n<think>\n"):
        errors.append(f"thinking=True prompt ends {on[-40:]!r}")
    if not off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"):
        errors.append(f"thinking=False prompt ends {off[-40:]!r}")
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    rendered = render_chat(tokenizer, image)
    if rendered.count(IMAGE_BLOCK) != 1 or '<|mime_start|>{"id": "image_00"' not in rendered:
        errors.append(f"image part rendered as {rendered!r}")
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    if ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) != 1:
        errors.append("the rendered image prompt does not hold exactly one <|IMAGE_PAD|> id")
    return errors


def read_shapes(directory: Path) -> tuple[list[str], dict[str, tuple[int, ...]], dict[str, str]]:
    """Index vs shard contents; returns (errors, {name: shape}, {name: dtype})."""
    from safetensors import safe_open

    errors: list[str] = []
    index = json.loads((directory / "model.safetensors.index.json").read_text(encoding="utf-8"))
    weight_map: dict[str, str] = index["weight_map"]
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(directory / shard), framework="pt") as fh:
            for name in fh.keys():
                if weight_map.get(name) != shard:
                    errors.append(f"{name} is in {shard} but the index says {weight_map.get(name)}")
                sl = fh.get_slice(name)
                shapes[name] = tuple(sl.get_shape())
                dtypes[name] = sl.get_dtype()
    if set(shapes) != set(weight_map):
        errors.append(f"index lists {len(weight_map)} tensors, shards hold {len(shapes)}")
    return errors, shapes, dtypes


def core_shapes(text_config: Any, vision_config: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the LM, ViT and projector tensors, as the transformers modules they feed have them."""
    import torch
    from transformers import HyperCLOVAXForCausalLM
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    # Built on the meta device: no memory, no init.
    with torch.device("meta"):
        lm = HyperCLOVAXForCausalLM(text_config)
        vit = Qwen2_5_VisionTransformerPretrainedModel(vision_config)
    shapes = {f"model.language_model.{k}": tuple(v.shape) for k, v in lm.state_dict().items()}
    shapes.update({f"model.vision_model.{k}": tuple(v.shape) for k, v in vit.state_dict().items()})
    shapes["model.mm_projector.weight"] = (text_config.hidden_size, vision_config.out_hidden_size)
    shapes["model.mm_projector.bias"] = (text_config.hidden_size,)
    return shapes


def _weight_errors(directory: Path, config: Any) -> tuple[list[str], dict[str, Any]]:
    """Index vs shard contents, dtypes, and names/shapes against the transformers modules they feed."""
    import torch

    errors, shapes, dtypes = read_shapes(directory)
    errors += [f"{n} is {dtypes[n]}, expected BF16" for n in sorted(dtypes) if dtypes[n] != "BF16"]
    total = sum(2 * int(torch.Size(shape).numel()) for shape in shapes.values())
    index = json.loads((directory / "model.safetensors.index.json").read_text(encoding="utf-8"))
    if index["metadata"]["total_size"] != total:
        errors.append(f"index total_size {index['metadata']['total_size']} != {total}")

    expected = core_shapes(config.text_config, config.vision_config)
    for name in sorted(set(expected) | set(shapes)):
        if name not in shapes:
            errors.append(f"missing tensor {name}")
        elif name not in expected:
            errors.append(f"unexpected tensor {name}")
        elif shapes[name] != expected[name]:
            errors.append(f"{name} has shape {shapes[name]}, expected {expected[name]}")
    if shapes.get("model.language_model.lm_head.weight") is None:
        errors.append("no explicit lm_head")
    info = {"tensors": len(shapes), "shards": len(set(index["weight_map"].values())), "weight_bytes": total}
    return errors, info


def read_fp32_tensors(directory: Path, prefixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """The saved tensors under each prefix, as fp32 and named without it: {prefix: {name: tensor}}."""
    from safetensors import safe_open

    index = json.loads((directory / "model.safetensors.index.json").read_text(encoding="utf-8"))
    groups: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(directory / shard), framework="pt") as fh:
            for name in fh.keys():
                prefix = next((p for p in prefixes if name.startswith(p)), None)
                if prefix is not None:
                    groups[prefix][name.removeprefix(prefix)] = fh.get_tensor(name).float()
    return groups


def load_vision_fp32(directory: Path, vision_config: Any, text_hidden_size: int
                     ) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The saved ViT and mm_projector as fp32 modules (sdpa attention on `vision_config`)."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    groups = read_fp32_tensors(directory, ("model.vision_model.", "model.mm_projector."))
    vision_config._attn_implementation = "sdpa"
    vision = Qwen2_5_VisionTransformerPretrainedModel(vision_config).float().eval()
    vision.load_state_dict(groups["model.vision_model."], strict=True)
    projector = torch.nn.Linear(vision_config.out_hidden_size, text_hidden_size).eval()
    projector.load_state_dict(groups["model.mm_projector."], strict=True)
    return vision, projector


def probe_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (640, 480), (200, 80, 40))


def vision_run_errors(directory: Path, image_processor: Any, vision_config: Any, text_hidden_size: int
                      ) -> tuple[list[str], dict[str, Any]]:
    """Run the saved ViT + projector on a processed image: proves the weights load and the token count adds up."""
    import torch

    errors: list[str] = []
    features = image_processor(images=[probe_image()], return_tensors="pt")
    grid = features["image_grid_thw"]
    n_tokens = int(grid.prod(-1).sum()) // vision_config.spatial_merge_size**2
    vision, projector = load_vision_fp32(directory, vision_config, text_hidden_size)
    with torch.no_grad():
        rows = projector(vision(features["pixel_values"].float(), grid_thw=grid).pooler_output)
    if tuple(rows.shape) != (n_tokens, text_hidden_size):
        errors.append(f"projected image rows {tuple(rows.shape)}, expected {(n_tokens, text_hidden_size)}")
    if not bool(torch.isfinite(rows).all()):
        errors.append("projected image rows are not finite")
    info = {"image_grid_thw": grid.tolist(), "image_tokens": n_tokens,
            "image_row_norm": float(rows.norm(dim=-1).mean())}
    return errors, info


def _vision_run(directory: Path, config: Any) -> tuple[list[str], dict[str, Any]]:
    """The saved processor: its class, its image token, and a vision run on its images with its pad expansion."""
    from transformers import AutoProcessor

    errors: list[str] = []
    processor = AutoProcessor.from_pretrained(str(directory))
    if type(processor).__name__ != "HyperCLOVAXVisionV2Processor":
        errors.append(f"AutoProcessor gave {type(processor).__name__}")
    if getattr(processor, "image_token", None) != IMAGE_TOKEN:
        errors.append(f"processor.image_token is {getattr(processor, 'image_token', None)!r}")
    vision_errors, info = vision_run_errors(directory, processor.image_processor, config.vision_config,
                                            config.text_config.hidden_size)
    errors += vision_errors

    # The full processor expands the single pad into one pad per merged patch, as vLLM does from the grid.
    text = render_chat(processor.tokenizer, [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                           "text": "Hi"}]}])
    expanded = processor(text=[text], images=[probe_image()], return_tensors="pt")
    pad_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_pads = int((expanded["input_ids"] == pad_id).sum())
    if n_pads != info["image_tokens"]:
        errors.append(f"processor expanded to {n_pads} image pads, expected {info['image_tokens']}")
    return errors, info


def load_unified_fp32(directory: Path) -> dict[str, Any]:
    """The saved checkpoint as fp32 transformers modules: {"lm", "vision", "projector", "processor", "config"}.

    A hand-built HF reference (ViT -> mm_projector -> HyperCLOVAX LM) to compare serving engines against; the
    native HyperCLOVAXVisionV2ForConditionalGeneration cannot load it (it expects `model.projector`).
    """
    from transformers import AutoConfig, AutoProcessor, HyperCLOVAXForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(str(directory))
    lm = HyperCLOVAXForCausalLM(config.text_config).float().eval()
    lm.load_state_dict(read_fp32_tensors(directory, ("model.language_model.",))["model.language_model."], strict=True)
    vision, projector = load_vision_fp32(directory, config.vision_config, config.text_config.hidden_size)
    return {"lm": lm, "vision": vision, "projector": projector, "config": config,
            "processor": AutoProcessor.from_pretrained(str(directory))}


def check_unified_checkpoint(directory: Path, expected_ids: dict[str, int] | None = None,
                             raise_on_failure: bool = True) -> dict[str, Any]:
    """Reload the saved checkpoint with transformers and check config, weights, tokenizer, template, processor."""
    from transformers import AutoConfig, AutoTokenizer, HyperCLOVAXConfig, HyperCLOVAXVisionV2Config

    timer = Timer()
    directory = Path(directory)
    errors: list[str] = [f"missing {name}" for name in REQUIRED_FILES if not (directory / name).is_file()]
    if errors:
        raise EmbeddedCheckError("; ".join(errors))

    config = AutoConfig.from_pretrained(str(directory))
    text = config.text_config
    if not isinstance(config, HyperCLOVAXVisionV2Config) or not isinstance(text, HyperCLOVAXConfig):
        errors.append(f"config classes {type(config).__name__}/{type(text).__name__}")
    if text.use_post_norm or text.tie_word_embeddings or config.tie_word_embeddings:
        errors.append("use_post_norm and tie_word_embeddings must be false")
    if (text.embedding_multiplier, text.residual_multiplier, text.logits_scaling) != (1.0, 1.0, 1.0):
        errors.append("MuP multipliers must be 1")
    if abs(text.attention_multiplier - text.head_dim**-0.5) > 1e-12:
        errors.append(f"attention_multiplier {text.attention_multiplier} != head_dim**-0.5")
    if config.vision_config.out_hidden_size != text.hidden_size:
        errors.append("vision out_hidden_size != text hidden_size")
    if text.vocab_size % 64:
        errors.append(f"vocab_size {text.vocab_size} is not a multiple of 64")

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    errors += roundtrip_errors(tokenizer, expected_ids)
    if config.image_token_id != tokenizer.convert_tokens_to_ids(IMAGE_TOKEN):
        errors.append(f"image_token_id {config.image_token_id} is not <|IMAGE_PAD|>")
    if config.video_token_id != tokenizer.convert_tokens_to_ids(VIDEO_TOKEN):
        errors.append(f"video_token_id {config.video_token_id} is not <|VIDEO_PAD|>")
    if len(tokenizer) > text.vocab_size:
        errors.append(f"tokenizer has {len(tokenizer)} tokens, model vocab {text.vocab_size}")
    errors += template_errors(tokenizer)
    generation = json.loads((directory / "generation_config.json").read_text(encoding="utf-8"))
    if generation.get("eos_token_id") != [2]:
        errors.append(f"generation_config eos_token_id {generation.get('eos_token_id')}")

    weight_errors, weight_info = _weight_errors(directory, config)
    vision_errors, vision_info = _vision_run(directory, config)
    errors += weight_errors + vision_errors
    report = {"ok": not errors, "errors": errors, "tokenizer_class": type(tokenizer).__name__,
              "tokenizer_len": len(tokenizer), "vocab_size": text.vocab_size, **weight_info, **vision_info,
              "seconds": round(timer(), 2)}
    logger.info("checkpoint check: %s (%d tensors in %d shards, image grid %s -> %d tokens, %.1f s)",
                "ok" if not errors else f"{len(errors)} problems", weight_info["tensors"], weight_info["shards"],
                vision_info["image_grid_thw"], vision_info["image_tokens"], timer())
    if errors and raise_on_failure:
        raise EmbeddedCheckError("; ".join(errors))
    return report
