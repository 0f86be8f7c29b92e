"""The embed stage: one image vector per item (paper 3.1.1, an ImageNet CNN's features) and one title vector.

    summary = embed_items(data_dir, cfg.embed, cfg.ray, cache_dir=work_dir / "embed-cache")

writes into the dataset directory

- ``image_embeddings.parquet``: item_id, embedding (list<float32>, the backbone's ``out_dim``), content_hash,
  backbone (the cache identity: ``<backbone>-<weights sha256[:16] or "random">-<image size>``). Items
  without a readable image get no row; :mod:`marn.data.item_features` fills zeros for them. When no item
  has one, the file is not written (and a stale one is removed).
- ``title_embeddings.parquet``: item_id, embedding (list<float32>): the mean of the title's pre-trained word
  vectors, zeros when none of its words has one.

Images are keyed by the sha256 of their file bytes, and vectors are cached per (backbone, weights, image size)
under ``cache_dir``. A rerun embeds only image contents the cache lacks, identical images shared by many
items are embedded once, and when nothing is left to embed Ray is never started. The work itself is a Ray
Data ``map_batches`` over an actor pool (one model per actor, on a GPU when the cluster has them).

Every file is written under a temporary name and then renamed, and computed vectors reach the cache in parts
while the run goes on, so an interrupted run keeps what it finished and leaves no half-written file.

Modules: :mod:`marn.embed.stage` (``embed_items``, the stage), :mod:`marn.embed.cache` (the vector cache and
its key), :mod:`marn.embed.images` (the Ray Data actor pool). Title vectors are
:func:`marn.data.text.word_vectors.title_vectors`.
"""
