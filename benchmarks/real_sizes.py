"""Encoder folders at the released models' sizes, with random weights, for timing on an accelerator.

The released checkpoints cannot be fetched where the benchmarks run, and the embedded defaults are too small for a
GPU's timings to mean anything (a forward pass is a few kernel launches). These folders carry the sizes of
HyperCLOVAX-SEED-Think-32B's and -Omni-8B's encoders (`omniserve-models.md` §2.1-2.3) in `config.json`, written as
a converted checkpoint writes them, and a random tensor for every weight their loader reads, so they load through
the same `from_pretrained` as a real `ve/` or `ae/` folder. Names and shapes come from the modules themselves,
built on the meta device. The work per item does not depend on the weights' values, so neither do the timings;
the outputs mean nothing.

    folder = write_real_size_folder(embedded_ve, tmp / "ve", "vision_encoder")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# Qwen2.5-VL-32B's vision tower, shared by both tracks (§2.1); Omni-8B's projector maps its 5120 to 4096.
VISION_CONFIG = {
    "depth": 32,
    "hidden_size": 1280,
    "num_heads": 16,
    "intermediate_size": 3456,
    "out_hidden_size": 5120,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}
# Qwen2-Audio-7B's encoder (§2.3).
AUDIO_CONFIG = {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120}
OMNI_TEXT_HIDDEN = 4096
THINK_TEXT_HIDDEN = 5120
# The real checkpoints' configs name no sizes for these three: the loaders' defaults are the released sizes.
REAL_DEFAULTS = {
    "discrete_vision_config": {"model_type": "ta_tok", "model_name_or_path": "ta_tok.pth"},
    "discrete_audio_config": {"model_type": "cosyvoice2"},
    "video_audio_compressor_config": {},
}


def real_size_config(config: dict, kind: str) -> dict:
    """`config.json` of an embedded `ve/` or `ae/` folder with every size replaced by the released model's."""
    config = json.loads(json.dumps(config))
    for key, value in REAL_DEFAULTS.items():
        if key in config:
            config[key] = dict(value)
    if kind == "vision_encoder":
        config["vision_config"].update(VISION_CONFIG)
        omni = "projector" in config
        config["text_hidden_size"] = OMNI_TEXT_HIDDEN if omni else THINK_TEXT_HIDDEN
        if omni:
            config["projector"] = {"in_features": VISION_CONFIG["out_hidden_size"], "out_features": OMNI_TEXT_HIDDEN}
    elif kind == "audio_encoder":
        config["audio_config"].update(AUDIO_CONFIG)
        config["text_hidden_size"] = OMNI_TEXT_HIDDEN
    else:
        raise ValueError(f"no released sizes for {kind!r}")
    return config


def weight_shapes(config: dict, kind: str) -> dict[str, tuple[int, ...]]:
    """Every tensor the loader of a folder with this `config.json` reads, by name, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def add(prefix: str, module: torch.nn.Module) -> None:
        shapes.update({prefix + name: tuple(t.shape) for name, t in module.state_dict().items()})

    with torch.device("meta"):
        if kind == "vision_encoder":
            from transformers import Qwen2_5_VLVisionConfig
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

            from hcxserve.models.ta_tok import WEIGHT_PREFIX, TATokConfig, TATokEncoder, codebook_shapes

            vision = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
            tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLVisionConfig(**vision))
            add("vision_model.", tower)
            if projector := config.get("projector"):
                add("mm_projector.", torch.nn.Linear(projector["in_features"], projector["out_features"]))
            if "discrete_vision_config" in config:
                ta_tok = TATokConfig.from_dict(config["discrete_vision_config"])
                add(WEIGHT_PREFIX, TATokEncoder(ta_tok))
                shapes.update({WEIGHT_PREFIX + key: shape for key, shape in codebook_shapes(ta_tok).items()})
        else:
            from transformers import Qwen2AudioEncoderConfig
            from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

            from hcxserve.models.audio_encoder import build_projector
            from hcxserve.models.mambamia import CONFIG_KEY, WEIGHT_PREFIX, MambaMiaCompressor, MambaMiaConfig
            from hcxserve.models.s3_tokenizer import S3Tokenizer, S3TokenizerConfig

            audio = Qwen2AudioEncoderConfig.from_dict(config["audio_config"])
            text_hidden = config["text_hidden_size"]
            add("audio_model.", Qwen2AudioEncoder._from_config(audio))
            add("audio_projector.", build_projector(config["audio_projector_type"], audio.d_model, text_hidden))
            add("discrete_audio_model.", S3Tokenizer(S3TokenizerConfig.from_dict(config["discrete_audio_config"])))
            if CONFIG_KEY in config:
                add(WEIGHT_PREFIX, MambaMiaCompressor(MambaMiaConfig.from_component_config(config, where="ae")))
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, device: str) -> torch.Tensor:
    """bf16 values at a trained network's scale: norm scales 1, biases 0, TA-Tok's input scaling 0.5, else N(0, .02)."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(("scale_layer.shift", "scale_layer.scale")):
        return torch.full(shape, 0.5, dtype=torch.bfloat16)
    if leaf == "bias":
        return torch.zeros(shape, dtype=torch.bfloat16)
    if len(shape) == 1 and leaf == "weight":
        return torch.ones(shape, dtype=torch.bfloat16)
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * 0.02
    return values.to(torch.bfloat16).cpu()


def write_real_size_folder(embedded: Path, out: Path, kind: str, device: str = "cpu", seed: int = 0) -> Path:
    """A copy of an embedded `ve/` or `ae/` folder at the released sizes, with random weights (one safetensors file)."""
    from safetensors.torch import save_file

    config = real_size_config(json.loads((embedded / "config.json").read_text()), kind)
    out.mkdir(parents=True, exist_ok=True)
    for path in embedded.glob("*.json"):
        if path.name != "config.json" and not path.name.endswith(".index.json"):
            shutil.copy(path, out / path.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator(device=device).manual_seed(seed)
    shapes = weight_shapes(config, kind)
    tensors = {name: random_tensor(name, shape, generator, device) for name, shape in shapes.items()}
    save_file(tensors, out / "model.safetensors")
    return out
