"""Which ``_target_`` callables a stored config (checkpoint, export folder) may build.

A checkpoint's run config is data from a file, not from the user's command line, so
:func:`check_stored_config` vets the whole tree before anything is instantiated:

- every ``_target_`` is resolved here, without Hydra, and must name the object itself: a
  class (or a scheduler function) *defined* in this package's component module of its
  section (``obj.__module__`` / ``obj.__qualname__`` equal the target, so
  ``nlp_transfer.encoders.transformer.Path.write_text`` or ``...transformer.torch.load``
  are refused), or one of :data:`THIRD_PARTY_TARGETS`; nothing outside ``nlp_transfer``
  and those modules is even imported;
- in the sections that loading builds (:data:`BUILT_SECTIONS`) the object must also be of
  the section's kind (an encoder is an :class:`Encoder` subclass, ...), nested targets
  included; targets in the other sections (trainer, callbacks, loggers) are never built
  from a checkpoint but must still be known ones;
- ``_args_``, interpolations (``${...}``), non-boolean ``_partial_``/``_recursive_``,
  ``_partial_`` where no shipped config sets it, and the loader flags ``weights_only``,
  ``allow_pickle``, ``pickle_module`` are refused; ``trust_remote_code: true`` anywhere
  only with the caller's explicit consent; URLs in the built sections are refused;
- ``extra_targets`` (the command line's ``safe_targets_extra``, never the checkpoint) opts
  a user's own components in: an exact target (allowed as given), or a module prefix
  ending in ``.`` (objects defined in a module under it).

Directory keys that decide where files are *written* (``data.cache_dir``) are not taken
from the checkpoint at all: :func:`nlp_transfer.checkpoint.restore` sets the caller's.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

# third-party callables that shipped configs store: exact dotted names only
THIRD_PARTY_TARGETS: frozenset[str] = frozenset(
    {
        "torch.optim.AdamW",
        "torch.optim.Adam",
        "torch.optim.SGD",
        "pytorch_lightning.Trainer",
        "pytorch_lightning.callbacks.EarlyStopping",
        "pytorch_lightning.callbacks.LearningRateMonitor",
        "pytorch_lightning.callbacks.ModelCheckpoint",
        "pytorch_lightning.callbacks.RichModelSummary",
        "pytorch_lightning.loggers.CSVLogger",
        "pytorch_lightning.loggers.TensorBoardLogger",
        "pytorch_lightning.loggers.WandbLogger",
        "sklearn.linear_model.LogisticRegression",
        "sklearn.svm.LinearSVC",
        "sklearn.svm.SVC",
        "sklearn.ensemble.RandomForestClassifier",
    }
)
# functions (not classes) a stored config may name outside the built sections
STORED_FUNCTIONS: frozenset[str] = frozenset(
    {
        "nlp_transfer.training.resume.slurm_environment",
        "nlp_transfer.sweeps.job.run_name",
        "nlp_transfer.sweeps.job.sweep_group",
    }
)
# modules whose top-level functions are learning-rate schedule factories
SCHEDULER_MODULES = ("nlp_transfer.training.schedulers", "nlp_transfer.training.slanted_triangular")
# sections that loading a checkpoint instantiates, and the module prefixes of their targets
BUILT_SECTIONS: dict[str, tuple[str, ...]] = {
    "encoder": ("nlp_transfer.encoders.",),
    "data": ("nlp_transfer.data.",),
    "head": ("nlp_transfer.heads.",),
    "strategy": ("nlp_transfer.strategies.",),
    "optimizer": ("nlp_transfer.training.", "torch.optim."),
    "scheduler": ("nlp_transfer.training.",),
    "layer_pooling": ("nlp_transfer.encoders.",),
    "subword_pooling": ("nlp_transfer.encoders.",),
}
# the sections whose configs are partials (completed by the module); elsewhere a stored
# _partial_: true would hand a half-built object to the loader
PARTIAL_SECTIONS = ("optimizer", "scheduler", "head", "layer_pooling", "subword_pooling")
FORBIDDEN_KEYS = ("weights_only", "allow_pickle", "pickle_module", "_args_")
CONVERT_VALUES = ("none", "partial", "object", "all")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class UnsafeConfigError(ValueError):
    """A stored config that would build or load something outside the allowed set."""


def _kind_ok(section: str, obj: Any) -> bool:
    """Whether ``obj`` is the kind of object a built section makes."""
    from nlp_transfer.data.base import TransferDataModule
    from nlp_transfer.encoders.base import Encoder
    from nlp_transfer.strategies.base import TransferStrategy

    if not inspect.isclass(obj):
        return section == "scheduler" and obj.__module__ in SCHEDULER_MODULES
    bases: dict[str, tuple[type, ...]] = {
        "encoder": (Encoder,),
        "data": (TransferDataModule,),
        "head": (nn.Module,),
        "strategy": (TransferStrategy,),
        "optimizer": (torch.optim.Optimizer,),
        "scheduler": (torch.optim.lr_scheduler.LRScheduler,),
        "layer_pooling": (nn.Module,),
        "subword_pooling": (nn.Module,),
    }
    return issubclass(obj, bases[section])


def _matches_extra(target: str, extra: Sequence[str]) -> bool:
    return any(target == e or (e.endswith(".") and target.startswith(e)) for e in extra)


def resolve_defined(target: str) -> Any:
    """The object ``target`` names, only if it is *defined* there (module and qualname)."""
    module_name, _, name = target.rpartition(".")
    if not module_name or not name.isidentifier():
        raise UnsafeConfigError("not a dotted module.name path")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UnsafeConfigError(
            f"{module_name!r} is not a module (attribute paths are refused)"
        ) from None
    obj = getattr(module, name, None)
    if obj is None or not (inspect.isclass(obj) or inspect.isfunction(obj)):
        raise UnsafeConfigError(f"{module_name} defines no class or function {name!r}")
    if obj.__module__ != module_name or obj.__qualname__ != name:
        raise UnsafeConfigError(
            f"it is {obj.__module__}.{obj.__qualname__}, only reachable through "
            f"{module_name}; only objects defined in the named module are built"
        )
    return obj


def check_target(target: Any, section: str | None, extra: Sequence[str] = ()) -> None:
    """Refuse ``target`` unless it is allowed in ``section`` (``None``: a section that
    loading never builds). ``extra`` only opts in targets outside ``nlp_transfer`` and
    :data:`THIRD_PARTY_TARGETS`, whose rules it cannot widen."""
    if not isinstance(target, str):
        raise UnsafeConfigError(f"_target_ must be a dotted name, not {type(target).__name__}")
    if target in THIRD_PARTY_TARGETS:
        obj = resolve_third_party(target)
        if section is None or (section == "optimizer" and issubclass(obj, torch.optim.Optimizer)):
            return
        raise UnsafeConfigError(f"{section} objects are built from this package's components only")
    if not target.startswith("nlp_transfer."):
        if target in extra:
            return  # named exactly by the user: their decision
        if _matches_extra(target, extra):
            resolve_defined(target)
            return
        raise UnsafeConfigError(
            "only classes defined in nlp_transfer's component modules and "
            f"{len(THIRD_PARTY_TARGETS)} listed third-party classes are allowed"
        )
    obj = resolve_defined(target)
    if section is None:
        if inspect.isclass(obj) or target in STORED_FUNCTIONS:
            return
        raise UnsafeConfigError("functions are not built from a stored config")
    prefixes = BUILT_SECTIONS[section]
    if not target.startswith(prefixes) or not _kind_ok(section, obj):
        raise UnsafeConfigError(
            f"{section} targets must be {section} components defined under {list(prefixes)}"
        )


def resolve_third_party(target: str) -> Any:
    """One of :data:`THIRD_PARTY_TARGETS` (exact names, so importing it is safe)."""
    module_name, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _walk(node: Any, where: str) -> Iterator[tuple[str, str, Any]]:
    """``(path, key, child node)`` for every entry below ``node``."""
    if isinstance(node, DictConfig):
        for key in node:
            child = node._get_node(key)
            yield f"{where}.{key}" if where else str(key), str(key), child
            yield from _walk(child, f"{where}.{key}" if where else str(key))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            yield f"{where}[{i}]", str(i), child
            yield from _walk(child, f"{where}[{i}]")


def check_stored_config(
    cfg: DictConfig,
    source: str,
    trust_remote_code: bool = False,
    extra_targets: Sequence[str] = (),
) -> None:
    """Refuse ``cfg`` (read from ``source``) unless every target and flag is allowed."""
    extra = [str(e) for e in extra_targets]

    def refuse(where: str, why: str) -> UnsafeConfigError:
        return UnsafeConfigError(
            f"{source}: its stored config sets {where}: {why}. Refused before anything was "
            "built; a checkpoint only builds this project's components (docs/resume.md, "
            "'Checkpoint safety'; your own modules: safe_targets_extra=[...] on the command "
            "line)."
        )

    for where, key, child in _walk(cfg, ""):
        section = where.split(".")[0].split("[")[0]
        built = section if section in BUILT_SECTIONS else None
        if child._is_interpolation():
            raise refuse(where, f"an interpolation {child._value()!r}")
        value = None if isinstance(child, DictConfig | ListConfig) else child._value()
        if key in FORBIDDEN_KEYS:
            raise refuse(where, f"{key!r} (a stored loader flag or call argument list)")
        if key == "trust_remote_code" and value not in (None, False) and not trust_remote_code:
            raise refuse(
                where,
                "trust_remote_code=true (model code from the hub would run); pass "
                "trust_remote_code=True explicitly if you trust this model",
            )
        if key in ("_partial_", "_recursive_") and not isinstance(value, bool):
            raise refuse(where, f"{key}={value!r} (must be true or false)")
        if key == "_partial_" and value and (built not in PARTIAL_SECTIONS or where.count(".") > 1):
            raise refuse(where, "_partial_: true where the project's configs never set it")
        if key == "_convert_" and value not in CONVERT_VALUES:
            raise refuse(where, f"_convert_={value!r}")
        if key == "_target_" and isinstance(child, DictConfig | ListConfig):
            raise refuse(where, "_target_ must be a dotted name, not a mapping or list")
        if key == "_target_":
            try:
                check_target(value, built, extra)
            except UnsafeConfigError as e:
                raise refuse(f"{where}={value!r}", str(e)) from None
        if built and isinstance(value, str) and URL.match(value):
            raise refuse(where, f"the URL {value!r} (loading never fetches stored URLs)")


def config_targets(cfg: DictConfig) -> list[str]:
    """Every ``_target_`` string of a config the user composed (not a stored one)."""
    return [
        str(child._value())
        for _, key, child in _walk(cfg, "")
        if key == "_target_" and not child._is_interpolation()
    ]
