"""Optuna search (``nlp_transfer.search``): search space parsing, pruning from inside
Lightning, one study shared through the journal file, best_params.yaml and trials.csv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.pruners import BasePruner
from optuna.trial import TrialState

from nlp_transfer.errors import ConfigError
from nlp_transfer.search import (
    BEST_PARAMS,
    JOURNAL,
    TRIALS_CSV,
    PruningCallback,
    format_value,
    parse_space,
    run_search,
    to_overrides,
)
from nlp_transfer.utils.resolvers import PROJECT_ROOT
from tests.conftest import FAST, compose_config


class PruneOddTrials(BasePruner):
    """Deterministic pruner for tests: odd-numbered trials stop at their first report."""

    def __init__(self, **_: Any) -> None:
        pass

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number % 2 == 1


SEARCH = [
    *FAST,
    "+trainer.enable_model_summary=false",
    "test=false",
    "data.max_train_examples=32",
    "data.max_eval_examples=16",
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=2",
    "search/sampler=random",
    "search.sampler.seed=0",
    "search/pruner=none",
    "search.pruner._target_=tests.test_search.PruneOddTrials",
]
SPACE = 'search.space={optimizer.lr:"choice(1e-3,1e-4)",head:"choice(linear,mlp)"}'


def test_parse_space() -> None:
    space = parse_space(
        {
            "optimizer.lr": "tag(log, interval(1e-5, 1e-3))",
            "head": "choice(linear, mlp)",
            "strategy": {"k": "range(1, 5)"},  # nested keys flatten to strategy.k
            "data.batch_size": [16, 32],
            "trainer.accumulate_grad_batches": {"type": "int", "low": 1, "high": 8, "log": True},
            "optimizer.weight_decay": "range(0.0, 0.3, 0.1)",
            "layers": "tag(int, interval(1, 6))",
        }
    )
    assert space["optimizer.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["head"] == CategoricalDistribution(["linear", "mlp"])
    assert space["strategy.k"] == IntDistribution(1, 4)  # Hydra's range excludes the stop
    assert space["data.batch_size"] == CategoricalDistribution([16, 32])
    assert space["trainer.accumulate_grad_batches"] == IntDistribution(1, 8, log=True)
    wd = space["optimizer.weight_decay"]
    assert isinstance(wd, FloatDistribution) and wd.step == pytest.approx(0.1)
    assert wd.high == pytest.approx(0.2)
    assert space["layers"] == IntDistribution(1, 6)
    for bad in ({"lr": "0.1"}, {"lr": {"type": "float", "low": 1}}, {"lr": 3}, {"x": "choice("}):
        with pytest.raises(ConfigError):
            parse_space(bad)


def test_overrides_text() -> None:
    assert to_overrides({"optimizer.lr": 1e-4, "head": "mlp", "flag": True, "x": None}) == [
        "optimizer.lr=0.0001",
        "head=mlp",
        "flag=true",
        "x=null",
    ]
    assert format_value("a b,'c'") == "'a b,\\'c\\''"


def test_pruning_callback_needs_a_trial() -> None:
    with pytest.raises(ConfigError, match="running Optuna trial"):
        PruningCallback(monitor="val/acc")


def _study_dir(log_dir: Path) -> Path:
    return log_dir / "train" / "studies" / "train"


def test_search_prunes_and_is_shared(tmp_path: Path) -> None:
    """2 trials (the second pruned), then a second worker on the same study adds a 3rd."""
    overrides = [*SEARCH, SPACE, f"paths.log_dir={tmp_path}", "search.n_trials=2"]
    cfg = compose_config("search", overrides, tmp_path / "worker1")
    study = run_search(cfg, overrides)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]
    complete, pruned = study.trials[0], study.trials[1]
    assert sorted(complete.intermediate_values) == [0, 1]  # one report per epoch in fit
    assert sorted(pruned.intermediate_values) == [0]  # stopped at its first report

    root = _study_dir(tmp_path)
    assert (root / JOURNAL).is_file()
    for t in study.trials:
        trial_dir = root / "trials" / str(t.number)
        status = json.loads((trial_dir / "status.json").read_text())
        overrides_file = yaml.safe_load((trial_dir / ".hydra" / "overrides.yaml").read_text())
        assert set(to_overrides(t.params)) <= set(overrides_file)
        if t.state == TrialState.COMPLETE:
            metrics = json.loads((trial_dir / "metrics.json").read_text())
            assert status["status"] == "completed"
            assert metrics["val/f1_macro"] == pytest.approx(t.value)
        else:
            assert status["status"] == "pruned" and "TrialPruned" in status["error"]
            assert not (trial_dir / "metrics.json").exists()

    best = yaml.safe_load((root / BEST_PARAMS).read_text())
    assert best["best_trial"] == study.best_trial.number
    assert best["best_value"] == pytest.approx(study.best_value)
    assert set(best["params"]) == {"optimizer.lr", "head"}
    assert best["trials"] == {"complete": 1, "pruned": 1}
    assert best["command"].startswith("python -m nlp_transfer.train ")
    assert "search." not in best["command"] and "search/" not in best["command"]
    assert best["overrides"][0] in best["command"]
    trials = pd.read_csv(root / TRIALS_CSV)
    assert list(trials["number"]) == [0, 1]
    assert list(trials["state"]) == ["COMPLETE", "PRUNED"]

    # a second worker (or a relaunch) with the same study name continues the study
    more = [*SEARCH, SPACE, f"paths.log_dir={tmp_path}", "search.n_trials=3"]
    study2 = run_search(compose_config("search", more, tmp_path / "worker2"), more)
    assert [t.number for t in study2.trials] == [0, 1, 2]
    assert study2.trials[2].state == TrialState.COMPLETE
    assert len(pd.read_csv(root / TRIALS_CSV)) == 3
    assert yaml.safe_load((root / BEST_PARAMS).read_text())["trials"]["complete"] == 2
    # the budget is spent: a third launch runs nothing
    study3 = run_search(compose_config("search", more, tmp_path / "worker3"), more)
    assert len(study3.trials) == 3


def test_failing_trial_is_recorded(tmp_path: Path) -> None:
    overrides = [
        *SEARCH,
        f"paths.log_dir={tmp_path}",
        "search.n_trials=1",
        "optimizer.lr=nan",  # fails when the optimizer is built
        'search.space={head:"choice(linear,mlp)"}',
    ]
    study = run_search(compose_config("search", overrides, tmp_path / "w"), overrides)
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    status = json.loads((_study_dir(tmp_path) / "trials" / "0" / "status.json").read_text())
    assert status["status"] == "failed"
    assert not (_study_dir(tmp_path) / BEST_PARAMS).exists()
    assert (_study_dir(tmp_path) / TRIALS_CSV).is_file()


@pytest.mark.slow
def test_parallel_workers_cli(tmp_path: Path) -> None:
    """Two ``python -m nlp_transfer.search`` processes at once share one study."""
    cmd = [
        sys.executable,
        "-m",
        "nlp_transfer.search",
        *SEARCH,
        SPACE,
        f"paths.log_dir={tmp_path}",
        "search.n_trials=3",
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    procs = [
        subprocess.Popen(
            cmd,
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    root = _study_dir(tmp_path)
    study = optuna.load_study(
        study_name="train",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(root / JOURNAL))
        ),
    )
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))) and len(numbers) in (3, 4)  # 4: a race in ask
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert sorted(p.name for p in (root / "trials").iterdir()) == [str(n) for n in numbers]
    assert len(list((root / "workers").iterdir())) == 2
    assert (root / BEST_PARAMS).is_file()
