"""Multi-task training, reached from ``nlp_transfer.train.train`` when ``cfg.tasks`` is set.

Config (see ``conf/experiment/multitask_demo.yaml``)::

    tasks:                       # a dict name → task (or a list of tasks with `name:`)
      <name>:
        data: {...}              # a datamodule config (e.g. /data@tasks.<name>.data: sst2)
        head: {...}              # a head config   (e.g. /head@tasks.<name>.head: linear)
        loss_weight: 1.0         # optional
        subword_pooling: {...}   # optional, sequence labeling (default: the top-level one)
        primary_metric: null     # optional: acc (classification) / f1 (sequence labeling)
    multitask:
      sampling: proportional     # proportional | temperature | round_robin
      temperature: 2.0           # T of `temperature`: p ∝ n^(1/T)
      steps_per_epoch: null      # null: the sum of the tasks' batches
      seed: null                 # null: the run's seed
      shared_projection: null    # {size, activation, dropout}: the shared embedding layer
      private_adapters: null     # {r, alpha, dropout, target_modules}: one LoRA per task

``tasks.<name>=null`` drops a task. The top-level ``encoder``, ``strategy``,
``layer_pooling``, ``optimizer``, ``scheduler`` and ``trainer`` are shared; the top-level
``data`` and ``head`` are not used.

DDP: every process runs the same task at every step (see
:mod:`nlp_transfer.multitask.datamodule`); the heads (and private adapters) of the other
tasks get no gradient in that step, so DDP runs with ``find_unused_parameters=True``
(``trainer.strategy=ddp`` and friends are switched to their ``*_find_unused_parameters_true``
variant; a strategy given as an object must set it itself).
"""

from __future__ import annotations

import re
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from nlp_transfer.builders import build_encoder, build_speed, plain_config
from nlp_transfer.checkpoint import check_fits, read_checkpoint
from nlp_transfer.data.base import TransferDataModule
from nlp_transfer.encoders.base import Encoder
from nlp_transfer.errors import ConfigError, config_flag
from nlp_transfer.multitask.datamodule import MultiTaskDataModule
from nlp_transfer.multitask.module import MultiTaskModule, TaskSpec
from nlp_transfer.tagging import normalize_scheme
from nlp_transfer.training.hardware import apply_hardware_settings
from nlp_transfer.training.run import fit_and_score, plan_run, prepare_run, write_metrics

TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
TASK_KEYS = {"name", "data", "head", "loss_weight", "subword_pooling", "primary_metric"}
OPTIONS: dict[str, Any] = {
    "sampling": "proportional",
    "temperature": 1.0,
    "steps_per_epoch": None,
    "seed": None,
    "shared_projection": None,
    "private_adapters": None,
}
DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def task_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """Task name → its config node, in configuration order; ``null`` tasks are dropped."""
    tasks = cfg.get("tasks")
    if isinstance(tasks, ListConfig):
        items = []
        for i, node in enumerate(tasks):
            if node is None:
                continue
            if not node.get("name"):
                raise ConfigError(f"tasks[{i}] needs a `name`")
            items.append((str(node.name), node))
    elif isinstance(tasks, DictConfig):
        items = [(str(k), node) for k, node in tasks.items() if node is not None]
    else:
        raise ConfigError(f"`tasks` must be a dict or a list of tasks, got {type(tasks).__name__}")
    out: dict[str, DictConfig] = {}
    for name, node in items:
        if not TASK_NAME.match(name):
            raise ConfigError(
                f"task name {name!r}: use letters, digits, '_' or '-', starting with a letter"
            )
        if name in out:
            raise ConfigError(f"task {name!r} is configured twice")
        unknown = sorted(set(node) - TASK_KEYS)
        if unknown:
            raise ConfigError(f"tasks.{name}: unknown key(s) {unknown}; known: {sorted(TASK_KEYS)}")
        for key in ("data", "head"):
            if node.get(key) is None:
                raise ConfigError(
                    f"tasks.{name}.{key} is missing, e.g. add `- /{key}@tasks.{name}.{key}: "
                    f"<option>` to the experiment's defaults"
                )
        out[name] = node
    if not out:
        raise ConfigError("`tasks` has no task (all are null)")
    return out


def multitask_options(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.multitask`` over the defaults, as plain data."""
    given = cfg.get("multitask") or {}
    if isinstance(given, DictConfig):
        given = OmegaConf.to_container(given, resolve=True)
    assert isinstance(given, dict)
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"multitask: unknown key(s) {unknown}; known: {sorted(OPTIONS)}")
    opts = {**OPTIONS, **given}
    if opts["seed"] is None:
        opts["seed"] = int(cfg.get("seed") or 0)
    return opts


def build_task_datamodule(task_cfg: DictConfig, encoder: Encoder) -> TransferDataModule:
    """A task's datamodule with the shared tokenizer, capped at the encoder's max length."""
    data = task_cfg.data
    max_length = min(int(data.get("max_length", encoder.max_length)), encoder.max_length)
    return instantiate(
        data, tokenizer=encoder.tokenizer, max_length=max_length, _convert_="partial"
    )


def build_multitask_datamodule(cfg: DictConfig, encoder: Encoder) -> MultiTaskDataModule:
    opts = multitask_options(cfg)
    tasks = {name: build_task_datamodule(node, encoder) for name, node in task_configs(cfg).items()}
    return MultiTaskDataModule(
        tasks,
        sampling=opts["sampling"],
        temperature=float(opts["temperature"]),
        steps_per_epoch=opts["steps_per_epoch"],
        seed=int(opts["seed"]),
    )


def build_multitask_module(
    cfg: DictConfig, encoder: Encoder, datamodule: MultiTaskDataModule
) -> MultiTaskModule:
    opts = multitask_options(cfg)
    specs = []
    for name, node in task_configs(cfg).items():
        kind = datamodule.tasks[name].task
        _check_head_scheme(name, node)
        pooling = node.get("subword_pooling", cfg.get("subword_pooling"))
        specs.append(
            TaskSpec(
                name=name,
                task=kind,
                labels=datamodule.tasks[name].labels,
                head=instantiate(node.head, _partial_=True),
                loss_weight=float(node.get("loss_weight", 1.0)),
                # word-level tasks build it (nlp_transfer.tasks.build_task)
                subword_pooling=instantiate(pooling, _partial_=True) if pooling else None,
                primary_metric=node.get("primary_metric"),
            )
        )
    model_cfg = cfg.get("model") or {}
    return MultiTaskModule(
        encoder=encoder,
        tasks=specs,
        strategy=instantiate(cfg.strategy),
        optimizer=instantiate(cfg.optimizer, _partial_=True),
        scheduler=instantiate(cfg.scheduler, _partial_=True) if cfg.get("scheduler") else None,
        layer_pooling=(
            instantiate(cfg.layer_pooling, _partial_=True) if cfg.get("layer_pooling") else None
        ),
        shared_projection=opts["shared_projection"],
        private_adapters=opts["private_adapters"],
        log_grad_norm=config_flag(model_cfg.get("log_grad_norm"), "model.log_grad_norm", False),
        check_finite_loss=config_flag(
            model_cfg.get("check_finite_loss"), "model.check_finite_loss", True
        ),
        speed=build_speed(cfg, compile_allowed=False),
        run_config=plain_config(cfg),
    )


def _check_head_scheme(name: str, node: DictConfig) -> None:
    """A CRF's transition constraints must follow the scheme the task's tags are in (the
    head config's default reads the top-level ``data``, which multitask runs leave unset)."""
    head_scheme, data_scheme = node.head.get("scheme"), node.data.get("train_scheme")
    if not head_scheme or not data_scheme:
        return
    if normalize_scheme(str(head_scheme)) != normalize_scheme(str(data_scheme)):
        raise ConfigError(
            f"tasks.{name}.head.scheme={head_scheme} but the task trains in "
            f"tasks.{name}.data.train_scheme={data_scheme}; set tasks.{name}.head.scheme="
            f"{data_scheme}"
        )


def trainer_overrides(cfg: DictConfig) -> dict[str, Any]:
    """DDP must tolerate parameters without gradient (the other tasks' heads)."""
    strategy = cfg.trainer.get("strategy", "auto")
    if isinstance(strategy, str) and strategy in DDP_STRATEGIES:
        return {"strategy": f"{strategy}_find_unused_parameters_true"}
    devices = cfg.trainer.get("devices", "auto")
    several = (
        devices == -1
        or (isinstance(devices, int) and devices > 1)
        or (isinstance(devices, ListConfig | list) and len(devices) > 1)
        or (isinstance(devices, str) and devices.isdigit() and int(devices) > 1)
    )
    if strategy in (None, "auto") and several:
        return {"strategy": "ddp_find_unused_parameters_true"}
    return {}


class MultiTaskRunner:
    """Several tasks sharing one encoder (``runner=multitask``, set by the multi-task
    experiments)."""

    def __call__(self, cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        return train_multitask(cfg)


def train_multitask(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Like :func:`nlp_transfer.train.train` for ``cfg.tasks``: fit, validate and test the
    best checkpoint, write ``metrics.json``; returns ``(metrics, objects)``.

    ``ckpt_path`` / ``resume`` work as for single-task runs, except that an interrupted
    epoch restarts its task schedule from the beginning (no exact mid-epoch resume).
    """
    apply_hardware_settings(cfg)  # a no-op when train() resolved it already
    plan = prepare_run(cfg, plan_run(cfg))
    out_dir = plan.output_dir

    encoder = build_encoder(cfg)
    datamodule = build_multitask_datamodule(cfg, encoder)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_multitask_module(cfg, encoder, datamodule)
    module.test_tasks = datamodule.tasks_with("test")
    if plan.ckpt_path is not None:  # never continue from another model's state
        check_fits(read_checkpoint(plan.ckpt_path, mmap=True), "multitask", list(module.tasks))

    metrics, trainer = fit_and_score(
        cfg,
        module,
        datamodule,
        plan,
        "multitask",
        run_test=bool(module.test_tasks),
        **trainer_overrides(cfg),
    )
    scheduler = datamodule.scheduler
    last_epoch = max(int(trainer.current_epoch) - 1, 0)
    metrics.update(
        {
            "tasks": datamodule.task_types,
            "sampling": datamodule.sampling,
            "steps_per_epoch": scheduler.steps if scheduler else None,
            "task_probabilities": scheduler.probabilities() if scheduler else None,
            "task_steps_last_epoch": scheduler.counts(last_epoch) if scheduler else None,
        }
    )
    write_metrics(metrics, trainer, out_dir)
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule, "cfg": cfg}
