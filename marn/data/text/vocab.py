"""Title vocabularies: codes 0 = PAD, 1 = UNK, 2.. by descending count, their embedding rows (pre-trained,
or deterministic random vectors for OOV words) and fixed-length code matrices (see :mod:`marn.data.text`)."""

from __future__ import annotations

import array
import functools
import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from marn.data.text.tokenize import iter_titles, tokenize
from marn.data.text.word_vectors import WordVectors

PAD = 0  # padding code; its embedding row is always zeros
UNK = 1  # words of a title not in the vocabulary (below min_count, beyond max_size, or unseen)
SPECIALS = ("<pad>", "<unk>")  # the words of codes 0 and 1; the tokenizer can never produce them

OovPolicy = Literal["random", "zeros"]


@dataclass(frozen=True, eq=False)
class TitleVocabulary:
    """Title words with codes and embedding rows: code 0 = PAD, 1 = UNK, 2.. by (-count, word).

    ``words[code]`` is the word of a code (``"<pad>"``, ``"<unk>"`` for the specials), ``counts`` its
    number of occurrences in the corpus the vocabulary was built from, ``embeddings[code]`` its vector.
    ``in_vectors[code]`` tells whether that vector is pre-trained (the specials never are).
    """

    words: tuple[str, ...]
    counts: tuple[int, ...]
    embeddings: np.ndarray  # (len, D) float32; row PAD is zeros
    in_vectors: np.ndarray  # (len,) bool
    n_tokens: int  # title tokens in the corpus
    n_known_tokens: int  # of those, tokens whose word has a pre-trained vector
    oov: OovPolicy = "random"
    seed: int = 0
    oov_scale: float = 0.0  # a of U[-a, a] for OOV rows (0 with oov="zeros")
    source: str = ""  # the word vectors' source, for provenance

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", tuple(self.words))
        object.__setattr__(self, "embeddings", np.ascontiguousarray(self.embeddings, dtype=np.float32))
        object.__setattr__(self, "in_vectors", np.asarray(self.in_vectors, dtype=bool))
        if self.words[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"a title vocabulary starts with {SPECIALS}, got {tuple(self.words[:2])}")
        n = len(self.words)
        if len(self.counts) != n or self.embeddings.shape[0] != n or self.in_vectors.shape != (n,):
            raise ValueError("words, counts, embeddings and in_vectors must have one entry per code")

    def __len__(self) -> int:
        return len(self.words)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def coverage(self) -> float:
        """Fraction of the corpus' title tokens whose word has a pre-trained vector (before any cut-off)."""
        return self.n_known_tokens / self.n_tokens if self.n_tokens else 0.0

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """word -> code for the title words (the specials are not looked up)."""
        return {w: code for code, w in enumerate(self.words) if code >= len(SPECIALS)}

    def to_dict(self, include_embeddings: bool = True) -> dict[str, Any]:
        """Plain values plus one float32 tensor, for ``torch.save`` / ``torch.load(weights_only=True)``.

        The matrix is stored as a torch tensor (4 bytes a float: 1e5 words x 50 = 20 MB) rather than a
        nested list (~5e6 Python floats, several times that and slow), so a checkpoint is self-contained:
        serving does not need the GloVe source, which for 300-d text files is gigabytes and minutes to
        parse. With ``include_embeddings=False`` (the model's state dict already holds the table, say) it
        is left out, and :meth:`from_dict` re-derives it from the same word vectors.
        """
        data: dict[str, Any] = {
            "words": list(self.words),
            "counts": list(self.counts),
            "in_vectors": self.in_vectors.tolist(),
            "n_tokens": int(self.n_tokens),
            "n_known_tokens": int(self.n_known_tokens),
            "oov": self.oov,
            "seed": int(self.seed),
            "oov_scale": float(self.oov_scale),
            "source": self.source,
            "dim": self.dim,
        }
        if include_embeddings:
            import torch  # deferred: tokenizing and encoding titles need no torch

            data["embeddings"] = torch.tensor(self.embeddings, dtype=torch.float32)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], vectors: WordVectors | None = None) -> TitleVocabulary:
        """Inverse of :meth:`to_dict`; ``vectors`` is needed only when the embeddings were left out."""
        words = tuple(data["words"])
        in_vectors = np.asarray(data["in_vectors"], dtype=bool)
        if "embeddings" in data:
            stored = data["embeddings"]
            stored = stored.numpy() if hasattr(stored, "numpy") else stored
            embeddings = np.array(stored, dtype=np.float32).reshape(len(words), int(data["dim"]))
        else:
            if vectors is None:
                raise ValueError("this vocabulary was saved without embeddings; pass the word vectors")
            embeddings, found = _embedding_rows(
                words, vectors, data["oov"], int(data["seed"]), float(data["oov_scale"])
            )
            if embeddings.shape[1] != int(data["dim"]) or not np.array_equal(found, in_vectors):
                differ = int((found != in_vectors).sum()) if found.shape == in_vectors.shape else len(words)
                raise ValueError(
                    f"word vectors {vectors.source or '(unnamed)'} (dim {vectors.dim}) are not those the "
                    f"vocabulary was built with ({data.get('source') or 'unnamed'}, dim {data['dim']}): "
                    f"{differ} words differ in having a vector"
                )
        return cls(
            words=words,
            counts=tuple(int(c) for c in data["counts"]),
            embeddings=embeddings,
            in_vectors=in_vectors,
            n_tokens=int(data["n_tokens"]),
            n_known_tokens=int(data["n_known_tokens"]),
            oov=data["oov"],
            seed=int(data["seed"]),
            oov_scale=float(data["oov_scale"]),
            source=str(data.get("source", "")),
        )


def build_title_vocabulary(
    titles: Iterable[object],
    vectors: WordVectors,
    min_count: int = 1,
    max_size: int | None = None,
    *,
    oov: OovPolicy = "random",
    seed: int = 0,
) -> TitleVocabulary:
    """Vocabulary of the title words occurring at least ``min_count`` times, at most ``max_size`` of them
    (PAD and UNK not counted), most frequent first, ties by word, so equal corpora give equal codes.

    Rows: PAD zeros; words with a pre-trained vector get it; UNK and the other words get deterministic
    random vectors (``oov="random"``, see the module docstring) or zeros (``oov="zeros"``).
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_size is not None and max_size < 0:
        raise ValueError(f"max_size must be >= 0 or None, got {max_size}")
    if oov not in ("random", "zeros"):
        raise ValueError(f"oov must be 'random' or 'zeros', got {oov!r}")
    counts = Counter(itertools.chain.from_iterable(map(tokenize, iter_titles(titles))))
    index = vectors.index
    n_tokens = sum(counts.values())
    n_known = sum(c for w, c in counts.items() if w in index)
    kept = sorted(((w, c) for w, c in counts.items() if c >= min_count), key=lambda wc: (-wc[1], wc[0]))
    if max_size is not None:
        kept = kept[:max_size]
    words = SPECIALS + tuple(w for w, _ in kept)
    scale = vectors.oov_scale if oov == "random" else 0.0
    embeddings, in_vectors = _embedding_rows(words, vectors, oov, seed, scale)
    return TitleVocabulary(
        words=words,
        counts=(0, 0, *(c for _, c in kept)),
        embeddings=embeddings,
        in_vectors=in_vectors,
        n_tokens=n_tokens,
        n_known_tokens=n_known,
        oov=oov,
        seed=seed,
        oov_scale=scale,
        source=vectors.source,
    )


def _embedding_rows(
    words: Sequence[str], vectors: WordVectors, oov: str, seed: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, in_vectors) for a vocabulary's words (the first two being the specials)."""
    index = vectors.index
    rows = np.array([-1, -1, *(index.get(w, -1) for w in words[len(SPECIALS) :])], dtype=np.int64)
    found = rows >= 0
    embeddings = np.zeros((len(words), vectors.dim), dtype=np.float32)
    embeddings[found] = vectors.matrix[rows[found]]
    if oov == "random":
        missing = np.flatnonzero(~found)
        missing = missing[missing != PAD]
        embeddings[missing] = hashed_vectors([words[i] for i in missing], vectors.dim, seed, scale)
    return embeddings, found


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def hashed_vectors(words: Sequence[str], dim: int, seed: int = 0, scale: float = 0.25) -> np.ndarray:
    """(len(words), dim) float32, uniform in [-scale, scale), each row a pure function of (word, seed).

    blake2b of the word seeds splitmix64 over the dimensions: vectorised, and independent of numpy's
    random generators (whose streams may change between versions) and of the order words arrive in.
    """
    if not words:
        return np.zeros((0, dim), dtype=np.float32)
    salt = seed.to_bytes(8, "little", signed=True)
    keys = np.array(
        [
            int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8, salt=salt).digest(), "little")
            for w in words
        ],
        dtype=np.uint64,
    )
    z = keys[:, None] + np.arange(1, dim + 1, dtype=np.uint64)[None, :] * _GOLDEN  # wraps mod 2**64
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    unit = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)  # top 24 bits -> [0, 1)
    return ((2.0 * unit - 1.0) * scale).astype(np.float32)


def encode_titles(titles: Iterable[object], vocab: TitleVocabulary, max_len: int) -> np.ndarray:
    """(N, max_len) int64 codes: each title's first ``max_len`` tokens, UNK for words outside the
    vocabulary, PAD after the end."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    import pyarrow as pa
    import pyarrow.compute as pc

    flat: list[str] = []  # the kept tokens of all titles, title after title
    lengths = array.array("q")
    for title in iter_titles(titles):
        tokens = tokenize(title)[:max_len]
        lengths.append(len(tokens))
        flat.extend(tokens)
    # Arrow's hash lookup beats a per-token dict.get (~2x for 1e5 titles). The value set is all of
    # vocab.words, so a token's position there is its code; "<pad>"/"<unk>" can never be tokens.
    found = pc.index_in(pa.array(flat, pa.large_string()), value_set=pa.array(vocab.words, pa.large_string()))
    flat_codes = pc.fill_null(found, UNK).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    n = np.frombuffer(lengths, dtype=np.int64)
    codes = np.full((len(n), max_len), PAD, dtype=np.int64)
    codes[np.arange(max_len)[None, :] < n[:, None]] = flat_codes  # boolean mask fills row-major
    return codes
