"""On a CUDA GPU (skipped elsewhere; run by benchmarks/gpu_check.sh): `auto` resolves for
the GPU and the CPU-only speed mechanisms stay off there."""

from __future__ import annotations

import pytest
import torch

from nlp_transfer.encoders.fast_dropout import ATTENTION_NAME, FastDropout
from nlp_transfer.training.embedding_grad import EmbeddingGradBuffer
from nlp_transfer.training.hardware import CUDA, probe_hardware

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_probe_reports_the_gpu_and_its_bf16_support() -> None:
    hw = probe_hardware("auto")
    assert hw.kind == CUDA and hw.device == "cuda"
    assert hw.bf16 is (torch.cuda.get_device_capability()[0] >= 8)


def test_default_run_on_the_gpu_uses_auto_precision_and_no_cpu_mechanisms(make_cfg) -> None:
    from nlp_transfer.train import train

    cfg = make_cfg(
        "trainer.accelerator=gpu",
        "trainer.precision=auto",
        "+trainer.max_steps=3",
        "callbacks.model_checkpoint=null",
        "test=false",
    )
    metrics, objects = train(cfg)
    want = "bf16-mixed" if probe_hardware("gpu").bf16 else "16-mixed"
    assert metrics["precision"] == want and metrics["hardware"] == CUDA
    module = objects["module"]
    assert next(module.parameters()).device.type == "cuda"
    assert not any(isinstance(m, FastDropout) for m in module.modules())
    assert module.encoder.model.config._attn_implementation != ATTENTION_NAME
    assert not any(isinstance(c, EmbeddingGradBuffer) for c in module.configure_callbacks())
    assert module.speed.clip_norm_shortcut is False
    for knob in ("fast_dropout", "embedding_grad_buffer", "clip_norm_shortcut"):
        assert metrics[f"speed/{knob}"] is False, knob
    fused = objects["trainer"].optimizers[0].defaults["fused"]
    assert fused is (want == "bf16-mixed")  # auto: no fused AdamW under fp16
