"""TA-Tok, the Text-Aligned Tokenizer of HyperCLOVAX-SEED-Omni-8B (track B's discrete image tokens).

TA-Tok comes from the Tar paper (csuhan/Tar, `tok/ta_tok.py`): a SigLIP vision tower whose features go through
`encode_task_layer` (Linear + Tanh), the bottleneck's `in_linear` and a SimVQ codebook lookup. Only that encoding
path is built here; the feature decoder (a Siglip2 model, `decode_task_layer`, `bottleneck.out_linear`) exists to
train the tokenizer and is never run, so its weights are dropped when loading.

Weights come from a converted `ve/` folder, where the unified checkpoint's `model.discrete_vision_model.*`
tensors sit under `discrete_vision_model.*`. `ve/config.json:discrete_vision_config` of the real model names
no sizes (only `model_type` and `model_name_or_path`), so `TATokConfig`'s defaults are the real sizes and any
key present in that dict overrides them (that is how a tiny test checkpoint declares its own).

Output: one row of raw codebook indices (0..codebook_size-1) per image; the LLM's token offset is applied
elsewhere. Unlike the original service, the code choice is deterministic (argmax of the cosine similarity)
unless a caller asks for the original's softmax sampling explicitly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hcxserve.convert.errors import ComponentError, few
from hcxserve.models import known_fields, torch_dtype

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
WEIGHT_PREFIX = "discrete_vision_model."  # in ve/ (the unified checkpoint has "model." in front)
# Similarity rows scored at once: bounds the (rows x codebook_size) fp32 score matrix at 512 MiB for the real
# 65536-code book, so a large batch does not need memory in proportion to its size.
_ROWS_PER_CHUNK = 2048

# Parts of the checkpoint the encoding path never reads: the feature decoder, the pooling head and final norm of
# SigLIP (features are taken from an earlier layer), and a distillation teacher if one was saved.
_UNUSED_PREFIXES = (
    "decoder.",
    "decode_task_layer.",
    "bottleneck.out_linear.",
    "teacher.",
    "encoder.post_layernorm.",
    "encoder.head.",
)
_CODEBOOK_KEYS = (
    "bottleneck.regularizer.embedding.weight",
    "bottleneck.regularizer.embedding_proj.weight",
    "bottleneck.regularizer.embedding_proj.bias",
)
_LAYER_PREFIX = "encoder.encoder.layers."


@dataclass(frozen=True)
class TATokConfig:
    """Every size of TA-Tok's encoding path; the defaults are the released Omni-8B tokenizer.

    The SigLIP fields are those of the teacher the original reads from the Hub at start-up
    (`google/siglip2-so400m-patch14-384`, which is SigLIP-v1 architecture); the rest are the tokenizer arguments
    that OmniServe's converter hard-codes. Images are resized to `image_size` squared (the original's
    `input_size`), and `bottleneck_token_num` must equal the patch count: only `pool_scale` 1 is used.
    """

    hidden_size: int = 1152
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    intermediate_size: int = 4304
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    select_layer_id: int = -2  # index into SigLIP's hidden_states (0 = patch embeddings)
    bottleneck_dim: int = 1536
    codebook_size: int = 65536
    bottleneck_token_num: int = 729
    l2_normalized: bool = True
    stochastic_temperature: float = 0.03  # the original samples softmax(cos / this); used only when asked to

    def __post_init__(self) -> None:
        patches = (self.image_size // self.patch_size) ** 2  # 384 / 14: the conv drops the last 6 pixels
        if self.bottleneck_token_num != patches:
            raise ValueError(f"bottleneck_token_num {self.bottleneck_token_num} != {patches} patches (pool_scale 1)")
        if not 0 <= self.layers_run <= self.num_hidden_layers:
            raise ValueError(f"select_layer_id {self.select_layer_id} is outside {self.num_hidden_layers} layers")
        if not self.l2_normalized:
            # The Euclidean SimVQ variant exists in Tar's code but not in any released TA-Tok checkpoint.
            raise ValueError("only the l2-normalized (cosine) SimVQ codebook is supported")
        if self.stochastic_temperature <= 0:
            raise ValueError("stochastic_temperature must be > 0 (a learnable temperature is not supported)")

    @classmethod
    def from_dict(cls, config: dict) -> TATokConfig:
        """Defaults overridden by the keys of `discrete_vision_config` that name a field; others are ignored."""
        return cls(**known_fields(cls, config))

    @property
    def layers_run(self) -> int:
        """SigLIP layers needed to produce hidden_states[select_layer_id]; later layers are never computed."""
        return self.select_layer_id if self.select_layer_id >= 0 else self.num_hidden_layers + 1 + self.select_layer_id

    def siglip_config(self, attn_implementation: str):
        from transformers import SiglipVisionConfig

        names = ("hidden_size", "num_attention_heads", "intermediate_size", "image_size", "patch_size")
        sizes = {name: getattr(self, name) for name in names}
        config = SiglipVisionConfig(
            **sizes,
            num_hidden_layers=self.layers_run,
            num_channels=self.num_channels,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
        )
        config._attn_implementation = attn_implementation
        return config


class _SiglipTrunk(nn.Module):
    """SigLIP's embeddings and its first `layers_run` encoder layers, with the checkpoint's module names."""

    def __init__(self, config) -> None:
        from transformers.models.siglip.modeling_siglip import SiglipEncoder, SiglipVisionEmbeddings

        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Equal to the full model's hidden_states[select_layer_id]: that entry is the raw output of this many
        # layers, before any later layer or the post-layernorm.
        return self.encoder(inputs_embeds=self.embeddings(pixel_values)).last_hidden_state


class _ScalingLayer(nn.Module):
    """TA-Tok's input normalisation `(x - shift) / scale`; the checkpoint stores both (as 0.5: [0,1] -> [-1,1])."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.full((1, channels, 1, 1), 0.5))
        self.register_buffer("scale", torch.full((1, channels, 1, 1), 0.5))


class _Bottleneck(nn.Module):
    def __init__(self, hidden_size: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.in_linear = nn.Linear(hidden_size, bottleneck_dim)


class TATokEncoder(nn.Module):
    def __init__(self, config: TATokConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, not {attn_implementation!r}")
        self.config = config
        self.scale_layer = _ScalingLayer(config.num_channels)
        self.encoder = _SiglipTrunk(config.siglip_config(attn_implementation))
        self.encode_task_layer = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh())
        self.bottleneck = _Bottleneck(config.hidden_size, config.bottleneck_dim)
        # normalize(embedding_proj(embedding.weight)), fp32 as in the original (its SimVQ runs with autocast off);
        # computed once by _set_codebook, not stored in the state dict.
        self.register_buffer("codebook", torch.empty(config.codebook_size, config.bottleneck_dim), persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        ve_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
    ) -> TATokEncoder:
        from hcxserve.convert import load_state_dict, read_component_config

        ve_dir = Path(ve_dir)
        resolved = torch.device(
            "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        )
        raw_config = read_component_config(ve_dir).get("discrete_vision_config")
        if not isinstance(raw_config, dict):
            raise ComponentError(f"{ve_dir}/config.json has no discrete_vision_config: not a track-b ve/ folder")
        try:
            config = TATokConfig.from_dict(raw_config)
        except ValueError as exc:
            raise ComponentError(f"{ve_dir}/config.json: discrete_vision_config: {exc}") from exc
        tensors = load_state_dict(ve_dir, prefix=WEIGHT_PREFIX)

        # On the meta device: the real tower has ~400M parameters and every one is overwritten by the load.
        with torch.device("meta"):
            model = cls(config, attn_implementation)
        state = model.select_weights(tensors, where=str(ve_dir))
        codebook_parts = [state.pop(k) for k in _CODEBOOK_KEYS]
        model.load_state_dict(state, strict=True, assign=True)
        # Non-persistent buffers are not in the state dict, so they are still on the meta device.
        embeddings = model.encoder.embeddings
        embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
        model.codebook = torch.empty(0)
        model = model.to(device=resolved, dtype=torch_dtype(dtype)).eval()
        model._set_codebook(*codebook_parts)  # after .to(dtype): the codebook stays fp32
        logger.info(
            "TA-Tok encoder loaded from %s on %s (%s, %d params, %d codes)",
            ve_dir,
            resolved,
            dtype,
            sum(p.numel() for p in model.parameters()),
            config.codebook_size,
        )
        return model

    def select_weights(self, tensors: dict[str, torch.Tensor], *, where: str) -> dict[str, torch.Tensor]:
        """The encoding path's tensors from a TA-Tok state dict (names without prefix), checked for completeness.

        Returns this module's state dict plus the three SimVQ tensors the codebook is computed from. Tensors of the
        parts that are never run are dropped; a missing tensor, or one the real model does not have at all (a
        sign that discrete_vision_config does not describe these weights), raises ComponentError.
        """
        wanted = set(self.state_dict()) | set(_CODEBOOK_KEYS)
        # A checkpoint without the scaling buffers gets the values the original's constructor sets.
        optional = dict(_ScalingLayer(self.config.num_channels).named_buffers(prefix="scale_layer"))
        missing = sorted(wanted - set(tensors) - set(optional))
        if missing:
            raise ComponentError(f"{where}: TA-Tok weights missing under {WEIGHT_PREFIX!r}: {few(missing)}")
        unexpected = sorted(k for k in tensors if k not in wanted and not _unused(k, self.config))
        if unexpected:
            raise ComponentError(
                f"{where}: unexpected TA-Tok weights under {WEIGHT_PREFIX!r} (does discrete_vision_config match "
                f"the checkpoint?): {few(unexpected)}"
            )
        return optional | {k: v for k, v in tensors.items() if k in wanted}

    @torch.no_grad()
    def _set_codebook(self, embedding: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor) -> None:
        """Project and l2-normalise SimVQ's code embeddings once, instead of on every call as the original does."""
        parts = [t.to(device=self.device, dtype=torch.float32) for t in (embedding, proj_weight, proj_bias)]
        self.codebook = F.normalize(F.linear(*parts), dim=-1)

    @property
    def device(self) -> torch.device:
        return self.bottleneck.in_linear.weight.device

    def pixel_values(self, images: list) -> torch.Tensor:
        """PIL images -> (B, C, S, S) float32 in [0, 1], as OmniServe prepares them for TA-Tok.

        Each image goes to RGB (transparency composited on white), then is resized to S x S with PIL's bicubic
        filter regardless of its aspect ratio, then scaled like torchvision's ToTensor.
        """
        from PIL import Image

        size = (self.config.image_size, self.config.image_size)
        arrays = [np.asarray(_to_rgb(image).resize(size, Image.BICUBIC), dtype=np.uint8) for image in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)

    def project(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] -> (B, tokens, bottleneck_dim) float32: the features SimVQ quantises."""
        scale = self.scale_layer
        pixels = (pixel_values.to(self.device, torch.float32) - scale.shift.float()) / scale.scale.float()
        features = self.encoder(pixels)  # the patch embedding casts to the model's dtype
        return self.bottleneck.in_linear(self.encode_task_layer(features)).float()

    def quantize(
        self, z: torch.Tensor, *, temperature: float | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, N, D) features -> (B, N) int64 code indices, by cosine similarity to the codebook.

        With `temperature` None the most similar code is taken. With a temperature the code is sampled from
        softmax(cos / temperature), which is what the original always does (with config.stochastic_temperature);
        pass a `generator` on z's device to make the draw reproducible.
        """
        if temperature is not None and temperature <= 0:
            raise ValueError("temperature must be > 0")
        rows = F.normalize(z.float().flatten(0, 1), dim=-1)
        picked = []
        for chunk in rows.split(_ROWS_PER_CHUNK):
            cos = chunk @ self.codebook.T
            if temperature is None:
                picked.append(cos.argmax(dim=-1))
            else:
                probs = torch.softmax(cos / temperature, dim=-1)
                picked.append(torch.multinomial(probs, 1, generator=generator).squeeze(-1))
        return torch.cat(picked).view(z.shape[:2])

    def forward(
        self,
        pixel_values: torch.Tensor,
        *,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return self.quantize(self.project(pixel_values), temperature=temperature, generator=generator)

    @torch.inference_mode()
    def encode(
        self, images: list, *, temperature: float | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """PIL images -> (B, bottleneck_token_num) int64 codes in one forward pass (rows do not interact)."""
        if not images:
            return torch.empty(0, self.config.bottleneck_token_num, dtype=torch.long)
        return self(self.pixel_values(images), temperature=temperature, generator=generator)


def _unused(key: str, config: TATokConfig) -> bool:
    """True for checkpoint tensors that exist in the real model but that the encoding path never reads."""
    if key.startswith(_UNUSED_PREFIXES) or key == "encoder.embeddings.position_ids":
        return True
    if key.startswith(_LAYER_PREFIX):
        index = key[len(_LAYER_PREFIX) :].split(".", 1)[0]
        # Layers past select_layer_id are unused; a layer past num_hidden_layers means the config is wrong.
        return index.isdigit() and config.layers_run <= int(index) < config.num_hidden_layers
    return False


def _to_rgb(image):
    """RGB with transparency composited on white (PIL paste with the alpha mask, as OmniServe does)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


# ------------------------------------------------------------------------------------------------ tiny model


def tiny_config() -> dict:
    """`discrete_vision_config` of a tiny TA-Tok that builds in milliseconds: 56 px / 14 -> 16 tokens."""
    sizes = TATokConfig(
        hidden_size=32,
        num_hidden_layers=3,  # select_layer_id -2 then runs 2 of them
        num_attention_heads=2,
        intermediate_size=64,
        image_size=56,
        patch_size=14,
        bottleneck_dim=16,
        codebook_size=1024,
        bottleneck_token_num=16,
    )
    return {"model_type": "ta_tok", "model_name_or_path": "ta_tok.pth", **asdict(sizes)}


def codebook_shapes(config: TATokConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of SimVQ's codebook tensors (`_CODEBOOK_KEYS`), which the loader folds into one buffer."""
    dim = config.bottleneck_dim
    shapes = [(config.codebook_size, dim), (dim, dim), (dim,)]
    return dict(zip(_CODEBOOK_KEYS, shapes, strict=True))


def checkpoint_shapes(config: TATokConfig, decoder_depth: int = 3, **decoder_sizes) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a TA-Tok state dict of these sizes (names as under WEIGHT_PREFIX).

    That is the real model's full set: the SigLIP tower with its pooling head, the Siglip2 feature decoder, both
    task layers, the bottleneck, the SimVQ codebook and the scaling buffers. The decoder is configured as the
    original configures it (Siglip2VisionConfig's defaults with patch_size 1, `decoder_depth` layers,
    bottleneck_dim channels and the tower's width); `decoder_sizes` overrides those defaults.
    """
    from transformers import Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionModel

    tower_config = config.siglip_config("sdpa")
    tower_config.num_hidden_layers = config.num_hidden_layers
    decoder_config = Siglip2VisionConfig(
        patch_size=1,  # the decoder reads one bottleneck vector per "patch"
        num_hidden_layers=decoder_depth,
        num_channels=config.bottleneck_dim,
        hidden_size=config.hidden_size,
        **decoder_sizes,
    )
    with torch.device("meta"):  # only names and shapes are needed
        tower = SiglipVisionModel(tower_config).state_dict()
        decoder = Siglip2VisionModel(decoder_config).state_dict()
    shapes = {f"encoder.{k}": tuple(v.shape) for k, v in tower.items()}
    # transformers 4.x, which wrote the checkpoint, nested Siglip2VisionModel's tower under `vision_model`.
    shapes |= {f"decoder.vision_model.{k}": tuple(v.shape) for k, v in decoder.items()}
    hidden, dim = config.hidden_size, config.bottleneck_dim
    return shapes | {
        "encode_task_layer.0.weight": (hidden, hidden),
        "encode_task_layer.0.bias": (hidden,),
        "decode_task_layer.0.weight": (hidden, hidden),
        "decode_task_layer.0.bias": (hidden,),
        "decode_task_layer.2.weight": (hidden, hidden),
        "decode_task_layer.2.bias": (hidden,),
        "bottleneck.in_linear.weight": (dim, hidden),
        "bottleneck.in_linear.bias": (dim,),
        "bottleneck.out_linear.weight": (hidden, dim),
        "bottleneck.out_linear.bias": (hidden,),
        **codebook_shapes(config),
        "scale_layer.shift": (1, config.num_channels, 1, 1),
        "scale_layer.scale": (1, config.num_channels, 1, 1),
    }


def tiny_components(seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """(discrete_vision_config, tensors named as in a unified Omni checkpoint) of a random tiny TA-Tok.

    It has the real model's full set of tensor names (see checkpoint_shapes), so a tiny checkpoint converts and
    loads through the same code paths as the real one. Values come from one seeded CPU generator in sorted name
    order, so they are the same on every run and machine; each init keeps activations of order one, and the code
    embeddings are standard normal, so their directions are well spread and different images pick different codes.
    """
    config = tiny_config()
    sizes = TATokConfig.from_dict(config)
    # The decoder's default 12 heads do not divide the tiny width.
    decoder = {"num_attention_heads": sizes.num_attention_heads, "intermediate_size": sizes.intermediate_size}
    shapes = checkpoint_shapes(sizes, decoder_depth=1, **decoder)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: _tiny_init(name, shapes[name], generator) for name in sorted(shapes)}
    return config, {f"model.{WEIGHT_PREFIX}{name}": tensor for name, tensor in tensors.items()}


def _tiny_init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.startswith("scale_layer."):  # the values of the real checkpoint: [0, 1] -> [-1, 1]
        return torch.full(shape, 0.5)
    leaf = name.rsplit(".", 2)
    if "norm" in leaf[-2]:  # LayerNorms start as the identity
        return torch.ones(shape) if leaf[-1] == "weight" else torch.zeros(shape)
    if name == "bottleneck.regularizer.embedding.weight":
        return torch.randn(shape, generator=generator)
    if "position_embedding" in name or len(shape) == 1:  # small, so the image content dominates the features
        return torch.randn(shape, generator=generator) * 0.02
    fan_in = int(np.prod(shape[1:]))
    return torch.randn(shape, generator=generator) / fan_in**0.5
