"""``python -m nlp_transfer.sweeps.run_train [overrides]``: the training entry point with
:func:`nlp_transfer.sweeps.job.run_job` around ``run_and_record`` (same config as
``nlp_transfer.train``). ``nlp_transfer.train.main`` does the same once it calls
``run_job``; until then sweeps that need skip/resume, GPU pinning or failure tolerance can
use this module."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from nlp_transfer.sweeps.job import run_job
from nlp_transfer.train import run_and_record
from nlp_transfer.utils.resolvers import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the optimized metric (``nan`` for a failed sweep job)."""
    return run_job(cfg, run_and_record)


if __name__ == "__main__":
    main()
