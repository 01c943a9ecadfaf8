"""Loading a converted component folder (llm/, ve/, ae/): what the services call.

from hcxserve.convert import read_component, load_state_dict
config, tensors = read_component(root / "ve")                     # everything
vit.load_state_dict(load_state_dict(root / "ve", prefix="vision_model."), strict=True)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ComponentError, few
from .tables import MANIFEST_FORMAT, MANIFEST_NAME, SINGLE_WEIGHTS, WEIGHTS_INDEX

if TYPE_CHECKING:
    import torch


def read_manifest(root: str | Path) -> dict:
    """OUT/manifest.json of a finished conversion (it is written last, so its presence means complete)."""
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ComponentError(f"{path} not found: {root} is not a finished hcxserve conversion") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ComponentError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ComponentError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def read_component_config(path: str | Path) -> dict:
    config_path = Path(path) / "config.json"
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ComponentError(f"{config_path} not found") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ComponentError(f"{config_path}: unreadable ({exc})") from exc


def weight_map(path: str | Path) -> dict[str, str]:
    """tensor name -> file name, from model.safetensors.index.json or the single model.safetensors."""
    from safetensors import safe_open

    path = Path(path)
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ComponentError(f"{index}: unreadable weight index ({exc})") from exc
        missing = sorted(f for f in set(mapping.values()) if not (path / f).is_file())
        if missing:
            raise ComponentError(f"{path}: weight file(s) named by the index are missing: {few(missing)}")
        return dict(mapping)
    single = path / SINGLE_WEIGHTS
    if not single.is_file():
        raise ComponentError(f"{path}: neither {WEIGHTS_INDEX} nor {SINGLE_WEIGHTS} found")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {key: SINGLE_WEIGHTS for key in f.keys()}
    except Exception as exc:  # SafetensorError: corrupt or truncated file
        raise ComponentError(f"{single}: unreadable safetensors file ({exc})") from exc


def iter_tensors(
    path: str | Path, prefix: str | None = None, *, strip_prefix: bool = True, device: str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one file at a time, so a caller that places tensors as they come holds one copy."""
    path = Path(path)
    by_file: dict[str, list[str]] = {}
    for key, name in weight_map(path).items():
        if prefix is None or key.startswith(prefix):
            by_file.setdefault(name, []).append(key)
    for name, keys in sorted(by_file.items()):
        yield from _read_file(path / name, keys, prefix if strip_prefix else None, device)


def _read_file(file: Path, keys: list[str], strip: str | None, device: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt", device=device)
    except Exception as exc:  # SafetensorError: corrupt or truncated file
        raise ComponentError(f"{file}: unreadable safetensors file ({exc})") from exc
    with handle as f:
        absent = sorted(set(keys) - set(f.keys()))
        if absent:
            raise ComponentError(f"{file}: the index names tensor(s) not in the file: {few(absent)}")
        for key in sorted(keys):
            yield (key[len(strip) :] if strip else key), f.get_tensor(key)


def load_state_dict(
    path: str | Path, prefix: str | None = None, *, strip_prefix: bool = True, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """All tensors of a component folder (single file or sharded), optionally only those under `prefix`.

    With a prefix such as "vision_model." the prefix is removed from the names (strip_prefix=False keeps it),
    so the result goes straight into `module.load_state_dict(..., strict=True)`. An unknown prefix that matches
    nothing is an error rather than an empty dict, because a silent empty load is the worse failure.
    """
    tensors = dict(iter_tensors(path, prefix, strip_prefix=strip_prefix, device=device))
    if prefix is not None and not tensors:
        raise ComponentError(f"{path}: no tensor starts with {prefix!r}")
    return tensors


def read_component(path: str | Path, prefix: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, {name: tensor}) of a component folder."""
    return read_component_config(path), load_state_dict(path, prefix)
