"""StaticVectorsEncoder: file formats, lookup, UNK, freezing, BiLSTM, format errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nlp_transfer.encoders.static import StaticVectorsEncoder, VectorsFormatError, load_vectors
from nlp_transfer.strategies.simple import FullFineTuning

VECTORS = {
    "the": [0.1, 0.2, 0.3, 0.4],
    "cat": [1.0, 0.0, -1.0, 0.5],
    "sat": [0.0, 2.0, 0.0, -2.0],
    ",": [0.5, 0.5, 0.5, 0.5],
    "Cat": [9.0, 9.0, 9.0, 9.0],  # equal to "cat" after lowercasing: first one wins
}


def write_vectors(path: Path, header: bool) -> Path:
    lines = [f"{w} " + " ".join(str(v) for v in vec) for w, vec in VECTORS.items()]
    if header:
        lines.insert(0, f"{len(VECTORS)} 4")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("header", [True, False])
def test_lookup_with_and_without_header(tmp_path: Path, header: bool) -> None:
    enc = StaticVectorsEncoder(str(write_vectors(tmp_path / "v.txt", header)))
    assert enc.hidden_size == 4 and enc.num_layers == 0
    batch = enc.tokenizer(["The cat, sat", "cat dog"], padding=True, return_tensors="pt")
    tokens = enc.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens == ["[CLS]", "the", "cat", ",", "sat", "[SEP]"]
    (emb,) = enc(batch["input_ids"], batch["attention_mask"])
    assert emb.shape == (2, 6, 4)
    torch.testing.assert_close(emb[0, 2], torch.tensor(VECTORS["cat"]))
    torch.testing.assert_close(emb[0, 4], torch.tensor(VECTORS["sat"]))
    assert torch.equal(emb[1, 2], torch.zeros(4))  # "dog": UNK, zeros by default
    assert torch.equal(emb[1, 4], torch.zeros(4))  # padding
    assert len(enc.layer_groups()) == 1
    assert len(enc.identity()["vectors_sha1"]) == 40


def test_word_ids_and_unk_mean(tmp_path: Path) -> None:
    enc = StaticVectorsEncoder(str(write_vectors(tmp_path / "v.txt", False)), unk_init="mean")
    batch = enc.tokenizer([["Cat,", "zebra"]], is_split_into_words=True, return_tensors="pt")
    assert batch.word_ids(0) == [None, 0, 0, 1, None]
    (emb,) = enc(batch["input_ids"], batch["attention_mask"])
    kept = torch.tensor([VECTORS[w] for w in ("the", "cat", "sat", ",")])
    torch.testing.assert_close(emb[0, 3], kept.mean(0))


def test_frozen_vs_trainable(tmp_path: Path) -> None:
    path = str(write_vectors(tmp_path / "v.txt", True))
    frozen = StaticVectorsEncoder(path, freeze=True)
    assert list(frozen.parameters()) == []
    assert "embeddings.weight" not in frozen.state_dict()  # rebuilt from the file

    class Holder(torch.nn.Module):
        def __init__(self, encoder: StaticVectorsEncoder) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(4, 2)
            self.aux_heads = torch.nn.ModuleDict()
            self.layer_pooling = None

    FullFineTuning().compile(Holder(frozen))  # no strategy can unfreeze the vectors
    assert list(frozen.parameters()) == []

    trainable = StaticVectorsEncoder(path, freeze=False)
    ids = trainable.tokenizer(["the cat"], return_tensors="pt")
    before = trainable.embeddings.weight.detach().clone()
    trainable(ids["input_ids"], ids["attention_mask"])[0].sum().backward()
    torch.optim.SGD(trainable.parameters(), lr=0.1).step()
    after = trainable.embeddings.weight.detach()
    cat = trainable.vocab["cat"]
    assert not torch.equal(before[cat], after[cat])
    assert torch.equal(before[trainable.vocab["sat"]], after[trainable.vocab["sat"]])


def test_bilstm_shapes_and_layer_groups(tmp_path: Path) -> None:
    path = str(write_vectors(tmp_path / "v.txt", False))
    enc = StaticVectorsEncoder(path, lstm_layers=2)
    batch = enc.tokenizer(["the cat sat", "cat"], padding=True, return_tensors="pt")
    hidden = enc(batch["input_ids"], batch["attention_mask"])
    assert len(hidden) == 3 and enc.num_layers == 2
    assert all(h.shape == (2, 5, 4) for h in hidden)  # lstm_hidden defaults to dim // 2
    assert len(enc.layer_groups()) == 3
    assert torch.equal(hidden[2][1, 3:], torch.zeros(2, 4))  # padding stays zero

    wide = StaticVectorsEncoder(path, lstm_layers=1, lstm_hidden=6)
    hidden = wide(batch["input_ids"], batch["attention_mask"])
    assert wide.hidden_size == 12
    assert [h.shape[-1] for h in hidden] == [12, 12]  # vectors projected to the LSTM size
    assert wide.embeddings.projection is not None


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("2 3\nthe 0.1 0.2 0.3\ncat 0.1 0.2\n", r"v\.txt:3: expected a word and 3 values, got 2"),
        ("the 0.1 0.2\ncat 0.1 0.2 0.3\n", r"v\.txt:2: expected a word and 2 values, got 3"),
        ("the 0.1 0.2\ncat 0.1 x\n", r"v\.txt:2: non-numeric value in the vector of 'cat'"),
        ("\n\n", "no vectors"),
    ],
)
def test_malformed_file_errors(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "v.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(VectorsFormatError, match=match):
        load_vectors(path)


def test_max_vectors_and_missing_file(tmp_path: Path) -> None:
    path = write_vectors(tmp_path / "v.txt", True)
    words, vectors, _ = load_vectors(path, max_vectors=2)
    assert words == ["the", "cat"] and vectors.shape == (2, 4)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        StaticVectorsEncoder(str(tmp_path / "nope.txt"))
