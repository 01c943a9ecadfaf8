"""Reading and validating a unified HyperCLOVAX checkpoint (config + index + shards), without loading any data."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, few
from .safetensors_io import TensorInfo, read_header
from .tables import DECODER_DIRS, SINGLE_WEIGHTS, WEIGHTS_INDEX


@dataclass
class Checkpoint:
    root: Path
    config: dict
    tensors: dict[str, TensorInfo]  # every tensor named by the index, with its shard and byte range
    shard_files: list[str]
    index_file: str | None
    fingerprint: str = field(default="")

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def load_checkpoint(root: Path) -> Checkpoint:
    """Validate the layout and every shard header; fail with a CheckpointError that names the problem."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"input {root} is not a directory")
    config = read_json(root / "config.json", what="config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{root / 'config.json'}: not a JSON object")
    index_file, weight_map = _read_weight_map(root)
    tensors = _read_shards(root, weight_map)
    shard_files = sorted(set(weight_map.values()))
    ckpt = Checkpoint(root, config, tensors, shard_files, index_file)
    ckpt.fingerprint = fingerprint(ckpt)
    return ckpt


def read_json(path: Path, *, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{what} not found in {path.parent}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from exc


def _read_weight_map(root: Path) -> tuple[str | None, dict[str, str]]:
    """tensor name -> shard file; a checkpoint without an index must be a single model.safetensors."""
    if not (root / WEIGHTS_INDEX).exists():
        if (root / SINGLE_WEIGHTS).exists():
            return None, {key: SINGLE_WEIGHTS for key in read_header(root / SINGLE_WEIGHTS)}
        raise CheckpointError(f"{WEIGHTS_INDEX} not found in {root} (and no single {SINGLE_WEIGHTS})")
    index = read_json(root / WEIGHTS_INDEX, what=WEIGHTS_INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{root / WEIGHTS_INDEX}: no weight_map")
    for name in set(weight_map.values()):
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"{root / WEIGHTS_INDEX}: invalid shard file name {name!r}")
    return WEIGHTS_INDEX, weight_map


def _read_shards(root: Path, weight_map: dict[str, str]) -> dict[str, TensorInfo]:
    by_file: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_file.setdefault(name, []).append(key)
    missing = sorted(name for name in by_file if not (root / name).is_file())
    if missing:
        raise CheckpointError(f"missing shard file(s) named by the index: {', '.join(missing)}")
    tensors: dict[str, TensorInfo] = {}
    for name, keys in sorted(by_file.items()):
        header = read_header(root / name)
        absent = sorted(set(keys) - header.keys())
        if absent:
            raise CheckpointError(f"{name}: the index names {len(absent)} tensor(s) not in this shard: {few(absent)}")
        extra = sorted(header.keys() - set(keys))
        if extra:
            raise CheckpointError(f"{name}: holds {len(extra)} tensor(s) that the index does not list: {few(extra)}")
        _check_with_safetensors(root / name)
        tensors.update((key, header[key]) for key in keys)
    return tensors


def _check_with_safetensors(path: Path) -> None:
    """Second opinion from the safetensors library itself (it only maps the file; no data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own SafetensorError plus OSError
        raise CheckpointError(f"{path}: safetensors rejects the file ({exc})") from exc


def fingerprint(ckpt: Checkpoint) -> str:
    """Cheap identity of the input: config + index bytes and each data file's (name, size, mtime)."""
    h = hashlib.sha256()
    for name in ("config.json", ckpt.index_file):
        if name:
            h.update(name.encode() + b"\0" + (ckpt.root / name).read_bytes() + b"\0")
    files = [ckpt.root / name for name in ckpt.shard_files]
    for rel in DECODER_DIRS.values():
        base = ckpt.root / rel
        if base.is_dir():
            files.extend(sorted(p for p in base.rglob("*") if p.is_file()))
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(ckpt.root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return "sha256:" + h.hexdigest()
