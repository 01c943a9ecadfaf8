"""The arguments a bento takes (`bentoml serve|build|deploy --arg profile=...`, or `args:` in a bentofile)."""

from __future__ import annotations

import bentoml
import pydantic

from hcxserve.config import Deployment, load_deployment


class BentoArgs(pydantic.BaseModel):
    profile: str | None = pydantic.Field(
        None, description="Comma-separated configs/profiles/ overlays (default: HCX_PROFILE, else `embedded`)."
    )


def deployment(*tracks: str) -> Deployment:
    return load_deployment(tracks, profile=bentoml.use_arguments(BentoArgs).profile)
