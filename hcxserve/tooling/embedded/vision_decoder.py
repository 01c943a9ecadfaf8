"""Tiny seeded track B vision decoders: `vd/` folders in the real layout (see `hcxserve.models.vision_decoder`).

A tiny decoder samples a 64 x 64 image in milliseconds on a CPU and is read by the same loading code as the real
one, so tests run the whole pipeline without the released weights; the embedded track B checkpoint is to get its
decoders from here too. The same seed gives the same weights on any machine.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from hcxserve.models.vision_decoder import PIPELINE_CLASS
from hcxserve.models.vision_dit import (
    IMAGE_TOKEN_COUNT,
    TokenEmbedderConfig,
    VisionTokenEmbedder,
    VisionTransformer,
    VisionTransformerConfig,
)


def tiny_configs() -> dict[str, dict]:
    """config.json contents of a tiny decoder that samples a 64 x 64 image in milliseconds; keys as in the real
    folder (including ones the loader ignores), so a tiny folder is read by the same code as the real one."""
    embedder = TokenEmbedderConfig(vocab_size=1024, embedding_dim=16, token_length=IMAGE_TOKEN_COUNT)
    transformer = VisionTransformerConfig(
        in_channels=16,
        vec_in_dim=16,
        context_in_dim=16,
        hidden_size=64,
        num_heads=2,
        depth_single_blocks=2,
        axes_dim=(8, 12, 12),
    )
    transformer_config = asdict(transformer) | {"axes_dim": list(transformer.axes_dim), "qkv_bias": True}
    return {
        "token_embedder": {"_class_name": "VisionTokenEmbedder", **asdict(embedder)},
        "transformer": {"_class_name": "VisionTransformer", **transformer_config, "guidance_embed": False},
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,  # three downsamplings: x8
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 8, 8, 8],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "latent_channels": 16,
            "scaling_factor": 0.3611,  # the FLUX.1 VAE's, so decoding exercises both factors
            "shift_factor": 0.1159,
        },
    }


def write_tiny_folder(folder: str | Path, *, seed: int = 0, transformer2: bool = True) -> Path:
    """Write a random tiny `vd/` folder in the real layout; the same seed gives the same weights on any machine."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, __version__
    from safetensors.torch import save_file

    folder = Path(folder)
    configs = tiny_configs()
    names = ["token_embedder", "transformer", *(["transformer2"] if transformer2 else [])]
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        config = configs["token_embedder" if name == "token_embedder" else "transformer"]
        if name == "token_embedder":
            module = VisionTokenEmbedder(TokenEmbedderConfig.from_dict(config))
        else:
            module = VisionTransformer(VisionTransformerConfig.from_dict(config))
        state = {key: _tiny_init(key, value, generator) for key, value in sorted(module.state_dict().items())}
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps({**config, "_diffusers_version": __version__}))
        save_file(state, str(folder / name / "diffusion_pytorch_model.safetensors"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        AutoencoderKL(**configs["vae"]).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    # "pipeline" stands for the original's own module; only whether an entry is null is read.
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": __version__,
        "token_embedder": ["pipeline", "VisionTokenEmbedder"],
        "transformer": ["pipeline", "VisionTransformer"],
        "transformer2": ["pipeline", "VisionTransformer"] if transformer2 else [None, None],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _tiny_init(name: str, tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    shape = tuple(tensor.shape)
    if name.endswith(".scale"):  # RMSNorm starts as the identity
        return torch.ones(shape)
    if name in ("vocab_embeddings", "uncond_embedding"):  # unit rows, so different codes differ clearly
        return torch.randn(shape, generator=generator)
    if len(shape) == 1:
        return torch.randn(shape, generator=generator) * 0.02
    return torch.randn(shape, generator=generator) / shape[1] ** 0.5
