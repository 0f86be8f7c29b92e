"""Feast features (docs/design.md, "Architecture and data flow": the features stage, Feast apply +
materialize, and the DIN samples from point-in-time feature retrieval).

A feature repo directory (``cfg.feast.repo_dir``; by default ``<work_dir>/feast``) holds
``feature_store.yaml``, generated from ``cfg.feast`` (never edit it: Feast silently ignores unknown keys),
and ``data/``: one parquet table per feature view (the file sources of Feast's dask offline store) and,
locally, the registry and the sqlite online store.

Entities ``user`` (user_id) and ``item`` (item_id); feature views:

====================  ====  ===============================================  ==============================
view                  key   features                                         rows stamped
====================  ====  ===============================================  ==============================
user_sequences        user  hist_item_ids, hist_behaviors, hist_ts: the      each distinct event time of the
                            newest ``samples.max_history`` behaviours up to  user
                            AND including the row's time, newest last;
                            sequence_ts: the row's time
item_attributes       item  category_id, brand_id, shop_id, title_tokens,    static
                            first_seen
item_stats            item  stats_ts (the snapshot's time), n_<behaviour>    a zero row when the data
                            counts (marn.data.stats) and the items' static   starts, then daily snapshots
                            numeric columns (price ...)
item_embeddings       item  image_embedding, title_embedding                 static; only when the embed
                                                                             stage wrote them
item_representations  item  item_rep: MARN's rep = s + c (paper 4.9.2)       registration time; one view
_<model>_<version>                                                           per registered version
====================  ====  ===============================================  ==============================

Static rows carry the dataset's earliest timestamp and never expire (ttl 0), so every sample finds them;
item_stats never expires either (a cumulative count holds until the next snapshot); user_sequences rows
expire after ``feast.ttl_days``. Feature services ``marn_v1`` and ``dupn_v1`` (the
two A/B arms) group the views; ``marn_v1`` adds the item representation views once they exist.

Item representations are versioned: the view's name carries the model version
(``item_representations_marn_v0003``), because they are only valid with the weights that made them.
Registration publishes the new version's view before the champion flips, and a scorer reads only its own
version's view, so a running scorer never combines new representations with old weights. Versions coexist;
``delete_item_representations`` drops the views (registry, online rows, table) of versions no longer served
(marn.stages.register_stage keeps the new champion and the one it replaces).

Point in time: :mod:`marn.features.point_in_time` (a target at time t sees only what was stamped before t).

Modules: :mod:`~marn.features.tables` (the offline tables, view names and columns),
:mod:`~marn.features.repo` (feature_store.yaml, the Feast objects, opening the store),
:mod:`~marn.features.materialize` (apply + materialize), :mod:`~marn.features.point_in_time` (training
samples through Feast), :mod:`~marn.features.online` (serving lookups) and
:mod:`~marn.features.representations` (publishing and dropping a model version's item representations).
"""
