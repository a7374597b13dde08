"""Print the composed config as a rich tree at the start of a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

FIRST = (
    "data",
    "encoder",
    "strategy",
    "layer_pooling",
    "head",
    "model",
    "optimizer",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "paths",
)


def print_config_tree(
    cfg: DictConfig, save_to: str | Path | None = None, order: Sequence[str] = FIRST
) -> None:
    """Print every top-level group as a branch (resolved); optionally save the text."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order and k != "hydra"]
    for key in keys:
        branch = tree.add(str(key), style="bold")
        node = cfg[key]
        try:
            text = (
                OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
            )
        except Exception:  # unresolvable outside a Hydra run: show it unresolved
            text = OmegaConf.to_yaml(node) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        with Path(save_to).open("w", encoding="utf-8") as f:
            rich.print(tree, file=f)
