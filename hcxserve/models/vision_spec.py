"""Shape facts about the vision tower, read from its `ve/config.json` without loading torch or weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VisionTowerSpec:
    out_hidden_size: int
    spatial_merge_size: int

    @classmethod
    def from_dir(cls, ve_dir: str | Path) -> VisionTowerSpec:
        return cls.from_vision_config(json.loads((Path(ve_dir) / "config.json").read_text())["vision_config"])

    @classmethod
    def from_vision_config(cls, vision_config: dict) -> VisionTowerSpec:
        return cls(int(vision_config["out_hidden_size"]), int(vision_config.get("spatial_merge_size", 2)))

    def rows_for_grid(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * h * w // (self.spatial_merge_size**2)
