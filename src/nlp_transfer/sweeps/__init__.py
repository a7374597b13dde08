"""Sweep tooling: aggregate a multirun's results, resume it, share GPUs between its jobs.

Modules are imported on demand so that a training job that only needs ``resume`` or
``gpu_slots`` never pays for pandas or matplotlib:

- ``nlp_transfer.sweeps.aggregate``: ``aggregate(sweep_dir)`` → results.csv, summary.md/png
- ``nlp_transfer.sweeps.callbacks``: Hydra callback ``AggregateOnMultirunEnd``
- ``nlp_transfer.sweeps.resume``: ``job_completed(output_dir)``
- ``nlp_transfer.sweeps.gpu_slots``: ``acquire_gpu(gpu_ids, lock_dir)``
"""
