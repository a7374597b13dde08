"""CoNLL column reader/writer and the HF token-dataset reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nlp_transfer.data.conll import Sentence, read_conll, read_hf_token_dataset, write_conll
from nlp_transfer.errors import DataError

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
# NN I-NP O

# a comment between sentences
Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
-DOCSTART- -X- -X- O
London NNP B-NP B-LOC
"""


def _write(tmp_path: Path, text: str, name: str = "data.conll") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_conll_default_columns(tmp_path: Path) -> None:
    path = _write(tmp_path, CONLL)
    sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [
        ["EU", "rejects", "German", "#"],
        ["Peter", "Blackburn"],
        ["London"],
    ]
    assert sentences[0].tags == ["B-ORG", "O", "B-MISC", "O"]
    assert sentences[1].tags == ["B-PER", "I-PER"]
    assert sentences[0].line == 3
    assert sentences[0].line_numbers == [3, 4, 5, 6]
    assert sentences[1].line_numbers == [9, 10]
    assert sentences[2].line_numbers == [12]
    assert all(s.source == str(path) for s in sentences)
    assert len(sentences[0]) == 4


def test_read_conll_columns_and_separator(tmp_path: Path) -> None:
    path = _write(tmp_path, "New York\tNNP\tB-LOC\n#x\tNN\tO\n\n\nb\tX\tO\n", "t.tsv")
    sentences = read_conll(path, separator="\t", token_column=0, tag_column=2)
    assert sentences[0].tokens == ["New York", "#x"]
    assert sentences[0].tags == ["B-LOC", "O"]
    pos = read_conll(path, separator="\t", tag_column=-2)
    assert pos[1].tags == ["X"]
    untagged = read_conll(path, separator="\t", tag_column=None)
    assert untagged[0].tags is None
    with pytest.raises(DataError, match=r"t\.tsv:1: column 5 does not exist"):
        read_conll(path, separator="\t", tag_column=5)


def test_read_conll_comments_configurable(tmp_path: Path, caplog) -> None:
    path = _write(tmp_path, "# doc one\na O\n\n# sent_id = 2\n#b O\n")
    with caplog.at_level("WARNING", logger="nlp_transfer.data.conll"):
        sentences = read_conll(path)
    # "# doc one", "# sent_id = 2" cannot be 2-column token lines: comments, counted, warned
    assert [s.tokens for s in sentences] == [["a"], ["#b"]]
    assert "skipped 2 comment line(s)" in caplog.text and f"{path}:1" in caplog.text
    with pytest.raises(DataError, match=r"data\.conll:2: expected 3 columns.*comment_prefix"):
        read_conll(path, comment_prefix=None)  # every line is data: line 2 has 2 columns
    path = _write(tmp_path, "% a header\na O\n\n%b O\n")
    assert [s.tokens for s in read_conll(path, comment_prefix="%")] == [["a"], ["%b"]]


def test_read_conll_keeps_sentence_initial_hashtags(tmp_path: Path, caplog) -> None:
    """A "#hashtag" token starting a sentence is data, not a comment (nothing dropped)."""
    path = _write(tmp_path, "#win O\nit O\n\n#NYC B-LOC\nrocks O\n")
    with caplog.at_level("WARNING", logger="nlp_transfer.data.conll"):
        sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [["#win", "it"], ["#NYC", "rocks"]]
    assert sentences[1].tags == ["B-LOC", "O"] and "comment" not in caplog.text


def test_read_conll_wrong_column_count(tmp_path: Path) -> None:
    path = _write(tmp_path, "a B-X\nb c O\n")
    with pytest.raises(DataError, match=r"data\.conll:2: expected 2 columns .* found 3"):
        read_conll(path)
    with pytest.raises(DataError, match=r"data\.conll:1: expected 3 columns"):
        read_conll(path, num_columns=3)


def test_read_conll_empty_token(tmp_path: Path) -> None:
    path = _write(tmp_path, "a\tO\n\tO\n", "e.tsv")
    with pytest.raises(DataError, match=r"e\.tsv:2: empty token"):
        read_conll(path, separator="\t")
    path = _write(tmp_path, "a\tO\nb\t \n", "f.tsv")
    with pytest.raises(DataError, match=r"f\.tsv:2: empty tag"):
        read_conll(path, separator="\t")


def test_read_conll_no_sentences(tmp_path: Path) -> None:
    path = _write(tmp_path, "-DOCSTART- -X- O\n\n# only comments\n\n")
    with pytest.raises(DataError, match=r"data\.conll: no sentences"):
        read_conll(path)
    with pytest.raises(DataError, match="cannot read"):
        read_conll(tmp_path / "missing.conll")


def test_read_conll_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "w.conll"
    path.write_bytes("\ufeffa O\r\nb B-X\r\n\r\n".encode())
    (sentence,) = read_conll(path)
    assert sentence.tokens == ["a", "b"]
    assert sentence.tags == ["O", "B-X"]


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    sentences = [
        Sentence(tokens=["a", "b"], tags=["B-X", "I-X"]),
        Sentence(tokens=["c"], tags=["O"]),
    ]
    path = tmp_path / "out.conll"
    write_conll(path, sentences)
    back = read_conll(path)
    assert [(s.tokens, s.tags) for s in back] == [(s.tokens, s.tags) for s in sentences]
    write_conll(path, sentences, separator="\t")
    assert read_conll(path, separator="\t")[0].tags == ["B-X", "I-X"]
    with pytest.raises(ValueError, match="2 tokens but 1 tags"):
        write_conll(path, [Sentence(tokens=["a", "b"], tags=["O"])])


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_hf_token_dataset_local_json_string_tags(tmp_path: Path) -> None:
    data = _jsonl(
        tmp_path / "train.jsonl",
        [{"words": ["a", "b"], "tags": ["B-X", "O"]}, {"words": ["c"], "tags": ["O"]}],
    )
    sentences = read_hf_token_dataset(
        "json",
        "train",
        tokens_field="words",
        tags_field="tags",
        data_files={"train": str(data)},
        cache_dir=str(tmp_path / "cache"),
    )
    assert [(s.tokens, s.tags) for s in sentences] == [(["a", "b"], ["B-X", "O"]), (["c"], ["O"])]
    assert sentences[1].line == 1
    assert sentences[0].source == "json[train]"


def test_read_hf_token_dataset_classlabel(tmp_path: Path) -> None:
    from datasets import ClassLabel, Features, Sequence, Value

    data = _jsonl(tmp_path / "d.jsonl", [{"tokens": ["a", "b", "c"], "ner_tags": [1, 2, 0]}])
    features = Features(
        {
            "tokens": Sequence(Value("string")),
            "ner_tags": Sequence(ClassLabel(names=["O", "B-PER", "I-PER"])),
        }
    )
    kwargs = {"data_files": str(data), "cache_dir": str(tmp_path / "cache")}
    (sentence,) = read_hf_token_dataset("json", "train", features=features, **kwargs)
    assert sentence.tags == ["B-PER", "I-PER", "O"]
    # plain integers need label_names
    with pytest.raises(DataError, match="label_names"):
        read_hf_token_dataset("json", "train", **kwargs)
    (named,) = read_hf_token_dataset("json", "train", label_names=["O", "B-A", "I-A"], **kwargs)
    assert named.tags == ["B-A", "I-A", "O"]
    with pytest.raises(DataError, match="no field 'labels'"):
        read_hf_token_dataset("json", "train", tags_field="labels", **kwargs)
