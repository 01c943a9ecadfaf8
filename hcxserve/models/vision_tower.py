"""Qwen2.5-VL vision tower of HyperCLOVAX-SEED (track A's continuous image encoder).

Loads a converted `ve/` component folder (see `convert_model.py`): `config.json` with `vision_config`,
the tower's weights under `vision_model.*`, and the Qwen2-VL `preprocessor_config.json`. On track A the output rows
are the ViT merger output *before* the projector: the LLM (vLLM's HCXVisionV2ForCausalLM) owns and applies the
projector, so there is exactly one copy of it. On track B the projector (`mm_projector.*`) sits in `ve/` and is
applied here, so the rows are LLM-width.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from hcxserve.models import resolve_device, torch_dtype, varlen_attention
from hcxserve.models.vision_spec import VisionTowerSpec
from hcxserve.protocol.payloads import encode_tensor

logger = logging.getLogger(__name__)


@dataclass
class VisionFeatures:
    features: torch.Tensor  # (rows, spec.out_hidden_size)
    grid_thw: tuple[int, int, int]

    def to_b64(self) -> str:
        return encode_tensor(self.features)


class VisionTower:
    def __init__(
        self,
        model,
        processor,
        video_processor,
        spec: VisionTowerSpec,
        device: torch.device,
        dtype: torch.dtype,
        projector: torch.nn.Linear | None = None,
    ) -> None:
        self.model = model
        self.projector = projector
        self.processor = processor
        self.video_processor = video_processor
        self.spec = spec
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls, ve_dir: str | Path, *, device: str = "auto", dtype: str = "bfloat16", attn_implementation: str = "sdpa"
    ) -> VisionTower:
        from transformers import Qwen2_5_VLVisionConfig, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        from hcxserve.convert import load_state_dict

        ve_dir = Path(ve_dir)
        resolved = torch.device(resolve_device(device))
        weights_dtype = torch_dtype(dtype)
        ve_config = json.loads((ve_dir / "config.json").read_text())
        vision_config = ve_config["vision_config"]
        config = Qwen2_5_VLVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        config._attn_implementation = attn_implementation
        # Not on the meta device: the rotary embedding's non-persistent buffers are computed at construction.
        model = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=weights_dtype)
        model.load_state_dict(load_state_dict(ve_dir, prefix="vision_model."), strict=True)
        model = model.to(device=resolved, dtype=weights_dtype).eval()
        if attn_implementation == "sdpa":
            # The same SDPA, one call per window length rather than one per window (see varlen_attention). Set on
            # the config the blocks share, not through set_attn_implementation, which takes the name for a kernel.
            model.config._attn_implementation = varlen_attention.register()
        processor = Qwen2VLImageProcessor.from_pretrained(ve_dir)
        video_processor = Qwen2VLVideoProcessor.from_pretrained(ve_dir)
        logger.info(
            "vision tower loaded from %s on %s (%s, %d params)",
            ve_dir,
            resolved,
            dtype,
            sum(p.numel() for p in model.parameters()),
        )
        projector = None
        if ve_config.get("projector"):
            shape = ve_config["projector"]
            projector = torch.nn.Linear(shape["in_features"], shape["out_features"])
            projector.load_state_dict(load_state_dict(ve_dir, prefix="mm_projector."), strict=True)
            projector = projector.to(device=resolved, dtype=weights_dtype).eval()
        spec = VisionTowerSpec.from_config(ve_config)
        return cls(model, processor, video_processor, spec, resolved, weights_dtype, projector)

    def preprocess(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """One PIL image -> its patches, on the tower's device and in its dtype, and its (1, 3) grid: what the
        processor makes of it in a batch (it treats each image alone), so that images can be preprocessed side by
        side, each copied to the accelerator by the thread that made it, and encoded together."""
        batch = self.processor(images=[image], return_tensors="pt")
        return batch["pixel_values"].to(self.device, self.dtype), batch["image_grid_thw"]

    def encode(self, images: list) -> list[VisionFeatures]:
        """Encode PIL images in one forward pass (the ViT attends within each image, so batching is exact)."""
        return self.encode_preprocessed([self.preprocess(image) for image in images])

    @torch.inference_mode()
    def encode_preprocessed(self, images: list[tuple[torch.Tensor, torch.Tensor]]) -> list[VisionFeatures]:
        """Encode what `preprocess` made of each image, in one forward pass."""
        if not images:
            return []
        return self._forward(torch.cat([patches for patches, _ in images]), torch.cat([grid for _, grid in images]))

    @torch.inference_mode()
    def encode_video(self, frames, *, max_pixels: int) -> VisionFeatures:
        """Encode sampled frames ((T, H, W, 3) uint8, T even), each resized to at most `max_pixels`."""
        min_pixels = self.video_processor.size["shortest_edge"]
        batch = self.video_processor(
            videos=[frames],
            return_tensors="pt",
            do_sample_frames=False,
            cap_pixels_per_frame=True,
            size={"shortest_edge": min(min_pixels, max_pixels), "longest_edge": max_pixels},
        )
        (features,) = self._forward(batch["pixel_values_videos"], batch["video_grid_thw"])
        return features

    def _forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[VisionFeatures]:
        pixel_values = pixel_values.to(self.device, self.dtype)
        features = self.model(pixel_values, grid_thw=grid_thw.to(self.device)).pooler_output
        if self.projector is not None:
            features = self.projector(features)
        # off an accelerator in one copy, not one per image when each is serialised
        features = features.cpu()
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        sizes = [self.spec.rows_for_grid(g) for g in grids]
        return [VisionFeatures(f, g) for f, g in zip(features.split(sizes), grids)]
