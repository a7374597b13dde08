"""OmegaConf resolvers used by the configs. Imported by every entry point."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[3]
CONFIG_DIR = PROJECT_ROOT / "conf"


def project_root() -> str:
    """The repository root (the folder holding ``conf/``); ``NLP_TRANSFER_ROOT`` overrides."""
    return os.environ.get("NLP_TRANSFER_ROOT", str(PROJECT_ROOT))


def cache_root() -> str:
    """Where tokenization and feature caches go (``paths.cache_dir``): ``NLP_TRANSFER_CACHE``,
    else ``$XDG_CACHE_HOME/nlp_transfer``, else ``~/.cache/nlp_transfer`` (outside the
    repository, shared by every checkout of the project)."""
    explicit = os.environ.get("NLP_TRANSFER_CACHE")
    if explicit:
        return str(Path(explicit).expanduser())
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return str(base / "nlp_transfer")


def minilm_dir() -> str:
    from nlp_transfer.encoders.transformer import packaged_minilm_dir

    return packaged_minilm_dir()


def wandb_offline() -> bool:
    """Offline unless an API key is configured (env var or ~/.netrc entry)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("project_root", project_root, replace=True)
    OmegaConf.register_new_resolver("minilm_dir", minilm_dir, replace=True)
    OmegaConf.register_new_resolver("cache_root", cache_root, replace=True)
    OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)
    # cached: the output dir must resolve to the same value every time it is read
    OmegaConf.register_new_resolver(
        "run_suffix", lambda: secrets.token_hex(3), use_cache=True, replace=True
    )


register_resolvers()
