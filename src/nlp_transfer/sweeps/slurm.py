"""Job states for submitit's SLURM launcher on clusters without accounting.

submitit learns the state of its jobs from ``sacct``. Where SLURM keeps no accounting
(``AccountingStorageType=accounting_storage/none``: small clusters, workstations,
``scripts/slurm_local.sh``) every poll fails: ``sacct`` prints "Slurm accounting storage is
disabled" and submitit logs "Bypassing sacct error ..." (twice: its own handler and Hydra's),
several times a minute for the whole sweep, and a job that died without writing its result
file (killed, out of memory) is never seen as finished. :class:`SqueueFallbackWatcher` asks
``squeue`` instead on such clusters (slurmctld keeps finished jobs for ``MinJobAge``
seconds, 300 by default), in the same format, so submitit's own parsing and state logic
are kept; clusters with accounting still use ``sacct``.

:class:`nlp_transfer.sweeps.callbacks.SlurmAccountingCheck` (a Hydra callback in
``conf/hydra/default.yaml``) installs it in the process that submits the sweep, when the
launcher is submitit's SLURM one.
"""

from __future__ import annotations

import logging
import subprocess

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)

NO_ACCOUNTING = "accounting_storage/none"
# sacct's --parsable2 header that submitit's read_info expects first
_HEADER = "JobID|State|NodeList"


def accounting_storage() -> str | None:
    """The cluster's ``AccountingStorageType`` (``scontrol show config``), None if unknown."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "AccountingStorageType":
            return value.strip()
    return None


class SqueueFallbackWatcher(SlurmInfoWatcher):
    """submitit's watcher that reads job states from ``squeue`` when accounting is off."""

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s=delay_s)
        self._accounting: bool | None = None  # probed on first use

    def uses_sacct(self) -> bool:
        """Whether the cluster keeps accounting (probed once)."""
        if self._accounting is None:
            storage = accounting_storage()
            self._accounting = storage != NO_ACCOUNTING
            if not self._accounting:
                log.info("SLURM accounting is disabled: job states are read from squeue")
        return self._accounting

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()
        if command is None or self.uses_sacct():
            return command
        jobs = sorted({x.split("_")[0] for x in self._registered - self._finished})
        # -r: one line per array task; --states=all: finished jobs too (for MinJobAge)
        return ["squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%N", "-j", ",".join(jobs)]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if self._accounting is False:
            text = string.decode() if isinstance(string, bytes) else string
            string = f"{_HEADER}\n{text}"
        return super().read_info(string)


def install_squeue_fallback() -> SqueueFallbackWatcher:
    """Make every submitit SLURM job of this process use :class:`SqueueFallbackWatcher`."""
    watcher = SlurmJob.watcher
    if not isinstance(watcher, SqueueFallbackWatcher):
        watcher = SqueueFallbackWatcher(delay_s=int(getattr(watcher, "_delay_s", 60)))
        SlurmJob.watcher = watcher
    return watcher
