"""benchmarks/work_claim.py: a benchmark's WORK directory is claimed for one config and one dataset, and a
run with other settings into it is refused instead of being paired with the old runs."""

from __future__ import annotations

import json

import pytest
from conftest import write_posters  # tests/ is on sys.path

from benchmarks import courier, flip
from benchmarks.work_claim import CLAIM, MAX_LINES, claim_work, data_fingerprint, work_settings
from marn.config import load_config
from marn.data.files import content_hash
from marn.data.schema import COURIER_EMBEDDINGS, Dataset, read_dataset
from marn.data.synth import synthesize


def _listed(message: str) -> list[str]:
    """The refusal's list of differences, one per line."""
    return [line.strip() for line in message.splitlines() if line.startswith("  ")]


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "events.parquet").write_bytes(b"events v1")
    (root / "items.parquet").write_bytes(b"items")
    (root / "images").mkdir()  # not a file directly inside: not fingerprinted
    (root / "images" / "1.jpg").write_bytes(b"poster")
    return root


def test_the_fingerprint_holds_each_files_size_and_sha256_in_name_order(data):
    (data / ".events.parquet.1234.tmp").write_bytes(b"half written")  # an atomic writer's temporary file
    fingerprint = data_fingerprint(data)
    assert list(fingerprint) == ["events.parquet", "items.parquet"]
    assert fingerprint["events.parquet"] == {"size": 9, "sha256": content_hash(data / "events.parquet")}
    assert list(data_fingerprint(data, exclude=["items.parquet"])) == ["events.parquet"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data_fingerprint(data / "missing")


def test_the_same_settings_claim_work_once_and_pass_again(data, tmp_path):
    work = tmp_path / "work"
    settings = work_settings("courier", load_config(None), data)
    claim_work(work, settings)
    claimed = json.loads((work / CLAIM).read_text())
    assert claimed["harness"] == "courier" and claimed["data"] == data_fingerprint(data)
    assert claimed["config"]["model"]["rep_dim"] == 256
    stamp = (work / CLAIM).stat().st_mtime_ns
    claim_work(work, work_settings("courier", load_config(None), data))  # a resumed or parallel run
    assert (work / CLAIM).stat().st_mtime_ns == stamp
    assert sorted(p.name for p in work.iterdir()) == [CLAIM]  # no temporary file left


def test_a_changed_config_value_is_refused_naming_its_key_path_and_how_to_proceed(data, tmp_path):
    work = tmp_path / "work"
    claim_work(work, work_settings("courier", load_config(None, {"model": {"rep_dim": 64}}), data))
    changed = work_settings("courier", load_config(None, {"model": {"rep_dim": 256}}), data)
    with pytest.raises(ValueError) as refused:
        claim_work(work, changed)
    message = str(refused.value)
    assert "config.model.rep_dim: 64 -> 256" in message
    assert "another --work" in message and f"delete {work / CLAIM}" in message
    assert _listed(message) == ["config.model.rep_dim: 64 -> 256"]  # only what differs
    (work / CLAIM).unlink()  # the documented way to let the runs there count: the next run claims WORK
    claim_work(work, changed)
    claim_work(work, changed)


def test_a_changed_data_file_or_harness_is_refused(data, tmp_path):
    work = tmp_path / "work"
    cfg = load_config(None)
    claim_work(work, work_settings("courier", cfg, data))
    (data / "events.parquet").write_bytes(b"events v2")  # same size, other bytes
    with pytest.raises(ValueError, match=r"data\.events\.parquet\.sha256: \"[0-9a-f]+\" -> \"[0-9a-f]+\""):
        claim_work(work, work_settings("courier", cfg, data))
    (data / "events.parquet").write_bytes(b"events v1")
    (data / "users.parquet").write_bytes(b"users")
    with pytest.raises(ValueError, match=r"data\.users\.parquet\.size: \(absent\) -> 5"):
        claim_work(work, work_settings("courier", cfg, data))
    (data / "users.parquet").unlink()
    claim_work(work, work_settings("courier", cfg, data))  # back as claimed
    with pytest.raises(ValueError, match='harness: "courier" -> "flip"'):
        claim_work(work, work_settings("flip", cfg, data))


def test_many_differences_are_cut_to_a_readable_list(tmp_path):
    claim_work(tmp_path, {"config": {f"k{i:02d}": i for i in range(30)}})
    with pytest.raises(ValueError) as refused:
        claim_work(tmp_path, {"config": {f"k{i:02d}": i + 1 for i in range(30)}})
    message = str(refused.value)
    assert _listed(message) == [f"config.k{i:02d}: {i} -> {i + 1}" for i in range(MAX_LINES)] + [
        "... and 10 more"
    ]


def test_an_unreadable_claim_is_refused(tmp_path):
    (tmp_path / CLAIM).write_text("{half")
    with pytest.raises(ValueError, match=r"cannot be read.*delete it"):
        claim_work(tmp_path, {"harness": "flip"})


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("claim-world")
    cfg = load_config(None, {"synth": {"users": 40, "items": 20, "events_per_user": 6, "seed": 5}})
    synthesize(root, cfg.synth)
    write_posters(root, read_dataset(root))
    return root


def test_the_courier_harness_claims_work_and_refuses_another_config(small_world, tmp_path):
    work = tmp_path / "work"
    cfg = load_config(None, {"embed": {"courier": {"dim": 8}}})
    assert courier.run_arms(small_world, cfg, work, [1], [], []) == {}  # no arm: the claim alone
    assert json.loads((work / CLAIM).read_text())["harness"] == "courier"
    assert courier.run_arms(small_world, cfg, work, [1, 2], [], []) == {}  # more seeds: the same claim
    (small_world / COURIER_EMBEDDINGS).write_bytes(b"DATA's own table")  # never read by the harness
    try:
        assert courier.run_arms(small_world, cfg, work, [1], [], []) == {}
    finally:
        (small_world / COURIER_EMBEDDINGS).unlink()
    other = cfg.with_overrides({"embed.courier.dim": 16})
    with pytest.raises(ValueError, match=r"config\.embed\.courier\.dim: 8 -> 16"):
        courier.run_arms(small_world, other, work, [1], ["imagenet_pca"], ["din"])


def test_the_flip_harness_claims_work_and_refuses_other_data(small_world, tmp_path):
    work = tmp_path / "work"
    cfg = load_config(None)
    dataset = read_dataset(small_world)
    assert flip.run_arms(dataset, cfg, work, [1], []) == {}
    assert json.loads((work / CLAIM).read_text())["harness"] == "flip"
    assert flip.run_arms(dataset, cfg, work, [1, 2], []) == {}
    other = tmp_path / "other"
    synthesize(other, load_config(None, {"synth": {"users": 40, "items": 20, "seed": 6}}).synth)
    with pytest.raises(ValueError, match=r"data\.events\.parquet\.sha256"):
        flip.run_arms(read_dataset(other), cfg, work, [1], ["random_init"])
    with pytest.raises(ValueError, match=r"Dataset\.root is None"):
        flip.run_arms(Dataset(dataset.events, dataset.items), cfg, tmp_path / "fresh", [1], [])
