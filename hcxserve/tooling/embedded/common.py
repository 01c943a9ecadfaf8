"""Light helpers shared by the embedded-model builders: cache paths, build markers, atomic output folders, and the
build steps every track goes through.

Nothing here imports torch or transformers, so the CLI can answer "up to date" in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

from hcxserve.config import CONFIG_DIR

logger = logging.getLogger("hcxserve.tooling.embedded")

# Bump when anything the builder writes changes (weights, configs, tokenizer), so old builds are rebuilt.
BUILDER_VERSION = "track_a-2"
# Track B's own version: its inputs (the tiny TA-Tok and audio components) change independently of track A.
TRACK_B_BUILDER_VERSION = "track_b-3"  # 2: the MambaMia video-audio compressor; 3: the decoders (decoder/)

# Written last into a finished build; its presence (with matching fields) is what "complete" means.
MARKER_NAME = ".hcx-embedded.json"

TRACK_A_CHAT_TEMPLATE = CONFIG_DIR / "chat_templates" / "track_a.jinja"
TRACK_B_CHAT_TEMPLATE = CONFIG_DIR / "chat_templates" / "track_b.jinja"


def default_cache_dir() -> Path:
    """`$HCX_CACHE_DIR`, else `~/.cache/hcxserve`."""
    env = os.environ.get("HCX_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hcxserve"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class BuildIdentity:
    """What a finished build must match to count as up to date."""

    track: str
    builder_version: str
    # The chat template is an input the builder does not own: a changed template means a rebuild.
    chat_template_sha256: str

    def as_dict(self) -> dict[str, str]:
        return {
            "track": self.track,
            "builder_version": self.builder_version,
            "chat_template_sha256": self.chat_template_sha256,
        }


def read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_up_to_date(directory: Path, identity: BuildIdentity) -> bool:
    """True when `directory` holds a complete build with the same identity and all its files at their sizes."""
    marker = read_marker(directory)
    if marker is None:
        return False
    if any(marker.get(key) != value for key, value in identity.as_dict().items()):
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        path = directory / name
        try:
            if path.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def write_marker(directory: Path, identity: BuildIdentity, extra: dict[str, Any] | None = None) -> None:
    """Record every file of the build with its size; written last, so a crash leaves no marker."""
    for path in directory.rglob("*"):
        # safetensors writes shards 0600; services may run as another user and only need to read.
        if path.is_file():
            path.chmod(0o644)
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }
    payload: dict[str, Any] = {**identity.as_dict(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    if extra:
        payload.update(extra)
    (directory / MARKER_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextmanager
def atomic_output_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target` by rename, on error it is removed.

    A sibling (same parent, same filesystem) makes the final rename atomic, so readers never see a half-written
    checkpoint at `target`.
    """
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Timer:
    """Elapsed seconds since construction, for progress logs."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start


@dataclass
class BuildResult:
    output: Path
    up_to_date: bool
    seconds: float
    token_ids: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


def build(output: Path, identity: BuildIdentity, prepare: Callable[[], Any], write: Callable[[Any, Path], None],
          check_parts: Callable[[Any], dict[str, Any]], check_written: Callable[[Path, Any], dict[str, Any]], *,
          check: bool = True, force: bool = False,
          token_ids: Callable[[Any], dict[str, Any]] = attrgetter("token_ids")) -> BuildResult:
    """Build a track's checkpoint into `output` atomically; a no-op when it is already up to date.

    The track supplies the steps: `prepare` derives the parts in memory (they carry `stats`), `write` writes them
    into an empty folder, `check_parts` checks them before that and `check_written` reloads the folder before it
    replaces `output`. `token_ids` picks the ids the marker and the result report.
    """
    timer = Timer()
    output = Path(output)
    if not force and is_up_to_date(output, identity):
        logger.info("%s is up to date (%s)", output, identity.builder_version)
        return BuildResult(output=output, up_to_date=True, seconds=timer())

    parts = prepare()
    # Before anything is written: a wrong mapping must never produce a checkpoint.
    parity = check_parts(parts) if check else {}
    with atomic_output_dir(output) as tmp:
        write(parts, tmp)
        checks = check_written(tmp, parts) if check else {}
        ids = token_ids(parts)
        write_marker(tmp, identity, extra={"token_ids": ids, "stats": parts.stats})
    logger.info("built %s in %.1f s", output, timer())
    return BuildResult(output=output, up_to_date=False, seconds=timer(), token_ids=ids, parity=parity,
                       checks=checks, stats=parts.stats)
