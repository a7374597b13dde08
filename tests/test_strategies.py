"""Transfer strategies on a tiny random BERT: what trains, at which LR, and when."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from nlp_transfer.encoders.layer_pooling import LayerPooling
from nlp_transfer.encoders.transformer import TransformerEncoder, packaged_minilm_dir
from nlp_transfer.strategies.base import TransferStrategy, param_layer_index
from nlp_transfer.strategies.gradual import GradualUnfreeze, GradualUnfreezing
from nlp_transfer.strategies.llrd import LLRD
from nlp_transfer.strategies.lora import LoRA, merge
from nlp_transfer.strategies.lp_ft import LPFT
from nlp_transfer.strategies.partial import EmbeddingsOnly, Layers, TopK
from nlp_transfer.strategies.reinit import ReinitTopK
from nlp_transfer.strategies.simple import FrozenEncoder, FullFineTuning
from nlp_transfer.training.param_groups import torch_param_groups
from nlp_transfer.training.slanted_triangular import slanted_triangular_schedule
from tests.conftest import quiet_trainer

NUM_LAYERS = 4
ALL = set(range(NUM_LAYERS + 1))  # layer groups: 0 = embeddings, 1..4 = layers
LR = 1e-2


@pytest.fixture(scope="module")
def tiny_encoder() -> TransformerEncoder:
    torch.manual_seed(0)
    return TransformerEncoder(
        packaged_minilm_dir(),
        random_init=True,
        config_overrides=dict(
            num_hidden_layers=NUM_LAYERS,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=256,  # the test ids are random (< 200): a small embedding is faster
        ),
    )


class TinyModule(pl.LightningModule):
    """Stand-in for the project's module: encoder, head, aux heads, layer pooling."""

    def __init__(
        self,
        encoder: TransformerEncoder,
        strategy: TransferStrategy,
        frozen_in_optimizer: bool = True,
        schedule: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(1)
        size = encoder.hidden_size
        self.encoder = encoder
        self.layer_pooling = LayerPooling(
            "scalar_mix", num_hidden_states=encoder.num_layers + 1, hidden_size=size
        )
        self.head = nn.Linear(size, 2)
        self.aux_heads = nn.ModuleDict({"aux": nn.Linear(size, 2)})
        self.frozen_in_optimizer = frozen_in_optimizer
        self.schedule = schedule
        self.spec = strategy.compile(self)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad() if self.spec.frozen_encoder else torch.enable_grad():
            hidden = self.encoder(batch["input_ids"], batch["attention_mask"])
        feats = self.layer_pooling(hidden)[:, 0]
        return self.head(feats), self.aux_heads["aux"](feats)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        main, aux = self(batch)
        return F.cross_entropy(main, batch["labels"]) + F.cross_entropy(aux, batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        return torch_param_groups(
            self.spec.groups,
            {id(p): n for n, p in self.named_parameters()},
            {"lr": LR, "weight_decay": 0.01},
            params=[p for p in self.parameters() if p.requires_grad or self.frozen_in_optimizer],
        )

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.optimizer_groups(), lr=LR, weight_decay=0.01)
        if not self.schedule:
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = slanted_triangular_schedule(optimizer, steps, cut_frac=0.25, ratio=4.0)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class Batches(Dataset):
    def __init__(self, n: int, vocab: int = 200) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, vocab, (n, 6), generator=gen)
        self.labels = torch.randint(0, 2, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def make(encoder: TransformerEncoder, strategy: TransferStrategy, **kw: Any) -> TinyModule:
    return TinyModule(copy.deepcopy(encoder), strategy, **kw)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(module: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def encoder_layers_changed(module: TinyModule, before: dict[str, torch.Tensor]) -> set[int]:
    index = param_layer_index(module.encoder)
    names = changed(module, before)
    return {index[id(p)] for n, p in module.named_parameters() if n in names and id(p) in index}


def unused(name: str) -> bool:
    return "pooler" in name  # BERT's pooler is not in the graph: never a gradient


def train_steps(module: TinyModule, steps: int = 3) -> torch.optim.Optimizer:
    optimizer = module.configure_optimizers()
    batch = next(iter(DataLoader(Batches(4), batch_size=4)))
    module.train()
    for _ in range(steps):
        optimizer.zero_grad()
        module.loss(batch).backward()
        for n, p in module.named_parameters():  # gradients exactly where trainable
            assert (p.grad is not None) == (p.requires_grad and not unused(n)), n
        optimizer.step()
    return optimizer


PRESETS = {
    "full": (FullFineTuning, ALL),
    "frozen": (FrozenEncoder, set()),
    "top_k": (lambda: TopK(2), {3, 4}),
    "embeddings": (EmbeddingsOnly, {0}),
    "layers": (lambda: Layers("1-2"), {1, 2}),
    "layers_list": (lambda: Layers([0, 4]), {0, 4}),
    "llrd": (lambda: LLRD(decay=0.5), ALL),
    "reinit_top_k": (lambda: ReinitTopK(1), ALL),
    "gradual_unfreeze": (lambda: GradualUnfreeze(initial_groups=1), {4}),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_trainable_parameters(tiny_encoder: TransformerEncoder, preset: str) -> None:
    factory, expected = PRESETS[preset]
    module = make(tiny_encoder, factory())
    before = snapshot(module)
    train_steps(module)
    assert encoder_layers_changed(module, before) == expected
    diff = changed(module, before)
    for name in before:
        if not name.startswith("encoder.") or unused(name):
            continue
        index = param_layer_index(module.encoder)[id(module.get_parameter(name))]
        assert (name in diff) == (index in expected), name
    for prefix in ("head.", "aux_heads.", "layer_pooling."):  # always train
        assert all(n in diff for n in before if n.startswith(prefix)), prefix
    assert module.spec.frozen_encoder == (preset == "frozen")
    assert factory().encoder_training == ("never" if preset == "frozen" else "always")


def test_encoder_training_is_declared_and_wrappers_delegate() -> None:
    """never / later / always, not one boolean: the two-stage presets start frozen but train
    their encoder later; wrappers (LLRD, re-init) report their base's state."""
    assert (FrozenEncoder().encoder_training, FrozenEncoder().frozen_encoder) == ("never", True)
    assert (LPFT().encoder_training, LPFT().frozen_encoder) == ("later", True)
    assert (GradualUnfreeze().encoder_training, GradualUnfreeze().frozen_encoder) == (
        "later",
        False,
    )
    assert GradualUnfreeze(initial_groups=2).encoder_training == "always"
    assert LLRD(decay=0.9, base=FrozenEncoder()).encoder_training == "never"
    assert ReinitTopK(1, base=LPFT()).encoder_training == "later"
    assert ReinitTopK(1, base=LPFT()).frozen_encoder and not LLRD(decay=0.9).frozen_encoder


def test_llrd_group_learning_rates(tiny_encoder: TransformerEncoder) -> None:
    module = make(tiny_encoder, LLRD(decay=0.5))
    scales = {g.name: g.lr_scale for g in module.spec.groups}
    assert scales == {
        "head": 1.0,
        "encoder.layer_4": 1.0,
        "encoder.layer_3": 0.5,
        "encoder.layer_2": 0.25,
        "encoder.layer_1": 0.125,
        "encoder.embeddings": 0.0625,
    }
    optimizer = train_steps(module, steps=1)
    # each strategy group is split by the weight-decay rule into <name> and <name>/no_decay
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert {name.removesuffix("/no_decay") for name in lrs} == set(scales)
    assert lrs == {name: LR * scales[name.removesuffix("/no_decay")] for name in lrs}
    # every encoder parameter is in exactly one group (the unused BERT pooler is removed)
    assert module.encoder.model.pooler is None
    grouped = [id(p) for g in module.spec.groups if g.name.startswith("encoder") for p in g.params]
    assert sorted(grouped) == sorted(id(p) for p in module.encoder.parameters())


def test_llrd_composes_with_other_presets(tiny_encoder: TransformerEncoder) -> None:
    as_option = make(tiny_encoder, TopK(2, lr_decay=0.5)).spec
    as_wrapper = make(tiny_encoder, LLRD(decay=0.5, base=TopK(2))).spec
    for spec in (as_option, as_wrapper):
        assert {g.name: g.lr_scale for g in spec.groups} == {
            "head": 1.0,
            "encoder.layer_4": 1.0,
            "encoder.layer_3": 0.5,
        }
    lora = make(tiny_encoder, LoRA(r=2, lr_decay=0.8)).spec
    assert {g.name: round(g.lr_scale, 6) for g in lora.groups} == {
        "head": 1.0,
        **{f"lora.layer_{i}": round(0.8 ** (4 - i), 6) for i in range(1, 5)},
    }
    with pytest.raises(ValueError, match="lr_decay"):
        FullFineTuning(lr_decay=1.5)


def test_invalid_layer_selections(tiny_encoder: TransformerEncoder) -> None:
    with pytest.raises(ValueError, match=r"valid range: 0\.\.4"):
        make(tiny_encoder, Layers([1, 7]))
    with pytest.raises(ValueError, match=r"valid k: 0\.\.5"):
        make(tiny_encoder, TopK(6))
    with pytest.raises(ValueError, match="negative"):
        Layers("-1")
    with pytest.raises(ValueError, match="parse"):
        Layers("two-four")
    assert Layers("2:4").layers == Layers("2-4").layers == [2, 3, 4]


def fit(module: TinyModule, callbacks: list[pl.Callback], root: Any, **kw: Any) -> pl.Trainer:
    ckpt = kw.pop("ckpt_path", None)
    trainer = quiet_trainer(default_root_dir=str(root), callbacks=callbacks, **kw)
    trainer.fit(module, DataLoader(Batches(8), batch_size=4), ckpt_path=ckpt)
    return trainer


def test_gradual_unfreezing_per_epoch(tiny_encoder: TransformerEncoder, tmp_path: Any) -> None:
    module = make(tiny_encoder, GradualUnfreeze())
    callback = module.spec.callbacks[0]
    assert isinstance(callback, GradualUnfreezing)
    before = snapshot(module)
    trainer = fit(module, module.spec.callbacks, tmp_path, max_epochs=3)
    # epoch 0: heads only; epoch 1: + layer 4; epoch 2: + layer 3
    assert [(e["epoch"], e["unfrozen"]) for e in callback.events] == [
        (1, ["layer_4"]),
        (2, ["layer_3"]),
    ]
    assert float(trainer.callback_metrics["unfrozen_groups"]) == 2.0
    assert encoder_layers_changed(module, before) == {3, 4}
    state = callback.state_dict()
    assert state["num_unfrozen"] == 2

    # resume: a fresh callback restores what is unfrozen before training continues
    restored = GradualUnfreezing()
    restored.load_state_dict(state)
    fresh = make(tiny_encoder, GradualUnfreeze())
    restored.freeze_before_training(fresh)
    index = param_layer_index(fresh.encoder)
    trainable = {index[id(p)] for p in fresh.encoder.parameters() if p.requires_grad}
    assert trainable == {3, 4}


def test_gradual_unfreezing_per_step_adds_groups(
    tiny_encoder: TransformerEncoder, tmp_path: Any
) -> None:
    # optimizer built from trainable params only: the callback adds groups and extends
    # the LR schedule to them
    strategy = GradualUnfreeze(every=2, unit="step", lr_decay=0.5)
    module = make(tiny_encoder, strategy, frozen_in_optimizer=False, schedule=True)
    callback = module.spec.callbacks[0]
    before = snapshot(module)
    trainer = fit(module, [callback], tmp_path, max_steps=5)
    assert [(e["step"], e["unfrozen"]) for e in callback.events] == [
        (2, ["layer_4"]),
        (4, ["layer_3"]),
    ]
    assert encoder_layers_changed(module, before) == {3, 4}
    optimizer = trainer.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    names = [g["name"] for g in optimizer.param_groups]
    assert "encoder.layer_4" in names and "encoder.layer_3/no_decay" in names
    assert len(scheduler.base_lrs) == len(optimizer.param_groups)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["encoder.layer_3"]["initial_lr"] == pytest.approx(LR * 0.5)
    factor = by_name["head"]["lr"] / LR  # the same schedule factor for every group
    assert by_name["encoder.layer_3"]["lr"] == pytest.approx(LR * 0.5 * factor)

    # resume from a checkpoint: groups, schedule and optimizer state come back
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    module2 = make(tiny_encoder, strategy, frozen_in_optimizer=False, schedule=True)
    callback2 = module2.spec.callbacks[0]
    trainer2 = fit(module2, [callback2], tmp_path, max_steps=7, ckpt_path=str(ckpt))
    assert callback2.num_unfrozen == 3  # steps 5 and 6 ran: one more event at step 6
    assert [e["step"] for e in callback2.events] == [2, 4, 6]
    opt2 = trainer2.optimizers[0]
    assert len(trainer2.lr_scheduler_configs[0].scheduler.base_lrs) == len(opt2.param_groups)


def test_gradual_unfreezing_identity_check(tiny_encoder: TransformerEncoder) -> None:
    # equal-valued LayerNorm weights of different layers must all reach the optimizer
    module = make(tiny_encoder, GradualUnfreeze(initial_groups=1), frozen_in_optimizer=False)
    optimizer = module.configure_optimizers()
    callback = module.spec.callbacks[0]
    callback.finetune_function(module, 2, optimizer)
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    layer2 = module.encoder.model.encoder.layer[1]
    assert all(id(p) in in_opt for p in layer2.parameters())
    assert callback.num_unfrozen == 3


def test_reinit_top_k(tiny_encoder: TransformerEncoder) -> None:
    encoder = copy.deepcopy(tiny_encoder)
    with torch.no_grad():  # pretend pre-trained: perturbed weights, HF "initialised" flags
        for p in encoder.parameters():
            p.add_(0.5)
            p._is_hf_initialized = True
    torch.manual_seed(7)
    first = make(encoder, ReinitTopK(2))
    torch.manual_seed(7)
    second = make(encoder, ReinitTopK(2))
    originals = encoder.layer_groups()
    for i, (a, b, orig) in enumerate(
        zip(first.encoder.layer_groups(), second.encoder.layer_groups(), originals)
    ):
        for pa, pb, po in zip(a.parameters(), b.parameters(), orig.parameters()):
            assert torch.equal(pa, pb)  # deterministic under the global seed
            assert torch.equal(pa, po) == (i < 3), i
    top = first.encoder.model.encoder.layer[-1]
    assert torch.equal(top.output.LayerNorm.weight, torch.ones_like(top.output.LayerNorm.weight))
    assert top.intermediate.dense.weight.std().item() == pytest.approx(0.02, rel=0.3)

    seeded, again = make(encoder, FullFineTuning()), make(encoder, FullFineTuning())
    state = torch.random.get_rng_state()
    ReinitTopK(1, seed=3).reinit(seeded)
    assert torch.equal(state, torch.random.get_rng_state())  # global stream untouched
    torch.manual_seed(123)
    ReinitTopK(1, seed=3).reinit(again)
    top_a, top_b = seeded.encoder.layer_groups()[-1], again.encoder.layer_groups()[-1]
    assert all(torch.equal(x, y) for x, y in zip(top_a.parameters(), top_b.parameters()))


def test_lora_trains_adapters_and_merges(tiny_encoder: TransformerEncoder) -> None:
    module = make(tiny_encoder, LoRA(r=4, alpha=8, dropout=0.0))
    assert len(module.encoder.layer_groups()) == NUM_LAYERS + 1
    before = snapshot(module)
    train_steps(module)
    diff = changed(module, before)
    for name in before:
        if name.startswith("encoder."):
            assert (name in diff) == ("lora_" in name), name
        else:
            assert name in diff, name
    assert any("lora_B" in n for n in diff)

    batch = next(iter(DataLoader(Batches(4), batch_size=4)))
    module.eval()
    with torch.no_grad():
        hidden = module.encoder(batch["input_ids"], batch["attention_mask"])
        assert len(hidden) == NUM_LAYERS + 1
        unmerged = module(batch)[0]
        merge(module)
        assert type(module.encoder.model).__name__ == "BertModel"
        assert not any("lora" in n for n, _ in module.named_parameters())
        merged = module(batch)[0]
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_slanted_triangular_schedule() -> None:
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(
        [{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 0.5}]
    )
    scheduler = slanted_triangular_schedule(optimizer, 100, cut_frac=0.1, ratio=32.0)
    lrs = []
    for _ in range(101):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx([1 / 32, 0.5 / 32])
    assert lrs[10] == pytest.approx([1.0, 0.5])  # peak at cut = floor(T * cut_frac)
    assert lrs[55] == pytest.approx([(1 + 0.5 * 31) / 32, 0.5 * (1 + 0.5 * 31) / 32])
    assert lrs[100] == pytest.approx([1 / 32, 0.5 / 32])
    assert max(range(101), key=lambda t: lrs[t][0]) == 10
    saved = scheduler.state_dict()  # the schedule is a callable object: it is saved
    assert saved["lr_lambdas"][0] == {"total": 100, "cut": 10, "ratio": 32.0}
    with pytest.raises(ValueError, match="cut_frac"):
        slanted_triangular_schedule(optimizer, 100, cut_frac=1.5)
