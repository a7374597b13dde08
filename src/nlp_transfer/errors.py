"""Errors raised for bad user input, each naming the file/line or config key at fault."""

from __future__ import annotations


class DataError(ValueError):
    """Malformed, missing or inconsistent data. The message names file and line."""


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key and valid choices."""


def where(path: object, line: int | None = None) -> str:
    return f"{path}:{line}" if line is not None else f"{path}"


def config_flag(value: object, key: str, default: bool = False) -> bool:
    """A true/false config value (``None``: ``default``). Anything else is refused, so a
    string such as ``"off"`` or ``"false"`` cannot switch a feature on."""
    if value is None:
        return default
    kind = type(value)
    if isinstance(value, bool) or (
        kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")
    ):
        return bool(value)
    raise ConfigError(f"{key} must be true or false, got {value!r} ({type(value).__name__})")
