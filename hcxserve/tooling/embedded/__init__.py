"""Embedded default models: tiny checkpoints built offline, in the real HyperCLOVAX-SEED layouts.

`python -m hcxserve.tooling.embedded --track a --output DIR` builds the track A (Think-32B unified layout) checkpoint,
`--track b` the track B (Omni-8B unified layout) one.
Heavy modules (torch, transformers) load lazily from the submodules, so importing this package stays cheap.
"""

from .common import BUILDER_VERSION, MARKER_NAME, default_cache_dir, is_up_to_date, read_marker

__all__ = ["BUILDER_VERSION", "MARKER_NAME", "default_cache_dir", "is_up_to_date", "read_marker"]
