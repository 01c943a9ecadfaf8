"""The conversion itself: plan, write into a temporary sibling folder, optionally verify, then swap in atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from .audio_decoder import write_vocoders
from .checkpoint import load_checkpoint
from .errors import ConvertError, OutputExistsError
from .plan import (
    DEFAULT_MAX_SHARD_SIZE,
    ComponentPlan,
    ConversionPlan,
    Options,
    build_plan,
    parse_size,
    resolve_components,
)
from .safetensors_io import count_tensors, write_shard
from .tables import DTYPE_CHOICES, MANIFEST_FORMAT, MANIFEST_NAME, WEIGHTS_INDEX
from .verify import verify_output

log = logging.getLogger(__name__)


@dataclass
class ConvertResult:
    status: str  # "converted" | "up-to-date" | "dry-run"
    output: Path
    plan: ConversionPlan
    output_state: str  # what was at `output` before: "absent" | "empty" | "up-to-date" | "different"
    manifest: dict | None = None


def convert(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    track: str,
    components: Sequence[str] | None = None,
    dtype: str = "keep",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    verify: bool = False,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = False,
) -> ConvertResult:
    """Split a unified checkpoint into component folders under `output_dir` (see docs/converter.md)."""
    if dtype not in DTYPE_CHOICES:
        raise ConvertError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_CHOICES)})")
    options = Options(track, resolve_components(track, components), dtype, parse_size(max_shard_size))
    input_dir, output = Path(input_dir), Path(output_dir)
    _check_paths(input_dir, output)
    plan = build_plan(load_checkpoint(input_dir), options)
    state = output_state(output, plan)
    if dry_run:
        return ConvertResult("dry-run", output, plan, state)
    if state == "up-to-date" and not force:
        if verify:
            _run_verify(plan, output, progress)
        return ConvertResult("up-to-date", output, plan, state, read_json_file(output / MANIFEST_NAME))
    if state == "different" and not force:
        raise OutputExistsError(
            f"output {output} is not empty and was not produced from this input with these options "
            "(use --force to replace it)"
        )
    _check_free_space(output, plan)
    manifest = _write_atomically(plan, output, verify=verify, progress=progress)
    return ConvertResult("converted", output, plan, state, manifest)


def _check_paths(input_dir: Path, output: Path) -> None:
    inp, out = input_dir.resolve(), output.resolve()
    if out == inp or out in inp.parents:
        raise ConvertError(f"output {output} must not be the input folder or contain it")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is not a directory")


def output_state(output: Path, plan: ConversionPlan) -> str:
    if not output.exists():
        return "absent"
    if not any(output.iterdir()):
        return "empty"
    try:
        manifest = read_json_file(output / MANIFEST_NAME)
    except (OSError, ValueError):
        return "different"
    same = (
        isinstance(manifest, dict)
        and manifest.get("format") == MANIFEST_FORMAT
        and manifest.get("track") == plan.options.track
        and manifest.get("source", {}).get("fingerprint") == plan.ckpt.fingerprint
        and manifest.get("options") == plan.options.as_manifest()
    )
    if same and _files_present(output, manifest):
        return "up-to-date"
    return "different"


def _files_present(output: Path, manifest: dict) -> bool:
    return all(
        (output / name / rel).is_file()
        for name, entry in manifest.get("components", {}).items()
        for rel in entry.get("files", [])
    )


def _check_free_space(output: Path, plan: ConversionPlan) -> None:
    free = shutil.disk_usage(output.parent if output.parent.exists() else Path.cwd()).free
    if free < plan.total_bytes:
        raise ConvertError(
            f"not enough disk space next to {output}: need {plan.total_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )


# ---------------------------------------------------------------------------------------------------- writing


def _write_atomically(plan: ConversionPlan, output: Path, *, verify: bool, progress: bool) -> dict:
    """Nothing appears at `output` until the new tree is complete (and verified): a service never sees half."""
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(output)
    partial = output.with_name(f"{output.name}.partial-{os.getpid()}")
    partial.mkdir()
    try:
        with _progress_bar(plan.total_bytes, "convert", progress) as bar:
            for name, component in plan.components.items():
                if component.vocoders:
                    log.info("writing %s/ (%s)", name, _vocoder_summary(component))
                elif component.copy_tree is not None:
                    log.info("writing %s/ (a copy of %s/)", name, component.copy_tree.relative_to(plan.ckpt.root))
                else:
                    log.info(
                        "writing %s/ (%d tensors in %d shard(s))", name, len(component.tensors), len(component.shards)
                    )
                _write_component(plan, component, partial / name, bar.update)
        manifest = build_manifest(plan, partial)
        write_json(partial / MANIFEST_NAME, manifest)  # last: a folder with a manifest is complete
        if verify:
            _run_verify(plan, partial, progress)
        _install(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _write_component(plan: ConversionPlan, component: ComponentPlan, dst: Path, on_bytes) -> None:
    if component.vocoders:
        write_vocoders(component.vocoders, dst, on_bytes)
        return
    if component.copy_tree is not None:
        shutil.copytree(component.copy_tree, dst)
        on_bytes(component.tree_bytes)
        return
    dst.mkdir()
    names = component.shard_names()
    for name, shard in zip(names, component.shards, strict=True):
        write_shard(dst / name, shard, on_bytes)
    if len(names) > 1:
        weight_map = {t.name: name for name, shard in zip(names, component.shards, strict=True) for t in shard}
        write_json(dst / WEIGHTS_INDEX, {"metadata": {"total_size": component.tensor_bytes}, "weight_map": weight_map})
    write_json(dst / "config.json", component.config)
    for rel in component.copy_files:
        shutil.copy2(plan.ckpt.root / rel, dst / rel)
    for rel, data in component.generated.items():
        write_json(dst / rel, data)


def _install(partial: Path, output: Path) -> None:
    """Swap the finished tree in; an old output is moved aside first and deleted only after the swap."""
    if not output.exists():
        os.rename(partial, output)
        return
    if not any(output.iterdir()):
        os.rename(partial, output)  # rename(2) replaces an empty directory
        return
    old = output.with_name(f"{output.name}.old-{os.getpid()}")
    os.rename(output, old)
    try:
        os.rename(partial, output)
    except BaseException:
        os.rename(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_siblings(output: Path) -> None:
    """Temporary folders of converter runs that were killed (their pid is gone) are removed."""
    for path in output.parent.glob(f"{output.name}.*-*"):
        kind, _, pid = path.name[len(output.name) + 1 :].partition("-")
        if kind in ("partial", "old") and pid.isdigit() and not _pid_alive(int(pid)) and path.is_dir():
            log.info("removing stale %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_verify(plan: ConversionPlan, root: Path, progress: bool) -> None:
    total = sum(c.tensor_bytes + c.tree_bytes for c in plan.components.values())
    with _progress_bar(total, "verify", progress) as bar:
        verify_output(plan, root, bar.update)
    log.info("verify: every output tensor matches the input")


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return nullcontext(_NoBar())
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass


# --------------------------------------------------------------------------------------------------- manifest


def build_manifest(plan: ConversionPlan, root: Path) -> dict:
    components = {}
    for name, component in plan.components.items():
        base = root / name
        files = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
        if component.vocoders:  # what the archives held is known only once they are unpacked
            tensors, size = count_tensors(base), sum((base / f).stat().st_size for f in files)
        elif component.copy_tree is not None:
            tensors, size = count_tensors(base), component.tree_bytes
        else:
            tensors, size = len(component.tensors), component.tensor_bytes
        components[name] = {"tensors": tensors, "bytes": size, "files": files}
    return {
        "format": MANIFEST_FORMAT,
        "track": plan.options.track,
        "source": {
            "path": str(plan.ckpt.root.resolve()),
            "fingerprint": plan.ckpt.fingerprint,
            "model_type": plan.ckpt.model_type,
        },
        "options": plan.options.as_manifest(),
        "components": components,
    }


def read_json_file(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- reports


def format_plan(result: ConvertResult) -> str:
    """The --dry-run report: per component, tensor count, bytes, shards and files copied."""
    plan = result.plan
    ckpt = plan.ckpt
    what = {
        "absent": "will be created",
        "empty": "empty folder, will be filled",
        "up-to-date": "up to date, would be left alone",
        "different": "not empty: needs --force to be replaced",
    }[result.output_state]
    lines = [
        f"input   {ckpt.root} (model_type {ckpt.model_type}, "
        f"{len(ckpt.tensors)} tensors in {len(ckpt.shard_files)} shard(s))",
        f"output  {result.output} ({what})",
        f"options track {plan.options.track}, dtype {plan.options.dtype}, "
        f"max shard {human(plan.options.max_shard_size)}",
        "",
        f"{'component':<10}{'tensors':>9}{'bytes':>12}{'shards':>8}  files copied",
    ]
    for name, c in plan.components.items():
        if c.vocoders:
            lines.append(f"{name:<10}{'-':>9}{human(c.tree_bytes):>12}{'-':>8}  {_vocoder_summary(c)}")
            continue
        if c.copy_tree is not None:
            lines.append(
                f"{name:<10}{'-':>9}{human(c.tree_bytes):>12}{'-':>8}  "
                f"{c.copy_tree.relative_to(ckpt.root)}/ (whole folder)"
            )
            continue
        copied = ", ".join(c.copy_files + [f"{g} (generated)" for g in c.generated]) or "-"
        lines.append(
            f"{name:<10}{len(c.tensors):>9}{human(c.tensor_bytes):>12}{len(c.shards):>8}  config.json, {copied}"
        )
    lines.append(
        f"{'total':<10}{sum(len(c.tensors) for c in plan.components.values()):>9}{human(plan.total_bytes):>12}"
    )
    return "\n".join(lines)


def _vocoder_summary(component: ComponentPlan) -> str:
    return ", ".join(f"{v.label} -> {v.variant}/" for v in component.vocoders)


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
