"""benchmarks/deepctr_models.py: DeepCTR-Torch's DIN and DIEN behind our CTRModel interface, trained and
scored by our own fit / predict / save_run on the tiny world."""

from __future__ import annotations

import importlib
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from marn.config import TrainConfig, load_config
from marn.data.tensors import PAD
from marn.train import RunInputs, fit, save_run, seed_everything

if importlib.util.find_spec("deepctr_torch") is None:
    pytest.skip(
        "deepctr_torch is not installed (optional: pip install -c constraints.txt deepctr-torch==0.3.0)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def deepctr():
    from benchmarks import deepctr_models

    return deepctr_models


def _width(tiny_world) -> int:
    return tiny_world.train.tensors["hist_items"].shape[1]


def _build(deepctr, tiny_world, name, init="glorot"):
    torch.manual_seed(0)
    return deepctr.build_deepctr(
        name, tiny_world.catalog, tiny_world.features, tiny_world.model_cfg, _width(tiny_world), init=init
    )


@pytest.fixture
def batch(tiny_world):
    batch = tiny_world.train.batch(torch.arange(48))
    assert (batch["hist_len"] >= 2).any()  # DIEN's auxiliary loss needs (t, t + 1) pairs
    return batch


@pytest.mark.parametrize("name", ["deepctr_din", "deepctr_dien"])
def test_references_give_one_finite_logit_per_sample(deepctr, tiny_world, batch, name):
    assert name in deepctr.REFERENCES
    model = _build(deepctr, tiny_world, name)
    for mode in (model.train(), model.eval()):
        logits = mode(batch).logits
        assert logits.shape == (48,)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("network", ["din_network", "dien_network"])
def test_regression_output_is_the_logit_of_the_binary_output(deepctr, tiny_world, batch, network):
    """What our BCEWithLogits needs: DeepCTR's "regression" task is its "binary" task before the sigmoid."""
    build = getattr(deepctr, network)
    args = (tiny_world.catalog, tiny_world.model_cfg, _width(tiny_world))
    logit, probability = (build(*args, task=task, seed=5).eval() for task in ("regression", "binary"))
    with torch.no_grad():
        for net in (logit, probability):  # move the output bias off 0, where a sigmoid could pass unseen
            net.out.bias.fill_(1.5)
        attributes = torch.as_tensor(tiny_world.catalog.attributes)
        x = deepctr.input_matrix(logit.feature_index, attributes, batch, _width(tiny_world))
        raw = logit(x).squeeze(-1)
        assert torch.allclose(torch.sigmoid(raw), probability(x).squeeze(-1))
        assert (raw > 1.0).all()  # not squashed into (0, 1)


def test_unknown_reference_is_rejected(deepctr, tiny_world):
    with pytest.raises(ValueError, match="deepctr_din, deepctr_dien"):
        _build(deepctr, tiny_world, "deepctr_fm")
    with pytest.raises(ValueError, match="init"):
        _build(deepctr, tiny_world, "deepctr_din", init="xavier")


def test_dense_layers_get_glorot_init_unless_deepctr_init_is_asked(deepctr, tiny_world):
    def largest_dense_weight(model):
        return max(m.weight.abs().max().item() for m in model.net.dnn.linears)

    assert largest_dense_weight(_build(deepctr, tiny_world, "deepctr_din")) > 0.01
    assert largest_dense_weight(_build(deepctr, tiny_world, "deepctr_din", init="deepctr")) < 0.01  # std 1e-4


@pytest.mark.parametrize("name", ["deepctr_din", "deepctr_dien"])
def test_fit_trains_and_save_run_scores(deepctr, tiny_world, tmp_path, name):
    seed_everything(0)
    model = _build(deepctr, tiny_world, name)
    cfg = TrainConfig(model=name, epochs=2, batch_size=128, seed=0)
    best_state, history = fit(model, tiny_world.train, tiny_world.valid, cfg, show_progress=False)
    assert len(history) == 2
    first, second = history
    # learning: the CTR loss falls and validation ranks clicks above non-clicks (DeepCTR's own init, under
    # our AdaGrad, stays at AUC 0.5 here)
    assert second.train_loss < first.train_loss < math.log(2) + 0.01
    assert max(r.valid["auc"] for r in history) > 0.6
    assert ("aux" in second.aux) == (name == "deepctr_dien")

    inputs = RunInputs(
        tiny_world.catalog,
        tiny_world.features,
        tiny_world.train,
        tiny_world.valid,
        tiny_world.valid,
        tiny_world.item_stats,
    )
    run_cfg = load_config(None, {"train": {"model": name}})
    result = save_run(model, best_state, history, inputs, run_cfg, tmp_path, started=0.0)
    assert 0.0 <= result.metrics["auc"] <= 1.0
    assert "recall" in result.metrics["unseen_recall"]
    assert result.checkpoint.is_file()


def test_dien_aux_loss_in_training_only_with_fresh_negatives(deepctr, tiny_world, batch):
    model = _build(deepctr, tiny_world, "deepctr_dien").train()
    start, end = model.net.feature_index["neg_hist_item_id"]
    fed = []  # the negative-history columns of each input matrix DeepCTR's DIEN receives
    model.net.register_forward_pre_hook(lambda net, args: fed.append(args[0][:, start:end].clone()))
    a, b = model(batch), model(batch)
    for out in (a, b):
        assert out.aux_loss is not None and out.aux_loss.shape == ()
        assert torch.isfinite(out.aux_loss) and out.aux_loss > 0 and out.aux_loss.requires_grad
        assert torch.equal(out.aux["aux"], out.aux_loss.detach())  # alpha = 1
    assert (fed[0] > 0).any() and not torch.equal(fed[0], fed[1])  # new negatives each forward
    assert torch.equal(a.logits, b.logits)  # negatives feed the auxiliary loss only
    a.aux_loss.backward()
    aux_net = model.net.interest_extractor.auxiliary_net
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in aux_net.parameters())

    model.eval()
    out = model(batch)
    assert out.aux_loss is None and out.aux == {}
    assert torch.allclose(out.logits, a.logits)
    assert (fed[2] == PAD).all()  # none drawn for inference


def test_negatives_are_real_items_at_real_positions_only(deepctr, tiny_world, batch):
    model = _build(deepctr, tiny_world, "deepctr_dien")
    negatives = model.sample_negatives(batch["hist_len"])  # (B, L)
    real = torch.arange(_width(tiny_world))[None, :] < batch["hist_len"][:, None]
    assert negatives.shape == real.shape
    assert (negatives[~real] == PAD).all()
    assert ((negatives[real] >= 1) & (negatives[real] <= len(tiny_world.catalog.items) - 1)).all()

    index = model.net.feature_index
    x = deepctr.input_matrix(index, model.item_attributes, batch, _width(tiny_world), negatives)
    start, end = index["neg_hist_item_id"]
    assert torch.equal(x[:, start:end].long(), negatives)
    start, end = index["neg_hist_shop"]
    assert torch.equal(x[:, start:end].long(), model.item_attributes[negatives, 2])


@pytest.mark.parametrize("name", ["deepctr_din", "deepctr_dien"])
def test_narrower_history_is_padded_and_wider_rejected(deepctr, tiny_world, batch, name):
    model = _build(deepctr, tiny_world, name).eval()
    narrow = {**batch, "hist_items": batch["hist_items"][:, :5], "hist_len": batch["hist_len"].clamp(max=5)}
    padded = {**narrow, "hist_items": F.pad(narrow["hist_items"], (0, _width(tiny_world) - 5), value=PAD)}
    with torch.no_grad():
        assert torch.equal(model(narrow).logits, model(padded).logits)
    wide = {**batch, "hist_items": F.pad(batch["hist_items"], (0, 1), value=PAD)}
    with pytest.raises(ValueError, match="max_history"):
        model(wide)


def test_dien_scores_a_batch_without_any_history(deepctr, tiny_world, batch):
    """DeepCTR's DIEN itself fails on it; the adapter's dummy row must not change the other rows."""
    model = _build(deepctr, tiny_world, "deepctr_dien").eval()
    empty = {**batch, "hist_items": torch.zeros_like(batch["hist_items"]), "hist_len": batch["hist_len"] * 0}
    mixed = {k: torch.cat([batch[k][:1], empty[k][1:]]) for k in batch}
    with torch.no_grad():
        alone, beside = model(empty).logits, model(mixed).logits
    assert alone.shape == (48,) and torch.isfinite(alone).all()
    assert torch.allclose(alone[1:], beside[1:])
    model.train()
    out = model(empty)
    assert torch.isfinite(out.logits).all() and out.aux_loss == 0
