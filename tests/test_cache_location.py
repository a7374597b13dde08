"""Caches live in the user cache folder, outside the repository, with an override."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from nlp_transfer.data.base import default_cache_dir
from nlp_transfer.features.cache import default_root
from nlp_transfer.utils.resolvers import CONFIG_DIR, PROJECT_ROOT, cache_root


def test_tests_use_a_private_cache() -> None:
    root = Path(cache_root())
    assert "nlp_transfer_test_cache_" in root.name and not root.is_relative_to(PROJECT_ROOT)
    assert not root.is_relative_to(Path.home() / ".cache")


def test_default_is_the_user_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NLP_TRANSFER_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == str(tmp_path / "home" / ".cache" / "nlp_transfer")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "nlp_transfer"
    assert cache_root() == str(expected)
    assert default_cache_dir() == expected and default_root() == expected / "features"
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        raw = compose("train", overrides=["encoder=tiny"])
    GlobalHydra.instance().clear()
    assert raw.paths.cache_dir == str(expected)
    assert raw.data.cache_dir == str(expected / "tokenized")
    assert raw.features.cache_dir == str(expected / "features")
    monkeypatch.setenv("NLP_TRANSFER_CACHE", str(tmp_path / "mine"))  # the override
    assert cache_root() == str(tmp_path / "mine")
    assert default_root() == tmp_path / "mine" / "features"
