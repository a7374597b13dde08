"""Feature sharing across tasks: one shared encoder (+ an optional shared projection
layer) and one head per task, trained on single-task batches drawn by a seeded task
schedule.

* :mod:`~nlp_transfer.multitask.sampling`: task schedules (proportional, temperature,
  round robin) and the DDP shard sampler.
* :mod:`~nlp_transfer.multitask.datamodule`: :class:`MultiTaskDataModule`.
* :mod:`~nlp_transfer.multitask.module`: :class:`MultiTaskModule`.
* :mod:`~nlp_transfer.multitask.adapters`: private per-task LoRA adapters.
* :mod:`~nlp_transfer.multitask.train`: ``train_multitask`` (``cfg.tasks`` set).
"""
