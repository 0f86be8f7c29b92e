"""The KFP pipeline run end to end by the KFP local runner (``marn pipeline run --local``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from marn.config import SynthConfig
from marn.data.synth import synthesize

pytestmark = pytest.mark.slow

MARN = Path(sys.executable).with_name("marn")


def marn(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "COLUMNS": "200"}
    return subprocess.run([str(MARN), *args], capture_output=True, text=True, env=env, timeout=900)


def _config(tmp_path: Path, extra: dict | None = None) -> Path:
    cfg = {"paths": {"work_dir": str(tmp_path / "work")}, **(extra or {})}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_poisoned_data_stops_the_pipeline_at_validation_with_the_report(tmp_path):
    data = tmp_path / "data"
    synthesize(data, SynthConfig(users=30, items=40, image_size=8))
    events = pd.read_parquet(data / "events.parquet")
    events.loc[events.index[:3], "user_id"] = None
    events.loc[events.index[3:5], "ts"] = pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=30)
    pq.write_table(pa.Table.from_pandas(events, preserve_index=False), data / "events.parquet")

    result = marn("pipeline", "run", "--local", "--data", str(data), "--config", str(_config(tmp_path)))

    assert result.returncode == 1, result.stdout + result.stderr
    runs = list((tmp_path / "work" / "kfp").glob("marn-ctr-*"))
    assert len(runs) == 1
    report = runs[0] / "validate" / "report"
    assert report.exists(), "the validation report is kept as the failed task's artifact"
    html = report.read_text()
    assert "FAILED" in html
    assert "expect_column_values_to_not_be_null" in html and "user_id" in html  # the null users
    assert "expect_column_values_to_be_between" in html  # the future timestamps
    assert sorted(p.name for p in runs[0].iterdir()) == ["validate"], "no stage after validate ran"
    assert str(report) in result.stderr.replace("\n", "")
    assert not (tmp_path / "work" / "registry").exists()
