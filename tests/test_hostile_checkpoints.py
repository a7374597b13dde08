"""A corpus of hostile checkpoints: each is refused before anything is built, by every
entry point that loads checkpoints, and none creates a file.

"Armed" cases are real: building their node with plain ``hydra.utils.instantiate`` (no
check) does create the sentinel, so the refusal is what protects the user.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from nlp_transfer.checkpoint import CheckpointError, read_checkpoint, restore
from nlp_transfer.safe_targets import (
    BUILT_SECTIONS,
    UnsafeConfigError,
    check_stored_config,
    check_target,
)
from nlp_transfer.train import train

LIMITS = [
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
]
T = "nlp_transfer.encoders.transformer"
# a package module that imports pathlib.Path (reachable as an attribute path through it)
P = "nlp_transfer.utils.io"
WRITE = "nlp_transfer.utils.io.atomic_write_json"  # a package function that writes a file


class _Payload:
    """Unpickling this creates ``path`` (what a ``weights_only=False`` load would run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.makedirs, (self.path,))


Edit = Callable[[dict[str, Any], Path], None]


def _set(section: str, node: Any) -> Edit:
    return lambda c, s: c.__setitem__(section, node(s) if callable(node) else node)


def _put(path: str, value: Any) -> Edit:
    """Set ``a.b.c`` (``value(sentinel)`` when callable)."""

    def edit(c: dict[str, Any], s: Path) -> None:
        *parents, last = path.split(".")
        for p in parents:
            c = c.setdefault(p, {})
        c[last] = value(s) if callable(value) else value

    return edit


def _write(s: Path) -> dict[str, Any]:
    return {"_target_": WRITE, "_convert_": "all", "path": str(s), "obj": {"pwned": True}}


# (id, edit of the stored config, section whose node plain instantiate would run or None)
CASES: list[tuple[str, Edit, str | None]] = [
    (
        "attr_path_Path_write_text",
        _set(
            "encoder",
            lambda s: {
                "_target_": f"{P}.Path.write_text",
                "self": {"_target_": f"{P}.Path", "_args_": [str(s)]},
                "data": "x",
            },
        ),
        "encoder",
    ),
    (
        "attr_path_torch_load_weights_only_false",
        _set(
            "encoder",
            lambda s: {"_target_": f"{T}.torch.load", "f": str(s) + ".pt", "weights_only": False},
        ),
        "encoder",
    ),
    (
        "attr_path_torch_os_system",
        _set("encoder", lambda s: {"_target_": f"{T}.torch.os.system", "command": f"touch {s}"}),
        None,
    ),
    ("os_system", _set("data", lambda s: {"_target_": "os.system", "command": f"touch {s}"}), None),
    (
        "builtins_exec_partial",
        _set("strategy", {"_target_": "builtins.exec", "_partial_": True, "source": "1"}),
        None,
    ),
    ("package_function_writes_file", _set("encoder", _write), "encoder"),
    (
        "package_function_wandb_run_id",
        _set(
            "encoder",
            lambda s: {"_target_": "nlp_transfer.training.resume.wandb_run_id", "run_dir": str(s)},
        ),
        None,
    ),
    (
        "package_function_deletes_files_as_scheduler",
        _put(
            "scheduler",
            lambda s: {
                "_target_": "nlp_transfer.training.resume.remove_stale_temp_files",
                "_partial_": True,
            },
        ),
        None,
    ),
    (
        "package_class_of_wrong_kind",
        _set(
            "strategy",
            lambda s: {
                "_target_": "nlp_transfer.training.resume.ResumableCSVLogger",
                "save_dir": str(s),
            },
        ),
        None,
    ),
    (
        "attr_path_reexported_module_class",
        _put("head._target_", "nlp_transfer.heads.classification.nn.Linear"),
        None,
    ),
    (
        "attr_path_method_of_allowed_class",
        _put("encoder._target_", f"{T}.TransformerEncoder.save_pretrained"),
        None,
    ),
    (
        "third_party_class_in_built_section",
        _put("encoder._target_", "pytorch_lightning.Trainer"),
        None,
    ),
    (
        "torch_class_not_listed",
        _put("optimizer._target_", "torch.optim.lr_scheduler.LambdaLR"),
        None,
    ),
    ("attr_path_torch_optim_method", _put("optimizer._target_", "torch.optim.AdamW.step"), None),
    ("hydra_instantiate", _put("strategy._target_", "hydra.utils.instantiate"), None),
    (
        "importlib",
        _set("data", {"_target_": "importlib.import_module", "name": "antigravity"}),
        None,
    ),
    ("nested_target_in_head", _put("head.pooling", _write), "head"),
    (
        "nested_target_in_list",
        _put("strategy.layers", lambda s: [_write(s)]),
        "strategy",
    ),
    (
        "args_with_nested_target",
        _set(
            "optimizer",
            lambda s: {"_target_": "torch.optim.AdamW", "_partial_": True, "_args_": [_write(s)]},
        ),
        "optimizer",
    ),
    ("args_on_allowed_target", _put("encoder._args_", ["/etc"]), None),
    ("partial_on_strategy", _put("strategy._partial_", True), None),
    ("partial_not_bool", _put("optimizer._partial_", "yes"), None),
    ("recursive_not_bool", _put("head._recursive_", "no"), None),
    ("convert_unknown", _put("data._convert_", "eval"), None),
    ("stored_weights_only", _put("encoder.weights_only", False), None),
    ("stored_allow_pickle", _put("data.allow_pickle", True), None),
    ("stored_pickle_module", _put("encoder.pickle_module", "pickle"), None),
    ("trust_remote_code_encoder", _put("encoder.trust_remote_code", True), None),
    ("trust_remote_code_nested", _put("encoder.config_overrides.trust_remote_code", True), None),
    ("interpolated_target", _put("encoder._target_", "${data.text_field}"), None),
    ("interpolated_env_path", _put("encoder.name_or_path", "${oc.env:HOME}"), None),
    ("interpolated_section", _put("head", "${encoder}"), None),
    ("url_encoder_path", _put("encoder.name_or_path", "https://example.invalid/model"), None),
    ("url_data_file", _put("data.test_file", "file:///etc/passwd"), None),
    ("callbacks_section_function", _put("callbacks.evil", _write), None),
    (
        "trainer_attr_path",
        _put("trainer._target_", "nlp_transfer.encoders.transformer.os.system"),
        None,
    ),
    (
        "logger_builtins_eval",
        _put("logger.evil", {"_target_": "builtins.eval", "source": "1"}),
        None,
    ),
    (
        "root_list_target",
        _set("tags", lambda s: [{"_target_": "os.system", "command": "true"}]),
        None,
    ),
    ("target_not_a_string", _put("encoder._target_", {"a": 1}), None),
    ("target_not_dotted", _put("subword_pooling._target_", "eval"), None),
    ("attr_path_subword_torch_load", _put("subword_pooling._target_", f"{T}.torch.load"), None),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import FAST, compose_config

    root = tmp_path_factory.mktemp("hostile")
    metrics, _ = train(compose_config("train", [*FAST, *LIMITS], root / "run", root / "cache"))
    return Path(metrics["best_checkpoint"])


def _hostile(base: Path, folder: Path, edit: Edit, sentinel: Path) -> Path:
    """``base`` with an edited stored config (weights and metadata only: small and quick)."""
    ckpt = torch.load(base, map_location="cpu", weights_only=True, mmap=True)
    ckpt = {"state_dict": ckpt["state_dict"], "nlp_transfer": ckpt["nlp_transfer"]}
    edit(ckpt["nlp_transfer"]["config"], sentinel)
    torch.save(ckpt, folder / "hostile.ckpt")
    torch.save({"x": _Payload(str(sentinel))}, str(sentinel) + ".pt")  # for torch.load cases
    return folder / "hostile.ckpt"


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def entry_configs(base: Path) -> dict[str, DictConfig]:
    """eval, predict, export and train configs, composed once (ckpt and folders per case)."""
    from tests.conftest import compose_config

    extra = {
        "eval": ["split=validation", "trainer=cpu"],
        "predict": ["input=unset"],
        "export": [],
        "train": ["encoder=tiny", *LIMITS],
    }
    return {
        name: compose_config(name, [f"ckpt_path={base}", *args], base.parent / name)
        for name, args in extra.items()
    }


@pytest.mark.parametrize(("case", "edit", "armed"), CASES, ids=[c[0] for c in CASES])
def test_hostile_checkpoint_is_refused_everywhere(
    base: Path,
    entry_configs: dict[str, DictConfig],
    tmp_path: Path,
    case: str,
    edit: Edit,
    armed: str | None,
) -> None:
    from nlp_transfer.eval import evaluate
    from nlp_transfer.export import export
    from nlp_transfer.predict import predict

    sentinel = tmp_path / "pwned"
    ckpt = _hostile(base, tmp_path, edit, sentinel)
    texts = tmp_path / "in.txt"
    texts.write_text("a fine film\n")
    before = _files(tmp_path)
    with pytest.raises(CheckpointError, match="Refused before anything was built"):
        restore(read_checkpoint(ckpt))
    entries = {"eval": evaluate, "predict": predict, "export": export, "train": train}
    for name, entry in entries.items():
        cfg = entry_configs[name].copy()
        with open_dict(cfg):
            cfg.ckpt_path = str(ckpt)
            cfg.paths.output_dir = str(tmp_path / f"out_{name}")
            cfg.paths.cache_dir = str(tmp_path / "cache")
            if name == "predict":
                cfg.input = str(texts)
        with pytest.raises(CheckpointError, match="Refused before anything was built"):
            entry(cfg)
    assert not sentinel.exists()
    assert _files(tmp_path) == before, "a refused checkpoint created files"


ARMED = [c for c in CASES if c[2] is not None]


@pytest.mark.parametrize(("case", "edit", "armed"), ARMED, ids=[c[0] for c in ARMED])
def test_armed_cases_are_real_attacks(
    base: Path, tmp_path: Path, case: str, edit: Edit, armed: str
) -> None:
    """Without the check, plain instantiate of the node does create the sentinel."""
    sentinel = tmp_path / "pwned"
    ckpt = _hostile(base, tmp_path, edit, sentinel)
    node = read_checkpoint(ckpt).config[armed]
    with contextlib.suppress(Exception):  # the outer call may fail after its argument ran
        hydra.utils.instantiate(node)
    assert sentinel.exists()


def test_cache_dir_of_a_checkpoint_is_never_used(base: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    ckpt = _hostile(base, tmp_path, _put("data.cache_dir", str(elsewhere)), tmp_path / "s")
    mine = tmp_path / "mine"
    _, data = restore(read_checkpoint(ckpt), cache_dir=mine)
    data.load_examples()
    data.setup("test")
    assert Path(data.cache_dir) == mine and any(mine.glob("*.arrow"))
    assert not elsewhere.exists()


def test_safe_targets_extra_opts_in_only_what_the_caller_names(base: Path) -> None:
    cfg = OmegaConf.create(torch.load(base, weights_only=True)["nlp_transfer"]["config"])
    with open_dict(cfg):
        cfg.head._target_ = "tests.test_hostile_checkpoints.MyHead"
    with pytest.raises(UnsafeConfigError, match="head._target_='tests.test_hostile"):
        check_stored_config(cfg, "x.ckpt")
    check_stored_config(cfg, "x.ckpt", extra_targets=["tests.test_hostile_checkpoints.MyHead"])
    check_stored_config(cfg, "x.ckpt", extra_targets=["tests.test_hostile_checkpoints."])
    # an opted-in prefix still needs the object to be defined there
    cfg.head._target_ = "tests.test_hostile_checkpoints.torch.nn.Linear"
    with pytest.raises(UnsafeConfigError, match="not a module"):
        check_stored_config(cfg, "x.ckpt", extra_targets=["tests.test_hostile_checkpoints."])


class MyHead(torch.nn.Module):
    """A user's own head, for :func:`test_safe_targets_extra_opts_in_only_what_the_caller_names`."""


def test_every_shipped_target_is_allowed() -> None:
    """The configs this project ships (each group option) pass the check."""
    from nlp_transfer.utils.resolvers import CONFIG_DIR

    checked = 0
    for group in (
        "data",
        "encoder",
        "head",
        "strategy",
        "optimizer",
        "scheduler",
        "layer_pooling",
        "callbacks",
        "logger",
        "trainer",
    ):
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            node = OmegaConf.load(path)
            targets = [v for k, v in _flat(OmegaConf.to_container(node)) if k == "_target_"]
            for target in targets:
                section = group if group in BUILT_SECTIONS else None
                if group == "head" and str(target).startswith("sklearn."):
                    section = None  # sklearn heads train on features, never from a checkpoint
                check_target(target, section)
                checked += 1
    assert checked >= 40


def _flat(node: Any) -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in [(k, v), *_flat(v)]]
    if isinstance(node, list):
        return [kv for v in node for kv in _flat(v)]
    return []
