"""Track B's vision decoder (HyperCLOVAX-SEED-Omni-8B): 729 discrete image codes -> an image.

The LLM draws an image as text: a ratio token `<|vision_ratio_W:H|>` followed by 27 x 27 code tokens
`<|visionNNNNN|>` (NNNNN is a TA-Tok/SimVQ codebook index in 0..65535, written with five digits by the tokenizer;
OmniServe's parser accepts any number of digits and so does `parse_image_tokens`). The ratio picks the output size
(`size_for_ratio`). The decoder is a flow-matching diffusion model conditioned on the codes, OmniServe's diffusers
`VisionTokenToImagePipeline`:

- `token_embedder` (VisionTokenEmbedder, in `hcxserve.models.vision_dit`): codes -> rows of a frozen table; the
  mean of the rows is the pooled vector.
- `transformer` (VisionTransformer, in `hcxserve.models.vision_dit`): a Flux-style DiT with single-stream blocks
  only. Every latent pixel is one token: its channels concatenated with the 27 x 27 grid of code rows, bilinearly
  resized here to the latent's height x width; conditioned on the time and the pooled vector, it predicts the flow
  (velocity).
- `transformer2` (optional): a second, weaker DiT of the same kind for autoguidance,
  `pred = pred + g * (pred - pred2)`, used when it is present and the guidance scale is above 0.
- `vae`: a diffusers AutoencoderKL (16 latent channels, x8), decoding `latents / scaling_factor + shift_factor`.
- `scheduler`: a diffusers FlowMatchEulerDiscreteScheduler.

Folder layout (the unified checkpoint's `decoder/vision/`, copied to `vd/` by the converter), diffusers style:

    vd/model_index.json                   _class_name VisionTokenToImagePipeline; one entry per component
                                          ([library, class], or [null, null] for an absent transformer2)
    vd/token_embedder/config.json         vocab_size, embedding_dim, token_length
    vd/token_embedder/diffusion_pytorch_model.safetensors    vocab_embeddings, uncond_embedding
    vd/transformer/config.json            in_channels, vec_in_dim, context_in_dim, hidden_size, mlp_ratio,
                                          num_heads, depth, depth_single_blocks, axes_dim, theta, use_patchify
    vd/transformer/diffusion_pytorch_model.safetensors       img_in, time_in, vector_in, single_blocks.N, final_layer
    vd/transformer2/...                   (optional) the same layout
    vd/vae/{config.json, diffusion_pytorch_model.safetensors}  read by diffusers' AutoencoderKL
    vd/scheduler/scheduler_config.json    read by diffusers' FlowMatchEulerDiscreteScheduler

The token embedder and DiT subfolders are read by `vision_dit.load_component` (which also accepts sharded or
`model.safetensors` weights and ignores unknown config keys).

The pipeline is a plain class rather than a diffusers DiffusionPipeline: DiffusionPipeline.from_pretrained would
import the token embedder and the DiT by the module name written in model_index.json (the original's own file),
and its `__call__` runs one request at a time. Here each component is loaded from its subfolder explicitly and
`generate` batches requests of one size into one forward pass per step.

Sampling follows the original: latents `randn [1, C, H/8, W/8]` per request from a generator seeded on the
decoder's device (so a request's image does not depend on what it is batched with), the scheduler's timesteps, an
Euler step per timestep, then VAE decode, clamp to [-1, 1] and truncation to uint8.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hcxserve.convert.errors import ComponentError
from hcxserve.models import resolve_device, torch_dtype
from hcxserve.models.vision_dit import (
    IMAGE_TOKEN_COUNT,
    TokenEmbedderConfig,
    VisionTokenEmbedder,
    VisionTransformer,
    VisionTransformerConfig,
    load_component,
    read_json_object,
)

logger = logging.getLogger(__name__)

PIPELINE_CLASS = "VisionTokenToImagePipeline"
REQUIRED_COMPONENTS = ("token_embedder", "transformer", "vae", "scheduler")

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 0.75  # OmniServe's API default (its pipeline's own default, 0.0, is never reached)

# Ratio tokens the LLM can emit, as W:H; each is listed with its transpose. The output size keeps about
# DEFAULT_PIXEL_DENSITY pixels, each side rounded down to a multiple of SIZE_MULTIPLE.
VISION_RATIOS: tuple[str, ...] = (
    "1:1", "1:2", "2:1", "3:4", "4:3", "3:5", "5:3", "4:5", "5:4", "6:9", "9:6", "9:16", "16:9",
)  # fmt: skip
DEFAULT_PIXEL_DENSITY = 768 * 768
SIZE_MULTIPLE = 16

_RATIO_TOKEN = re.compile(r"<\|vision_ratio_(\d+):(\d+)\|>")
# OmniServe's own pattern (serve.py parse_vision_tokens): digits only, so <|vision_ratio_..|>, <|vision_eol|> and
# <|vision_eof|> never match.
_CODE_TOKEN = re.compile(r"<\|vision(\d+)\|>")


class VisionDecoderInputError(ValueError):
    """A decode request this decoder cannot serve: the ratio token is missing or unknown, there are too few image
    tokens, a code is out of range, or a size or sampling parameter is invalid. The message is meant for the
    client (a server answers 400)."""


# ------------------------------------------------------------------------------------------------ sizes and parsing


def size_for_ratio(
    ratio: str, *, pixel_density: int = DEFAULT_PIXEL_DENSITY, multiple: int = SIZE_MULTIPLE
) -> tuple[int, int]:
    """(width, height) in pixels for a ratio "W:H" from VISION_RATIOS.

    The rule is OmniServe's (serve.py `ratio2res`): with r = H / W, width = sqrt(density / r) and
    height = sqrt(density * r), each floored to a multiple of `multiple`, in the same floating-point steps so the
    sizes are the original's exactly (768^2: 1:1 -> 768 x 768, 16:9 -> 1024 x 576). A smaller `pixel_density`
    gives the same shapes at a smaller scale (tests use it).
    """
    if ratio not in VISION_RATIOS:
        raise VisionDecoderInputError(f"unknown image ratio {ratio!r}: expected one of {', '.join(VISION_RATIOS)}")
    w, h = (int(part) for part in ratio.split(":"))
    r = h / w
    width = int(((pixel_density / r) ** 0.5 // multiple) * multiple)
    height = int(((pixel_density * r) ** 0.5 // multiple) * multiple)
    if width < multiple or height < multiple:
        raise ValueError(f"pixel_density {pixel_density} is too small for ratio {ratio}")
    return width, height


@dataclass(frozen=True)
class ImageTokens:
    """What the LLM wrote for one image: its ratio ("W:H") and its codebook indices, in row-major grid order."""

    ratio: str
    codes: tuple[int, ...]

    def size(self, *, pixel_density: int = DEFAULT_PIXEL_DENSITY) -> tuple[int, int]:
        return size_for_ratio(self.ratio, pixel_density=pixel_density)


def parse_image_tokens(text: str | Sequence[str], *, token_count: int = IMAGE_TOKEN_COUNT) -> ImageTokens:
    """The ratio and the first `token_count` codes of an image in LLM output.

    `text` is the detokenized output, or a sequence of token strings (joined as they are). The first
    `<|vision_ratio_W:H|>` gives the ratio; every `<|visionN|>` gives a code, in order, other text and framing
    tokens (`<|discrete_image_start|>`, `<|vision_eol|>`, ...) being skipped. Like the original, codes past
    `token_count` are dropped; unlike it, a missing or unknown ratio or too few codes raises
    VisionDecoderInputError rather than an AssertionError, KeyError or shape error. Code ranges are checked by
    VisionDecoder.generate, which knows the codebook size.
    """
    if not isinstance(text, str):
        text = "".join(text)
    ratio_match = _RATIO_TOKEN.search(text)
    if ratio_match is None:
        raise VisionDecoderInputError("no image ratio token <|vision_ratio_W:H|> in the model output")
    # int() first, as the original's table lookup does, so "<|vision_ratio_06:09|>" means 6:9.
    ratio = f"{int(ratio_match.group(1))}:{int(ratio_match.group(2))}"
    size_for_ratio(ratio)  # raises for an unknown ratio
    codes = [int(digits) for digits in _CODE_TOKEN.findall(text)]
    if len(codes) < token_count:
        raise VisionDecoderInputError(f"an image needs {token_count} image tokens <|visionN|>, found {len(codes)}")
    return ImageTokens(ratio=ratio, codes=tuple(codes[:token_count]))


# ------------------------------------------------------------------------------------------------ loading


def _present_components(folder: Path) -> set[str]:
    """Components model_index.json declares (an entry of [null, null] means absent), each checked on disk."""
    index = read_json_object(folder / "model_index.json")
    if index.get("_class_name", PIPELINE_CLASS) != PIPELINE_CLASS:
        raise ComponentError(f"{folder}/model_index.json: {index['_class_name']!r} is not {PIPELINE_CLASS}")
    present = {
        name
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and any(part is not None for part in entry)
    }
    missing = [name for name in REQUIRED_COMPONENTS if name not in present]
    if missing:
        raise ComponentError(f"{folder}/model_index.json declares no {', '.join(missing)}")
    absent = sorted(name for name in present if not (folder / name).is_dir())
    if absent:
        raise ComponentError(f"{folder}: model_index.json declares {', '.join(absent)} but the folder lacks it")
    return present


# ------------------------------------------------------------------------------------------------ the pipeline


class VisionDecoder:
    """Image codes -> PIL images, batching requests of one size; build it with `from_pretrained`."""

    def __init__(
        self,
        token_embedder: VisionTokenEmbedder,
        transformer: VisionTransformer,
        vae,
        scheduler,
        transformer2: VisionTransformer | None = None,
        *,
        truncate_timesteps: bool = True,
        max_batch_size: int = 4,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        for name, model in (("transformer", transformer), ("transformer2", transformer2)):
            if model is None:
                continue
            sizes = model.config
            width = token_embedder.config.embedding_dim
            if sizes.context_in_dim != width or sizes.vec_in_dim != width:
                raise ComponentError(f"{name}: context_in_dim and vec_in_dim must equal the code width {width}")
            if sizes.in_channels != vae.config.latent_channels:
                raise ComponentError(f"{name}: in_channels {sizes.in_channels} != the VAE's latent channels")
        if scheduler.config.get("use_dynamic_shifting") or scheduler.config.get("stochastic_sampling"):
            # The original never passes `mu` or a per-step noise generator to the scheduler.
            raise ComponentError("scheduler: use_dynamic_shifting and stochastic_sampling are not supported")
        self.token_embedder = token_embedder
        self.transformer = transformer
        self.transformer2 = transformer2
        self.vae = vae
        self.scheduler_config = dict(scheduler.config)
        self.scheduler_class = type(scheduler)
        # NOTE: OmniServe casts each scheduler timestep to int64 before sigma = t / num_train_timesteps, so the DiT
        # sees a truncated time (e.g. 0.9796 -> 0.979) while the Euler step uses the exact sigma. Possibly an
        # accident, but the released weights were presumably tuned with it; False feeds the exact sigma instead.
        self.truncate_timesteps = truncate_timesteps
        self.max_batch_size = max_batch_size

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        device: str = "auto",
        dtype: str = "bfloat16",
        load_transformer2: bool = True,
        truncate_timesteps: bool = True,
        max_batch_size: int = 4,
    ) -> VisionDecoder:
        """Load a `vd/` folder. bfloat16 is the original's choice (its comment: 16 s per image against 2 min).
        `load_transformer2=False` skips the autoguidance model (about half the memory; guidance is then off)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        folder = Path(folder)
        resolved = torch.device(resolve_device(device))
        weights_dtype = torch_dtype(dtype)
        present = _present_components(folder)
        token_embedder = load_component(
            VisionTokenEmbedder, TokenEmbedderConfig, folder / "token_embedder", resolved, weights_dtype
        )
        transformer = load_component(
            VisionTransformer, VisionTransformerConfig, folder / "transformer", resolved, weights_dtype
        )
        transformer2 = None
        if load_transformer2 and "transformer2" in present:
            transformer2 = load_component(
                VisionTransformer, VisionTransformerConfig, folder / "transformer2", resolved, weights_dtype
            )
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=weights_dtype).to(resolved).eval()
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        decoder = cls(
            token_embedder,
            transformer,
            vae,
            scheduler,
            transformer2,
            truncate_timesteps=truncate_timesteps,
            max_batch_size=max_batch_size,
        )
        logger.info(
            "vision decoder loaded from %s on %s (%s, DiT %d params, autoguidance %s)",
            folder,
            resolved,
            dtype,
            sum(p.numel() for p in transformer.parameters()),
            "on" if transformer2 is not None else "off",
        )
        return decoder

    @property
    def device(self) -> torch.device:
        return self.transformer.img_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.img_in.weight.dtype

    @property
    def token_count(self) -> int:
        return self.token_embedder.config.token_length

    @property
    def codebook_size(self) -> int:
        return self.token_embedder.config.vocab_size

    @property
    def has_autoguidance(self) -> bool:
        return self.transformer2 is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.inference_mode()
    def generate(
        self,
        token_batches: Sequence[Sequence[int]],
        sizes: tuple[int, int] | Sequence[tuple[int, int]],
        *,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        seeds: Sequence[int | None] | None = None,
    ) -> list:
        """One PIL image per code list, in order.

        `sizes` is one (width, height) for all, or one per request; each side a positive multiple of the VAE's
        factor (8). Each code list needs `token_count` (729) codes in 0..codebook_size-1; more are cut to the first
        729, as the original does. A seed of None draws a fresh one. Guidance above 0 runs transformer2 when the
        decoder has it and is ignored otherwise (there is nothing to guide with). Requests of one size run
        together, at most `max_batch_size` per forward pass; a request's image does not depend on its batch.
        """
        count = len(token_batches)
        if isinstance(sizes, tuple) and len(sizes) == 2 and all(isinstance(s, int) for s in sizes):
            sizes = [sizes] * count
        seeds = [None] * count if seeds is None else list(seeds)
        if len(sizes) != count or len(seeds) != count:
            raise ValueError(f"{count} token lists need as many sizes and seeds, got {len(sizes)} and {len(seeds)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise VisionDecoderInputError(f"steps must be a positive integer, not {steps!r}")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise VisionDecoderInputError(f"guidance_scale must be a finite number >= 0, not {guidance_scale!r}")
        codes = [self.check_codes(tokens, i) for i, tokens in enumerate(token_batches)]
        checked_sizes = [self._check_size(size, i) for i, size in enumerate(sizes)]
        for seed in seeds:
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
                raise VisionDecoderInputError(f"a seed must be an integer in [0, 2**64), not {seed!r}")
        seeds = [secrets.randbits(63) if seed is None else seed for seed in seeds]
        if guidance_scale > 0 and not self.has_autoguidance:
            logger.debug("guidance_scale %s ignored: no transformer2 loaded", guidance_scale)

        images: list = [None] * count
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(checked_sizes):
            by_size.setdefault(size, []).append(i)
        for (width, height), indices in by_size.items():
            for start in range(0, len(indices), self.max_batch_size):
                chunk = indices[start : start + self.max_batch_size]
                pixels = self._sample(
                    torch.stack([codes[i] for i in chunk]),
                    width,
                    height,
                    [seeds[i] for i in chunk],
                    steps,
                    guidance_scale,
                )
                for i, image in zip(chunk, _to_pil(pixels)):
                    images[i] = image
        return images

    def check_codes(self, tokens: Sequence[int], index: int) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor | np.ndarray):
            tokens = tokens.tolist()
        if len(tokens) < self.token_count:
            raise VisionDecoderInputError(f"image {index}: needs {self.token_count} image tokens, got {len(tokens)}")
        codes = list(tokens[: self.token_count])
        # Checked in Python, before torch sees them: an out-of-range Python int would overflow int64 there.
        for code in codes:
            if isinstance(code, bool) or not isinstance(code, Integral):  # numpy integers are Integral
                raise VisionDecoderInputError(f"image {index}: image tokens must be integers, not {code!r}")
            if not 0 <= code < self.codebook_size:
                raise VisionDecoderInputError(
                    f"image {index}: image token {code} is outside the codebook (0..{self.codebook_size - 1})"
                )
        return torch.tensor([int(code) for code in codes], dtype=torch.long)

    def _check_size(self, size: tuple[int, int], index: int) -> tuple[int, int]:
        factor = self.vae_scale_factor
        try:
            width, height = (int(side) for side in size)
        except (TypeError, ValueError) as exc:
            raise VisionDecoderInputError(f"image {index}: size must be (width, height), not {size!r}") from exc
        if width < factor or height < factor or width % factor or height % factor:
            raise VisionDecoderInputError(
                f"image {index}: width and height must be positive multiples of {factor}, not {width}x{height}"
            )
        return width, height

    def _sample(
        self,
        codes: torch.Tensor,
        width: int,
        height: int,
        seeds: list[int],
        steps: int,
        guidance_scale: float,
    ) -> torch.Tensor:
        """(B, N) codes of one size -> (B, 3, height, width) decoded pixels in [-1, 1]."""
        device, dtype = self.device, self.dtype
        factor = self.vae_scale_factor
        rows, cols = height // factor, width // factor
        channels = self.transformer.config.in_channels
        # One draw per request from its own generator: the same latents as the original running it alone.
        latents = torch.cat(
            [
                torch.randn(
                    (1, channels, rows, cols),
                    generator=torch.Generator(device=device).manual_seed(seed),
                    device=device,
                    dtype=dtype,
                )
                for seed in seeds
            ]
        )
        code_rows, pooled = self.token_embedder(codes.to(device))
        code_rows, pooled = code_rows.to(dtype), pooled.to(dtype)
        side = self.token_embedder.config.grid_side
        grid = code_rows.transpose(1, 2).reshape(len(seeds), -1, side, side)  # row-major codes -> (B, D, 27, 27)
        code_grid = F.interpolate(grid, size=(rows, cols), mode="bilinear").flatten(2).transpose(1, 2)

        positions = torch.zeros(rows, cols, 3, device=device)
        positions[..., 1] = torch.arange(rows, device=device)[:, None]
        positions[..., 2] = torch.arange(cols, device=device)[None, :]
        positions = positions.view(-1, 3)
        guide = self.transformer2 if guidance_scale > 0 else None
        rotations = self.transformer.rope(positions)
        rotations2 = guide.rope(positions) if guide is not None else None

        # A scheduler per call: it counts its steps, so one shared instance would make concurrent calls collide.
        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps, device=device)
        train_steps = scheduler.config.num_train_timesteps
        for t in scheduler.timesteps:
            x = torch.cat((latents.flatten(2).transpose(1, 2), code_grid), dim=2)
            time = torch.full((len(seeds),), float(t), device=device)
            sigmas = (time.long() if self.truncate_timesteps else time).float() / train_steps
            flow = self.transformer(x, rotations, sigmas, pooled)
            if guide is not None:
                flow = flow + guidance_scale * (flow - guide(x, rotations2, sigmas, pooled))
            flow = flow.transpose(1, 2).reshape(latents.shape)
            latents = scheduler.step(flow, t, latents).prev_sample

        config = self.vae.config
        shift = config.get("shift_factor") or 0.0
        return self.vae.decode(latents / config.scaling_factor + shift).sample


def _to_pil(pixels: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> RGB images; values are truncated to uint8, as the original does."""
    from PIL import Image

    arrays = ((pixels.clamp(-1, 1) + 1) / 2).float().cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((array * 255).astype(np.uint8)) for array in arrays]
