"""Hyperparameter search with Optuna: ``python -m nlp_transfer.search [overrides]``.

Each trial composes the training config (``conf/search.yaml`` = ``train`` + a ``search``
node) with the overrides Optuna samples from ``search.space``, runs
:func:`nlp_transfer.train.run_and_record` in this process and reports the monitored
validation metric after every validation to the trial; :class:`PruningCallback` stops a
trial the pruner (``search.pruner``: median, ASHA/successive halving, Hyperband, ...) gives
up on. Every trial writes into ``<study dir>/trials/<trial number>/`` like a training run
(``.hydra/``, ``metrics.json``, ``status.json``: completed, pruned or failed), so
``python -m nlp_transfer.aggregate <study dir>/trials`` works on a study too.

Several processes (or SLURM jobs) run one study by giving the same ``search.study_name``:
they share a journal file (``<study dir>/journal.log``, Optuna's ``JournalFileBackend``),
which appends records under a lock made of an atomic symlink creation, so it works on NFS,
where SQLite's file locking does not (``search.storage`` takes any Optuna storage URL
instead, e.g. ``postgresql://...``). ``search.n_trials`` is the study's total: a worker
stops when the study holds that many finished trials, so relaunching an interrupted search
continues it. At the end each worker writes ``best_params.yaml`` and ``trials.csv`` into the
study dir.

Search space (``search.space``, or a preset ``hparams_search=<name>``): keys are config
keys or group names, values use Hydra's sweep syntax or a dict::

    search:
      space:
        optimizer.lr: tag(log, interval(1e-5, 1e-3))   # log-uniform float
        head: choice(linear, mlp)                       # categorical (also "linear,mlp")
        strategy.k: range(1, 5)                         # int 1..4 (Hydra's range excludes 5)
        trainer.accumulate_grad_batches: {type: int, low: 1, high: 4, log: true}
"""

from __future__ import annotations

import gc
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import optuna
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.trainer.states import TrainerFn

from nlp_transfer.errors import ConfigError
from nlp_transfer.sweeps.job import _uses_subprocess_ddp, gpu_slot, set_wandb_names
from nlp_transfer.utils.io import atomic_write_json
from nlp_transfer.utils.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)

BEST_PARAMS = "best_params.yaml"
TRIALS_CSV = "trials.csv"
JOURNAL = "journal.log"
TRIALS_DIR = "trials"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# what counts toward search.n_trials: running trials too, so parallel workers do not overshoot
BUDGET = (*FINISHED, TrialState.RUNNING)
_active_trial: optuna.Trial | None = None


# --------------------------------------------------------------------------- search space


def _flatten(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings → dotted keys; a mapping with ``type`` is one distribution."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "type" not in value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _from_dict(name: str, spec: Mapping[str, Any]) -> BaseDistribution:
    kind = str(spec.get("type", "")).lower()
    extra = sorted(set(spec) - {"type", "low", "high", "log", "step", "choices"})
    if extra:
        raise ConfigError(f"search.space.{name}: unknown keys {extra}")
    if kind in ("categorical", "choice"):
        return CategoricalDistribution(list(spec["choices"]))
    if kind in ("float", "int"):
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"search.space.{name}: a {kind} needs low and high")
        log_scale = bool(spec.get("log", False))
        step = spec.get("step")
        if kind == "int":
            return IntDistribution(
                int(spec["low"]), int(spec["high"]), log=log_scale, step=int(step or 1)
            )
        return FloatDistribution(float(spec["low"]), float(spec["high"]), log=log_scale, step=step)
    raise ConfigError(f"search.space.{name}: type must be float, int or categorical, got {kind!r}")


def _from_sweep_string(name: str, text: str) -> BaseDistribution:
    """Hydra's sweep syntax (``choice``, ``range``, ``interval``, ``tag(log|int, ...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    try:
        override = OverridesParser.create().parse_override(f"{name}={text}")
    except Exception as e:
        raise ConfigError(f"search.space.{name}={text!r}: {e}") from e
    sweep = override.value()
    if not override.is_sweep_override():
        raise ConfigError(
            f"search.space.{name}={text!r} is a single value, not a range: pass it as an "
            "ordinary override instead"
        )
    tags = set(getattr(sweep, "tags", set()) or set())
    if isinstance(sweep, ChoiceSweep):
        choices = list(sweep.list)
        if any(isinstance(c, (dict, list)) for c in choices):
            raise ConfigError(f"search.space.{name}: choices must be scalars, got {choices}")
        return CategoricalDistribution(choices)
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if all(float(v).is_integer() for v in (start, stop, step)) and "float" not in tags:
            high = int(stop) - int(step)
            return IntDistribution(int(start), high, step=int(step))
        count = math.ceil((float(stop) - float(start)) / float(step))
        high = float(start) + (count - 1) * float(step)
        return FloatDistribution(float(start), high, step=float(step))
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in tags
        if "int" in tags:
            return IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise ConfigError(f"search.space.{name}={text!r}: unsupported sweep {type(sweep).__name__}")


def parse_space(space: Mapping[str, Any] | DictConfig | None) -> dict[str, BaseDistribution]:
    """``search.space`` → ``{config key: optuna distribution}``."""
    if space is None:
        return {}
    if isinstance(space, DictConfig):
        space = OmegaConf.to_container(space, resolve=True)  # type: ignore[assignment]
    assert isinstance(space, Mapping)
    out: dict[str, BaseDistribution] = {}
    for name, spec in _flatten(space).items():
        if isinstance(spec, BaseDistribution):
            out[name] = spec
        elif isinstance(spec, Mapping):
            out[name] = _from_dict(name, spec)
        elif isinstance(spec, (list, tuple, ListConfig)):
            out[name] = CategoricalDistribution(list(spec))
        elif isinstance(spec, str):
            out[name] = _from_sweep_string(name, spec)
        else:
            raise ConfigError(f"search.space.{name}={spec!r}: give a range, e.g. choice(a, b)")
    return out


def suggest(trial: optuna.Trial, space: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    """Sample one value per key of ``space``."""
    params: dict[str, Any] = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, list(dist.choices))  # type: ignore[arg-type]
        elif isinstance(dist, IntDistribution):
            params[name] = trial.suggest_int(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        elif isinstance(dist, FloatDistribution):
            params[name] = trial.suggest_float(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        else:
            raise ConfigError(f"search.space.{name}: unsupported distribution {dist}")
    return params


_PLAIN = re.compile(r"^[A-Za-z0-9_./@:+-]+$")


def format_value(value: Any) -> str:
    """A value as Hydra override text (strings quoted where the grammar needs it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text):
        return text
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def to_overrides(params: Mapping[str, Any]) -> list[str]:
    """``{"optimizer.lr": 1e-4, "head": "mlp"}`` → ``["optimizer.lr=0.0001", "head=mlp"]``."""
    return [f"{k}={format_value(v)}" for k, v in params.items()]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


# --------------------------------------------------------------------------- pruning


def active_trial() -> optuna.Trial | None:
    """The trial whose training runs now in this process (None outside a search)."""
    return _active_trial


@contextmanager
def _activate(trial: optuna.Trial) -> Iterator[None]:
    global _active_trial
    _active_trial = trial
    try:
        yield
    finally:
        _active_trial = None


class PruningCallback(Callback):
    """Report ``monitor`` to the Optuna trial after every validation and stop training with
    ``optuna.TrialPruned`` when the pruner says so. Steps count validations (0, 1, ...), so
    trials compare at the same point even when their batch counts differ."""

    def __init__(self, monitor: str, trial: optuna.Trial | None = None) -> None:
        trial = trial if trial is not None else active_trial()
        if trial is None:
            raise ConfigError(
                "PruningCallback needs a running Optuna trial: it is added by "
                "nlp_transfer.search, not meant for callbacks=... in a training run"
            )
        self.trial = trial
        self.monitor = monitor
        self.reports = 0

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # not the sanity check, nor trainer.validate() after fit
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ConfigError(
                f"search: the monitored metric {self.monitor!r} was not logged in "
                f"validation (logged: {sorted(trainer.callback_metrics)})"
            )
        step, score = self.reports, float(value)
        self.reports += 1
        self.trial.report(score, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at validation {step}: {self.monitor}={score:.4f}")


# --------------------------------------------------------------------------- study


def _direction(value: Any) -> str:
    text = str(value).lower()
    if text in ("max", "maximize"):
        return "maximize"
    if text in ("min", "minimize"):
        return "minimize"
    raise ConfigError(f"search.direction={value!r}: use max or min")


def create_study(search: DictConfig) -> optuna.Study:
    """Create or load the study ``search.study_name`` in its shared storage."""
    study_dir = Path(search.dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    storage: Any = search.get("storage")
    if not storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(str(study_dir / JOURNAL)))
    sampler = instantiate(search.sampler) if search.get("sampler") else None
    pruner = instantiate(search.pruner) if search.get("pruner") else optuna.pruners.NopPruner()
    return optuna.create_study(
        study_name=str(search.study_name),
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction=_direction(search.direction),
        load_if_exists=True,
    )


def _counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=BUDGET))


def fail_running_trials(study: optuna.Study) -> list[int]:
    """Mark the study's RUNNING trials as failed (left by killed workers: the journal has no
    heartbeat); only safe while no other worker runs. Returns their numbers."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    return [t.number for t in stale]


def _compose_trial(config_name: str, overrides: list[str]) -> DictConfig:
    """The config of one trial, composed like the command line would."""
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name=config_name, overrides=overrides)
    with hydra.initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return hydra.compose(config_name=config_name, overrides=overrides)


def _save_job_files(trial_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """``.hydra/config.yaml`` and ``overrides.yaml``, as Hydra writes for a job."""
    hydra_dir = trial_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        OmegaConf.save(OmegaConf.create(resolved), hydra_dir / "config.yaml")
    except Exception:
        OmegaConf.save(cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")


class Objective:
    """One trial: sample, compose, train, return the final metric."""

    def __init__(self, cfg: DictConfig, base_overrides: Iterable[str], config_name: str) -> None:
        self.search = cfg.search
        self.space = parse_space(cfg.search.space)
        if not self.space:
            raise ConfigError("search.space is empty: give at least one key to search over")
        self.metric = str(cfg.search.metric)
        self.config_name = config_name
        self.base = [o for o in base_overrides if _override_key(o) not in self.space]
        self.trials_dir = Path(cfg.search.dir) / TRIALS_DIR

    def trial_config(self, trial: optuna.Trial) -> tuple[DictConfig, list[str]]:
        params = suggest(trial, self.space)
        overrides = self.base + to_overrides(params)
        cfg = _compose_trial(self.config_name, overrides)
        trial_dir = self.trials_dir / str(trial.number)
        with open_dict(cfg):
            cfg.paths.output_dir = str(trial_dir)
            if cfg.get("callbacks") is None:
                cfg.callbacks = {}
            cfg.callbacks.optuna_pruning = {
                "_target_": f"{__name__}.PruningCallback",
                "monitor": self.metric,
            }
        if _uses_subprocess_ddp(cfg):
            raise ConfigError(
                "search trials run in this process: use one device per trial (no trainer=ddp); "
                "run several search workers instead"
            )
        name = f"trial {trial.number}: " + ",".join(to_overrides(params))
        set_wandb_names(cfg, group=str(self.search.study_name), name=name[:128])
        return cfg, overrides

    def __call__(self, trial: optuna.Trial) -> float:
        from nlp_transfer.train import run_and_record

        cfg, overrides = self.trial_config(trial)
        trial_dir = Path(cfg.paths.output_dir)
        trial.set_user_attr("trial_dir", str(trial_dir))
        trial.set_user_attr("overrides", " ".join(to_overrides(trial.params)))
        _save_job_files(trial_dir, cfg, overrides)
        log.info("trial %d: %s", trial.number, " ".join(to_overrides(trial.params)))
        try:
            with _activate(trial):
                metrics = run_and_record(cfg)
        except optuna.TrialPruned as e:
            atomic_write_json(
                trial_dir / "status.json",
                {"status": "pruned", "error": f"TrialPruned: {e}"},
            )
            log.info("trial %d pruned (%s)", trial.number, e)
            raise
        finally:
            _free_memory()
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)):
            raise ConfigError(
                f"search.metric {self.metric!r} is not in the trial's metrics.json "
                f"(has: {sorted(k for k in metrics if k.startswith(('val/', 'test/')))})"
            )
        return float(value)


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- outputs


def write_results(study: optuna.Study, search: DictConfig, base: list[str]) -> dict[str, Any]:
    """``trials.csv`` (every trial) and ``best_params.yaml`` (when a trial completed)."""
    from nlp_transfer.sweeps.aggregate import atomic_write

    study_dir = Path(search.dir)
    trials = study.trials_dataframe()
    atomic_write(study_dir / TRIALS_CSV, lambda f: trials.to_csv(f, index=False))
    states = {
        s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState
    }
    summary: dict[str, Any] = {
        "study": study.study_name,
        "metric": str(search.metric),
        "direction": study.direction.name.lower(),
        "trials": {k: v for k, v in states.items() if v},
    }
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        log.warning("search: no completed trial yet in %s; no %s written", study_dir, BEST_PARAMS)
        return summary
    best = study.best_trial
    overrides = to_overrides(best.params)
    summary.update(
        best_value=best.value,
        best_trial=best.number,
        trial_dir=best.user_attrs.get("trial_dir"),
        params=dict(best.params),
        overrides=overrides,
        command=" ".join(["python -m nlp_transfer.train", *base, *overrides]),
    )
    text = OmegaConf.to_yaml(OmegaConf.create(summary))
    atomic_write(study_dir / BEST_PARAMS, lambda f: f.write(text))
    return summary


def run_search(
    cfg: DictConfig, base_overrides: Iterable[str] = (), config_name: str = "search"
) -> optuna.Study:
    """Run trials of ``cfg.search`` until the study holds ``search.n_trials`` finished ones
    (or ``search.timeout_s`` passes); write the results; return the study."""
    search = cfg.search
    base = list(base_overrides)
    objective = Objective(cfg, base, config_name)
    study = create_study(search)
    if search.get("fail_running_on_start"):
        stale = fail_running_trials(study)
        if stale:
            log.warning("search: marked trials %s, left running by a killed worker, failed", stale)
    total = int(search.n_trials)
    left = total - _counted(study)
    log.info(
        "study %s (%s): %d of %d trials finished or running; storage %s",
        study.study_name,
        search.dir,
        total - max(left, 0),
        total,
        search.get("storage") or Path(search.dir) / JOURNAL,
    )
    if left > 0:
        study.optimize(
            objective,
            n_trials=left,
            timeout=search.get("timeout_s"),
            catch=(Exception,) if search.get("catch_failures", True) else (),
            callbacks=[optuna.study.MaxTrialsCallback(total, states=BUDGET)],
            gc_after_trial=True,
        )
    summary = write_results(study, search, [o for o in base if not _is_search_key(o)])
    log.info("search results in %s:\n%s", search.dir, OmegaConf.to_yaml(OmegaConf.create(summary)))
    return study


def _is_search_key(override: str) -> bool:
    key = _override_key(override)
    return key == "hparams_search" or key == "search" or key.startswith(("search.", "search/"))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="search")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the best value (None when no trial completed)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    with gpu_slot(cfg):
        study = run_search(cfg, list(hc.overrides.task), str(hc.job.config_name))
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return float(study.best_value) if completed else None


if __name__ == "__main__":
    main()
