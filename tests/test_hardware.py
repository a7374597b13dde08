"""trainer.precision=auto and the speed-mechanism auto table (training/hardware.py), with
the hardware probe mocked for each kind, plus one real run on this machine's probe."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from nlp_transfer.encoders.fast_dropout import FastDropout
from nlp_transfer.errors import ConfigError
from nlp_transfer.features.extract import resolve_precision as feature_precision
from nlp_transfer.training import hardware
from nlp_transfer.training.embedding_grad import EmbeddingGradBuffer
from nlp_transfer.training.hardware import (
    AUTO_TABLE,
    CPU,
    CPU_BF16,
    CUDA,
    OTHER,
    SPEED_KNOBS,
    Hardware,
    apply_hardware_settings,
    auto_precision,
    cpu_features,
    probe_hardware,
    resolve_knob,
    resolve_precision,
)

GPU_BF16 = Hardware(CUDA, "cuda", "A100", True, capability=(8, 0))
GPU_OLD = Hardware(CUDA, "cuda", "V100", False, capability=(7, 0))
CPU_AMX = Hardware(CPU_BF16, "cpu", "Xeon", True, ("avx2", "amx_bf16"), 2)
CPU_AVX2 = Hardware(CPU, "cpu", "EPYC", False, ("avx2",), 2)
MPS = Hardware(OTHER, "mps", "", False)


@pytest.mark.parametrize(
    ("hw", "want"),
    [
        (GPU_BF16, "bf16-mixed"),
        (GPU_OLD, "16-mixed"),
        (CPU_AMX, "bf16-mixed"),
        (CPU_AVX2, "32-true"),
        (MPS, "32-true"),
    ],
)
def test_auto_precision_per_hardware_kind(hw: Hardware, want: str) -> None:
    value, why = resolve_precision("auto", hw)
    assert value == want
    assert why.startswith("auto: ") and hw.describe().split(",")[0] in why


@pytest.mark.parametrize("hw", [GPU_BF16, GPU_OLD, CPU_AMX, CPU_AVX2])
@pytest.mark.parametrize("given", ["32-true", "bf16-mixed", "16-mixed", 64])
def test_an_explicit_precision_always_wins(hw: Hardware, given: object) -> None:
    assert resolve_precision(given, hw) == (given, "set explicitly")


def test_forced_bf16_on_a_cpu_without_native_bf16_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="nlp_transfer.training.hardware"):
        resolve_precision("bf16-mixed", CPU_AMX)
        assert not caplog.records
        resolve_precision("bf16-mixed", CPU_AVX2)
    (record,) = caplog.records
    assert "emulated" in record.message and "700 s" in record.message
    assert "trainer.precision=auto" in record.message


def _probe(monkeypatch: pytest.MonkeyPatch, hw: Hardware) -> None:
    monkeypatch.setattr(hardware, "probe_hardware", lambda accelerator="auto": hw)


@pytest.mark.parametrize("hw", [GPU_BF16, GPU_OLD, CPU_AMX, CPU_AVX2, MPS])
def test_config_resolves_precision_and_every_knob_from_the_table(
    make_cfg, monkeypatch, hw: Hardware
) -> None:
    _probe(monkeypatch, hw)
    cfg = make_cfg("trainer.precision=auto")
    record = apply_hardware_settings(cfg)
    want_precision = auto_precision(hw)[0]
    assert cfg.trainer.precision == record["precision"] == want_precision
    assert record["hardware"] == hw.kind and record["precision_source"] == "auto"
    fp16 = want_precision == "16-mixed"
    for knob, dotted in SPEED_KNOBS.items():
        section, key = dotted.split(".")
        want = AUTO_TABLE[hw.kind][knob] and not (knob == "fused_adamw" and fp16)
        assert cfg[section][key] is want, knob
        assert record["speed"][knob] is want
    assert record["speed"]["lazy_adamw"] is False
    # the features' encoder pass follows the trainer (features.precision: null)
    assert feature_precision(cfg) == {"bf16-mixed": "bf16", "16-mixed": "16"}.get(
        want_precision, "32"
    )
    # resolved once: a second call changes nothing and returns the same choice
    assert apply_hardware_settings(cfg) == record


def test_the_auto_table_keeps_cpu_only_mechanisms_off_on_cuda() -> None:
    assert set(AUTO_TABLE) == {CUDA, CPU_BF16, CPU, OTHER}
    for kind, row in AUTO_TABLE.items():
        assert set(row) == set(SPEED_KNOBS), kind
    cpu_only = ("fast_dropout", "embedding_grad_buffer", "clip_norm_shortcut")
    assert not any(AUTO_TABLE[CUDA][k] for k in cpu_only)
    assert AUTO_TABLE[CUDA]["fused_adamw"]
    assert all(AUTO_TABLE[CPU_BF16].values())


def test_explicit_knobs_win_and_bad_values_name_the_key(make_cfg, monkeypatch) -> None:
    _probe(monkeypatch, GPU_BF16)
    cfg = make_cfg(
        "trainer.precision=32-true",
        "encoder.fast_dropout=true",
        "model.embedding_grad_buffer=true",
        "optimizer.fused=false",
    )
    record = apply_hardware_settings(cfg)
    assert record["precision"] == "32-true" and record["precision_source"] == "set"
    assert cfg.encoder.fast_dropout is True and cfg.model.embedding_grad_buffer is True
    assert cfg.optimizer.fused is False
    assert cfg.model.clip_norm_shortcut is False  # still auto: off on CUDA
    assert resolve_knob(None, "fused_adamw", CPU) == (True, True)
    assert resolve_knob(True, "fused_adamw", CUDA, "16-mixed") == (True, False)
    assert resolve_knob("AUTO", "fused_adamw", CUDA, "16-mixed") == (False, True)
    for bad in ("on", "false", 1):
        with pytest.raises(ConfigError, match="model.clip_norm_shortcut"):
            resolve_knob(bad, "clip_norm_shortcut", CPU)


def test_cpu_probe_reads_torch_capabilities_or_proc_cpuinfo(monkeypatch, tmp_path) -> None:
    for var in hardware.ISA_LIMIT_VARS:  # a limit set for the whole run must not interfere
        monkeypatch.delenv(var, raising=False)
    caps = {"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**caps, "num_logical_cores": 4})
    got = cpu_features()
    assert got["flags"] == ("avx2", "avx512_f") and not got["bf16"] and got["cores"] == 4
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**caps, "amx_bf16": True})
    assert cpu_features()["bf16"]
    # without torch's cpuinfo: the Linux flags (avx512f spelled without the underscore)
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    read = hardware._proc_cpuinfo
    monkeypatch.setattr(hardware, "_proc_cpuinfo", lambda path=info: read(path))
    got = cpu_features()
    assert got["flags"] == ("avx2", "avx512_f", "avx512_bf16") and got["bf16"]
    assert got["name"] == "Some CPU"


def test_a_onednn_isa_limit_below_bf16_counts_as_no_native_bf16(monkeypatch) -> None:
    caps = {"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    for var in hardware.ISA_LIMIT_VARS:
        monkeypatch.delenv(var, raising=False)
    assert cpu_features()["bf16"] and probe_hardware("cpu").kind == CPU_BF16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    hw = probe_hardware("cpu")
    assert hw.kind == CPU and not hw.bf16 and hw.flags == tuple(caps)  # flags as they are
    assert hw.isa_limit == "AVX2" and "oneDNN limited to AVX2" in hw.describe()
    assert auto_precision(hw)[0] == "32-true"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert probe_hardware("cpu").kind == CPU_BF16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert cpu_features()["isa_limit"] is None


def test_probe_follows_the_trainer_accelerator(monkeypatch) -> None:
    assert probe_hardware("cpu").device == "cpu"
    assert probe_hardware("cpu").kind in (CPU, CPU_BF16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        probe_hardware("gpu")
    assert probe_hardware("mps").kind == OTHER


def test_default_sst2_run_resolves_to_what_the_probe_reports(
    make_cfg, tmp_path: Path, shared_data: Path
) -> None:
    """``experiment=sst2`` as shipped (trainer.precision and every knob left at auto),
    on a tiny slice and the tiny encoder, end to end on this machine's probe."""
    from nlp_transfer.train import train

    probed = probe_hardware("auto")
    want, _ = auto_precision(probed)
    cfg = make_cfg(
        "experiment=sst2",
        "encoder=tiny",
        f"data.data_dir={shared_data / 'sst2'}",
        "data.max_train_examples=32",
        "data.max_eval_examples=16",
        "data.batch_size=16",
        "trainer.precision=auto",  # undo the suite's fp32 pin: the shipped default
        "test=false",
        "callbacks.model_checkpoint=null",
        fast=True,
    )
    metrics, objects = train(cfg)
    assert metrics["precision"] == want == str(objects["trainer"].precision)
    assert metrics["hardware"] == probed.kind
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stored["precision"] == want and stored["precision_source"] == "auto"
    module = objects["module"]
    row = AUTO_TABLE[probed.kind]
    for knob in SPEED_KNOBS:
        assert stored[f"speed/{knob}"] is row[knob], knob
    has_fast = any(isinstance(m, FastDropout) for m in module.modules())
    assert has_fast is row["fast_dropout"]
    assert module.speed.clip_norm_shortcut is row["clip_norm_shortcut"]
    assert objects["trainer"].optimizers[0].defaults["fused"] is row["fused_adamw"]
    callbacks = module.configure_callbacks()
    assert (
        any(isinstance(c, EmbeddingGradBuffer) for c in callbacks) is (row["embedding_grad_buffer"])
    )


def test_sklearn_and_multitask_runs_resolve_auto_too(make_cfg, monkeypatch) -> None:
    """The other entry paths of ``train``, on a (mocked) AVX2-only CPU: an sklearn head on
    frozen features (whose encoder pass follows the trainer's precision) and a multi-task
    run."""
    from nlp_transfer.train import train

    hw = CPU_AVX2
    _probe(monkeypatch, hw)
    want = auto_precision(hw)[0]
    metrics, _ = train(
        make_cfg(
            "head=logreg",
            "trainer.precision=auto",
            "data.max_train_examples=32",
            "data.max_eval_examples=16",
            "test=false",
            run="sklearn",
        )
    )
    assert metrics["precision"] == want and metrics["hardware"] == hw.kind
    assert metrics["feature_precision"] == ("bf16" if hw.bf16 else "32")
    metrics, objects = train(
        make_cfg(
            "experiment=multitask_demo",
            "encoder=tiny",
            "trainer.precision=auto",
            "tasks.sentiment.data.max_train_examples=16",
            "tasks.ner.data.max_train_examples=16",
            "tasks.sentiment.data.max_eval_examples=8",
            "tasks.ner.data.max_eval_examples=8",
            "+trainer.max_steps=2",
            "callbacks.model_checkpoint=null",
            "test=false",
            run="multitask",
        )
    )
    assert metrics["precision"] == want == str(objects["trainer"].precision)
    row = AUTO_TABLE[hw.kind]
    assert metrics["speed/fast_dropout"] is row["fast_dropout"]
    assert objects["module"].speed.clip_norm_shortcut is row["clip_norm_shortcut"]


def test_clipping_without_the_shortcut_scales_gradients_like_clip_grad_norm() -> None:
    from types import SimpleNamespace

    from pytorch_lightning import LightningModule

    from nlp_transfer.module import TransferModule
    from nlp_transfer.training.speed import SpeedMachinery

    module = TransferModule.__new__(TransferModule)
    LightningModule.__init__(module)
    module.speed = SpeedMachinery()  # what __init__ sets (defaults)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))  # type: ignore[assignment]
    module.speed.clip_norm_shortcut = False
    fused_p, plain_p = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    fused_sgd = torch.optim.SGD([fused_p], lr=0.5, fused=True)
    plain_sgd = torch.optim.SGD([plain_p], lr=0.5)
    for grad in ([3.0, 4.0, 0.0, 12.0], [0.1, 0.2, 0.0, 0.1]):
        fused_p.grad, plain_p.grad = torch.tensor(grad), torch.tensor(grad)
        module.configure_gradient_clipping(fused_sgd, 1.0, "norm")
        assert fused_sgd.grad_scale is None  # nothing handed to the kernel
        fused_sgd.step()
        torch.nn.utils.clip_grad_norm_([plain_p], 1.0)
        plain_sgd.step()
        torch.testing.assert_close(fused_p, plain_p)
    # a sparse (lazy) embedding gradient: its summed rows are scaled as the dense one
    table = torch.nn.Parameter(torch.zeros(3, 2))
    opt = torch.optim.SGD([table], lr=0.1, fused=True)
    table.grad = torch.sparse_coo_tensor([[1, 1]], torch.tensor([[3.0, 0.0], [0.0, 4.0]]), (3, 2))
    module.configure_gradient_clipping(opt, 1.0, "norm")
    torch.testing.assert_close(
        table.grad.to_dense()[1], torch.tensor([0.6, 0.8]), atol=1e-5, rtol=0
    )


def test_an_avx2_emulation_without_the_mkl_limit_is_flagged(monkeypatch) -> None:
    for var in (*hardware.ISA_LIMIT_VARS, hardware.MKL_LIMIT_VAR):
        monkeypatch.delenv(var, raising=False)
    plain = hardware.fingerprint()
    assert plain["mkl_isa_limit"] is None and hardware.partial_isa_limit(plain) is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    onednn_only = hardware.fingerprint()
    warning = hardware.partial_isa_limit(onednn_only)
    assert warning is not None and "MKL_ENABLE_INSTRUCTIONS=AVX2" in warning
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "avx2")
    assert hardware.partial_isa_limit({"cpu_isa_limit": "SSE41"}).endswith(
        "MKL_ENABLE_INSTRUCTIONS=SSE4_2 as well to emulate the smaller CPU kind"
    )
    # a limit at AVX-512 or above leaves fp32 matmuls as they are: nothing to warn about
    assert hardware.partial_isa_limit({"cpu_isa_limit": "AVX512_CORE_AMX"}) is None
    both = hardware.fingerprint()
    assert both["mkl_isa_limit"] == "AVX2" and hardware.partial_isa_limit(both) is None
    assert "oneDNN limited to AVX2, MKL limited to AVX2" in hardware.describe_fingerprint(both)
    # results with and without MKL's limit are different machines to the benchmark tables
    assert hardware.fingerprint_differences(onednn_only, both) == ["mkl_isa_limit: None != 'AVX2'"]
