"""Errors raised for bad user input, each naming the file/line or config key at fault."""

from __future__ import annotations


class DataError(ValueError):
    """Malformed, missing or inconsistent data. The message names file and line."""


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key and valid choices."""


def where(path: object, line: int | None = None) -> str:
    return f"{path}:{line}" if line is not None else f"{path}"
