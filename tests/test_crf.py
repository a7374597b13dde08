"""Linear-chain CRF against brute force, constraints, and the token/CRF heads."""

from __future__ import annotations

import itertools

import pytest
import torch

from nlp_transfer.errors import ConfigError
from nlp_transfer.heads.crf import CRFHead, LinearChainCRF, allowed_transitions
from nlp_transfer.heads.token import TokenHead

BIO = ["O", "B-A", "I-A", "B-B", "I-B"]
BIOES = ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "E-B", "S-B"]


def _value(tensor: torch.Tensor) -> float:
    """A Python float from a (possibly grad-tracking) scalar tensor."""
    return float(tensor.detach())


def _crf(num_labels: int, allowed=None, seed: int = 0) -> LinearChainCRF:
    torch.manual_seed(seed)
    crf = LinearChainCRF(num_labels, allowed)
    with torch.no_grad():
        crf.transitions.normal_()
        crf.start.normal_()
        crf.end.normal_()
    return crf


@torch.no_grad()
def _path_score(crf: LinearChainCRF, emissions: torch.Tensor, path: tuple[int, ...]) -> float:
    """Score of one path over a 1-D chain, written out explicitly (penalties included)."""
    trans = crf.transitions + crf.transition_penalty
    start = crf.start + crf.start_penalty
    end = crf.end + crf.end_penalty
    total = start[path[0]] + end[path[-1]]
    for t, tag in enumerate(path):
        total = total + emissions[t, tag]
        if t:
            total = total + trans[path[t - 1], tag]
    return float(total)


def _brute(crf: LinearChainCRF, emissions: torch.Tensor):
    """(log Z, best path) over every path of a 1-D chain ``[L, C]``."""
    paths = list(itertools.product(range(emissions.shape[1]), repeat=emissions.shape[0]))
    scores = torch.tensor([_path_score(crf, emissions, p) for p in paths], dtype=torch.float64)
    return float(torch.logsumexp(scores, 0)), list(paths[int(scores.argmax())])


@pytest.mark.parametrize("constrained", [False, True])
def test_log_partition_viterbi_nll_match_brute_force(constrained: bool) -> None:
    labels = BIO
    allowed = allowed_transitions(labels, "IOB2") if constrained else None
    crf = _crf(len(labels), allowed)
    torch.manual_seed(1)
    lengths = [4, 2, 1, 0, 3]
    emissions = torch.randn(len(lengths), 4, len(labels)) * 2
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    tags = torch.randint(0, len(labels), (len(lengths), 4))
    with torch.no_grad():
        log_z = crf.log_partition(emissions, mask)
        gold = crf.score(emissions, tags, mask)
        paths = crf.viterbi(emissions, mask)
        nll = crf.nll(emissions, tags, mask, reduction="none")
        mean = crf.nll(emissions, tags, mask)
    for b, n in enumerate(lengths):
        if n == 0:
            assert float(log_z[b]) == 0.0 and float(nll[b]) == 0.0
            continue
        want_z, want_path = _brute(crf, emissions[b, :n])
        assert float(log_z[b]) == pytest.approx(want_z, rel=1e-5, abs=1e-4)
        assert paths[b, :n].tolist() == want_path
        want_gold = _path_score(crf, emissions[b, :n], tuple(tags[b, :n].tolist()))
        assert float(gold[b]) == pytest.approx(want_gold, rel=1e-5, abs=1e-4)
        assert float(nll[b]) == pytest.approx(want_z - want_gold, rel=1e-5, abs=1e-3)
    assert float(mean) == pytest.approx(float(nll.sum()) / 4, rel=1e-5)


def test_constrained_viterbi_equals_best_allowed_path() -> None:
    allowed = allowed_transitions(BIOES, "BIOES")
    crf = _crf(len(BIOES), allowed, seed=3)
    trans, start, end = allowed
    torch.manual_seed(4)
    for _ in range(5):
        emissions = torch.randn(3, len(BIOES)) * 3
        paths = list(itertools.product(range(len(BIOES)), repeat=3))
        legal = [
            p
            for p in paths
            if start[p[0]] and end[p[-1]] and all(trans[a, b] for a, b in itertools.pairwise(p))
        ]
        best = max(legal, key=lambda p: _path_score(crf, emissions, p))
        assert crf.viterbi(emissions[None])[0].tolist() == list(best)


@pytest.mark.parametrize(("labels", "scheme"), [(BIO, "IOB2"), (BIOES, "BIOES")])
def test_constrained_decoding_never_outputs_forbidden(labels: list[str], scheme: str) -> None:
    trans, start, end = allowed_transitions(labels, scheme)
    head = CRFHead(8, len(labels), labels=labels, scheme=scheme, constrained=True)
    torch.manual_seed(5)
    emissions = torch.randn(32, 12, len(labels)) * 10  # strong, often illegal, preferences
    lengths = torch.randint(1, 13, (32,))
    mask = torch.arange(12)[None, :] < lengths[:, None]
    decoded = head.decode(emissions, mask)
    unconstrained = CRFHead(8, len(labels)).decode(emissions, mask)
    illegal_unconstrained = 0
    for b in range(32):
        path = decoded[b, : lengths[b]].tolist()
        assert start[path[0]] and end[path[-1]]
        assert all(trans[x, y] for x, y in itertools.pairwise(path))
        raw = unconstrained[b, : lengths[b]].tolist()
        illegal_unconstrained += not all(trans[x, y] for x, y in itertools.pairwise(raw))
    assert illegal_unconstrained > 0  # the constraint did something


def test_allowed_transitions_rules() -> None:
    trans, start, end = allowed_transitions(BIO, "BIO")
    ix = {t: i for i, t in enumerate(BIO)}
    assert not trans[ix["O"], ix["I-A"]]
    assert not trans[ix["B-A"], ix["I-B"]]
    assert not trans[ix["I-A"], ix["I-B"]]
    assert trans[ix["B-A"], ix["I-A"]] and trans[ix["I-A"], ix["I-A"]]
    assert trans[ix["I-A"], ix["B-B"]] and trans[ix["O"], ix["B-A"]]
    assert not start[ix["I-A"]] and start[ix["B-A"]] and bool(end.all())
    trans, start, end = allowed_transitions(BIOES, "IOBES")
    jx = {t: i for i, t in enumerate(BIOES)}
    assert not trans[jx["B-A"], jx["O"]] and trans[jx["B-A"], jx["E-A"]]
    assert not trans[jx["B-A"], jx["E-B"]] and not trans[jx["S-A"], jx["I-A"]]
    assert trans[jx["E-A"], jx["S-B"]] and not end[jx["B-A"]] and end[jx["S-A"]]
    assert not start[jx["E-A"]] and start[jx["S-A"]]
    trans, start, _ = allowed_transitions(["O", "B-A", "I-A"], "IOB1")
    assert not start[1] and start[2] and not trans[0, 1] and trans[2, 1] and trans[0, 2]
    with pytest.raises(ConfigError, match="E-A"):
        allowed_transitions(["O", "E-A"], "IOB2")


def test_non_prefix_mask_is_a_compacted_chain() -> None:
    crf = _crf(3, seed=6)
    torch.manual_seed(7)
    emissions = torch.randn(1, 5, 3)
    tags = torch.tensor([[2, 0, 1, 1, 2]])
    mask = torch.tensor([[False, True, True, False, True]])
    sub = emissions[:, [1, 2, 4]]
    assert _value(crf.nll(emissions, tags, mask)) == pytest.approx(
        _value(crf.nll(sub, tags[:, [1, 2, 4]])), abs=1e-5
    )
    path = crf.viterbi(emissions, mask)
    assert path[0, [1, 2, 4]].tolist() == crf.viterbi(sub)[0].tolist()
    marg = crf.marginals(emissions, mask)
    assert torch.allclose(marg[0, [1, 2, 4]].sum(-1), torch.ones(3), atol=1e-5)
    assert marg[0, [0, 3]].abs().sum() == 0


def test_crf_head_loss_ignores_minus_100_and_trains() -> None:
    torch.manual_seed(8)
    head = CRFHead(6, len(BIO), labels=BIO, constrained=True, hidden_dim=16, dropout=0.0)
    features = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    labels = torch.tensor([[-100, 1, 2, 0, -100], [0, 3, 4, -100, -100]])
    emissions = head(features, mask)
    assert emissions.shape == (2, 5, len(BIO))
    loss = head.loss(emissions, labels, mask)
    keep = mask & (labels != -100)
    expected = head.crf.nll(emissions, labels.clamp(min=0), keep)
    assert _value(loss) == pytest.approx(_value(expected))
    assert head.decode(emissions, mask).shape == (2, 5)
    assert torch.allclose(head.probabilities(emissions, mask)[mask].sum(-1), torch.ones(8))
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    first = _value(loss)
    for _ in range(30):
        optimizer.zero_grad()
        step_loss = head.loss(head(features, mask), labels, mask)
        step_loss.backward()
        optimizer.step()
    assert _value(step_loss) < first / 2
    decoded = head.decode(head(features, mask), mask)
    assert decoded[keep].tolist() == labels[keep].tolist()
    # a batch without any labelled word gives a zero (finite) loss
    assert _value(head.loss(emissions, torch.full((2, 5), -100), mask)) == 0.0


def test_token_head() -> None:
    torch.manual_seed(9)
    head = TokenHead(4, 3, hidden_dim=8, dropout=0.1)
    head.eval()
    features = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    labels = torch.tensor([[0, -100, 2], [1, 2, 0]])
    logits = head(features, mask)
    assert logits.shape == (2, 3, 3)
    keep = mask & (labels != -100)
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert _value(head.loss(logits, labels, mask)) == pytest.approx(_value(expected))
    assert torch.equal(head.decode(logits, mask), logits.argmax(-1))
    assert _value(head.loss(logits, torch.full((2, 3), -100), mask)) == 0.0
    assert isinstance(TokenHead(4, 3).classifier[-1], torch.nn.Linear)
    with pytest.raises(ConfigError, match="activation"):
        TokenHead(4, 3, hidden_dim=8, activation="swish")
    with pytest.raises(ConfigError, match="needs the 3 labels"):
        CRFHead(4, 3, constrained=True)
