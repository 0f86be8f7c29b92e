"""FM, YoutubeNet, xDeepFM and DIN: shapes, empty histories, and the mechanism that defines each model."""

import itertools

import pytest
import torch

from marn.models.din import DIN, Dice
from marn.models.fm import FM
from marn.models.xdeepfm import CIN, XDeepFM
from marn.models.youtubenet import YoutubeNet

MODELS = {"fm": FM, "youtubenet": YoutubeNet, "xdeepfm": XDeepFM, "din": DIN}


def _build(cls, world, **options):
    torch.manual_seed(0)
    return cls(world.catalog, world.features, world.model_cfg, **options)


def _batch(world, n=16):
    batch = world.train.batch(torch.arange(n))
    assert (batch["hist_len"] > 1).any()  # the checks below need real histories to mean anything
    return batch


def _empty_histories(batch):
    batch = dict(batch)
    batch["hist_len"] = torch.zeros_like(batch["hist_len"])
    for key in ("hist_items", "hist_behavior", "hist_gap"):
        batch[key] = torch.zeros_like(batch[key])
    return batch


def _garbage_in_padding(batch, world, extra=3, seed=0):
    """The same samples with 'extra' more columns and random item/behaviour/gap/statistic codes after
    hist_len."""
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    b, length = batch["hist_items"].shape
    padded = ~(torch.arange(length + extra)[None, :] < batch["hist_len"][:, None])  # (B, L + extra)
    for key, high in (
        ("hist_items", world.features.n_items),
        ("hist_behavior", 4),
        ("hist_gap", 24),
        ("hist_stats", min(world.features.statistics.buckets)),
    ):
        tail = torch.zeros(b, extra, *batch[key].shape[2:], dtype=batch[key].dtype)
        wide = torch.cat([batch[key], tail], dim=1)
        noise = torch.randint(1, high, wide.shape, generator=g).to(wide.dtype)
        mask = padded.view(*padded.shape, *[1] * (wide.dim() - 2))
        out[key] = torch.where(mask, noise, wide)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_have_one_score_per_sample(name, tiny_world):
    model = _build(MODELS[name], tiny_world)
    batch = _batch(tiny_world)
    for mode in (model.train, model.eval):
        mode()
        out = model(batch)
        assert out.logits.shape == (16,) and out.aux_loss is None
        assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_empty_histories_give_finite_logits_and_gradients(name, tiny_world):
    model = _build(MODELS[name], tiny_world).train()  # training mode: DIN's Dice uses batch statistics
    batch = _empty_histories(_batch(tiny_world))
    logits = model(batch).logits
    assert logits.shape == (16,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list(MODELS))
def test_padding_does_not_change_logits(name, tiny_world):
    model = _build(MODELS[name], tiny_world).eval()
    batch = _batch(tiny_world)
    with torch.no_grad():
        clean = model(batch).logits
        noisy = model(_garbage_in_padding(batch, tiny_world)).logits
    assert torch.allclose(clean, noisy, atol=1e-5)


# -- FM ------------------------------------------------------------------------------------------------


def test_fm_second_order_equals_the_explicit_pairwise_sum(tiny_world):
    model = _build(FM, tiny_world, factor_dim=5, init_std=1.0)  # large factors: a wrong term shows
    batch = _batch(tiny_world, n=4)
    batch["hist_len"] = torch.tensor([0, 1, 3, int(batch["hist_len"].max())])
    attributes = model.item_attributes
    for b in range(4):
        item = batch["item"][b]
        codes = [item, *attributes[item]]  # item, category, brand, shop
        vectors = [model.factors[j].weight[c] for j, c in enumerate(codes)]  # x_i = 1
        n = int(batch["hist_len"][b])
        for t in range(n):  # each history position: an item and a category feature with x = 1/n
            h = batch["hist_items"][b, t]
            vectors.append(model.factors[4].weight[h] / n)
            vectors.append(model.factors[5].weight[attributes[h, 0]] / n)
        expected = sum(torch.dot(u, v) for u, v in itertools.combinations(vectors, 2))
        got = model.second_order(batch)[b]
        assert torch.allclose(got, torch.as_tensor(expected, dtype=got.dtype), rtol=1e-4, atol=1e-4), b


def test_fm_logit_is_bias_plus_first_order_plus_second_order(tiny_world):
    model = _build(FM, tiny_world)
    torch.nn.init.normal_(model.weights[0].weight)  # candidate-item weights
    torch.nn.init.normal_(model.weights[4].weight)  # history-item weights
    batch = _batch(tiny_world)
    b = int(torch.argmax(batch["hist_len"]))
    n = int(batch["hist_len"][b])
    first = (
        model.weights[0].weight[batch["item"][b], 0]
        + model.weights[4].weight[batch["hist_items"][b, :n], 0].mean()
    )
    with torch.no_grad():
        got = model(batch).logits[b] - model.second_order(batch)[b] - model.bias
    assert torch.allclose(got, first.detach(), atol=1e-5)


# -- YoutubeNet ---------------------------------------------------------------------------------------


def test_youtubenet_ignores_the_order_of_the_history(tiny_world):
    model = _build(YoutubeNet, tiny_world).eval()
    batch = _batch(tiny_world)
    shuffled = {k: v.clone() for k, v in batch.items()}
    g = torch.Generator().manual_seed(1)
    for b, n in enumerate(batch["hist_len"].tolist()):
        order = torch.randperm(n, generator=g)
        for key in ("hist_items", "hist_behavior", "hist_gap"):
            shuffled[key][b, :n] = batch[key][b, :n][order]
    assert not torch.equal(shuffled["hist_items"], batch["hist_items"])
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, model(shuffled).logits, atol=1e-5)


def test_youtubenet_depends_on_the_history(tiny_world):
    model = _build(YoutubeNet, tiny_world).eval()
    batch = _batch(tiny_world)
    with torch.no_grad():
        assert not torch.allclose(model(batch).logits, model(_empty_histories(batch)).logits)


# -- xDeepFM ------------------------------------------------------------------------------------------


def test_cin_output_width_follows_split_half():
    x0 = torch.randn(3, 9, 10)  # (B, F, E)
    assert CIN(9, (100, 100), split_half=True)(x0).shape == (3, 50 + 100)
    assert CIN(9, (100, 100), split_half=False)(x0).shape == (3, 200)
    assert CIN(9, (8, 6, 4), split_half=True)(x0).shape == (3, 4 + 3 + 4)
    with pytest.raises(ValueError, match="even"):
        CIN(9, (7, 4), split_half=True)


def test_cin_first_layer_is_the_papers_formula():
    torch.manual_seed(0)
    cin = CIN(3, (4,), split_half=False)
    x0 = torch.randn(2, 3, 5)  # (B, F, E)
    weight = cin.convs[0].weight.view(4, 3, 3)  # W^{1,h}_{ij}
    bias = cin.convs[0].bias
    x1 = torch.zeros(2, 4, 5)
    for h, i, j in itertools.product(range(4), range(3), range(3)):
        x1[:, h] += weight[h, i, j] * x0[:, i] * x0[:, j]
    x1 += bias[None, :, None]
    assert torch.allclose(cin(x0), x1.sum(dim=2), atol=1e-5)  # sum pooling over E


def test_xdeepfm_fields_and_cin_shapes(tiny_world):
    model = _build(XDeepFM, tiny_world, field_dim=6, cin_layer_sizes=(10, 8))
    batch = _batch(tiny_world)
    raw, x0 = model.fields(batch)
    m, d = model.embedding.n_modalities, model.embedding.dim
    assert x0.shape == (16, 2 * m + 1, 6)  # candidate modalities, history modalities, behaviour property
    assert raw.shape == (16, 2 * m * d + model.behavior.dim)
    assert model.cin(x0).shape == (16, 5 + 8)
    with pytest.raises(ValueError, match="field_dim"):
        _build(XDeepFM, tiny_world, field_dim=0)


# -- DIN ----------------------------------------------------------------------------------------------


def test_din_attention_is_zero_on_padding_and_not_normalised(tiny_world):
    model = _build(DIN, tiny_world).eval()
    batch = _garbage_in_padding(_batch(tiny_world), tiny_world)
    with torch.no_grad():
        weights = model.attention_weights(batch)  # (B, L)
    real = torch.arange(weights.shape[1])[None, :] < batch["hist_len"][:, None]
    assert torch.all(weights[~real] == 0)
    assert torch.count_nonzero(weights[real]) == real.sum()
    sums = weights.sum(dim=1)[batch["hist_len"] > 1]
    assert not torch.allclose(sums, torch.ones_like(sums))  # raw weights, no softmax


def test_din_on_ids_only(tiny_world):
    model = _build(DIN, tiny_world, modalities=("ids",), behavior=False).eval()
    assert model.embedding.modalities == ("ids",) and not hasattr(model.embedding, "title_cnn")
    assert not hasattr(model, "behavior")
    batch = _batch(tiny_world)
    with torch.no_grad():
        logits = model(batch).logits
    assert logits.shape == (16,) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="modalities"):
        _build(DIN, tiny_world, modalities=("ids", "audio"))


def test_din_behaviour_property_reaches_the_logits(tiny_world):
    model = _build(DIN, tiny_world).eval()
    batch = _batch(tiny_world)
    other = dict(batch)
    other["hist_behavior"] = torch.where(batch["hist_behavior"] > 0, batch["hist_behavior"] % 5 + 1, 0)
    with torch.no_grad():
        assert not torch.allclose(model(batch).logits, model(other).logits)


@pytest.mark.parametrize("activation", ["dice", "prelu", "relu"])
def test_din_prediction_activation(activation, tiny_world):
    model = _build(DIN, tiny_world, activation=activation)
    kinds = {type(layer).__name__ for layer in model.predict}
    assert {"dice": "Dice", "prelu": "PReLU", "relu": "ReLU"}[activation] in kinds
    assert model(_batch(tiny_world)).logits.shape == (16,)


def test_din_trains_on_a_one_row_batch(tiny_world):
    model = _build(DIN, tiny_world).train()  # batch statistics of one row: an epoch's last batch can be one
    logits = model(tiny_world.train.batch(torch.arange(1))).logits
    assert logits.shape == (1,) and torch.isfinite(logits).all()


def test_din_rejects_an_unknown_activation(tiny_world):
    with pytest.raises(ValueError, match="activation"):
        _build(DIN, tiny_world, activation="sigmoid")


def test_dice_follows_the_formula_with_batch_statistics_in_training_and_running_ones_in_eval():
    torch.manual_seed(0)
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.0, 0.5, -1.0]))
    s = torch.randn(64, 3) * 2 + 1
    p = torch.sigmoid((s - s.mean(0)) / torch.sqrt(s.var(0, unbiased=False) + 1e-8))
    assert torch.allclose(dice.train()(s), p * s + (1 - p) * dice.alpha * s, atol=1e-6)
    assert torch.allclose(dice.running_mean, 0.1 * s.mean(0), atol=1e-6)
    # Eval: each row is transformed alone, with the running statistics, whatever the rest of the batch.
    dice.eval()
    alone = torch.cat([dice(s[i : i + 1]) for i in range(4)])
    assert torch.allclose(alone, dice(s)[:4], atol=1e-6)
    p_eval = torch.sigmoid((s - dice.running_mean) / torch.sqrt(dice.running_var + 1e-8))
    assert torch.allclose(dice(s), p_eval * s + (1 - p_eval) * dice.alpha * s, atol=1e-6)
    # Training on a single row: variance 0, p = 1/2, still finite.
    assert torch.isfinite(dice.train()(s[:1])).all()
