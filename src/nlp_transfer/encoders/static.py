"""Static word vectors (word2vec / GloVe text format), optionally with a BiLSTM on top.

The classic pre-transformer transfer baseline: the vectors are the "pre-trained encoder".
Text files are read with or without word2vec's ``"<count> <dim>"`` header line (``.gz``
works too); a malformed row raises :class:`VectorsFormatError` naming file and line.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import PreTrainedTokenizerFast

from nlp_transfer.encoders.base import Encoder

log = logging.getLogger(__name__)

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIALS = (PAD, UNK, CLS, SEP)  # ids 0..3
UNK_INITS = ("zeros", "mean")


class VectorsFormatError(ValueError):
    """A vectors file that is not in word2vec/GloVe text format."""


def _lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        yield from f


def load_vectors(
    path: str | Path, lowercase: bool = False, max_vectors: int | None = None
) -> tuple[list[str], np.ndarray, str]:
    """Read a word2vec/GloVe *text* vectors file.

    Args:
        path: the file; a first line ``"<count> <dim>"`` is taken as word2vec's header.
        lowercase: lowercase the words; of several words equal after lowercasing, the
            first (in these files: the most frequent) keeps its vector.
        max_vectors: read only the first rows (files are sorted by frequency).

    Returns:
        ``(words, vectors [n, dim] float32, sha1 of the bytes read)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vectors file not found: {path}")
    digest = hashlib.sha1()
    words: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[str] = set()
    dim: int | None = None
    header_count: int | None = None
    for lineno, raw in enumerate(_lines(path), start=1):
        if max_vectors is not None and len(words) >= max_vectors:
            break
        digest.update(raw)
        try:
            line = raw.decode("utf-8").rstrip("\r\n").rstrip(" ")
        except UnicodeDecodeError as e:
            raise VectorsFormatError(f"{path}:{lineno}: not valid UTF-8 ({e})") from None
        if not line.strip():
            continue
        fields = line.split(" ")
        if lineno == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
            header_count, dim = int(fields[0]), int(fields[1])
            continue
        if dim is None:
            dim = len(fields) - 1
            if dim < 1:
                raise VectorsFormatError(f"{path}:{lineno}: a row needs a word and values")
        if len(fields) != dim + 1:
            raise VectorsFormatError(
                f"{path}:{lineno}: expected a word and {dim} values, got {len(fields) - 1} "
                f"values (word {fields[0]!r})"
            )
        word = fields[0]
        if not word:
            raise VectorsFormatError(f"{path}:{lineno}: empty word (line starts with a space)")
        try:
            vector = np.asarray(fields[1:], dtype=np.float32)
        except ValueError:
            raise VectorsFormatError(
                f"{path}:{lineno}: non-numeric value in the vector of {word!r}"
            ) from None
        if lowercase:
            word = word.lower()
        if word in seen:
            continue
        seen.add(word)
        words.append(word)
        rows.append(vector)
    if not words:
        raise VectorsFormatError(f"{path}: no vectors found")
    if header_count is not None and max_vectors is None and header_count != len(rows):
        log.warning("%s: header announces %d vectors, read %d", path, header_count, len(rows))
    return words, np.stack(rows), digest.hexdigest()


def build_word_tokenizer(
    vocab: dict[str, int], lowercase: bool, max_length: int
) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer: splits on whitespace and punctuation, adds
    ``[CLS] ... [SEP]``, maps unknown words to ``[UNK]``; supports ``word_ids()``."""
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token=PAD,
        cls_token=CLS,
        sep_token=SEP,
        model_max_length=max_length,
    )


class StaticEmbedding(nn.Module):
    """Vector lookup (a non-persistent buffer when frozen, a parameter when trainable),
    then an optional linear projection to the encoder's hidden size."""

    def __init__(self, vectors: torch.Tensor, freeze: bool, out_size: int | None) -> None:
        super().__init__()
        self.freeze = freeze
        if freeze:
            # a buffer: no strategy can unfreeze it; not saved, rebuilt from the file
            self.register_buffer("weight", vectors, persistent=False)
        else:
            self.weight = nn.Parameter(vectors)
        dim = vectors.shape[1]
        self.projection = nn.Linear(dim, out_size) if out_size and out_size != dim else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.weight, padding_idx=0)
        return self.projection(x) if self.projection is not None else x


class StaticVectorsEncoder(Encoder):
    """Pre-trained static word vectors as an :class:`Encoder`, with an optional BiLSTM.

    Args:
        path: word2vec/GloVe text file (header line optional, ``.gz`` allowed).
        lowercase: lowercase vocabulary and input (set ``False`` for cased vectors).
        freeze: keep the vectors fixed (stored as a buffer) or fine-tune them.
        lstm_layers: BiLSTM layers on top (0 = vectors only).
        lstm_hidden: BiLSTM size per direction (default ``dim // 2``, so every hidden state
            has the vectors' size). If ``2 * lstm_hidden != dim``, a trainable linear
            projection maps the vectors to ``2 * lstm_hidden`` (part of layer group 0).
        dropout: dropout on the input of each BiLSTM layer.
        unk_init: ``[UNK]`` vector, ``"zeros"`` or ``"mean"`` (mean of all file vectors).
        max_vectors: load only the first (most frequent) words.
        max_length: maximum tokens per input (the tokenizer's ``model_max_length``).

    ``[PAD]`` is the zero vector; ``[CLS]``/``[SEP]`` are fixed pseudo-random vectors
    (seed 0, the file's value scale) so that they differ from padding. Words of the file
    spelled like a special token are dropped. ``forward`` returns ``(embeddings,
    bilstm_1, ..., bilstm_L)``; inputs must be right-padded.
    """

    def __init__(
        self,
        path: str,
        lowercase: bool = True,
        freeze: bool = True,
        lstm_layers: int = 0,
        lstm_hidden: int | None = None,
        dropout: float = 0.0,
        unk_init: str = "zeros",
        max_vectors: int | None = None,
        max_length: int = 512,
    ) -> None:
        super().__init__()
        if unk_init not in UNK_INITS:
            raise ValueError(f"unk_init must be one of {UNK_INITS}, got {unk_init!r}")
        if lstm_layers < 0:
            raise ValueError(f"lstm_layers must be >= 0, got {lstm_layers}")
        self.path = str(path)
        self.lowercase = lowercase
        self.freeze = freeze
        self.unk_init = unk_init
        self.max_vectors = max_vectors
        words, matrix, self.vectors_sha1 = load_vectors(path, lowercase, max_vectors)
        self.dim = int(matrix.shape[1])
        vectors, kept = self._with_specials(words, torch.from_numpy(matrix))
        self.vocab = {w: i for i, w in enumerate([*SPECIALS, *kept])}
        self.tokenizer = build_word_tokenizer(self.vocab, lowercase, max_length)
        self.max_length = int(max_length)
        self.num_layers = int(lstm_layers)
        self.lstm_hidden = int(lstm_hidden or max(1, self.dim // 2)) if lstm_layers else None
        self.hidden_size = 2 * self.lstm_hidden if self.lstm_hidden else self.dim
        self.embeddings = StaticEmbedding(vectors, freeze, self.hidden_size)
        self.lstms = nn.ModuleList(
            nn.LSTM(self.hidden_size, self.lstm_hidden, batch_first=True, bidirectional=True)
            for _ in range(self.num_layers)
        )
        self.dropout = nn.Dropout(dropout)
        log.info(
            "static vectors %s: %d words, dim %d, %s, %d BiLSTM layers",
            self.path,
            len(kept),
            self.dim,
            "frozen" if freeze else "trainable",
            self.num_layers,
        )

    def _with_specials(
        self, words: list[str], matrix: torch.Tensor
    ) -> tuple[torch.Tensor, list[str]]:
        keep = [i for i, w in enumerate(words) if w not in SPECIALS]
        if len(keep) < len(words):
            log.warning("%s: dropped words spelled like special tokens %s", self.path, SPECIALS)
        matrix = matrix[keep]
        gen = torch.Generator().manual_seed(0)
        scale = float(matrix.std()) if matrix.numel() > 1 else 1.0
        unk = matrix.mean(dim=0) if self.unk_init == "mean" else torch.zeros(self.dim)
        specials = torch.stack(
            [
                torch.zeros(self.dim),
                unk,
                torch.randn(self.dim, generator=gen) * scale,
                torch.randn(self.dim, generator=gen) * scale,
            ]
        )
        return torch.cat([specials, matrix]).contiguous(), [words[i] for i in keep]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        x = self.embeddings(input_ids)
        states = [x]
        if self.num_layers:
            lengths = attention_mask.sum(dim=1).clamp(min=1).cpu()
            total = input_ids.shape[1]
            for lstm in self.lstms:
                packed = pack_padded_sequence(
                    self.dropout(x), lengths, batch_first=True, enforce_sorted=False
                )
                out, _ = lstm(packed)
                x, _ = pad_packed_sequence(out, batch_first=True, total_length=total)
                states.append(x)
        return tuple(states)

    def layer_groups(self) -> list[nn.Module]:
        return [self.embeddings, *self.lstms]

    def identity(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "path": self.path,
            "vectors_sha1": self.vectors_sha1,
            "lowercase": self.lowercase,
            "freeze": self.freeze,
            "max_vectors": self.max_vectors,
            "unk_init": self.unk_init,
            "lstm_layers": self.num_layers,
            "lstm_hidden": self.lstm_hidden,
            "vocab_size": len(self.vocab),
            "dim": self.dim,
        }
