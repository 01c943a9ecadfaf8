"""Module fixtures shared by the embedded-checkpoint tests of both tracks: the parts, the written checkpoint and its
saved tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hcxserve.tooling.embedded import common


def track_fixtures(prepare: Callable[[Path], Any], write: Callable[[Any, Path], None],
                   build_identity: Callable[[str], common.BuildIdentity], name: str) -> tuple[Any, Any, Any]:
    """The `parts`, `checkpoint` and `saved_tokenizer` fixtures of one track; a test module binds them to those names.

    Module-scoped: SmolLM2 is loaded once per module, and `checkpoint` writes the track's files plus the marker (what
    the builder writes, without its checks) into one temporary folder that every test of the module reads.
    """

    @pytest.fixture(scope="module")
    def parts() -> Any:
        return prepare(common.default_cache_dir())

    @pytest.fixture(scope="module")
    def checkpoint(parts: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
        directory = tmp_path_factory.mktemp(name)
        write(parts, directory)
        common.write_marker(directory, build_identity(parts.chat_template))
        return directory

    @pytest.fixture(scope="module")
    def saved_tokenizer(checkpoint: Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(checkpoint))

    return parts, checkpoint, saved_tokenizer
