"""Exceptions of the converter; the CLI turns any ConvertError into a one-line message and exit code 2."""

from __future__ import annotations


class ConvertError(Exception):
    """Base class: a conversion that cannot go on, with a message meant for the user."""


class CheckpointError(ConvertError):
    """The input checkpoint is missing something, is corrupt, or does not match the requested track."""


class OutputExistsError(ConvertError):
    """The output folder holds something else and --force was not given."""


class VerifyError(ConvertError):
    """The written output does not match the input (raised by --verify)."""


class ComponentError(ConvertError):
    """A component folder cannot be loaded (missing or inconsistent weight files)."""


def few(items: list[str], n: int = 5) -> str:
    """The first n items of a list for an error message, with a count of the rest."""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
