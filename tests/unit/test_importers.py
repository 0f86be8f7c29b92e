"""Importers of the public data sets (MovieLens 100K, Amazon reviews) on tiny hand-written fixtures."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from marn.data.amazon import import_amazon
from marn.data.importing import ImportSummary
from marn.data.movielens import import_movielens
from marn.data.schema import read_dataset, resolve_image_uri
from marn.data.stats import stats_as_of

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
AMAZON = FIXTURES / "amazon-mini"
REVIEWS = AMAZON / "reviews_Mini_5.json"
META_2014 = AMAZON / "meta_Mini.json"
META_2018 = AMAZON / "meta_Mini_2018.json.gz"


@pytest.fixture(scope="module")
def ml_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The MovieLens fixtures in the official layout.

    They are committed with a ``.fixture`` suffix so they are never mistaken for the licensed GroupLens
    files (which must not enter the repository); here they get their official names back.
    """
    root = tmp_path_factory.mktemp("ml-fixtures")
    for name in ("ml-100k-mini", "ml-media-mini"):
        for path in (FIXTURES / name).rglob("*.fixture"):
            target = root / name / path.relative_to(FIXTURES / name).with_suffix("")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return root / "ml-100k-mini", root / "ml-media-mini"


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


@pytest.fixture(scope="module")
def movielens(tmp_path_factory: pytest.TempPathFactory, ml_dirs) -> tuple[ImportSummary, object]:
    out = tmp_path_factory.mktemp("ml")
    summary = import_movielens(ml_dirs[0], out, media=ml_dirs[1])
    return summary, read_dataset(out)


def _items(dataset) -> pd.DataFrame:
    return dataset.items.set_index("item_id")


# --- MovieLens ------------------------------------------------------------------------------------------


def test_movielens_counts(movielens) -> None:
    summary, data = movielens
    assert (summary.events, summary.users, summary.items, summary.items_with_image) == (17, 5, 8, 3)
    assert len(data.events) == 17 and len(data.items) == 8 and len(data.users) == 5
    assert set(data.events["item_id"]) <= set(data.items["item_id"])


def test_movielens_events(movielens) -> None:
    _, data = movielens
    events = data.events
    assert list(events.columns) == ["user_id", "item_id", "behavior", "ts", "rating"]
    assert "label" not in events.columns  # labels come from the DIN protocol, not from ratings
    assert set(events["behavior"]) == {"rating"}
    assert events["ts"].is_monotonic_increasing
    first = events.iloc[0]
    assert (first["user_id"], first["item_id"], first["rating"]) == ("1", "1", 5)
    assert first["ts"] == utc("1997-09-20 10:00")
    assert pd.api.types.is_integer_dtype(events["rating"])


def test_movielens_items_text_and_categories(movielens) -> None:
    _, data = movielens
    items = _items(data)
    assert items.loc["4", "title"] == "Café au lait (1994) Une comédie sur Lola, enceinte."  # latin-1 decoded
    assert items.loc["1", "category_id"] == "Animation|Children's|Comedy"  # u.genre order and names
    assert items.loc["2", "category_id"] == "Action|Adventure|Thriller"
    assert items.loc["7", "category_id"] == "unknown"
    assert items.loc["1", "title"] == "Toy Story (1995) Led by Woody, Andy's toys live happily in his room."
    assert items["brand_id"].isna().all() and items["shop_id"].isna().all()


def test_movielens_tmdb_duplicates_and_gaps(movielens) -> None:
    _, data = movielens
    items = _items(data)
    # id 2 appears twice; the row with an overview wins over the earlier empty one (runtime 999).
    assert items.loc["2", "title"].startswith("GoldenEye (1995) James Bond")
    assert items.loc["2", "title"].endswith(" the head of the Janus Syndicate.")
    assert items.loc["2", "runtime"] == 130.0
    # id 6 appears twice, both with overviews: the first row wins.
    assert items.loc["6", "title"].endswith("In 1930s Shanghai a boy becomes the servant of a singer.")
    assert items.loc["6", "runtime"] == 108.0
    # id 3 has only an empty overview: the title stays as it is.
    assert items.loc["3", "title"] == "Four Rooms (1995)"
    assert items.loc["3", "runtime"] == 98.0
    # id 5 has no TMDB row at all but is still imported.
    assert items.loc["5", "title"] == "Get Shorty (1995)"
    assert np.isnan(items.loc["5", "runtime"]) and items.loc["5", "release_year"] == 1995.0
    # Missing and zero runtimes are unknown, not zero.
    assert np.isnan(items.loc["4", "runtime"]) and np.isnan(items.loc["8", "runtime"])
    # The "unknown" movie has no release date anywhere.
    assert np.isnan(items.loc["7", "release_year"])
    assert items.loc["4", "release_year"] == 1994.0


def test_movielens_no_future_vote_statistics(movielens) -> None:
    _, data = movielens
    assert not [c for c in data.items.columns if "vote" in c]
    stat_columns = [c for c in data.items.columns if pd.api.types.is_numeric_dtype(data.items[c])]
    assert stat_columns == ["release_year", "runtime"]


def test_movielens_posters_are_absolute_existing_paths(movielens) -> None:
    summary, data = movielens
    items = _items(data)
    with_image = items["image_uri"].dropna()
    assert sorted(with_image.index) == ["1", "2", "4"]
    for uri in with_image:
        path = Path(uri)
        assert path.is_absolute() and path.is_file()
        assert resolve_image_uri(summary.out, uri) == path
    assert items.loc["3", "image_uri"] is None


def test_movielens_first_seen_is_first_event(movielens) -> None:
    _, data = movielens
    items = _items(data)
    assert items.loc["1", "first_seen"] == utc("1997-09-20 10:00")
    assert items.loc["8", "first_seen"] == utc("1998-02-14 19:30")
    expected = data.events.groupby("item_id")["ts"].min()
    pd.testing.assert_series_equal(items["first_seen"].sort_index(), expected.sort_index(), check_names=False)


def test_movielens_users(movielens) -> None:
    _, data = movielens
    users = data.users.set_index("user_id")
    assert list(users.columns) == ["age", "gender", "occupation", "zip"]
    assert users.loc["2"].tolist() == [53, "F", "other", "94043"]
    assert users.loc["5", "zip"] == "V3N4P"  # zip codes are text, not numbers


def test_movielens_item_stats_count_only_earlier_days(movielens) -> None:
    _, data = movielens
    stats = data.item_stats
    # Item 1 by hand: two ratings on 1997-09-20, one on 09-21, one on 09-23, one on 1998-04-22.
    item1 = stats[stats["item_id"] == "1"].set_index("ts")["n_events"]
    assert item1.to_dict() == {
        utc("1997-09-21"): 2,
        utc("1997-09-22"): 3,
        utc("1997-09-24"): 4,
        utc("1998-04-23"): 5,
    }
    # As seen by each rating of item 1: never itself, nor anything from its own day.
    item1_events = data.events[data.events["item_id"] == "1"]
    seen = stats_as_of(stats, item1_events)["n_events"].tolist()
    assert seen == [0, 0, 2, 3, 4]
    # In general: every snapshot counts exactly the events strictly before its own day.
    for row in stats.itertuples():
        earlier = data.events[(data.events["item_id"] == row.item_id) & (data.events["ts"] < row.ts)]
        assert row.n_events == len(earlier)


def test_movielens_without_media(tmp_path: Path, ml_dirs) -> None:
    summary = import_movielens(ml_dirs[0], tmp_path)
    items = _items(read_dataset(tmp_path))
    assert summary.items_with_image == 0 and items["image_uri"].isna().all()
    assert items.loc["1", "title"] == "Toy Story (1995)"
    assert items["runtime"].isna().all()


def _copy_ml(tmp_path: Path, ml_dirs) -> Path:
    src = tmp_path / "ml"
    shutil.copytree(ml_dirs[0], src)
    return src


def test_movielens_malformed_line_names_file_and_line(tmp_path: Path, ml_dirs) -> None:
    src = _copy_ml(tmp_path, ml_dirs)
    lines = (src / "u.data").read_text().splitlines(keepends=True)
    lines[2] = "3\t1\t4\n"
    (src / "u.data").write_text("".join(lines))
    with pytest.raises(ValueError, match=r"u\.data:3: expected 4 fields, got 3"):
        import_movielens(src, tmp_path / "out")


def test_movielens_non_integer_id_names_file_and_line(tmp_path: Path, ml_dirs) -> None:
    src = _copy_ml(tmp_path, ml_dirs)
    raw = (src / "u.item").read_bytes().split(b"\n")
    raw[1] = b"x" + raw[1][1:]
    (src / "u.item").write_bytes(b"\n".join(raw))
    with pytest.raises(ValueError, match=r"u\.item:2: field 1 must be an integer"):
        import_movielens(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_movielens_missing_file(tmp_path: Path, ml_dirs) -> None:
    src = _copy_ml(tmp_path, ml_dirs)
    (src / "u.user").unlink()
    with pytest.raises(FileNotFoundError, match=r"u\.user"):
        import_movielens(src, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="media"):
        import_movielens(ml_dirs[0], tmp_path / "out", media=tmp_path / "no-such-media")


# --- Amazon ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta", [META_2014, META_2018], ids=["meta2014-literal", "meta2018-gz"])
def test_amazon_events_and_referential_integrity(tmp_path: Path, meta: Path) -> None:
    summary = import_amazon(REVIEWS, meta, tmp_path)
    data = read_dataset(tmp_path)
    assert (summary.events, summary.users, summary.items, summary.items_with_image) == (8, 4, 4, 0)
    assert data.users is None
    assert list(data.events.columns) == ["user_id", "item_id", "behavior", "ts", "rating"]
    assert set(data.events["behavior"]) == {"review"}
    assert set(data.events["item_id"]) == set(data.items["item_id"])  # every event item exists
    assert "B0NOREVIEW" not in set(data.items["item_id"])  # metadata of unreviewed products is skipped
    assert data.events["ts"].is_monotonic_increasing
    items = _items(data)
    assert items.loc["0000031852", "first_seen"] == pd.Timestamp(1382659200, unit="s", tz="UTC")
    missing = items.loc["B0000ZZZZ1"]  # reviewed but absent from the metadata
    assert missing["category_id"] == "unknown" and missing["title"] is None and missing["image_url"] is None
    # Two reviews of one item on the same day are visible together from the next day on.
    stats = data.item_stats[data.item_stats["item_id"] == "0000031852"]
    assert stats.iloc[0][["ts", "n_events", "n_review"]].tolist() == [utc("2013-10-26"), 2, 2]


def test_amazon_meta_2014_python_literals(tmp_path: Path) -> None:
    import_amazon(REVIEWS, META_2014, tmp_path)
    items = _items(read_dataset(tmp_path))
    tutu = items.loc["0000031852"]
    assert tutu["category_id"] == "Tutus"  # DIN: categories[-1][-1]
    assert (tutu["brand_id"], tutu["price"]) == ("Coxlures", 3.17)
    assert tutu["image_url"] == "http://ecx.images-amazon.com/images/I/51fAmVkTbyL._SY300_.jpg"
    assert tutu["image_uri"] is None  # a URL is never an image_uri
    cream = items.loc["B00004U9V2"]
    assert cream["title"] == "Kid's Crabtree & Evelyn Hand Cream"
    assert (cream["category_id"], cream["brand_id"], cream["price"]) == ("Hand Creams & Lotions", None, 30.0)
    cups = items.loc["B000ABCDEF"]
    assert (cups["category_id"], cups["brand_id"]) == ("Home & Kitchen", None)  # empty brand -> null
    assert cups["title"] == "Café Espresso Cups, Set of 4" and np.isnan(cups["price"])
    assert items["shop_id"].isna().all()


def test_amazon_meta_2018_gz(tmp_path: Path) -> None:
    import_amazon(REVIEWS, META_2018, tmp_path)
    items = _items(read_dataset(tmp_path))
    tutu = items.loc["0000031852"]
    assert (tutu["category_id"], tutu["price"]) == ("Tutus", 3.17)
    assert tutu["image_url"] == "https://images-na.ssl-images-amazon.com/images/I/51fAmVkTbyL.jpg"  # high-res
    cream = items.loc["B00004U9V2"]
    assert (cream["brand_id"], cream["price"]) == ("Crabtree & Evelyn", 1299.0)
    assert cream["image_url"].endswith("41HXGP5FRIL._SS40_.jpg")  # falls back to `image`
    cups = items.loc["B000ABCDEF"]  # empty category list, a price range, a repeated record (first wins)
    assert cups["category_id"] == "unknown" and np.isnan(cups["price"]) and cups["image_url"] is None
    assert cups["title"] == "Café Espresso Cups, Set of 4"


def test_amazon_gzipped_reviews_and_duplicates(tmp_path: Path) -> None:
    lines = REVIEWS.read_bytes().splitlines(keepends=True)
    gz = tmp_path / "reviews_Mini_5.json.gz"
    gz.write_bytes(gzip.compress(b"".join([*lines, lines[0]])))  # plus one exact repeat
    summary = import_amazon(gz, META_2014, tmp_path / "out")
    assert summary.events == 8


def test_amazon_local_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "0000031852.jpg").write_bytes(b"\xff\xd8\xff")
    summary = import_amazon(REVIEWS, META_2014, tmp_path / "out", images=images)
    items = _items(read_dataset(tmp_path / "out"))
    assert summary.items_with_image == 1
    assert Path(items.loc["0000031852", "image_uri"]) == (images / "0000031852.jpg").resolve()
    assert items.drop(index="0000031852")["image_uri"].isna().all()

    # Images inside the dataset directory are referenced relatively, so the directory can move.
    out = tmp_path / "moving"
    (out / "images").mkdir(parents=True)
    shutil.copy(images / "0000031852.jpg", out / "images")
    import_amazon(REVIEWS, META_2014, out, images=out / "images")
    uri = _items(read_dataset(out)).loc["0000031852", "image_uri"]
    assert uri == "images/0000031852.jpg"
    assert resolve_image_uri(out, uri).is_file()


def test_amazon_bad_lines_name_file_and_line(tmp_path: Path) -> None:
    meta = tmp_path / "meta_bad.json"
    meta.write_text(META_2014.read_text() + "__import__('os').system('touch pwned')\n")
    with pytest.raises(ValueError, match=r"meta_bad\.json:5: neither JSON nor a Python dict literal"):
        import_amazon(REVIEWS, meta, tmp_path / "out")
    assert not (Path.cwd() / "pwned").exists() and not (tmp_path / "pwned").exists()

    reviews = tmp_path / "reviews_bad.json"
    reviews.write_text(REVIEWS.read_text() + '{"reviewerID": "A1", "asin": "B1"}\n')
    with pytest.raises(ValueError, match=r"reviews_bad\.json:9: missing required field 'unixReviewTime'"):
        import_amazon(reviews, META_2014, tmp_path / "out")


def test_amazon_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"reviews_None\.json"):
        import_amazon(AMAZON / "reviews_None.json", META_2014, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"meta_None\.json"):
        import_amazon(REVIEWS, AMAZON / "meta_None.json", tmp_path)
