"""Checks for the embedded track B checkpoint: token blocks, config ids, template, weights, a ViT run, decoders."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import (
    CHECKPOINT_FILES,
    PARITY_PROMPT,
    EmbeddedCheckError,
    core_shapes,
    read_shapes,
    render_chat,
    vision_run_errors,
)
from .common import Timer
from .tokenizer import (
    AUDIO_TOKEN,
    DISCRETE_AUDIO_TOKEN,
    DISCRETE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    OMNI_SPECIAL_TOKENS,
    VISION_OUTPUT_TOKENS,
    roundtrip_errors,
    unit_block_errors,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from .track_b import TrackBParts

logger = logging.getLogger("hcxserve.tooling.embedded")

# No processor_config.json: the Omni processor is remote code with no transformers class to name.
REQUIRED_FILES = (*CHECKPOINT_FILES, "video_preprocessor_config.json")
IMAGE_BLOCK = (f"<|discrete_image_start|>{DISCRETE_IMAGE_TOKEN}<|discrete_image_end|>\n"
               f"<|image_start|>{IMAGE_TOKEN}<|image_end|>")
AUDIO_BLOCK = (f"<|discrete_audio_start|>{DISCRETE_AUDIO_TOKEN}<|discrete_audio_end|>\n"
               f"<|audio_start|>{AUDIO_TOKEN}<|audio_end|>")


def new_token_mass(lm: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, first_new: int = 49152,
                   prompt: str = PARITY_PROMPT) -> float:
    """Largest next-token probability mass on the added tokens over the prompt's positions (sampling risk)."""
    import torch

    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        probs = lm(input_ids=ids).logits.float().softmax(-1)
    return float(probs[0, :, first_new:].sum(-1).max())


def config_id_errors(config: dict[str, Any], tokenizer: PreTrainedTokenizerBase, unit_counts: dict[str, int]
                     ) -> list[str]:
    from .tokenizer import VISION_RATIOS, vision_ratio_token
    from .track_b import CONFIG_TOKEN_IDS

    errors = []
    for key, token in CONFIG_TOKEN_IDS.items():
        if config.get(key) != tokenizer.convert_tokens_to_ids(token):
            errors.append(f"config {key}={config.get(key)} but {token} is {tokenizer.convert_tokens_to_ids(token)}")
    ratios = config.get("discrete_image_ratio_token_ids") or {}
    if set(ratios) != set(VISION_RATIOS) or any(
            ratios[r] != tokenizer.convert_tokens_to_ids(vision_ratio_token(r)) for r in VISION_RATIOS):
        errors.append(f"discrete_image_ratio_token_ids {ratios} do not match the tokenizer")
    audio0, image0 = config.get("discrete_audio_unit_0_id"), config.get("discrete_image_unit_0_id")
    if audio0 != tokenizer.convert_tokens_to_ids("<|audio0000|>"):
        errors.append(f"discrete_audio_unit_0_id {audio0} is not <|audio0000|>")
    if image0 != tokenizer.convert_tokens_to_ids("<|vision00000|>"):
        errors.append(f"discrete_image_unit_0_id {image0} is not <|vision00000|>")
    vocab = config["text_config"]["vocab_size"]
    if vocab % 64 or len(tokenizer) > vocab:
        errors.append(f"text vocab_size {vocab} (tokenizer {len(tokenizer)}) is not a padded superset")
    for unit0, count in ((audio0, unit_counts["audio"]), (image0, unit_counts["image"])):
        if not isinstance(unit0, int) or unit0 + count > vocab:
            errors.append(f"unit block {unit0}+{count} does not fit the vocab {vocab}")
    if config.get("llm_hidden_size") != config["text_config"]["hidden_size"]:
        errors.append("llm_hidden_size != text hidden_size")
    if config["vision_config"].get("out_hidden_size") != config["text_config"]["hidden_size"]:
        errors.append("vision out_hidden_size != text hidden_size")
    for key in ("audio_config", "discrete_vision_config", "discrete_audio_config"):
        if not isinstance(config.get(key), dict):
            errors.append(f"config has no {key}")
    return errors


def template_errors_b(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    errors: list[str] = []
    text_only = [{"role": "user", "content": "Hi"}]
    on = render_chat(tokenizer, text_only)
    off = render_chat(tokenizer, text_only, skip_reasoning=True)
    if not on.endswith("<|im_start|>assistant\n<think>\n"):
        errors.append(f"default prompt ends {on[-40:]!r}")
    if not off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"):
        errors.append(f"skip_reasoning prompt ends {off[-40:]!r}")
    mixed = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "What?"}]}]
    rendered = render_chat(tokenizer, mixed)
    if rendered.count(IMAGE_BLOCK) != 1 or rendered.count(AUDIO_BLOCK) != 1:
        errors.append(f"image/audio parts rendered as {rendered!r}")
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    for token in (IMAGE_TOKEN, DISCRETE_IMAGE_TOKEN, AUDIO_TOKEN, DISCRETE_AUDIO_TOKEN):
        if ids.count(tokenizer.convert_tokens_to_ids(token)) != 1:
            errors.append(f"the rendered prompt does not hold exactly one {token} id")
    return errors


def weight_errors_b(directory: Path, config: dict[str, Any], component_shapes: dict[str, tuple[int, ...]] | None
                    ) -> tuple[list[str], dict[str, Any]]:
    """Names/shapes of the LM, ViT and projector against their transformers modules; components against theirs."""
    import torch
    from transformers import HyperCLOVAXConfig

    errors, shapes, dtypes = read_shapes(directory)
    expected = core_shapes(HyperCLOVAXConfig(**config["text_config"]), saved_vision_config(config))
    core = set(expected)
    if component_shapes is not None:
        expected.update(component_shapes)
    for name in sorted(set(expected) | set(shapes)):
        if name not in shapes:
            errors.append(f"missing tensor {name}")
        elif name not in expected:
            if component_shapes is not None or name.startswith(("model.language_model.", "model.vision_model.",
                                                                  "model.mm_projector.")):
                errors.append(f"unexpected tensor {name}")
        elif shapes[name] != expected[name]:
            errors.append(f"{name} has shape {shapes[name]}, expected {expected[name]}")
    errors += [f"{n} is {dtypes[n]}, expected BF16" for n in sorted(core & set(dtypes)) if dtypes[n] != "BF16"]
    from .track_b import AUDIO_PREFIXES, DISCRETE_VISION_PREFIX

    for prefix in (DISCRETE_VISION_PREFIX, *AUDIO_PREFIXES[:3]):
        if not any(n.startswith(prefix) for n in shapes):
            errors.append(f"no {prefix}* tensors")
    total = sum(int(torch.Size(s).numel()) * (2 if dtypes[n] in ("BF16", "F16") else 4) for n, s in shapes.items())
    return errors, {"tensors": len(shapes), "weight_bytes": total}


def decoder_errors(directory: Path, counts: dict[str, int]) -> tuple[list[str], dict[str, Any]]:
    """Load decoder/vision/ and the archives of decoder/audio/ (unpacked by the converter's own code) with the
    services' loaders, run each once, and check their vocabularies against the LLM's unit blocks."""
    import tempfile

    import torch

    from hcxserve.convert.audio_decoder import plan_vocoders, write_vocoders
    from hcxserve.models.unit_vocoder import SAMPLES_PER_UNIT, UnitVocoder
    from hcxserve.models.vision_decoder import VisionDecoder

    from .track_b import DECODER_DIR

    errors: list[str] = []
    timer = Timer()
    vision = VisionDecoder.from_pretrained(directory / DECODER_DIR / "vision", device="cpu", dtype="float32")
    if vision.codebook_size != counts["image"]:
        errors.append(f"vision decoder codebook {vision.codebook_size} != the {counts['image']} image units")
    (image,) = vision.generate([[0] * vision.token_count], (64, 64), steps=1, seeds=[0])
    if image.size != (64, 64):
        errors.append(f"vision decoder drew a {image.size} image, not 64 x 64")
    speakers: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "ad"
        write_vocoders(plan_vocoders(directory / DECODER_DIR / "audio", f"{DECODER_DIR}/audio"), out, lambda n: None)
        for variant in ("finetuned", "zeroshot"):
            vocoder = UnitVocoder.from_pretrained(out / variant)
            if vocoder.config.num_units != counts["audio"]:
                errors.append(f"{variant} audio decoder has {vocoder.config.num_units} units, not {counts['audio']}")
            if variant == "finetuned":
                speakers = vocoder.speakers
                wave = vocoder(torch.tensor([[0, counts["audio"] - 1]]), vocoder.speaker_embedding())
                if wave.shape != (1, 2 * SAMPLES_PER_UNIT) or not bool(torch.isfinite(wave).all()):
                    errors.append(f"finetuned audio decoder gave {tuple(wave.shape)} samples for 2 units")
    return errors, {"speakers": speakers, "decoders_seconds": round(timer(), 2)}


def saved_vision_config(config: dict[str, Any]) -> Any:
    """The ViT config from config.json's `vision_config` (its `model_type` names the Omni remote code's class)."""
    from transformers import Qwen2_5_VLVisionConfig

    return Qwen2_5_VLVisionConfig(**{k: v for k, v in config["vision_config"].items() if k != "model_type"})


def check_track_b_checkpoint(directory: Path, parts: TrackBParts | None = None, raise_on_failure: bool = True
                             ) -> dict[str, Any]:
    """Reload the saved checkpoint: files, config ids vs tokenizer, unit blocks, template, weights, a ViT run, and
    one run of each decoder."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    timer = Timer()
    directory = Path(directory)
    errors: list[str] = [f"missing {name}" for name in REQUIRED_FILES if not (directory / name).is_file()]
    if errors:
        raise EmbeddedCheckError("; ".join(errors))
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    load = Timer()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    load_seconds = load()
    from .track_b import image_codebook_size

    counts = {"audio": 3**8, "image": image_codebook_size(config["discrete_vision_config"])}
    expected_ids = None
    if parts is not None:
        expected_ids = {k: v for k, v in parts.token_ids.items() if not k.endswith("unit_0")}
        if parts.unit_counts != counts:
            errors.append(f"unit counts {parts.unit_counts} != {counts} from the saved config")
    errors += roundtrip_errors(tokenizer, expected_ids)
    for token in (*OMNI_SPECIAL_TOKENS, *VISION_OUTPUT_TOKENS):
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or (expected_ids and ids[0] != expected_ids[token]):
            errors.append(f"{token} encodes to {ids}")
    if getattr(tokenizer, "audio_token", None) != AUDIO_TOKEN:
        errors.append(f"tokenizer.audio_token is {getattr(tokenizer, 'audio_token', None)!r}")
    errors += unit_block_errors(tokenizer, config.get("discrete_audio_unit_0_id", -1), counts["audio"],
                                config.get("discrete_image_unit_0_id", -1), counts["image"])
    errors += config_id_errors(config, tokenizer, counts)
    errors += template_errors_b(tokenizer)
    component_shapes = None
    if parts is not None:
        component_shapes = {n: tuple(t.shape) for n, t in parts.component_tensors.items()}
    weight_errors, weight_info = weight_errors_b(directory, config, component_shapes)
    vision_errors, vision_info = vision_run_errors(directory, Qwen2VLImageProcessor.from_pretrained(str(directory)),
                                                   saved_vision_config(config), config["text_config"]["hidden_size"])
    decoders, decoder_info = decoder_errors(directory, counts)
    errors += weight_errors + vision_errors + decoders
    report = {"ok": not errors, "errors": errors, "tokenizer_len": len(tokenizer),
              "tokenizer_load_seconds": round(load_seconds, 3), "vocab_size": config["text_config"]["vocab_size"],
              **weight_info, **vision_info, **decoder_info, "seconds": round(timer(), 2)}
    logger.info("track B checkpoint check: %s (%d tensors, tokenizer %d tokens loads in %.2f s, %.1f s)",
                "ok" if not errors else f"{len(errors)} problems", weight_info["tensors"], len(tokenizer),
                load_seconds, timer())
    if errors and raise_on_failure:
        raise EmbeddedCheckError("; ".join(errors))
    return report
