"""--verify: re-read every written tensor with the safetensors library and compare it with the input.

Deliberately independent of the writer: names, shapes and dtypes come from the output files as safetensors reads
them, content is compared byte for byte with the input tensor read through safetensors and cast with torch.
ad/, unpacked from archives rather than split from shards, is checked by `audio_decoder.verify_vocoders`: its files,
their bytes against the archives', and a fit to the audio decoder.
"""

from __future__ import annotations

import filecmp
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from .audio_decoder import verify_vocoders
from .errors import ComponentError, VerifyError, few
from .loader import weight_map
from .plan import ComponentPlan, ConversionPlan
from .safetensors_io import OutTensor, single_torch_thread, torch_dtype
from .tables import WEIGHTS_INDEX

VERIFY_CHUNK = 32 * 1024 * 1024  # bytes compared at a time per side
VERIFY_WINDOW = 256 * 1024 * 1024  # bytes read through one mapping before it is dropped


def verify_output(plan: ConversionPlan, out_root: Path, on_bytes: Callable[[int], object] = lambda n: None) -> None:
    with single_torch_thread():
        _verify_components(plan, out_root, on_bytes)


def _verify_components(plan: ConversionPlan, out_root: Path, on_bytes: Callable[[int], object]) -> None:
    for name, component in plan.components.items():
        target = out_root / name
        if component.vocoders:
            # Archived checkpoints are extracted again for the comparison: next to the output, never inside it.
            with tempfile.TemporaryDirectory(prefix=f".{out_root.name}.verify-", dir=out_root.parent) as scratch:
                verify_vocoders(component.vocoders, target, Path(scratch))
            on_bytes(component.tree_bytes)
            continue
        if component.copy_tree is not None:
            _verify_tree(component.copy_tree, target)
            on_bytes(component.tree_bytes)
            continue
        for rel in component.copy_files:
            if not filecmp.cmp(plan.ckpt.root / rel, target / rel, shallow=False):
                raise VerifyError(f"{name}/{rel} differs from the input file")
        if not (target / "config.json").is_file():
            raise VerifyError(f"{name}/config.json is missing")
        _verify_tensors(component, target, on_bytes)


def _verify_tensors(component: ComponentPlan, target: Path, on_bytes: Callable[[int], object]) -> None:
    try:
        written = weight_map(target)
    except ComponentError as exc:
        raise VerifyError(f"{component.name}: {exc}") from exc
    expected = {t.name: t for t in component.tensors}
    _compare_names(component.name, set(expected), set(written))
    _check_index(component, target, written)
    by_file: dict[str, list[OutTensor]] = {}
    for key, file in written.items():
        by_file.setdefault(file, []).append(expected[key])
    for file, tensors in sorted(by_file.items()):
        _verify_file(component.name, target / file, tensors, on_bytes)


def _compare_names(component: str, expected: set[str], written: set[str]) -> None:
    if expected != written:
        missing, extra = sorted(expected - written), sorted(written - expected)
        raise VerifyError(
            f"{component}: tensor names differ (missing: {few(missing) or '-'}; unexpected: {few(extra) or '-'})"
        )


def _check_index(component: ComponentPlan, target: Path, written: dict[str, str]) -> None:
    planned = {
        t.name: file for file, shard in zip(component.shard_names(), component.shards, strict=True) for t in shard
    }
    if written != planned:
        raise VerifyError(f"{component.name}: tensors are not in the planned weight files")
    if len(component.shards) <= 1:
        return
    index = json.loads((target / WEIGHTS_INDEX).read_text())
    total = sum(t.nbytes for t in component.tensors)
    if index.get("metadata", {}).get("total_size") != total:
        raise VerifyError(f"{component.name}/{WEIGHTS_INDEX}: total_size is not {total}")


def _verify_file(component: str, path: Path, tensors: list[OutTensor], on_bytes: Callable[[int], object]) -> None:
    out = _WindowedReader(path)
    sources: dict[Path, _WindowedReader] = {}
    try:
        for t in sorted(tensors, key=lambda t: (str(t.src.path), t.name)):
            src = sources.get(t.src.path) or sources.setdefault(t.src.path, _WindowedReader(t.src.path))
            _verify_tensor(component, out, src, t)
            on_bytes(t.nbytes)
    except VerifyError:
        raise
    except Exception as exc:  # safetensors' own errors: the file is not even readable
        raise VerifyError(f"{component}: {path.name} cannot be read back ({exc})") from exc
    finally:
        for reader in (out, *sources.values()):
            reader.close()


def _verify_tensor(component: str, out: _WindowedReader, src: _WindowedReader, t: OutTensor) -> None:
    import torch

    where = f"{component}: {t.name}"
    dtype, shape = out.describe(t.name)
    if dtype != t.dtype:
        raise VerifyError(f"{where}: dtype {dtype}, expected {t.dtype}")
    if shape != t.src.shape:
        raise VerifyError(f"{where}: shape {list(shape)}, expected {list(t.src.shape)}")
    for rows in _row_chunks(t):
        got = out.read(t.name, rows)
        want = src.read(t.src.key, rows)
        if t.cast:
            want = want.to(torch_dtype(t.dtype))
        # Bytes, not values: NaN != NaN, and -0.0 == 0.0 would hide a difference.
        if not torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
            raise VerifyError(f"{where}: content differs from input tensor {t.src.key}")


def _row_chunks(t: OutTensor) -> list[slice | None]:
    """Compare big tensors in slices along dim 0, so verify holds ~VERIFY_CHUNK per side, not a whole tensor."""
    shape = t.src.shape
    if not shape or shape[0] == 0 or t.nbytes <= VERIFY_CHUNK:
        return [None]
    rows = max(1, VERIFY_CHUNK * shape[0] // max(t.nbytes, t.src.nbytes))
    return [slice(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]


class _WindowedReader:
    """safe_open that is re-opened after every VERIFY_WINDOW bytes read.

    safetensors maps the file, and every page touched stays in the process's RSS until the handle closes; the
    re-open bounds verify's resident memory by the window instead of by the file size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None
        self._since = 0

    def _file(self):
        from safetensors import safe_open

        if self._handle is None or self._since >= VERIFY_WINDOW:
            self.close()
            self._handle = safe_open(str(self.path), framework="pt")
            self._handle.__enter__()
        return self._handle

    def describe(self, key: str) -> tuple[str, tuple[int, ...]]:
        view = self._file().get_slice(key)
        return view.get_dtype(), tuple(view.get_shape())

    def read(self, key: str, rows: slice | None):
        f = self._file()
        tensor = f.get_tensor(key) if rows is None else f.get_slice(key)[rows]
        self._since += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None
            self._since = 0


def _verify_tree(src: Path, dst: Path) -> None:
    src_files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    dst_files = sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file()) if dst.is_dir() else []
    if src_files != dst_files:
        raise VerifyError(f"{dst.name}: copied file list differs from {src}")
    for rel in src_files:
        if not filecmp.cmp(src / rel, dst / rel, shallow=False):
            raise VerifyError(f"{dst.name}/{rel} differs from the input file")
