"""EntityF1 gives exactly seqeval's numbers, in default (conlleval) and strict modes."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from seqeval.metrics import sequence_labeling as lenient
from seqeval.metrics import v1 as strict
from seqeval.scheme import IOB2, IOBES

from nlp_transfer.errors import ConfigError
from nlp_transfer.metrics.entity import EntityF1

BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
BIOES = ["O"] + [f"{p}-{t}" for t in ("PER", "LOC") for p in "BIES"]

ADVERSARIAL = [
    # (gold, pred)
    (["O", "I-PER", "I-PER", "O"], ["O", "I-PER", "I-PER", "O"]),  # I- without B-
    (["B-PER", "I-PER", "I-LOC"], ["B-PER", "I-LOC", "I-LOC"]),  # type change mid-entity
    (["O", "O", "B-LOC"], ["O", "B-LOC", "I-LOC"]),  # sentence-final entities
    (["B-MISC"], ["B-MISC"]),  # single-token entity, one-token sentence
    (["O", "O", "O"], ["O", "O", "O"]),  # all O
    (["B-PER", "O"], ["O", "O"]),  # empty prediction
    (["O", "O"], ["B-LOC", "I-PER"]),  # predictions without gold
    (["B-PER", "B-PER", "I-PER"], ["B-PER", "I-PER", "I-PER"]),  # adjacent same-type entities
    (["I-LOC", "B-LOC"], ["I-LOC", "I-LOC"]),
    ([], []),  # empty sentence
]


def _seqeval(gold, pred, mode):
    """Per-type and averaged (p, r, f) from seqeval; per-type keyed by type name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "strict-iob2":
            fn, kw = strict.precision_recall_fscore_support, {"scheme": IOB2}
        elif mode == "strict-iobes":
            fn, kw = strict.precision_recall_fscore_support, {"scheme": IOBES}
        else:
            fn, kw = lenient.precision_recall_fscore_support, {}
        out = {}
        for average in ("micro", "macro"):
            p, r, f, _ = fn(gold, pred, average=average, zero_division=0, **kw)
            out[average] = (float(p), float(r), float(f))
        p, r, f, s = fn(gold, pred, average=None, zero_division=0, **kw)
        if mode.startswith("strict"):
            from seqeval.scheme import Entities

            scheme = kw["scheme"]
            names = sorted(Entities(gold, scheme).unique_tags | Entities(pred, scheme).unique_tags)
        else:
            names = sorted(
                {e[0] for e in lenient.get_entities(gold)}
                | {e[0] for e in lenient.get_entities(pred)}
            )
        out["types"] = {
            n: (float(a), float(b), float(c), int(d)) for n, a, b, c, d in zip(names, p, r, f, s)
        }
    return out


def _metric(labels, mode):
    if mode == "strict-iob2":
        return EntityF1(labels, mode="strict", scheme="IOB2")
    if mode == "strict-iobes":
        return EntityF1(labels, mode="strict", scheme=IOBES)
    return EntityF1(labels)


def _assert_same(result, expected, types) -> None:
    approx = lambda x: pytest.approx(x, rel=1e-6, abs=1e-7)  # noqa: E731
    micro, macro = expected["micro"], expected["macro"]
    assert [float(result[k]) for k in ("precision", "recall", "f1")] == approx(list(micro))
    if expected["types"]:
        assert [
            float(result[k]) for k in ("precision_macro", "recall_macro", "f1_macro")
        ] == approx(list(macro))
    else:  # seqeval: nan (mean of nothing); EntityF1: 0
        assert float(result["f1_macro"]) == 0.0
    for name in types:
        got = tuple(float(result[f"{k}/{name}"]) for k in ("precision", "recall", "f1"))
        want = expected["types"].get(name, (0.0, 0.0, 0.0, 0))
        assert got == approx(want[:3]), name
        assert int(result[f"support/{name}"]) == want[3]


def _random_sequences(rng: random.Random, labels, n: int, valid_bias: float):
    """Random tag sequences mixing well-formed entities and arbitrary (invalid) tags."""
    types = sorted({t[2:] for t in labels if t != "O"})
    prefixes = sorted({t[0] for t in labels if t != "O"})
    seqs = []
    for _ in range(n):
        seq: list[str] = []
        length = rng.randint(0, 14)
        while len(seq) < length:
            r = rng.random()
            if r < valid_bias:
                t = rng.choice(types)
                size = rng.randint(1, 3)
                if "E" in prefixes:
                    chunk = (
                        [f"S-{t}"]
                        if size == 1
                        else [f"B-{t}"] + [f"I-{t}"] * (size - 2) + [f"E-{t}"]
                    )
                else:
                    chunk = [f"B-{t}"] + [f"I-{t}"] * (size - 1)
                seq.extend(chunk)
            elif r < valid_bias + 0.3:
                seq.append("O")
            else:
                seq.append(rng.choice(labels))
        seqs.append(seq[:length])
    return seqs


def _perturb(rng: random.Random, seq, labels):
    return [rng.choice(labels) if rng.random() < 0.2 else t for t in seq]


@pytest.mark.parametrize(
    ("labels", "mode"),
    [(BIO, "default"), (BIO, "strict-iob2"), (BIOES, "default"), (BIOES, "strict-iobes")],
)
def test_random_sequences_match_seqeval(labels, mode) -> None:
    rng = random.Random(1234)
    gold = _random_sequences(rng, labels, 300, valid_bias=0.35)
    pred = [_perturb(rng, s, labels) for s in gold]
    metric = _metric(labels, mode)
    # id path in several batches with padding and a mask
    index = {t: i for i, t in enumerate(labels)}
    for lo in range(0, len(gold), 64):
        g, p = gold[lo : lo + 64], pred[lo : lo + 64]
        width = max(len(s) for s in g) + 2
        gt = torch.full((len(g), width), -100)
        pt = torch.randint(0, len(labels), (len(g), width))  # garbage in padding
        mask = torch.zeros(len(g), width, dtype=torch.bool)
        for i, (gs, ps) in enumerate(zip(g, p)):
            gt[i, : len(gs)] = torch.tensor([index[t] for t in gs], dtype=torch.long)
            pt[i, : len(ps)] = torch.tensor([index[t] for t in ps], dtype=torch.long)
            mask[i, : len(gs)] = True
        metric.update(pt, gt, mask)
    expected = _seqeval(gold, pred, mode)
    result = metric.compute()
    _assert_same(result, expected, metric.types)
    assert 0 < float(result["f1"]) < 1
    # string path gives the same numbers
    by_tags = _metric(labels, mode)
    by_tags.update_tags(pred, gold)
    for key, value in by_tags.compute().items():
        assert float(value) == pytest.approx(float(result[key]))
    # per-type report agrees with seqeval's counts
    report = metric.report()
    for name, (_, _, _, support) in expected["types"].items():
        assert report[name]["support"] == support


@pytest.mark.parametrize("mode", ["default", "strict-iob2"])
@pytest.mark.parametrize("case", range(len(ADVERSARIAL)))
def test_adversarial_cases_match_seqeval(mode, case) -> None:
    gold, pred = ADVERSARIAL[case]
    metric = _metric(BIO, mode)
    metric.update_tags([pred], [gold])
    _assert_same(metric.compute(), _seqeval([gold], [pred], mode), metric.types)


@pytest.mark.parametrize("mode", ["default", "strict-iob2"])
def test_all_adversarial_cases_together(mode) -> None:
    gold = [g for g, _ in ADVERSARIAL]
    pred = [p for _, p in ADVERSARIAL]
    metric = _metric(BIO, mode)
    metric.update_tags(pred, gold)
    _assert_same(metric.compute(), _seqeval(gold, pred, mode), metric.types)


def test_invalid_bio_from_softmax_head() -> None:
    """O I-PER I-PER: one PER entity by default (conlleval), dropped in strict mode."""
    from seqeval.metrics import f1_score

    gold, pred = [["O", "B-PER", "I-PER"]], [["O", "I-PER", "I-PER"]]
    default, strict_metric = EntityF1(BIO), EntityF1(BIO, mode="strict", scheme="BIO")
    default.update_tags(pred, gold)
    strict_metric.update_tags(pred, gold)
    # default: I-PER after O starts an entity, here it even matches the gold span
    assert default.report()["PER"]["predicted"] == 1
    assert float(default.compute()["f1"]) == 1.0 == f1_score(gold, pred)
    # strict: the invalid span is no entity at all
    assert strict_metric.report()["PER"]["predicted"] == 0
    assert float(strict_metric.compute()["f1"]) == 0.0
    assert f1_score(gold, pred, mode="strict", scheme=IOB2) == 0.0


def test_logits_mask_and_ignore_index() -> None:
    metric = EntityF1(BIO)
    target = torch.tensor([[-100, 1, 2, -100, 0]])  # -100 words (e.g. not owned) are dropped
    logits = torch.full((1, 5, len(BIO)), -5.0)
    for j, label in enumerate([3, 1, 2, 4, 0]):
        logits[0, j, label] = 5.0
    metric.update(logits, target)
    assert float(metric.compute()["f1"]) == 1.0
    # a mask removes positions the same way
    metric2 = EntityF1(BIO)
    metric2.update(torch.tensor([1, 2, 0]), torch.tensor([1, 2, 1]), torch.tensor([1, 1, 0]).bool())
    assert float(metric2.compute()["f1"]) == 1.0


def test_state_is_summable_like_ddp() -> None:
    """Two 'processes' whose states are summed equal one process seeing everything."""
    rng = random.Random(7)
    gold = _random_sequences(rng, BIO, 40, 0.4)
    pred = [_perturb(rng, s, BIO) for s in gold]
    a, b, full = EntityF1(BIO), EntityF1(BIO), EntityF1(BIO)
    a.update_tags(pred[:20], gold[:20])
    b.update_tags(pred[20:], gold[20:])
    full.update_tags(pred, gold)
    for name, reduce in a._reductions.items():
        assert reduce is not None
        a_state = getattr(a, name)
        setattr(a, name, a_state + getattr(b, name))
        assert a_state.dtype == torch.long
    assert {k: float(v) for k, v in a.compute().items()} == {
        k: float(v) for k, v in full.compute().items()
    }


def test_errors() -> None:
    with pytest.raises(ConfigError, match="scheme"):
        EntityF1(BIO, mode="strict")
    with pytest.raises(ConfigError, match="mode"):
        EntityF1(BIO, mode="lenient")
    with pytest.raises(ConfigError, match="U-PER"):
        EntityF1(["O", "U-PER"])
    metric = EntityF1(BIOES, mode="strict", scheme="IOB2")
    with pytest.raises(ValueError, match="'E-PER' is not valid"):
        metric.update_tags([["B-PER", "E-PER"]], [["O", "O"]])
    with pytest.raises(ValueError, match="not in the label list"):
        EntityF1(BIO).update_tags([["B-XYZ"]], [["O"]])
    with pytest.raises(ValueError, match="outside"):
        EntityF1(BIO).update(torch.tensor([[9]]), torch.tensor([[0]]))
