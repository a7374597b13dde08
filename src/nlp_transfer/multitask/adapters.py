"""Private per-task LoRA adapters (PEFT) inside the shared encoder.

Design: one LoRA adapter per task, named ``private_<task>``, is injected into the
encoder's transformers model (``peft.inject_adapter_in_model``, so the model keeps its
type; if ``strategy=lora`` already wrapped it, the private adapters join its shared
``default`` adapter in the same LoRA layers). Before every batch the adapters of that
batch's task (plus any shared adapter) are made active, so only that task's adapter
is in the graph: the others get no gradient (``None``) and the optimizer skips them.

PEFT's ``set_adapter`` also flips ``requires_grad``; :meth:`PrivateAdapters.activate`
puts every flag back, so which parameters train is decided once, by the transfer
strategy and by :meth:`PrivateAdapters.__init__` (private adapters always train), and
stays constant, as DDP requires. The adapters are injected after the strategy has
compiled, so partial strategies (``frozen``, ``top_k``...) do not freeze them; with a
frozen encoder the forward pass keeps autograd on so the adapters still learn.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from nlp_transfer.errors import ConfigError

PREFIX = "private_"


def adapter_name(task: str) -> str:
    return f"{PREFIX}{task}"


class PrivateAdapters:
    """One LoRA adapter per task in ``encoder.model``; :meth:`activate` picks the task's.

    Args:
        encoder: an encoder wrapping a transformers model as ``.model``.
        tasks: task names.
        r / alpha / dropout / target_modules / bias: the LoRA settings of every adapter.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: Sequence[str],
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Sequence[str] = ("query", "value"),
        bias: str = "none",
    ) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = getattr(encoder, "model", None)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                "multitask.private_adapters needs an encoder wrapping a transformers model "
                f"as `.model`; {type(encoder).__name__} has none"
            )
        if int(r) < 1:
            raise ConfigError(f"multitask.private_adapters.r must be >= 1, got {r}")
        flags = {id(p): p.requires_grad for p in encoder.parameters()}
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.shared = sorted({a for layer in layers for a in layer.active_adapters})
        self.tasks = list(tasks)
        for task in self.tasks:
            config = LoraConfig(
                r=int(r),
                lora_alpha=float(alpha),
                lora_dropout=float(dropout),
                target_modules=list(target_modules),
                bias=bias,
            )
            try:
                with warnings.catch_warnings():  # "multiple adapters": that is the point
                    warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                    inject_adapter_in_model(config, model, adapter_name=adapter_name(task))
            except ValueError as e:
                raise ConfigError(
                    f"multitask.private_adapters: cannot place adapters on target_modules="
                    f"{list(target_modules)} in {type(model).__name__} ({e})"
                ) from e
        # injection freezes everything but the new adapter: restore the strategy's flags
        for p in encoder.parameters():
            p.requires_grad_(flags.get(id(p), True))
        self.params: dict[str, list[nn.Parameter]] = {
            task: [p for n, p in encoder.named_parameters() if f".{adapter_name(task)}." in f"{n}."]
            for task in self.tasks
        }
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self._layer_params = [p for layer in self.layers for p in layer.parameters()]
        self.active: str | None = None

    def parameters(self) -> list[nn.Parameter]:
        """Every private adapter's parameters."""
        return [p for task in self.tasks for p in self.params[task]]

    def activate(self, task: str) -> None:
        """Make ``task``'s adapter (and the shared ones) the active adapters."""
        if task == self.active:
            return
        if task not in self.params:
            raise KeyError(f"no private adapter for task {task!r}; tasks: {self.tasks}")
        flags = [(p, p.requires_grad) for p in self._layer_params]
        for layer in self.layers:
            layer.set_adapter([*self.shared, adapter_name(task)])
        for p, flag in flags:
            p.requires_grad_(flag)
        self.active = task
