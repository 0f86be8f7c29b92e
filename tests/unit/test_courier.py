"""COURIER (marn.embed.courier): the scores, the examples, the table, and that nothing after the training
cut reaches it (the point-in-time suite's rule, docs/design.md)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_posters  # tests/ is on sys.path: pytest imports conftest from there

from marn.config import ConfigError, EmbedConfig, FeaturesConfig, load_config
from marn.data.files import write_parquet_atomic
from marn.data.item_features import ItemFeatures, build_item_features, image_table
from marn.data.samples import build_samples
from marn.data.schema import COURIER_EMBEDDINGS, COURIER_HEAD, IMAGE_EMBEDDINGS, TS, Dataset, read_dataset
from marn.data.stats import daily_item_stats
from marn.data.synth import synthesize
from marn.data.tensors import ItemCatalog, fit_statistics
from marn.embed.courier import (
    COURIER_METRICS,
    CourierHead,
    Posters,
    UserClicks,
    _earlier_clicks,
    _hits,
    click_examples,
    read_courier_head,
    read_posters,
    reconstruction_scores,
    standardisation_scale,
    train_courier,
)
from serve.scoring import cold_image_rows

COURIER = {"dim": 8, "hidden": 16, "history": 6, "min_history": 2, "negatives": 16, "batch_size": 64}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Dataset:
    root = tmp_path_factory.mktemp("courier")
    cfg = load_config(None, {"synth": {"users": 120, "items": 60, "events_per_user": 10, "seed": 5}})
    synthesize(root, cfg.synth)
    dataset = read_dataset(root)
    write_posters(root, dataset)
    return dataset


def run_courier(dataset: Dataset, out: Path, epochs: int = 2, seed: int = 0) -> Path:
    """Samples from ``dataset``, the posters of the world, COURIER into ``out`` (one torch thread)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / IMAGE_EMBEDDINGS).write_bytes((dataset.root / IMAGE_EMBEDDINGS).read_bytes())
    cfg = load_config(
        None,
        {"samples": {"max_history": 8}, "embed": {"courier": {**COURIER, "epochs": epochs, "seed": seed}}},
    )
    samples = build_samples(dataset, cfg.samples)
    train_courier(
        out, samples.train, samples.valid, cfg.embed.courier
    )  # embed.courier.threads 1: no reordering
    return out / COURIER_EMBEDDINGS


def test_scores_equal_the_cosine_of_the_attention_reconstruction():
    generator = torch.Generator().manual_seed(1)
    history = torch.nn.functional.normalize(torch.randn(3, 5, 4, generator=generator), dim=-1)
    candidates = torch.nn.functional.normalize(torch.randn(7, 4, generator=generator), dim=-1)
    keys = torch.tensor([[True] * 5, [True, True, False, False, False], [True] + [False] * 4])
    keyed = history * keys[:, :, None]
    dots = torch.einsum("bld,cd->blc", keyed, candidates)
    scores = reconstruction_scores(dots, keyed @ keyed.transpose(1, 2), keys, 0.2)
    for b in range(3):
        kept = history[b][keys[b]]  # (L_b, d)
        attention = torch.softmax(candidates @ kept.T / 0.2, dim=1)  # (C, L_b)
        rebuilt = attention @ kept  # r_i
        expected = torch.nn.functional.cosine_similarity(rebuilt, candidates, dim=1)
        torch.testing.assert_close(scores[b], expected)


POSTERS = Posters(np.array(["a", "b", "c", "d"], dtype=object), np.eye(4, dtype=np.float32), [""] * 4, "x")


def sample_rows(users, days, labels, items, histories) -> pa.Table:
    seconds = np.round(np.asarray(days, dtype=float) * 86400).astype("int64")
    ts = pa.array(pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(seconds, unit="s")).cast(TS)
    return pa.table(
        {
            "user_id": users,
            "ts": ts,
            "label": pa.array(labels, pa.int8()),
            "item_id": items,
            "hist_item_ids": pa.array(histories, pa.list_(pa.string())),
        }
    )


def test_examples_keep_positives_with_a_poster_and_the_newest_keys_that_have_one():
    rows = sample_rows(
        ["u"] * 5,
        [1, 1, 2, 3, 4],
        [1, 0, 1, 1, 1],
        ["a", "b", "nope", "d", "c"],
        [["b", "gone", "c", "d"], ["a", "c"], ["a", "b"], ["gone"], ["a", "b", "c", "d", "a"]],
    )
    clicks = click_examples(rows, POSTERS, history=3, min_history=1)
    assert clicks.targets.tolist() == [0, 2]  # a negative, a target without poster, no key with one: out
    # "gone" dropped; the target is no key of its own ("c" of the last); the newest three kept
    assert clicks.history.tolist() == [[1, 2, 3], [1, 3, 0]]
    short = click_examples(rows, POSTERS, history=5, min_history=4)
    assert short.targets.tolist() == [2] and short.history.tolist() == [[0, 1, 3, 0, -1]]
    with pytest.raises(ValueError, match="hist_item_ids"):
        click_examples(rows.drop_columns(["hist_item_ids"]), POSTERS, 3, 1)
    nulls = rows.set_column(4, "hist_item_ids", pa.array([None, [], [], [], []], pa.list_(pa.string())))
    with pytest.raises(ValueError, match="null"):
        click_examples(nulls, POSTERS, 3, 1)


def test_an_examples_earlier_clicks_are_every_training_click_of_its_user_before_it():
    train = sample_rows(
        ["u", "u", "u", "u", "v"], [1, 2, 2, 3, 1], [1, 1, 0, 1, 1], ["a", "b", "c", "d", "c"], [[]] * 5
    )
    earlier = UserClicks.from_rows(train, POSTERS)
    queries = sample_rows(
        ["u", "u", "u", "v", "w"], [1, 1 + 1 / 86400, 31, 5, 60], [1] * 5, ["a"] * 5, [[]] * 5
    )
    start, count = earlier.before(
        queries.column("user_id").to_numpy(zero_copy_only=False),
        queries.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False),
    )
    spans = [sorted(earlier.items[s : s + c].tolist()) for s, c in zip(start, count, strict=True)]
    # strictly before (not at the same second); u's negative "c" is no click; v has its own; w has none
    assert spans == [[], [0], [0, 1, 3], [2], []]
    valid = sample_rows(["u"], [5], [1], ["b"], [["d"]])
    clicks = click_examples(valid, POSTERS, history=2, min_history=1, earlier=earlier)
    ranked = np.arange(4)
    assert _earlier_clicks(clicks, ranked).tolist() == [
        [True, False, False, True]
    ]  # a and d; b is the target


def test_recall_counts_ties_as_the_expected_hit_and_a_nan_target_as_a_miss():
    clicks = click_examples(
        sample_rows(["u"] * 3, [1, 2, 3], [1] * 3, ["a", "b", "c"], [["d"]] * 3), POSTERS, 1, 1
    )
    same = torch.zeros(3, 4)  # a collapsed space: every item scores the same
    assert _hits(same, clicks, k=1) == pytest.approx(
        3 * 1 / 3
    )  # 3 candidates (d is an earlier click), 1 slot
    assert _hits(same, clicks, k=3) == pytest.approx(3.0)
    assert _hits(torch.full((3, 4), float("nan")), clicks, k=2) == 0.0  # a diverged space hits nothing
    ordered = torch.tensor([[4.0, 3.0, 2.0, 9.0]] * 3)  # d (masked) scores highest: it is no rival
    assert _hits(ordered, clicks, k=1) == pytest.approx(1.0)  # only a ranks first
    rival_nan = ordered.clone()
    rival_nan[:, 1] = float("nan")  # a NaN rival is counted above the target
    assert _hits(rival_nan, clicks, k=1) == pytest.approx(0.0)


def test_every_item_with_a_poster_gets_a_unit_vector_in_the_image_table_layout(world, tmp_path):
    table_path = run_courier(world, tmp_path / "run")
    table = pq.read_table(table_path)
    posters = pq.read_table(world.root / IMAGE_EMBEDDINGS)
    assert table.column_names == posters.column_names  # the models read it through the same path
    assert table.schema.field("embedding").type == posters.schema.field("embedding").type
    assert sorted(table.column("item_id").to_pylist()) == sorted(posters.column("item_id").to_pylist())
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert vectors.shape == (posters.num_rows, COURIER["dim"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    metrics = json.loads((table_path.parent / COURIER_METRICS).read_text())
    assert set(metrics["recall_at_k"]) == {"courier", "imagenet", "imagenet_pca8", "popularity"}
    assert metrics["train_examples"] > 0 and metrics["best_epoch"] in (1, 2)


def test_an_item_no_one_clicked_gets_the_vector_of_its_poster(world, tmp_path):
    """A new item with a poster and no events: its row is the head applied to its poster, and giving it
    another item's poster gives it that item's vector."""
    items = world.items.copy()
    twin = sorted(items["item_id"].astype(str))[-1]
    new_item = items[items["item_id"].astype(str) == twin].assign(item_id="never-clicked")
    grown = replace(world, items=pd.concat([items, new_item], ignore_index=True))
    out = tmp_path / "grown"
    out.mkdir()
    posters = pq.read_table(world.root / IMAGE_EMBEDDINGS)
    copy = posters.filter(pa.compute.equal(posters.column("item_id"), twin)).set_column(
        0, "item_id", pa.array(["never-clicked"], pa.string())
    )
    write_parquet_atomic(pa.concat_tables([posters, copy]), out / IMAGE_EMBEDDINGS)
    cfg = load_config(None, {"samples": {"max_history": 8}, "embed": {"courier": {**COURIER, "epochs": 1}}})
    samples = build_samples(grown, cfg.samples)
    train_courier(out, samples.train, samples.valid, cfg.embed.courier)
    rows = pq.read_table(out / COURIER_EMBEDDINGS).to_pandas().set_index("item_id")["embedding"]
    np.testing.assert_array_equal(rows["never-clicked"], rows[twin])


def test_events_after_the_training_cut_leave_the_table_bit_identical(world, tmp_path):
    """Each user's training range ends before their validation click. Replacing every user's test click
    by another item, and new users too short for the protocol (one click each, after the last event),
    change no training example; a seeded one-thread run then writes the same bytes. Changing one training
    click does change the table. (The split is per user: a new user's training clicks would count, late or
    not, as they do for every model; the courier module's docstring says so.)"""
    events = world.events.assign(ts=pd.to_datetime(world.events["ts"], utc=True))
    ordered = events.assign(_row=np.arange(len(events))).sort_values(["user_id", "ts", "_row"], kind="stable")
    last = ordered.groupby("user_id").tail(1).index  # every user's test click
    items = sorted(world.items["item_id"].astype(str))
    changed = events.copy()
    changed.loc[last, "item_id"] = [
        items[(items.index(i) + 7) % len(items)] for i in events.loc[last, "item_id"]
    ]
    end = events["ts"].max()
    outsiders = pd.DataFrame(
        [(f"outsider-{k}", items[k], "click", end + pd.Timedelta(hours=k + 1)) for k in range(0, 40, 2)],
        columns=["user_id", "item_id", "behavior", "ts"],
    )
    future = pd.concat([changed, outsiders], ignore_index=True)
    plain = run_courier(replace(world, item_stats=daily_item_stats(events)), tmp_path / "plain")
    after = run_courier(
        replace(world, events=future, item_stats=daily_item_stats(future)), tmp_path / "after"
    )
    assert plain.read_bytes() == after.read_bytes()

    # the test can fail: one training click moved to another item changes the vectors
    first_train = ordered.groupby("user_id").nth(1).index[:5]  # a training target of five users
    touched = events.copy()
    touched.loc[first_train, "item_id"] = [
        items[(items.index(i) + 11) % len(items)] for i in events.loc[first_train, "item_id"]
    ]
    moved = run_courier(
        replace(world, events=touched, item_stats=daily_item_stats(touched)), tmp_path / "moved"
    )
    assert not pq.read_table(plain).equals(pq.read_table(moved))


def test_training_beats_the_raw_vectors_on_the_next_click(world, tmp_path):
    table_path = run_courier(world, tmp_path / "long", epochs=6)
    recall = json.loads((table_path.parent / COURIER_METRICS).read_text())["recall_at_k"]
    assert recall["courier"] > recall["imagenet"]


def test_models_read_the_courier_table_only_with_method_courier(world, tmp_path):
    table_path = run_courier(world, tmp_path / "read")
    dataset = replace(world, root=table_path.parent)
    catalog = ItemCatalog.from_items(dataset.items)
    samples = build_samples(dataset, load_config(None, {"samples": {"max_history": 8}}).samples)
    statistics = fit_statistics(samples.train, (10, 100))
    glove = tmp_path / "glove.txt"
    glove.write_text("red 0.1 0.2\n")
    features_cfg = FeaturesConfig(word_vectors=str(glove), title_len=4)
    assert image_table(EmbedConfig()) == IMAGE_EMBEDDINGS
    courier = build_item_features(
        dataset, catalog, features_cfg, statistics, image_table(EmbedConfig(method="courier"))
    )
    plain = build_item_features(dataset, catalog, features_cfg, statistics)
    assert courier.image_source == "courier" and plain.image_source == "embeddings"
    assert courier.image.shape == (len(catalog.items), COURIER["dim"])
    assert plain.image.shape == (len(catalog.items), 24)
    rows = pq.read_table(table_path).to_pandas()
    codes = catalog.items.encode(rows["item_id"].tolist())
    np.testing.assert_array_equal(courier.image[codes], np.stack(rows["embedding"].to_numpy()))
    assert (courier.image[0] == 0).all()  # padding row

    bare = replace(world, root=tmp_path / "bare")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="marn courier"):
        build_item_features(bare, catalog, features_cfg, statistics, COURIER_EMBEDDINGS)
    with pytest.raises(ValueError, match="pixels"):
        build_item_features(
            dataset,
            catalog,
            features_cfg.model_copy(update={"image": "pixels"}),
            statistics,
            COURIER_EMBEDDINGS,
        )


def test_config_defaults_to_imagenet_and_rejects_unknown_courier_keys():
    assert load_config(None).embed.method == "imagenet"
    with pytest.raises(ConfigError, match=r"embed\.courier\.temperature"):
        load_config(None, {"embed": {"method": "courier", "courier": {"temperature": 0.1}}})
    with pytest.raises(ConfigError, match=r"embed\.method"):
        load_config(None, {"embed": {"method": "clip"}})
    short = {"samples": {"max_history": 2}, "embed": {"method": "courier", "courier": {"min_history": 3}}}
    with pytest.raises(ConfigError, match=r"exceeds samples\.max_history"):
        load_config(None, short)
    load_config(None, {**short, "embed": {"courier": {"min_history": 3}}})  # not used: no constraint


def test_no_poster_table_is_a_clear_error(world, tmp_path):
    samples = build_samples(world, load_config(None).samples)
    with pytest.raises(FileNotFoundError, match="embed stage"):
        train_courier(tmp_path, samples.train, samples.valid, load_config(None).embed.courier)


def test_the_pipeline_task_passes_the_dataset_on_without_training_for_imagenet(world, tmp_path):
    from marn.config import dump_config
    from marn.stages import read_dataset_ref, run_courier, write_dataset_ref

    data = tmp_path / "data"
    data.mkdir()
    (data / IMAGE_EMBEDDINGS).write_bytes((world.root / IMAGE_EMBEDDINGS).read_bytes())
    write_dataset_ref(tmp_path / "embedded", data)
    summary = run_courier(
        dump_config(load_config(None)), str(tmp_path / "embedded"), "unused", str(tmp_path / "out")
    )
    assert summary["trained"] is False and summary["method"] == "imagenet"
    assert read_dataset_ref(tmp_path / "out") == data.resolve()
    assert not (data / COURIER_EMBEDDINGS).exists()


def test_marn_courier_prints_each_epoch_and_the_recall_against_the_raw_vectors(world, tmp_path):
    from typer.testing import CliRunner

    from marn.cli import app

    data = tmp_path / "data"
    data.mkdir()
    for name in ("events.parquet", "items.parquet", IMAGE_EMBEDDINGS):
        (data / name).write_bytes((world.root / name).read_bytes())
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"samples": {"max_history": 8}, "embed": {"courier": COURIER}}))
    result = CliRunner().invoke(
        app, ["courier", "--data", str(data), "--epochs", "2", "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert "epoch 1  loss" in result.output and "epoch 2  loss" in result.output
    assert "valid recall@20: courier" in result.output and "imagenet" in result.output
    assert (data / COURIER_EMBEDDINGS).exists()


def test_without_validation_clicks_every_epoch_runs_and_the_last_is_kept(world, tmp_path):
    out = tmp_path / "novalid"
    out.mkdir()
    (out / IMAGE_EMBEDDINGS).write_bytes((world.root / IMAGE_EMBEDDINGS).read_bytes())
    cfg = load_config(None, {"samples": {"max_history": 8}, "embed": {"courier": {**COURIER, "epochs": 3}}})
    samples = build_samples(world, cfg.samples)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = train_courier(out, samples.train, samples.valid.slice(0, 0), cfg.embed.courier)
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    assert summary.epochs == 3 and summary.best_epoch == 3 and summary.recall["courier"] is None
    assert json.loads(summary.metrics_path.read_text())["torch_threads"] == 1  # embed.courier.threads


def _features(dataset: Dataset, tmp_path: Path, vectors: str = COURIER_EMBEDDINGS) -> ItemFeatures:
    catalog = ItemCatalog.from_items(dataset.items)
    samples = build_samples(dataset, load_config(None, {"samples": {"max_history": 8}}).samples)
    glove = tmp_path / "glove.txt"
    glove.write_text("red 0.1 0.2\n")
    cfg = FeaturesConfig(word_vectors=str(glove), title_len=4)
    return build_item_features(dataset, catalog, cfg, fit_statistics(samples.train, (10, 100)), vectors)


def test_a_model_keeps_the_head_that_maps_a_new_items_poster_into_its_table(world, tmp_path):
    """Serving a COURIER-fed model: an item added after training has only its backbone vector in Feast;
    the head kept in the checkpoint puts it where the table would have (issue 19 item 4)."""
    out = run_courier(world, tmp_path / "run").parent
    features = _features(replace(world, root=out), tmp_path)
    assert features.image_source == "courier" and features.image_head is not None
    checkpoint = tmp_path / "features.pt"
    torch.save(features.to_dict(), checkpoint)
    loaded = ItemFeatures.from_dict(torch.load(checkpoint, weights_only=True))
    head = CourierHead.from_state(loaded.image_head)

    posters = pq.read_table(out / IMAGE_EMBEDDINGS).to_pandas()
    table = pq.read_table(out / COURIER_EMBEDDINGS).to_pandas().set_index("item_id")["embedding"]
    backbone = [posters["embedding"][k].tolist() for k in range(3)]  # as Feast returns them: lists
    expected = np.stack([table[i] for i in posters["item_id"][:3]])
    rows, mismatched = cold_image_rows([backbone[0], None, backbone[2], [0.5] * 3], COURIER["dim"], head)
    assert mismatched == 1  # the 3-d vector of another backbone
    np.testing.assert_allclose(rows[[0, 2]].numpy(), expected[[0, 2]], atol=1e-6)
    assert (rows[[1, 3]] == 0).all()  # no poster, or one the head cannot read: zeros, as offline
    assert rows.shape == (4, COURIER["dim"])

    plain = _features(world, tmp_path, IMAGE_EMBEDDINGS)  # a model of the backbone's vectors: no head
    assert plain.image_head is None and "image_head" not in plain.to_dict()
    rows, mismatched = cold_image_rows([backbone[1], [1.0] * 5], plain.image.shape[1])
    np.testing.assert_array_equal(rows[0].numpy(), np.asarray(backbone[1], dtype=np.float32))
    assert mismatched == 1 and (rows[1] == 0).all()


def test_a_head_that_did_not_write_the_table_beside_it_is_refused(world, tmp_path):
    out = run_courier(world, tmp_path / "one").parent
    other = run_courier(world, tmp_path / "two", seed=1).parent
    state = read_courier_head(out)
    backbone = pq.read_table(out / IMAGE_EMBEDDINGS).column("backbone")[0].as_py()
    assert (state["dim"], state["hidden"], state["backbone"]) == (COURIER["dim"], COURIER["hidden"], backbone)

    (out / COURIER_HEAD).write_bytes((other / COURIER_HEAD).read_bytes())  # another run's head
    with pytest.raises(ValueError, match="does not map the backbone"):
        read_courier_head(out)
    with pytest.raises(ValueError, match="not the head"):
        _features(replace(world, root=out), tmp_path)

    posters = pq.read_table(other / IMAGE_EMBEDDINGS)  # the backbone re-embedded since COURIER ran
    moved = pa.array([[v + 1.0 for v in row] for row in posters.column("embedding").to_pylist()])
    write_parquet_atomic(
        posters.set_column(1, "embedding", moved.cast(posters.schema.field(1).type)), other / IMAGE_EMBEDDINGS
    )
    with pytest.raises(ValueError, match="does not map the backbone"):
        read_courier_head(other)

    third = run_courier(world, tmp_path / "three").parent  # a new poster embedded since COURIER ran
    posters = pq.read_table(third / IMAGE_EMBEDDINGS)
    grown = pa.concat_tables([posters, posters.slice(0, 1).set_column(0, "item_id", pa.array(["new"]))])
    write_parquet_atomic(grown, third / IMAGE_EMBEDDINGS)
    with pytest.raises(ValueError, match="posters changed"):
        read_courier_head(third)

    (out / COURIER_HEAD).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a COURIER head"):
        read_courier_head(out)
    (out / COURIER_HEAD).unlink()
    with pytest.raises(FileNotFoundError, match="marn courier"):
        read_courier_head(out)


def test_a_channel_that_never_varies_cannot_decide_a_new_posters_vector():
    vectors = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    vectors[:, 0] = 0.0  # dead on every catalogue poster
    scale = standardisation_scale(vectors)
    np.testing.assert_allclose(scale[1:], vectors[:, 1:].std(0), rtol=1e-6)  # the varying ones: their own
    assert scale[0] == pytest.approx(0.1 * np.median(vectors[:, 1:].std(0)))
    torch.manual_seed(0)
    head = CourierHead(vectors.mean(0), scale, hidden=16, dim=8)
    new = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    new[:, 0] = 0.3  # slightly active on the new posters
    with torch.no_grad():
        mapped = head(torch.from_numpy(new))
    cosine = mapped @ mapped.T
    assert cosine[~torch.eye(5, dtype=torch.bool)].max() < 0.99  # still five different vectors
    naive = CourierHead(vectors.mean(0), vectors.std(0) + 1e-6, hidden=16, dim=8)  # the old 1e-6 floor
    naive.load_state_dict(head.state_dict() | {"scale": torch.from_numpy(vectors.std(0) + 1e-6)})
    with torch.no_grad():
        collapsed = naive(torch.from_numpy(new))
    assert (collapsed @ collapsed.T).min() > 0.999  # what the floor prevents: one direction for all
    assert (standardisation_scale(np.zeros((3, 2), np.float32)) == 1.0).all()


def test_a_diverged_training_stops_with_a_clear_error_and_writes_nothing(world, tmp_path):
    out = tmp_path / "diverged"
    out.mkdir()
    (out / IMAGE_EMBEDDINGS).write_bytes((world.root / IMAGE_EMBEDDINGS).read_bytes())
    cfg = load_config(
        None, {"samples": {"max_history": 8}, "embed": {"courier": {**COURIER, "epochs": 2, "lr": 1e20}}}
    )
    samples = build_samples(world, cfg.samples)
    with pytest.raises(ValueError, match="not finite"):
        train_courier(out, samples.train, samples.valid, cfg.embed.courier)
    assert not (out / COURIER_EMBEDDINGS).exists() and not (out / COURIER_HEAD).exists()


def test_posters_of_two_backbones_are_refused_and_numeric_ids_read_as_text(world, tmp_path):
    posters = pq.read_table(world.root / IMAGE_EMBEDDINGS)
    mixed = posters.set_column(3, "backbone", pa.array(["a"] + ["b"] * (posters.num_rows - 1)))
    write_parquet_atomic(mixed, tmp_path / IMAGE_EMBEDDINGS)
    with pytest.raises(ValueError, match="2 backbones"):
        read_posters(tmp_path)
    numbers = posters.set_column(0, "item_id", pa.array(range(posters.num_rows), pa.int64()))
    write_parquet_atomic(numbers, tmp_path / IMAGE_EMBEDDINGS)
    read = read_posters(tmp_path)
    assert read.item_ids[read.codes(np.array(["7"], dtype=object))].tolist() == ["7"]
