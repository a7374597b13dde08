"""Frozen-encoder feature extraction and its on-disk cache.

Names are imported lazily so that ``python -m nlp_transfer.features.cache`` does not
import the module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_CACHE_NAMES = (
    "CacheNotWritableError",
    "Entry",
    "EntryInfo",
    "FeatureCache",
    "Writer",
    "cache_key",
    "feature_key_parts",
    "hash_examples",
    "key_parts_from_encoder",
)

__all__ = list(_CACHE_NAMES)


def __getattr__(name: str) -> Any:
    if name in _CACHE_NAMES:
        return getattr(importlib.import_module(".cache", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
