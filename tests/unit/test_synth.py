"""The synthetic generator: canonical tables, determinism, streaming statistics and a learnable signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from marn.config import SynthConfig
from marn.data import synth
from marn.data.schema import (
    EVENTS,
    EVENTS_SCHEMA,
    ITEM_STATS,
    ITEMS,
    ITEMS_SCHEMA,
    TABLE_FILES,
    USERS,
    read_dataset,
    resolve_image_uri,
)
from marn.data.stats import daily_item_stats
from marn.data.synth import (
    ATTRIBUTES,
    COLORS,
    LATENT_ITEMS_FILE,
    LATENT_USERS_FILE,
    SHAPES,
    TEXTURES,
    ItemStatsAccumulator,
    PlantedSignal,
    synthesize,
)

SMALL = SynthConfig(users=60, items=40, events_per_user=8, image_size=16, days=10, seed=3)
OUTPUTS = [TABLE_FILES[t] for t in (EVENTS, ITEMS, USERS, ITEM_STATS)]
OUTPUTS += [LATENT_ITEMS_FILE, LATENT_USERS_FILE]  # ground truth: must be deterministic too


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("small")
    return out, synthesize(out, SMALL)


def _tables(path: Path) -> dict[str, pd.DataFrame]:
    return {name: pq.read_table(path / name).to_pandas() for name in OUTPUTS}


def _images(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "images").iterdir())}


def test_tables_follow_the_canonical_contract(small: tuple[Path, synth.SynthSummary]) -> None:
    path, summary = small
    data = read_dataset(path)
    assert data.users is not None and data.item_stats is not None
    for file, schema in ((TABLE_FILES[EVENTS], EVENTS_SCHEMA), (TABLE_FILES[ITEMS], ITEMS_SCHEMA)):
        written = pq.read_schema(path / file)
        assert [written.field(f.name).type for f in schema] == list(schema.types)
    assert "label" not in data.events.columns  # every event is a positive; labels come from the DIN protocol
    assert str(data.events["ts"].dtype) == "datetime64[us, UTC]"
    assert data.items["price"].dtype == np.float64 and (data.items["price"] > 0).all()
    assert (summary.users, summary.items, summary.events, summary.images) == (
        SMALL.users,
        SMALL.items,
        len(data.events),
        SMALL.items,
    )

    events = data.events
    assert set(events["item_id"]) <= set(data.items["item_id"])
    assert set(events["user_id"]) == set(data.users["user_id"])
    assert set(events["behavior"]) <= {"click", "cart", "purchase"}
    assert (events["behavior"] == "click").mean() > 0.7
    start = pd.Timestamp(SMALL.start)
    assert events["ts"].min() >= start and events["ts"].max() < start + pd.Timedelta(days=SMALL.days)
    assert (data.items["first_seen"] <= start).all()
    per_user = events.groupby("user_id", sort=False)
    assert per_user.size().min() >= synth.MIN_EVENTS
    assert per_user["ts"].apply(lambda ts: ts.is_monotonic_increasing and ts.is_unique).all()

    latent_items = pd.read_parquet(path / LATENT_ITEMS_FILE)
    latent_users = pd.read_parquet(path / LATENT_USERS_FILE)
    assert list(latent_items["item_id"]) == list(data.items["item_id"])
    assert list(latent_users["user_id"]) == list(data.users["user_id"])
    tastes = latent_users[[f"taste_{a}" for a in ATTRIBUTES]].notna().sum(axis=1)
    assert (tastes == PlantedSignal().n_tastes).all()


def test_images_and_titles_carry_their_attributes(small: tuple[Path, synth.SynthSummary]) -> None:
    path, _ = small
    items = read_dataset(path).items
    latent = pd.read_parquet(path / LATENT_ITEMS_FILE)
    palette = synth._RGB / synth._RGB.sum(axis=1, keepdims=True)
    for item, row in zip(items.itertuples(), latent.itertuples(), strict=True):
        image_path = resolve_image_uri(path, item.image_uri)
        assert image_path is not None and image_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(image_path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (SMALL.image_size,) * 2)
            pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
        # Color is in both modalities: the chromatic pixels' mean chromaticity is nearest the item's color.
        chromatic = pixels[pixels.max(axis=1) - pixels.min(axis=1) > 40]
        chroma = (chromatic / chromatic.sum(axis=1, keepdims=True)).mean(axis=0)
        assert COLORS[int(np.argmin(((palette - chroma) ** 2).sum(axis=1)))] == row.color
        words = set(item.title.split())
        assert {row.color, row.style, row.material} <= words  # title attributes
        assert not words & (set(TEXTURES) | set(SHAPES))  # image-only attributes never reach the title


def test_same_seed_same_data_for_any_chunk_size(
    small: tuple[Path, synth.SynthSummary], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, _ = small
    again = tmp_path / "again"
    synthesize(again, SMALL)
    for name, table in _tables(reference).items():
        pd.testing.assert_frame_equal(table, _tables(again)[name], obj=name)
    assert _images(again) == _images(reference)

    # Small user blocks so that chunks of 7 users cut across several random-stream blocks.
    monkeypatch.setattr(synth, "USER_BLOCK", 16)
    calls: list[tuple[int, int]] = []
    blocks_big, blocks_small = tmp_path / "big", tmp_path / "seven"
    synthesize(blocks_big, SMALL.model_copy(update={"chunk_users": 1000}))
    synthesize(blocks_small, SMALL.model_copy(update={"chunk_users": 7}), progress=lambda *a: calls.append(a))
    assert calls == [(min(n, SMALL.users), SMALL.users) for n in range(7, SMALL.users + 7, 7)]
    big, seven = _tables(blocks_big), _tables(blocks_small)
    for name in OUTPUTS:
        pd.testing.assert_frame_equal(big[name], seven[name], obj=name)
    assert pq.ParquetFile(blocks_small / TABLE_FILES[EVENTS]).num_row_groups == len(calls)


def test_another_seed_gives_other_data(small: tuple[Path, synth.SynthSummary], tmp_path: Path) -> None:
    reference, _ = small
    synthesize(tmp_path, SMALL.model_copy(update={"seed": SMALL.seed + 1}))
    ours, theirs = _tables(reference), _tables(tmp_path)
    assert not ours[TABLE_FILES[EVENTS]].equals(theirs[TABLE_FILES[EVENTS]])
    assert not ours[TABLE_FILES[ITEMS]]["title"].equals(theirs[TABLE_FILES[ITEMS]]["title"])
    assert _images(reference) != _images(tmp_path)


def test_streamed_item_stats_equal_daily_item_stats(small: tuple[Path, synth.SynthSummary]) -> None:
    path, _ = small
    data = read_dataset(path)
    pd.testing.assert_frame_equal(data.item_stats, daily_item_stats(data.events))

    # The accumulator alone, fed uneven chunks of unsorted events with a start that is not midnight.
    rng = np.random.default_rng(0)
    n, item_ids = 5000, np.array([f"x{i:03d}" for i in range(50)], dtype=object)
    start_us = 1_700_000_000_000_000 + 12_345
    item = rng.integers(0, 50, n)
    ts = start_us + rng.integers(0, 20 * 86_400_000_000, n)
    behavior = rng.choice(3, n, p=[0.9, 0.1, 0.0])  # no purchases: absent behaviours get no column
    accumulator = ItemStatsAccumulator(item_ids, start_us)
    for lo, hi in ((0, 1), (1, 1), (1, 2000), (2000, n)):
        accumulator.add(item[lo:hi], ts[lo:hi], behavior[lo:hi])
    events = pd.DataFrame(
        {
            "item_id": item_ids[item],
            "behavior": np.asarray(synth.BEHAVIOR_CODES, dtype=object)[behavior],
            "ts": pd.Series(ts.astype("datetime64[us]")).dt.tz_localize("UTC"),
        }
    )
    pd.testing.assert_frame_equal(accumulator.frame(), daily_item_stats(events))


@pytest.mark.parametrize(
    ("overrides", "signal", "message"),
    [
        ({"seed": -1}, PlantedSignal(), "seed"),
        ({}, PlantedSignal(n_tastes=len(ATTRIBUTES) + 1), "n_tastes"),
        ({}, PlantedSignal(n_tastes=0), "n_tastes"),
        ({}, PlantedSignal(beta=-1.0), "beta"),
    ],
)
def test_bad_config_is_rejected(
    tmp_path: Path, overrides: dict[str, int], signal: PlantedSignal, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path, SMALL.model_copy(update=overrides), signal=signal)


# ----------------------------------------------------------------------------- the planted signal

SIGNAL = SynthConfig(users=1500, items=400, events_per_user=12, image_size=8, seed=11)


def _din_auc(path: Path, seed: int = 0) -> dict[str, float]:
    """Test AUC of logistic regressions on DIN-style pairs (last event vs. a never-clicked item).

    Features: ``ids`` one-hot candidate item/category/brand/shop; ``latent`` for each true attribute the
    share of the user's earlier items with the candidate's value; ``visible`` the same for color, texture
    and style only (attributes an image + title model can see). Users are split into train and test.
    """
    data = read_dataset(path)
    items = data.items.set_index("item_id")
    code = pd.Series(np.arange(len(items)), index=items.index)
    latent = pd.read_parquet(path / LATENT_ITEMS_FILE).set_index("item_id").loc[items.index]
    attrs = np.stack([pd.factorize(latent[a])[0] for a in ATTRIBUTES], axis=1)
    events = data.events.assign(code=code.loc[data.events["item_id"]].to_numpy())
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, int, int]] = []  # (user index, candidate, label)
    shares = []
    for u, sequence in enumerate(events.groupby("user_id", sort=True)["code"]):
        seq = sequence[1].to_numpy()
        history, clicked = seq[:-1], set(seq.tolist())
        negative = int(rng.integers(len(items)))
        while negative in clicked:
            negative = int(rng.integers(len(items)))
        for candidate, label in ((seq[-1], 1), (negative, 0)):
            rows.append((u, candidate, label))
            shares.append((attrs[history] == attrs[candidate]).mean(axis=0))
    user, candidate, label = (np.array(c) for c in zip(*rows, strict=True))
    latent_x = np.array(shares)
    visible = [list(ATTRIBUTES).index(a) for a in ("color", "texture", "style")]
    ids = items[["category_id", "brand_id", "shop_id"]].reset_index().to_numpy()[candidate]
    train = rng.permutation(user.max() + 1)[user] < 0.7 * (user.max() + 1)

    def auc(x_train: np.ndarray, x_test: np.ndarray) -> float:
        model = LogisticRegression(max_iter=2000).fit(x_train, label[train])
        return float(roc_auc_score(label[~train], model.predict_proba(x_test)[:, 1]))

    encoder = OneHotEncoder(handle_unknown="ignore").fit(ids[train])
    return {
        "ids": auc(encoder.transform(ids[train]), encoder.transform(ids[~train])),
        "latent": auc(latent_x[train], latent_x[~train]),
        "visible": auc(latent_x[train][:, visible], latent_x[~train][:, visible]),
    }


def test_planted_signal_is_learnable_beyond_ids(tmp_path: Path) -> None:
    synthesize(tmp_path, SIGNAL)
    auc = _din_auc(tmp_path)
    assert auc["latent"] > auc["ids"] + 0.05, auc
    assert auc["visible"] > auc["ids"] + 0.03, auc


def test_without_tastes_the_attributes_predict_nothing(tmp_path: Path) -> None:
    synthesize(tmp_path, SIGNAL, signal=PlantedSignal(beta=0.0))
    auc = _din_auc(tmp_path)
    assert auc["latent"] < 0.6, auc  # only a faint popularity echo is left
