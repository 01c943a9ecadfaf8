"""Shape facts about the vision encoder, read from its `ve/config.json` without loading torch or weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VisionTowerSpec:
    out_hidden_size: int  # width of the rows the encoder returns
    spatial_merge_size: int
    discrete: bool = False  # images also get TA-Tok codes (track B)

    @classmethod
    def from_dir(cls, ve_dir: str | Path) -> VisionTowerSpec:
        return cls.from_config(json.loads((Path(ve_dir) / "config.json").read_text()))

    @classmethod
    def from_config(cls, config: dict) -> VisionTowerSpec:
        """A `ve/` that holds the projector (track B's layout) returns projected, LLM-width rows; otherwise the
        rows are the ViT merger output and the LLM projects them (track A)."""
        vision_config = config["vision_config"]
        projector = config.get("projector")
        width = projector["out_features"] if projector else vision_config["out_hidden_size"]
        return cls(
            int(width),
            int(vision_config.get("spatial_merge_size", 2)),
            config.get("discrete_vision_config") is not None,
        )

    def rows_for_grid(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * h * w // (self.spatial_merge_size**2)
