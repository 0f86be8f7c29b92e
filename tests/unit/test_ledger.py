"""benchmarks/ledger.py: what a benchmark keeps in the repository, and the refusal to mix data."""

from __future__ import annotations

import json

import pytest

from benchmarks import courier, flip, ledger
from benchmarks.paper import LEDGER as PAPER


def _data(root, events=b"events v1"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "events.parquet").write_bytes(events)
    (root / "image_embeddings.parquet").write_bytes(b"vectors")
    return root


def _finished(work, experiment, row, seed, auc=0.8):
    run = work / experiment / row / f"seed-{seed}"
    run.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "curves.json", "resume.pt"):
        (run / name).write_bytes(name.encode())
    (run / "metrics.json").write_text(json.dumps({"auc": auc}))
    return run


def _work(tmp_path):
    work = tmp_path / "work"
    _finished(work, "runs", "marn", 1)
    _finished(work, "runs", "din", 1)
    _finished(work, "cold", "marn", 2)
    half = work / "runs" / "marn" / "seed-2"  # stopped half way: no metrics.json
    half.mkdir(parents=True)
    (half / "resume.pt").write_bytes(b"state")
    (work / "tune" / "marn").mkdir(parents=True)
    (work / "tune" / "marn" / "tune.json").write_text('{"best": {"lambda0": 0.9}}')
    (work / "tune" / "marn" / "ray").mkdir()
    (work / "tune" / "marn" / "ray" / "trial.json").write_text("{}")
    (work / "timing.json").write_text('{"runs": 10.0}')
    return work


def test_the_ledger_keeps_finished_runs_searches_and_one_runs_figure_files(tmp_path):
    work, data, book = _work(tmp_path), _data(tmp_path / "data"), tmp_path / "ledger"
    ledger.save(PAPER, work, book, data)
    kept = {str(p.relative_to(book)) for p in book.rglob("*") if p.is_file()}
    assert kept == {
        "ledger.json",
        "timing.json",
        "tune/marn/tune.json",
        "runs/marn/seed-1/metrics.json",
        "runs/marn/seed-1/model.pt",  # Figures 4-6 read MARN seed 1's weights and losses
        "runs/marn/seed-1/curves.json",
        "runs/din/seed-1/metrics.json",
        "cold/marn/seed-2/metrics.json",
    }
    assert json.loads((book / "ledger.json").read_text())["finished_runs"] == 3


def test_another_machine_restores_what_the_first_one_finished(tmp_path):
    work, data, book = _work(tmp_path), _data(tmp_path / "data"), tmp_path / "ledger"
    ledger.save(PAPER, work, book, data)
    fresh = tmp_path / "fresh"
    restored = ledger.restore(PAPER, book, fresh, data)
    assert {str(p) for p in restored} == {
        str(p.relative_to(book)) for p in book.rglob("*") if p.is_file() and p.name != "ledger.json"
    }
    assert (fresh / "runs" / "din" / "seed-1" / "metrics.json").read_text() == '{"auc": 0.8}'
    assert not (fresh / "runs" / "marn" / "seed-2").exists()  # the half-done run starts over


def test_save_copies_only_what_changed_and_restore_never_replaces_work(tmp_path):
    work, data, book = _work(tmp_path), _data(tmp_path / "data"), tmp_path / "ledger"
    ledger.save(PAPER, work, book, data)
    assert ledger.save(PAPER, work, book, data) == []
    (work / "timing.json").write_text('{"runs": 70.0}')
    _finished(work, "runs", "lr", 3)
    assert {str(p) for p in ledger.save(PAPER, work, book, data)} == {
        "timing.json",
        "runs/lr/seed-3/metrics.json",
    }
    (work / "timing.json").write_text('{"runs": 99.0}')  # WORK is newer than the ledger
    assert ledger.restore(PAPER, book, work, data) == []
    assert (work / "timing.json").read_text() == '{"runs": 99.0}'


def test_a_ledger_made_from_other_data_is_refused_both_ways(tmp_path):
    work, book = _work(tmp_path), tmp_path / "ledger"
    ledger.save(PAPER, work, book, _data(tmp_path / "data"))
    other = _data(tmp_path / "other", events=b"events v2")
    with pytest.raises(ValueError, match=r"other data.*events\.parquet"):
        ledger.restore(PAPER, book, tmp_path / "fresh", other)
    with pytest.raises(ValueError, match=r"other data.*events\.parquet"):
        ledger.save(PAPER, work, book, other)
    assert not (tmp_path / "fresh").exists()


def test_no_ledger_yet_restores_nothing(tmp_path):
    assert ledger.restore(PAPER, tmp_path / "none", tmp_path / "work", _data(tmp_path / "data")) == []


def test_a_courier_heads_table_is_kept_only_once_its_metrics_are_written(tmp_path):
    work, data, book = tmp_path / "work", _data(tmp_path / "data"), tmp_path / "ledger"
    (data / "courier_embeddings.parquet").write_bytes(b"the pipeline's own")  # not the benchmark's input
    _finished(work, "marn", "courier", 1)
    (work / "claim.json").write_text("{}")
    for seed, done in ((1, True), (2, False)):
        head = work / "courier" / f"seed-{seed}"
        head.mkdir(parents=True)
        (head / "courier_embeddings.parquet").write_bytes(b"vectors")
        (head / "courier_head.pt").write_bytes(b"weights")
        (head / "events.parquet").symlink_to(data / "events.parquet")  # the data, linked: not kept
        if done:
            (head / "courier_metrics.json").write_text("{}")
    ledger.save(courier.LEDGER, work, book, data)
    kept = {str(p.relative_to(book)) for p in book.rglob("*") if p.is_file()}
    assert kept == {
        "ledger.json",
        "claim.json",
        "marn/courier/seed-1/metrics.json",
        "courier/seed-1/courier_metrics.json",
        "courier/seed-1/courier_embeddings.parquet",
        "courier/seed-1/courier_head.pt",
    }
    assert "courier_embeddings.parquet" not in json.loads((book / "ledger.json").read_text())["data"]


def test_flip_keeps_its_runs_metrics_and_not_the_pretrainings(tmp_path):
    work, data, book = tmp_path / "work", _data(tmp_path / "data"), tmp_path / "ledger"
    run = work / "flip_id" / "seed-3"
    run.mkdir(parents=True)
    (run / "flip_metrics.json").write_text("{}")
    (run / "metrics.json").write_text("{}")
    (work / "pretrained").mkdir()
    (work / "pretrained" / "seed-3-icl-mtm-mlm.pt").write_bytes(b"weights")
    ledger.save(flip.LEDGER, work, book, data)
    kept = {str(p.relative_to(book)) for p in book.rglob("*") if p.is_file()}
    assert kept == {"ledger.json", "flip_id/seed-3/flip_metrics.json"}


def test_attach_restores_now_and_saves_when_called(tmp_path):
    work, data, book = _work(tmp_path), _data(tmp_path / "data"), tmp_path / "ledger"
    ledger.save(PAPER, work, book, data)
    ledger.attach(PAPER, None, tmp_path / "none", data)()  # no ledger: nothing restored or saved
    assert not (tmp_path / "none").exists()
    fresh = tmp_path / "fresh"
    save = ledger.attach(PAPER, book, fresh, data)
    assert (fresh / "runs" / "din" / "seed-1" / "metrics.json").exists()
    _finished(fresh, "runs", "lr", 2)
    save()
    assert (book / "runs" / "lr" / "seed-2" / "metrics.json").exists()
