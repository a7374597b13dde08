"""The BiLSTM word head (BERT's feature-based NER setup): packing, CRF variant, width default,
and training on live and on cached frozen features."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nlp_transfer.errors import ConfigError
from nlp_transfer.heads import head_kwargs
from nlp_transfer.heads.bilstm import BiLSTMTokenHead
from nlp_transfer.train import train

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def test_padding_never_changes_a_sentence_outputs() -> None:
    """A sentence gets the same logits alone and padded in a batch with a longer one."""
    torch.manual_seed(0)
    head = BiLSTMTokenHead(8, len(TAGS), hidden_size=6, dropout=0.0).eval()
    long, short = torch.randn(1, 7, 8), torch.randn(1, 4, 8)
    batch = torch.zeros(2, 7, 8)
    batch[0], batch[1, :4] = long[0], short[0]
    batch[1, 4:] = 5.0  # garbage in the padding must not reach the backward direction
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = head(batch, mask)
    alone = head(short, torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(out[1, :4], alone[0])
    assert out.shape == (2, 7, len(TAGS))


def test_width_follows_the_encoder_not_the_pooled_input() -> None:
    kw = head_kwargs(BiLSTMTokenHead, input_size=4 * 32, labels=TAGS, encoder_hidden_size=32)
    head = BiLSTMTokenHead(**kw)
    assert head.lstm.input_size == 128 and head.hidden_size == 32 and head.num_layers == 2
    assert BiLSTMTokenHead(**kw, hidden_size=10).hidden_size == 10


def test_crf_variant_decodes_valid_tags() -> None:
    torch.manual_seed(0)
    head = BiLSTMTokenHead(8, len(TAGS), labels=TAGS, hidden_size=4, crf=True)
    feats, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    labels = torch.randint(0, len(TAGS), (3, 5))
    loss = head.loss(head(feats, mask), labels, mask)
    loss.backward()
    assert torch.isfinite(loss) and head.lstm.weight_ih_l0.grad is not None
    tags = head.decode(head(feats, mask), mask)
    for row in tags.tolist():  # constrained IOB2: never O -> I-X or a leading I-X
        prev = "O"
        for t in row:
            if TAGS[t].startswith("I-"):
                assert prev[2:] == TAGS[t][2:], row
            prev = TAGS[t]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"crf": "yes"}, "crf"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"head.{key}"):
        BiLSTMTokenHead(8, 3, **kwargs)


NER = [
    "data=demo_ner",
    "head=token_bilstm",
    "head.num_layers=1",
    "monitor=val/f1",
    "strategy=frozen",
    "optimizer.lr=1e-2",
    "trainer.max_epochs=3",
    "data.max_train_examples=200",
    "data.max_eval_examples=60",
]


def test_trains_on_live_and_on_cached_features_alike(make_cfg, monkeypatch) -> None:
    """Live and cached frozen features give the same metrics; the cached run never calls the
    encoder once the cache holds its features, and the BiLSTM learns (loss falls)."""
    live, objects = train(make_cfg(*NER, run="live"))
    assert isinstance(objects["module"].head, BiLSTMTokenHead)
    cached, objects = train(make_cfg(*NER, "features.cache=true", run="cached"))
    assert type(objects["datamodule"]).__name__ == "CachedFeatureDataModule"
    for key in ("val/f1", "test/f1", "val/loss"):
        assert cached[key] == pytest.approx(live[key], abs=1e-5), key


def test_learns_a_rule_that_needs_left_context() -> None:
    """Word ``t`` is I-PER exactly when word ``t-1`` is a name (B-PER); the word itself carries
    no hint, so only the LSTM's left context can get the I-PER words right."""
    torch.manual_seed(0)
    n, width, dim = 64, 8, 6
    name = torch.rand(n, width) < 0.3
    feats = torch.randn(n, width, dim) * 0.1
    feats[..., 0] += name.float()  # a name is visible in its own features only
    labels = torch.zeros(n, width, dtype=torch.long)
    after = torch.zeros_like(name)
    after[:, 1:] = name[:, :-1] & ~name[:, 1:]
    labels[name], labels[after] = 1, 2
    mask = torch.ones(n, width, dtype=torch.bool)
    head = BiLSTMTokenHead(dim, 3, hidden_size=16, num_layers=1, dropout=0.0)
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    for _ in range(150):
        opt.zero_grad()
        head.loss(head(feats, mask), labels, mask).backward()
        opt.step()
    pred = head.decode(head(feats, mask), mask)
    assert (pred[after] == 2).float().mean() > 0.9
    assert (pred == labels).float().mean() > 0.95


def test_refused_on_classification(make_cfg) -> None:
    with pytest.raises(ConfigError, match="head"):
        train(make_cfg("head=token_bilstm", run="cls"))
