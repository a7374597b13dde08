"""What the run's hardware does natively, and the ``auto`` settings that follow from it.

One probe and one table decide, once at the start of a run (before anything is built):

- ``trainer.precision: auto`` → ``bf16-mixed`` on CUDA GPUs with bf16 (Ampere and newer)
  and on CPUs with native bf16 (AMX or AVX512-BF16); ``16-mixed`` on older CUDA GPUs;
  ``32-true`` everywhere else. On a CPU without native bf16, bf16 is emulated: one epoch
  of 3,000 CoNLL-2003 sentences took 53.2 s in fp32 and had not finished after 700 s in
  bf16 (issue 21, a 2-core AVX2 CPU).
- the speed mechanisms (:data:`SPEED_KNOBS`): each config key accepts ``auto`` or
  true/false; ``auto`` takes the value of :data:`AUTO_TABLE` for the hardware kind. An
  explicit value always wins.

The CPU's features come from torch's own cpuinfo (``torch.cpu.get_capabilities()``), or
``/proc/cpuinfo`` where that is missing: no benchmark at start. A oneDNN ISA limit
(``ONEDNN_MAX_CPU_ISA``, which torch's bf16 matmuls obey) below AVX512_CORE_BF16 makes bf16
emulated on any CPU, so it counts as no native bf16. With ``ATEN_CPU_CAPABILITY=avx2`` and
``MKL_ENABLE_INSTRUCTIONS=AVX2`` (fp32 matmuls are MKL's) as well, the run behaves as on an
AVX2-only CPU (``benchmarks/`` use this to measure that kind on a machine that has AMX).
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from nlp_transfer.errors import ConfigError, config_flag

log = logging.getLogger(__name__)

AUTO = "auto"
CUDA, CPU_BF16, CPU, OTHER = "cuda", "cpu_bf16", "cpu", "other"
KINDS = (CUDA, CPU_BF16, CPU, OTHER)
# CPU flags recorded with every run and benchmark (torch / Linux names)
CPU_FLAGS = ("avx2", "avx512_f", "avx512_bf16", "amx_tile", "amx_bf16")
_NATIVE_BF16 = ("avx512_bf16", "amx_bf16")
_LINUX_NAMES = {"avx512_f": "avx512f"}  # /proc/cpuinfo spelling where it differs
ISA_LIMIT_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# MKL's own limit: torch's fp32 matmuls on x86 are MKL sgemm, which ignores oneDNN's limit
# (2-core AMX Xeon, MiniLM shapes: 363-382 GFLOP/s under ONEDNN_MAX_CPU_ISA=AVX2 alone,
# 223-230 with MKL_ENABLE_INSTRUCTIONS=AVX2 too), so an AVX2 emulation needs both
MKL_LIMIT_VAR = "MKL_ENABLE_INSTRUCTIONS"
# oneDNN ISA limits under which its bf16 kernels are emulated (no AVX512-BF16 / AMX code)
_ISA_WITHOUT_BF16 = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
)

# speed mechanism -> the config key that switches it
SPEED_KNOBS: dict[str, str] = {
    "fast_dropout": "encoder.fast_dropout",  # encoders/fast_dropout.py
    "embedding_grad_buffer": "model.embedding_grad_buffer",  # training/embedding_grad.py
    "fused_adamw": "optimizer.fused",  # torch's fused AdamW kernel
    "clip_norm_shortcut": "model.clip_norm_shortcut",  # module.configure_gradient_clipping
}
# What ``auto`` means per hardware kind. Each CPU mechanism was measured to pay on both CPU
# kinds (docs/benchmarks.md): on the 2-core AVX512-BF16 CPU, and without native bf16 under
# ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 (paired
# medians: fused AdamW 1.16x, fast dropout 1.06x; the clipping-norm shortcut and the
# embedding gradient buffer save 4.7 and 0.8 ms/step of optimizer time in 8 of 8 rounds,
# p = 0.008, while their whole-run ratios, 1.014x and 1.009x, are inside the noise). A
# mechanism that saves nothing measurable on a kind is set off for that kind. On CUDA the
# CPU-only mechanisms are off (their kernels are CPU work; the GPU path is torch's own);
# fused AdamW is the usual fast CUDA optimizer. Other accelerators (MPS, ...) get plain torch.
AUTO_TABLE: dict[str, dict[str, bool]] = {
    CUDA: {
        "fast_dropout": False,
        "embedding_grad_buffer": False,
        "fused_adamw": True,
        "clip_norm_shortcut": False,
    },
    CPU_BF16: dict.fromkeys(SPEED_KNOBS, True),
    CPU: dict.fromkeys(SPEED_KNOBS, True),
    OTHER: dict.fromkeys(SPEED_KNOBS, False),
}
# mechanisms whose speed-up was measured on each kind (the others are reasoned, see above)
MEASURED_ON: dict[str, tuple[str, ...]] = {CPU_BF16: tuple(SPEED_KNOBS), CPU: tuple(SPEED_KNOBS)}
# LazyAdamW (optimizer=lazy_adamw) is not in the table: it changes the update (rows outside
# the batch skip their step), so it is only ever the user's choice.

BF16_SLOWDOWN_NOTE = (
    "measured: 1 epoch of 3,000 CoNLL-2003 sentences took 53.2 s in fp32 and more than "
    "700 s in bf16 (over 13x slower) on a 2-core AVX2 CPU; 640 sentences took 6.6 s against "
    "174.4 s (26x) with oneDNN limited to AVX2 (docs/benchmarks.md)"
)


@dataclass(frozen=True)
class Hardware:
    """The device a run trains on, as far as precision and speed settings care."""

    kind: str  # one of KINDS
    device: str  # cuda | cpu | mps | ...
    name: str  # GPU name or CPU model
    bf16: bool  # native bf16 arithmetic
    flags: tuple[str, ...] = ()  # CPU_FLAGS present
    cores: int | None = None
    isa_limit: str | None = None  # ONEDNN_MAX_CPU_ISA, when set
    capability: tuple[int, int] | None = None  # CUDA compute capability

    def describe(self) -> str:
        if self.device == "cuda":
            cc = f"sm {self.capability[0]}.{self.capability[1]}, " if self.capability else ""
            return f"{self.name} ({cc}bf16 {'yes' if self.bf16 else 'no'})"
        if self.device == "cpu":
            flags = ", ".join(self.flags) or "none of " + "/".join(CPU_FLAGS)
            limit = f", oneDNN limited to {self.isa_limit}" if self.isa_limit else ""
            return f"CPU {self.name}, {self.cores} cores, flags {flags}{limit}"
        return f"{self.device} {self.name}".strip()


def cpu_features() -> dict[str, Any]:
    """CPU model, core count, which of :data:`CPU_FLAGS` it has (torch's cpuinfo, else
    ``/proc/cpuinfo``), the oneDNN ISA limit, and whether bf16 runs natively under it."""
    caps: Mapping[str, Any] = {}
    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if callable(get):
        try:
            caps = get()
        except Exception:  # an unusual CPU must not stop a run
            caps = {}
    flags: set[str] = {f for f in CPU_FLAGS if caps.get(f) is True}
    name = str(caps.get("cpu_name") or "")
    if not caps:
        linux, linux_name = _proc_cpuinfo()
        flags = {f for f in CPU_FLAGS if _LINUX_NAMES.get(f, f) in linux}
        name = linux_name
    model = _proc_cpuinfo()[1] or name or platform.processor() or platform.machine()
    cores = caps.get("num_logical_cores") or os.cpu_count()
    limit = isa_limit()
    return {
        "name": model,
        "cores": int(cores) if cores else None,
        "flags": tuple(f for f in CPU_FLAGS if f in flags),
        "bf16": any(f in flags for f in _NATIVE_BF16) and limit not in _ISA_WITHOUT_BF16,
        "arch": platform.machine(),
        "isa_limit": limit,
        "mkl_isa_limit": os.environ.get(MKL_LIMIT_VAR, "").strip().upper() or None,
    }


def isa_limit() -> str | None:
    """The oneDNN ISA limit set in the environment (upper case), or None."""
    for var in ISA_LIMIT_VARS:
        value = os.environ.get(var, "").strip().upper()
        if value and value not in ("ALL", "DEFAULT"):
            return value
    return None


def _proc_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[set[str], str]:
    """Flags and model name of the first CPU in ``/proc/cpuinfo`` (empty elsewhere)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return set(), ""
    flags: set[str] = set()
    name = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and not name:
            name = value.strip()
    return flags, name


def training_device(accelerator: Any) -> str:
    """The device type Lightning will train on for ``trainer.accelerator``."""
    acc = str(accelerator or AUTO).lower()
    if acc == "cpu":
        return "cpu"
    if acc in ("gpu", "cuda"):
        return "cuda"
    if acc != AUTO:
        return acc  # mps, tpu, hpu, ...
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def probe_hardware(accelerator: Any = AUTO) -> Hardware:
    """What the run will train on: CUDA GPU (with or without bf16), CPU (with or without
    native bf16) or another accelerator."""
    device = training_device(accelerator)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator}: no CUDA GPU is available")
        capability = tuple(torch.cuda.get_device_capability())
        return Hardware(
            kind=CUDA,
            device="cuda",
            name=torch.cuda.get_device_name(),
            bf16=capability[0] >= 8,  # Ampere+: bf16 tensor cores, not emulation
            capability=(int(capability[0]), int(capability[1])),
        )
    if device == "cpu":
        cpu = cpu_features()
        return Hardware(
            kind=CPU_BF16 if cpu["bf16"] else CPU,
            device="cpu",
            name=cpu["name"],
            bf16=cpu["bf16"],
            flags=cpu["flags"],
            cores=cpu["cores"],
            isa_limit=cpu["isa_limit"],
        )
    return Hardware(kind=OTHER, device=device, name="", bf16=False)


def auto_precision(hw: Hardware) -> tuple[str, str]:
    """The precision ``auto`` stands for on ``hw``, and why."""
    if hw.kind == CUDA:
        if hw.bf16:
            return "bf16-mixed", f"CUDA GPU with bf16: {hw.describe()}"
        return "16-mixed", f"CUDA GPU without bf16 (before Ampere): {hw.describe()}"
    if hw.kind == CPU_BF16:
        return "bf16-mixed", f"CPU with native bf16: {hw.describe()}"
    if hw.kind == CPU:
        return "32-true", f"CPU without native bf16 (AVX512-BF16/AMX): {hw.describe()}"
    return "32-true", f"{hw.describe()}: no tested mixed precision here, fp32"


def resolve_precision(requested: Any, hw: Hardware) -> tuple[Any, str]:
    """``trainer.precision`` for the run: ``auto`` resolved on ``hw``; any other value is
    the user's and is kept (with a warning for bf16 on a CPU that emulates it)."""
    if requested is None or str(requested).lower() == AUTO:
        value, why = auto_precision(hw)
        return value, f"auto: {why}"
    if hw.kind == CPU and str(requested).lower().startswith("bf16"):
        log.warning(
            "trainer.precision=%s on a CPU without native bf16 (no AVX512-BF16 or AMX, or "
            "oneDNN limited below them: %s): "
            "bf16 is emulated there and training can be more than 10x slower than fp32 "
            "(%s). Use trainer.precision=auto or 32-true.",
            requested,
            hw.describe(),
            BF16_SLOWDOWN_NOTE,
        )
    return requested, "set explicitly"


def resolve_knob(value: Any, knob: str, kind: str, precision: Any = None) -> tuple[bool, bool]:
    """``(on, from_auto)`` for one speed mechanism: true/false as given, ``auto`` (or
    null) from :data:`AUTO_TABLE`. Fused AdamW stays off under fp16 with auto: Lightning
    cannot clip the gradients of an optimizer that unscales them itself."""
    key = SPEED_KNOBS[knob]
    if value is None or (isinstance(value, str) and value.lower() == AUTO):
        on = AUTO_TABLE[kind][knob]
        if knob == "fused_adamw" and str(precision).lower().startswith("16"):
            on = False
        return on, True
    if isinstance(value, str):
        raise ConfigError(f"{key} must be auto, true or false, got {value!r}")
    return config_flag(value, key), False


def _node(cfg: DictConfig, dotted: str) -> tuple[Any, str] | None:
    """The config node holding ``dotted``'s last key and that key, if the key exists."""
    *parents, key = dotted.split(".")
    node: Any = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, DictConfig) else None
        if node is None:
            return None
    return (node, key) if isinstance(node, DictConfig) and key in node else None


def apply_hardware_settings(cfg: DictConfig) -> dict[str, Any]:
    """Resolve ``trainer.precision`` and every speed knob of ``cfg`` in place, before
    anything is built, log what was chosen and why, and keep the choice in ``cfg.hardware``
    (so also in checkpoints); returns it. A config resolved before is left as it is."""
    if cfg.get("hardware") is not None:
        return dict(OmegaConf.to_container(cfg.hardware))
    trainer = cfg.get("trainer") or {}
    hw = probe_hardware(trainer.get("accelerator", AUTO))
    precision, reason = resolve_precision(trainer.get("precision", AUTO), hw)
    record: dict[str, Any] = {
        "precision": str(precision),
        "precision_source": "set" if reason == "set explicitly" else AUTO,
        "hardware": hw.kind,
        "hardware_name": hw.name,
        "cpu_flags": " ".join(hw.flags) if hw.device == "cpu" else None,
        "speed": {},
    }
    chosen = []
    with open_dict(cfg):
        if cfg.get("trainer") is not None:
            cfg.trainer.precision = precision
        for knob, dotted in SPEED_KNOBS.items():
            found = _node(cfg, dotted)
            if found is None:
                continue  # e.g. static vectors (no dropout masks), an optimizer without fused
            node, key = found
            on, from_auto = resolve_knob(node.get(key), knob, hw.kind, precision)
            node[key] = on
            record["speed"][knob] = on
            chosen.append(f"{knob}={'on' if on else 'off'}{' (auto)' if from_auto else ''}")
        target = str((cfg.get("optimizer") or {}).get("_target_", ""))
        record["speed"]["lazy_adamw"] = target.endswith(".LazyAdamW")  # opt-in only
        cfg.hardware = record
    log.info("precision %s (%s)", precision, reason)
    if chosen:
        log.info("speed mechanisms on %s: %s", hw.kind, ", ".join(chosen))
    return record


def metrics_record(cfg: DictConfig) -> dict[str, Any]:
    """The choice of :func:`apply_hardware_settings` as flat ``metrics.json`` entries
    (``precision``, ``hardware``, ``speed/<mechanism>``, ...); empty if none was made."""
    node = cfg.get("hardware")
    if node is None:
        return {}
    record = dict(OmegaConf.to_container(node))
    speed = record.pop("speed", None) or {}
    record.update({f"speed/{k}": v for k, v in speed.items()})
    return record


def fingerprint() -> dict[str, Any]:
    """This machine as benchmarks record it: CPU model, flags and cores, the GPU, the torch
    build. Results with different fingerprints are never compared in one table."""
    cpu = cpu_features()
    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = f"{torch.cuda.get_device_name()} (sm {major}.{minor})"
    return {
        "cpu": cpu["name"],
        "arch": cpu["arch"],
        "cpu_flags": list(cpu["flags"]),
        "cpu_native_bf16": cpu["bf16"],
        "cpu_isa_limit": cpu["isa_limit"],
        "mkl_isa_limit": cpu["mkl_isa_limit"],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": cpu["cores"],
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


def describe_fingerprint(fp: Mapping[str, Any]) -> str:
    """One line for benchmark output."""
    flags = {f: f in fp.get("cpu_flags", ()) for f in CPU_FLAGS}
    shown = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in flags.items())
    gpu = f"; GPU {fp['gpu']}" if fp.get("gpu") else "; no GPU"
    limit = f", oneDNN limited to {fp['cpu_isa_limit']}" if fp.get("cpu_isa_limit") else ""
    if fp.get("mkl_isa_limit"):
        limit += f", MKL limited to {fp['mkl_isa_limit']}"
    cap = f" (CPU kernels {fp['torch_cpu_capability']})" if fp.get("torch_cpu_capability") else ""
    return (
        f"CPU {fp.get('cpu')} ({fp.get('arch')}), {fp.get('cores')} cores, {shown}{limit}"
        f"{gpu}; torch {fp.get('torch')}{cap}"
    )


# oneDNN ISA limits below AVX-512 -> the MKL_ENABLE_INSTRUCTIONS value that matches them
_MKL_FOR_ISA = {
    "SSE41": "SSE4_2",
    "AVX": "AVX",
    "AVX2": "AVX2",
    "AVX2_VNNI": "AVX2",
    "AVX2_VNNI_2": "AVX2",
}


def partial_isa_limit(fp: Mapping[str, Any]) -> str | None:
    """A warning when oneDNN is limited below AVX-512 but MKL is not: the emulated CPU kind
    then still runs its fp32 matmuls with the real CPU's widest instructions."""
    limit = fp.get("cpu_isa_limit")
    if limit in _MKL_FOR_ISA and not fp.get("mkl_isa_limit"):
        return (
            f"oneDNN is limited to {limit} but MKL is not: fp32 matmuls (MKL sgemm) still "
            f"use every instruction of this CPU; set {MKL_LIMIT_VAR}={_MKL_FOR_ISA[limit]} "
            "as well to emulate the smaller CPU kind"
        )
    return None


def fingerprint_report(fp: Mapping[str, Any]) -> str:
    """What benchmarks print first: the ``hardware:`` line, and the partial-limit warning."""
    warning = partial_isa_limit(fp)
    line = f"hardware: {describe_fingerprint(fp)}"
    return f"{line}\nWARNING: {warning}" if warning else line


def fingerprint_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The fields in which two fingerprints differ (``key: a != b``)."""
    return [
        f"{k}: {a.get(k)!r} != {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
