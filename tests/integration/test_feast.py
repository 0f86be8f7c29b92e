"""Real Feast (sqlite online store, dask offline store) on tiny synthetic data: point-in-time samples with
no future leaks, the same samples as build_samples, idempotent materialization, the feature services, item
representations, and the feature_repo/ adapter."""

import importlib.util
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from marn.config import Config, load_config
from marn.data.samples import SPLITS, Samples, build_samples
from marn.data.schema import Dataset, read_dataset, write_table
from marn.data.stats import stats_as_of
from marn.data.synth import synthesize
from marn.data.tensors import ItemCatalog, encode_samples, fit_statistics
from marn.features.materialize import FeatureSummary, materialize_features
from marn.features.online import online_features
from marn.features.point_in_time import AS_OF_SHIFT, samples_from_feature_store
from marn.features.repo import DUPN_SERVICE, MARN_SERVICE
from marn.features.representations import write_item_representations
from marn.features.tables import (
    ITEM_EMBEDDINGS,
    ITEM_REPRESENTATIONS,
    USER_SEQUENCES,
    representations_view,
    table_path,
)

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class FeastWorld:
    data_dir: Path
    repo_dir: Path
    cfg: Config
    dataset: Dataset
    summary: FeatureSummary
    samples: Samples


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> FeastWorld:
    root = tmp_path_factory.mktemp("feast")
    cfg = load_config(
        None,
        {
            "synth": {"users": 40, "items": 60},
            "samples": {"max_history": 5},
            "paths": {"work_dir": str(root)},
        },
    )
    data_dir = root / "data"
    synthesize(data_dir, cfg.synth)
    _write_fake_embeddings(data_dir)
    summary = materialize_features(data_dir, cfg, root / "repo")
    dataset = read_dataset(data_dir)
    samples = samples_from_feature_store(dataset, cfg, root / "repo")
    return FeastWorld(data_dir, root / "repo", cfg, dataset, summary, samples)


def _write_fake_embeddings(data_dir: Path) -> None:
    """The embed stage's files: 3-d image vectors for all items but the first (no readable image), 2-d
    title vectors for all."""
    items = sorted(pq.read_table(data_dir / "items.parquet").column("item_id").to_pylist())
    rng = np.random.default_rng(0)
    vec = pa.list_(pa.float32())
    image = rng.normal(size=(len(items) - 1, 3)).astype(np.float32)
    title = rng.normal(size=(len(items), 2)).astype(np.float32)
    pq.write_table(
        pa.table({"item_id": items[1:], "embedding": pa.array(list(image), vec)}),
        data_dir / "image_embeddings.parquet",
    )
    pq.write_table(
        pa.table({"item_id": items, "embedding": pa.array(list(title), vec)}),
        data_dir / "title_embeddings.parquet",
    )


def _store(repo_dir: Path):
    from feast import FeatureStore

    return FeatureStore(repo_path=str(repo_dir))


def _all_samples(samples: Samples) -> pd.DataFrame:
    return pd.concat([samples.split(s).to_pandas().assign(split=s) for s in SPLITS], ignore_index=True)


def test_histories_and_statistics_are_strictly_from_before_each_target(world):
    df = _all_samples(world.samples)
    for ts, hist_ts in zip(df["ts"], df["hist_ts"], strict=True):
        assert all(pd.Timestamp(h, tz="UTC") < ts for h in hist_ts)

    # The target's own event opens a user_sequences row stamped exactly at the target's time (the row a
    # join as of t would take); the sample must hold the row before it instead.
    sequences = pq.read_table(table_path(world.repo_dir / "data", USER_SEQUENCES)).to_pandas()
    by_user = {user: rows.sort_values("event_timestamp") for user, rows in sequences.groupby("user_id")}
    for row in df[df["label"] == 1].itertuples():
        rows = by_user[row.user_id]
        at_target = rows[rows["event_timestamp"] == row.ts]
        assert len(at_target) == 1 and at_target["hist_item_ids"].iloc[0][-1] == row.item_id
        before = rows[rows["event_timestamp"] < row.ts].iloc[-1]
        assert list(row.hist_ts) == list(before["hist_ts"])
        assert list(row.hist_item_ids) == list(before["hist_item_ids"])

    # Item statistics: the newest snapshot before the target, although later snapshots of the item exist,
    # for the candidate and for every history item (as of the sample's time, not the history event's).
    stats = world.dataset.item_stats
    expected = stats_as_of(stats, df[["item_id"]].assign(ts=df["ts"] - AS_OF_SHIFT))
    for name in expected.columns:
        np.testing.assert_array_equal(df[f"stat_{name}"].to_numpy(), expected[name].to_numpy(), name)
    newest = stats.groupby("item_id")["ts"].max()
    assert (df["item_id"].map(newest) > df["ts"]).sum() > len(df) // 2
    lengths = df["hist_item_ids"].map(len).to_numpy()
    history = pd.DataFrame(
        {"item_id": np.concatenate(df["hist_item_ids"].to_numpy()), "ts": np.repeat(df["ts"], lengths)}
    )
    expected = stats_as_of(stats, history.assign(ts=history["ts"] - AS_OF_SHIFT))
    got = np.concatenate([np.asarray(v) for v in df["hist_stat_n_events"]])
    np.testing.assert_array_equal(got, expected["n_events"].to_numpy())


def test_feature_store_samples_equal_build_samples_on_data_without_ties(world):
    events = world.dataset.events
    assert not events.duplicated(["user_id", "ts"]).any()  # synthetic times increase strictly per user
    expected = build_samples(world.dataset, world.cfg.samples)
    statistics = fit_statistics(expected.train, (10, 100))
    catalog = ItemCatalog.from_items(world.dataset.items)
    for split in SPLITS:
        got = world.samples.split(split)
        assert got.equals(expected.split(split)), split  # histories and every statistic column alike
        assert {"stat_n_events", "stat_n_click", "stat_price", "hist_stat_price"} <= set(got.schema.names)
        # the same tensors from Feast's point-in-time join as from the local path
        local, feast = (encode_samples(t, catalog, 5, statistics) for t in (expected.split(split), got))
        for name, tensor in local.tensors.items():
            assert torch.equal(tensor, feast.tensors[name]), (split, name)


TIED_AT = pd.Timestamp("2025-03-01 02:00", tz="UTC")


def _write_tied_dataset(data_dir: Path) -> None:
    """u1 has two events ("c", "d") at TIED_AT; every other time is one event."""
    t = TIED_AT - pd.Timedelta(hours=2)
    hours = [0, 1, 2, 2, 3, 4, 0, 5, 6, 7]  # u1, then u2
    events = pd.DataFrame(
        {
            "user_id": ["u1"] * 6 + ["u2"] * 4,
            "item_id": ["a", "b", "c", "d", "e", "f", "a", "c", "e", "g"],
            "behavior": "click",
            "ts": [t + pd.Timedelta(hours=h) for h in hours],
        }
    )
    items = pd.DataFrame(
        {"item_id": list("abcdefghij"), "category_id": "k", "brand_id": None, "shop_id": None, "title": "x"}
    ).assign(image_uri=None, first_seen=t)
    write_table(data_dir, "events", events)
    write_table(data_dir, "items", items)


def test_tied_events_are_left_out_of_the_history(tmp_path):
    """Two events of a user at one time, both targets: Feast's histories of both exclude the other, where
    build_samples gives the second one the first (earlier in file order); every other sample agrees."""
    _write_tied_dataset(tmp_path / "data")
    cfg = load_config(None, {"paths": {"work_dir": str(tmp_path)}})
    materialize_features(tmp_path / "data", cfg, tmp_path / "repo")
    dataset = read_dataset(tmp_path / "data")
    got = _all_samples(samples_from_feature_store(dataset, cfg, tmp_path / "repo"))
    expected = _all_samples(build_samples(dataset, cfg.samples))
    assert len(got) == len(expected)
    tied = (got["user_id"] == "u1") & (got["ts"] == TIED_AT)
    assert got.loc[tied & (got["label"] == 1), "item_id"].tolist() == ["c", "d"]  # both are targets
    assert [list(h) for h in got.loc[tied, "hist_item_ids"]] == [["a", "b"]] * 4
    assert [list(h) for h in expected.loc[tied, "hist_item_ids"]] == [["a", "b"]] * 2 + [["a", "b", "c"]] * 2
    same = ~tied
    assert got.loc[same, "hist_item_ids"].map(list).equals(expected.loc[same, "hist_item_ids"].map(list))


def test_a_view_whose_table_is_gone_is_unregistered(tmp_path):
    data_dir = tmp_path / "data"
    _write_tied_dataset(data_dir)
    _write_fake_embeddings(data_dir)
    cfg = load_config(None, {"paths": {"work_dir": str(tmp_path)}})
    assert ITEM_EMBEDDINGS in materialize_features(data_dir, cfg, tmp_path / "repo").feature_views
    (data_dir / "image_embeddings.parquet").unlink()
    (data_dir / "title_embeddings.parquet").unlink()
    summary = materialize_features(data_dir, cfg, tmp_path / "repo")
    assert ITEM_EMBEDDINGS not in summary.feature_views
    store = _store(tmp_path / "repo")
    assert ITEM_EMBEDDINGS not in {
        p.name for p in store.get_feature_service(MARN_SERVICE).feature_view_projections
    }
    assert "image_embedding" not in online_features(tmp_path / "repo", [], ["a"]).items.columns


def test_materializing_twice_leaves_identical_online_values(world):
    users = [*sorted(world.dataset.events["user_id"].unique())[:10], "nobody"]
    items = [*sorted(world.dataset.items["item_id"])[:10], "no-such-item"]
    before = online_features(world.repo_dir, users, items)
    again = materialize_features(world.data_dir, world.cfg, world.repo_dir)
    after = online_features(world.repo_dir, users, items)
    for frame in ("users", "items"):
        pd.testing.assert_frame_equal(getattr(before, frame), getattr(after, frame))
    assert again.rows == world.summary.rows

    # user_sequences reach the online store by write_to_online_store: the same as Feast's materialize.
    _store(world.repo_dir).materialize(again.start, again.end, feature_views=[USER_SEQUENCES])
    pd.testing.assert_frame_equal(online_features(world.repo_dir, users, []).users, before.users)

    # Online: the newest max_history behaviours of each user; unknown ids are served with nulls.
    online = before.users.set_index("user_id")
    for user in users[:-1]:
        history = world.dataset.events[world.dataset.events["user_id"] == user].sort_values("ts")
        assert online.loc[user, "hist_item_ids"] == history["item_id"].tolist()[-5:]
    assert online.loc["nobody", "hist_item_ids"] is None
    item_rows = before.items.set_index("item_id")
    first = items[0]  # the item without an image vector
    assert (
        item_rows.loc[first, "image_embedding"] is None and len(item_rows.loc[first, "title_embedding"]) == 2
    )
    assert len(item_rows.loc[items[1], "image_embedding"]) == 3
    assert item_rows.loc["no-such-item", "category_id"] is None


def test_apply_registers_both_services_and_representations_join_marn_only(world):
    summary = world.summary
    assert summary.feature_services == (DUPN_SERVICE, MARN_SERVICE)
    assert ITEM_EMBEDDINGS in summary.feature_views and ITEM_REPRESENTATIONS not in summary.feature_views
    assert (
        summary.start <= world.dataset.events["ts"].min() and summary.end >= world.dataset.events["ts"].max()
    )
    assert summary.rows[USER_SEQUENCES] == len(world.dataset.events)  # one row per distinct event time

    store = _store(world.repo_dir)
    views = {
        s: {p.name for p in store.get_feature_service(s).feature_view_projections}
        for s in (MARN_SERVICE, DUPN_SERVICE)
    }
    assert (
        views[MARN_SERVICE]
        == views[DUPN_SERVICE]
        == {USER_SEQUENCES, "item_attributes", "item_stats", ITEM_EMBEDDINGS}
    )

    items = sorted(world.dataset.items["item_id"])[:4]
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    write_item_representations(
        world.repo_dir, items, vectors, datetime.now(UTC), model="marn", version="v0001"
    )
    store = _store(world.repo_dir)
    marn = {p.name for p in store.get_feature_service(MARN_SERVICE).feature_view_projections}
    dupn = {p.name for p in store.get_feature_service(DUPN_SERVICE).feature_view_projections}
    view = representations_view("marn", "v0001")
    assert view.startswith(ITEM_REPRESENTATIONS)
    assert marn == views[MARN_SERVICE] | {view} and dupn == views[DUPN_SERVICE]
    online = online_features(world.repo_dir, [], [*items, "zz"]).items.set_index("item_id")
    np.testing.assert_allclose(np.stack(online.loc[items, "item_rep"].to_numpy()), vectors, rtol=1e-6)
    assert online.loc["zz", "item_rep"] is None


def test_feature_repo_adapter_exposes_the_same_objects(world, monkeypatch):
    from feast import FeatureService, FeatureView

    monkeypatch.setenv("MARN_FEATURE_TABLES", str(world.repo_dir / "data"))
    spec = importlib.util.spec_from_file_location(
        "marn_feature_repo", REPO_ROOT / "feature_repo" / "definitions.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.marn_v1, FeatureService) and isinstance(module.dupn_v1, FeatureService)
    assert isinstance(module.user_sequences, FeatureView) and isinstance(module.item_embeddings, FeatureView)
    assert module.item_stats.batch_source.path == str(
        table_path(world.repo_dir / "data", "item_stats").resolve()
    )
