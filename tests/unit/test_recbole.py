"""RecBole atomic files -> canonical tables (marn/data/recbole.py).

The fixture ``tests/fixtures/recbole-mini`` is hand-written in RecBole 1.2's atomic-file format
(tab-separated, ``field:type`` header, space-separated sequences), as its ``Dataset._load_feat`` reads
it and as https://recbole.io/docs/user_guide/data/data_args.html documents the separators. RecBole's
own ml-100k (shipped inside the ``recbole`` wheel under ``recbole/dataset_example/ml-100k``) is
GroupLens data and stays out of the repository; the last test reads it from the pinned wheel, fetched
from the package registry when no local copy is given (see ``_recbole_ml100k``), and skips, saying how to
get it, only where the registry cannot be reached (it fails instead under CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from marn.cli import app
from marn.config import ValidateConfig
from marn.data.recbole import ORDER_ORIGIN, FieldType, import_recbole, read_atomic_file
from marn.data.schema import read_dataset
from marn.validate.dataset import validate_dataset

MINI = Path(__file__).resolve().parents[1] / "fixtures" / "recbole-mini"


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("recbole")
    summary = import_recbole(MINI, "mini", out)
    return summary, read_dataset(out), out


def _copy_mini(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(MINI, src)
    return src


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- the parser ---------------------------------------------------------------------------------------


def test_read_atomic_file_types_and_values() -> None:
    item = read_atomic_file(MINI / "mini.item", required=("item_id",), key="item_id")
    assert item.types == {
        "item_id": FieldType.TOKEN,
        "movie_title": FieldType.TOKEN_SEQ,
        "price": FieldType.FLOAT,
        "class": FieldType.TOKEN_SEQ,
        "vec": FieldType.FLOAT_SEQ,
    }
    assert item.columns["item_id"] == ["i1", "i2", "i3", "i4"]
    assert item.columns["price"][0] == 12.5 and np.isnan(item.columns["price"][1])  # empty float: missing
    assert item.columns["vec"][3] == [0.7, 0.8]
    assert item.lines == [2, 3, 4, 5]


def test_blank_lines_skipped_crlf_and_bom(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.inter", "\ufeffuser_id:token\titem_id:token\r\nu1\ti1\r\n\r\nu2\ti2\r\n")
    parsed = read_atomic_file(path, required=("user_id", "item_id"))
    assert parsed.columns["item_id"] == ["i1", "i2"] and parsed.lines == [2, 4]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("user_id:token\titem_id:int\nu1\t1\n", r"x\.inter:1: field 'item_id' has unknown type 'int'"),
        ("user_id:token\titem_id\nu1\t1\n", r"x\.inter:1: header entry 'item_id' is not field:type"),
        ("user_id:token\trating:float\nu1\t1\n", r"x\.inter:1: missing required field\(s\) \['item_id'\]"),
        ("user_id:token\titem_id:float\nu1\t1\n", r"x\.inter:1: field 'item_id' must be token"),
        ("user_id:token\tuser_id:token\titem_id:token\n", r"x\.inter:1: field 'user_id' appears twice"),
        ("user_id:token\titem_id:token\nu1\ti1\nu2\n", r"x\.inter:3: expected 2 tab-separated fields"),
        ("user_id:token\titem_id:token\nu1\ti1\textra\n", r"x\.inter:2: expected 2 .* got 3"),
        ("user_id:token\titem_id:token\trating:float\nu1\ti1\tfour\n", r"x\.inter:2: field 'rating': 'four'"),
        ("user_id:token\titem_id:token\trating:float\nu1\ti1\tinf\n", r"x\.inter:2: .* not a finite number"),
        ("user_id:token\titem_id:token\tv:float_seq\nu1\ti1\t1 x\n", r"x\.inter:2: field 'v': 'x'"),
        ("", r"x\.inter:1: empty file"),
        ("user_id:token\titem_id:token\nu1\ti1\n\ti2\n", r"x\.inter:3: field 'user_id' is empty"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path / "x.inter", text)
    with pytest.raises(ValueError, match=message):
        read_atomic_file(path, required=("user_id", "item_id"))


def test_not_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "x.item"
    path.write_bytes(b"item_id:token\ttitle:token_seq\ni1\tok\ni2\tcaf\xe9\n")
    with pytest.raises(ValueError, match=r"x\.item:3: not UTF-8"):
        read_atomic_file(path, required=("item_id",))


def test_repeated_key_names_both_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.item", "item_id:token\ni1\ni2\ni1\n")
    with pytest.raises(ValueError, match=r"x\.item:4: item_id 'i1' repeats line 2"):
        read_atomic_file(path, required=("item_id",), key="item_id")


# --- the import ---------------------------------------------------------------------------------------


def test_events_from_timestamps(mini) -> None:
    summary, dataset, _ = mini
    assert (summary.events, summary.users, summary.items, summary.items_with_image) == (6, 3, 4, 0)
    events = dataset.events
    assert set(events["behavior"]) == {"rating"}  # the file has a rating field
    assert events["ts"].is_monotonic_increasing
    assert events["ts"].iloc[0] == utc("2001-09-09 01:46:40")  # unix 1000000000
    assert events["ts"].iloc[2] == utc("2001-09-09 01:47:40.5")  # fractions kept (microseconds)
    # equal times keep file order: u3 rated i2 before i1 in the file
    last = events.iloc[-2:]
    assert list(last["item_id"]) == ["i2", "i1"] and last["ts"].nunique() == 1
    assert events["rating"].dtype == np.float64 and events["rating"].sum() == 20


def test_items_mapping(mini) -> None:
    _, dataset, _ = mini
    items = dataset.items.set_index("item_id")
    assert items.loc["i1", "category_id"] == "Kitchen|Home"  # token_seq joined as MovieLens genres
    assert items.loc["i3", "category_id"] == "unknown"  # empty category
    assert items.loc["i1", "title"] == "The Red Kettle"
    assert items["image_uri"].isna().all() and items["brand_id"].isna().all()
    assert items.loc["i1", "price"] == 12.5 and np.isnan(items.loc["i2", "price"])
    assert "vec" not in items.columns  # float_seq: no vector column in the contract
    assert items.loc["i2", "first_seen"] == utc("2001-09-09 01:47:40.5")  # its first event
    assert pd.isna(items.loc["i4", "first_seen"])  # catalogued, never bought


def test_users_and_stats(mini) -> None:
    _, dataset, _ = mini
    users = dataset.users.set_index("user_id")
    assert (
        users.loc["u2", "gender"] == "F" and users.loc["u1", "age"] == 24 and np.isnan(users.loc["u3", "age"])
    )
    stats = dataset.item_stats
    # the snapshot stamped 2001-09-10 counts only the three events of 2001-09-09
    day = stats[stats["ts"] == utc("2001-09-10")].set_index("item_id")
    assert day["n_events"].sum() == 3


def test_imported_dataset_validates(mini) -> None:
    _, _, out = mini
    report = validate_dataset(out, ValidateConfig())
    assert report.success, report.to_text()


def test_file_order_becomes_time(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "seq.inter", "user_id:token\titem_id:token\nb\tx\na\ty\nb\ty\na\tx\n")
    _write(src / "seq.item", "item_id:token\ny\n")  # x is missing: it gets an "unknown" row
    summary = import_recbole(src, "seq", tmp_path / "out", order_step=pd.Timedelta(hours=1))
    dataset = read_dataset(tmp_path / "out")
    events = dataset.events
    assert list(events["user_id"] + events["item_id"]) == ["bx", "ay", "by", "ax"]
    assert list(events["ts"]) == [ORDER_ORIGIN + pd.Timedelta(hours=i) for i in range(4)]
    assert set(events["behavior"]) == {"click"}  # no rating field
    assert dataset.users is None and summary.users == 2
    assert dataset.items.set_index("item_id").loc["x", "category_id"] == "unknown"


def test_label_field(tmp_path: Path) -> None:
    src = _copy_mini(tmp_path)
    _write(src / "mini.inter", "user_id:token\titem_id:token\tlabel:float\nu1\ti1\t1\nu2\ti2\t0\n")
    import_recbole(src, "mini", tmp_path / "out")
    assert list(read_dataset(tmp_path / "out").events["label"]) == [1, 0]
    _write(src / "mini.inter", "user_id:token\titem_id:token\tlabel:float\nu1\ti1\t1\nu2\ti2\t0.5\n")
    with pytest.raises(ValueError, match=r"mini\.inter:3: field 'label' must be 0 or 1"):
        import_recbole(src, "mini", tmp_path / "out2")


def test_bad_timestamp_names_line(tmp_path: Path) -> None:
    src = _copy_mini(tmp_path)
    _write(src / "mini.inter", "user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t10\nu1\ti2\t\n")
    with pytest.raises(ValueError, match=r"mini\.inter:3: field 'timestamp' must be unix seconds"):
        import_recbole(src, "mini", tmp_path / "out")
    _write(src / "mini.inter", "user_id:token\titem_id:token\ttimestamp:token\nu1\ti1\t10\n")
    with pytest.raises(ValueError, match=r"mini\.inter:1: field 'timestamp' must be float"):
        import_recbole(src, "mini", tmp_path / "out")


def test_missing_files_and_bad_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"RecBole file not found: .*nope\.inter"):
        import_recbole(MINI, "nope", tmp_path / "out")
    with pytest.raises(ValueError, match="plain file-name stem"):
        import_recbole(MINI, "../mini", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are read


def test_cli_import_and_error(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(
        app, ["data", "import", "recbole", "--src", str(MINI), "--name", "mini", "--out", str(tmp_path / "o")]
    )
    assert ok.exit_code == 0, ok.output
    assert "wrote 6 events, 3 users, 4 items" in ok.output
    src = _copy_mini(tmp_path)
    _write(src / "mini.user", "user_id:token\tage:float\nu1\tx\n")
    bad = runner.invoke(
        app, ["data", "import", "recbole", "--src", str(src), "--name", "mini", "--out", str(tmp_path / "b")]
    )
    assert bad.exit_code == 1
    assert "mini.user:2" in bad.output.replace("\n", "")


WHEEL_FOLDER = "recbole/dataset_example/ml-100k"
RECBOLE_VERSION = "1.2.1"  # the wheel whose ml-100k this test reads
ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
SHARED = Path(os.environ.get("MARN_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared"))


def _recbole_ml100k(tmp_path: Path) -> Path:
    """RecBole's own ml-100k: a folder (MARN_RECBOLE_ML100K) or the files unpacked from the recbole wheel
    (MARN_RECBOLE_WHEEL, else a recbole-*.whl in the shared datasets folder)."""
    folder = os.environ.get("MARN_RECBOLE_ML100K")
    if folder:
        return Path(folder)
    wheels = [Path(os.environ["MARN_RECBOLE_WHEEL"])] if os.environ.get("MARN_RECBOLE_WHEEL") else []
    wheels += sorted((SHARED / "datasets").glob("recbole-*.whl"))
    if not wheels:  # fetch the pinned wheel from the package registry (nothing is installed)
        download = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"),
                *("-d", str(tmp_path / "wheel"), f"recbole=={RECBOLE_VERSION}"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        wheels = sorted((tmp_path / "wheel").glob("recbole-*.whl"))
        if not wheels:
            message = (
                f"RecBole's ml-100k not found and `pip download recbole=={RECBOLE_VERSION}` failed "
                f"({download.stderr.strip()[-300:]}): set MARN_RECBOLE_WHEEL to the wheel (or "
                f"MARN_RECBOLE_ML100K to its unpacked {WHEEL_FOLDER}), or put it in {SHARED / 'datasets'}"
            )
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    out = tmp_path / "ml-100k"
    out.mkdir()
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in ML100K_FILES:
            member = wheel.getinfo(f"{WHEEL_FOLDER}/{name}")
            assert member.file_size < 50_000_000, f"{name}: unexpectedly large ({member.file_size} bytes)"
            (out / name).write_bytes(wheel.read(member))
    return out


@pytest.mark.slow
def test_recbole_ml100k_from_the_wheel(tmp_path: Path) -> None:
    """RecBole's shipped ml-100k imports whole and passes the data gate."""
    summary = import_recbole(_recbole_ml100k(tmp_path), "ml-100k", tmp_path / "out")
    assert (summary.events, summary.users, summary.items) == (100_000, 943, 1682)
    dataset = read_dataset(tmp_path / "out")
    assert set(dataset.events["behavior"]) == {"rating"} and dataset.events["ts"].is_monotonic_increasing
    assert dataset.items.set_index("item_id").loc["1", "category_id"] == "Animation|Children's|Comedy"
    report = validate_dataset(tmp_path / "out", ValidateConfig())
    assert report.success, report.to_text()
