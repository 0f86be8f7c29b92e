"""``marn models``: one described row per registered model, and the declared modalities are what the built
models read."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from marn.cli import app
from marn.models import build_model, model_names
from marn.models.catalog import ABLATION, BASELINE, MODEL_INFO, REFERENCE, UNDESCRIBED, model_rows
from marn.models.layers import MODALITIES, ItemModalities


def test_every_registered_model_has_a_described_row() -> None:
    rows = {row.name: row for row in model_rows()}
    assert list(rows) == model_names()
    undescribed = [name for name, row in rows.items() if row.summary == UNDESCRIBED]
    assert not undescribed, f"describe {undescribed} in marn/models/catalog.py"
    assert set(MODEL_INFO) == set(model_names()), "catalog entries for models that are not registered"


def test_groups_and_modalities_are_well_formed() -> None:
    groups = {name: info.group for name, info in MODEL_INFO.items()}
    assert {n for n, g in groups.items() if g == ABLATION} == {
        "base_ids", "base_image", "base_conc", "base_maf", "base_maf_adv", "base_maf_ddma",
    }  # fmt: skip
    assert groups["dupn"] == BASELINE and groups["popularity"] == REFERENCE
    for name, info in MODEL_INFO.items():
        assert info.modalities and set(info.modalities) <= set(MODALITIES), name
        assert info.modalities == tuple(m for m in MODALITIES if m in info.modalities), name
        assert "\n" not in info.summary and len(info.summary) <= 110, name


@pytest.mark.parametrize("name", model_names())
def test_declared_modalities_are_what_the_model_reads(name, tiny_world) -> None:
    model = build_model(name, tiny_world.catalog, tiny_world.features, tiny_world.model_cfg)
    embeddings = [m for m in model.modules() if isinstance(m, ItemModalities)]
    if not embeddings:  # LR, FM, popularity: raw ids or statistics without the modality layer
        assert MODEL_INFO[name].modalities in (("ids",), ("stats",)), name
        return
    read = {m for layer in embeddings for m in layer.modalities}
    assert tuple(m for m in MODALITIES if m in read) == MODEL_INFO[name].modalities


def test_cli_prints_the_table() -> None:
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for header in ("name", "paper group", "modalities", "what it is"):
        assert header in result.output
    lines = result.output.splitlines()
    for name in model_names():
        assert any(line.split("│")[1].strip() == name for line in lines if line.count("│") >= 4), name


def test_cli_names_one_a_line() -> None:
    result = CliRunner().invoke(app, ["models", "--names"])
    assert result.exit_code == 0 and result.output.splitlines() == model_names()
