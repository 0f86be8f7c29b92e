"""DUPN and DIEN: the mechanisms that define them (property gates, attention over real behaviours, the
auxiliary loss, AUGRU) and their handling of padding and empty histories."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marn.data.schema import BEHAVIORS
from marn.data.tensors import GAP_BUCKETS
from marn.models.dien import AUGRU, DIEN
from marn.models.dupn import DUPN, PropertyGatedLSTM
from marn.models.layers import sequence_mask

MODELS = {"dupn": DUPN, "dien": DIEN}


def _build(tiny_world, name, **options):
    torch.manual_seed(0)
    return MODELS[name](tiny_world.catalog, tiny_world.features, tiny_world.model_cfg, **options)


@pytest.fixture
def batch(tiny_world):
    batch = tiny_world.train.batch(torch.arange(64))
    lengths = batch["hist_len"]
    assert (lengths >= 2).any() and (lengths < lengths.max()).any()  # real steps and padding to test
    return batch


def _empty(batch):
    history = ("hist_items", "hist_behavior", "hist_gap", "hist_len")
    return {name: torch.zeros_like(t) if name in history else t for name, t in batch.items()}


def _scramble_padding(batch, n_items, extra=3):
    """Random real codes in every padded slot, plus ``extra`` more padding columns on the right."""
    g = torch.Generator().manual_seed(1)
    out = dict(batch)
    pad = ~(torch.arange(batch["hist_items"].shape[1])[None, :] < batch["hist_len"][:, None])
    for name, high in (
        ("hist_items", n_items),
        ("hist_behavior", len(BEHAVIORS) + 1),
        ("hist_gap", GAP_BUCKETS),
    ):
        noise = torch.randint(1, high, batch[name].shape, generator=g)
        out[name] = torch.cat(
            [torch.where(pad, noise, batch[name]), torch.zeros(len(pad), extra, dtype=torch.long)], 1
        )
    return out


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_finite_logits(tiny_world, batch, name):
    model = _build(tiny_world, name)
    for mode in (model.train(), model.eval()):
        out = mode(batch)
        assert out.logits.shape == (64,)
        assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", MODELS)
def test_empty_histories_give_finite_logits_and_losses(tiny_world, batch, name):
    model = _build(tiny_world, name).train()
    empty = _empty(batch)
    out = model(empty)
    assert torch.isfinite(out.logits).all()
    if out.aux_loss is not None:
        assert torch.isfinite(out.aux_loss)
    mixed = {k: torch.cat([empty[k][:8], batch[k][8:16]]) for k in batch}
    out = model(mixed)
    assert torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_padded_positions_do_not_change_the_output(tiny_world, batch, name):
    model = _build(tiny_world, name).train()  # train mode: DIEN's aux loss must not see padding either
    noisy = _scramble_padding(batch, len(tiny_world.catalog.items))
    assert not torch.equal(noisy["hist_items"][:, : batch["hist_items"].shape[1]], batch["hist_items"])
    torch.manual_seed(5)
    clean = model(batch)
    torch.manual_seed(5)
    scrambled = model(noisy)
    assert torch.allclose(clean.logits, scrambled.logits, atol=1e-6)
    if clean.aux_loss is not None:
        assert torch.allclose(clean.aux_loss, scrambled.aux_loss, atol=1e-6)


def test_hist_len_longer_than_the_history_is_rejected(tiny_world, batch):
    bad = {**batch, "hist_len": batch["hist_len"].clone()}
    bad["hist_len"][0] = batch["hist_items"].shape[1] + 1
    for name in MODELS:
        with pytest.raises(ValueError, match="hist_len"):
            _build(tiny_world, name)(bad)


# -- DUPN -------------------------------------------------------------------------------------------------


def test_dupn_gates_read_the_behaviour_property(tiny_world, batch):
    model = _build(tiny_world, "dupn").eval()
    other = {
        **batch,
        "hist_behavior": torch.where(
            batch["hist_behavior"] > 0, len(BEHAVIORS) + 1 - batch["hist_behavior"], 0
        ),
    }
    assert not torch.equal(other["hist_behavior"], batch["hist_behavior"])
    with torch.no_grad():
        _, states, _ = model.perceive(batch)
        _, other_states, _ = model.perceive(other)
        assert not torch.allclose(states, other_states, atol=1e-5)
        assert not torch.allclose(model(batch).logits, model(other).logits, atol=1e-5)
        model.lstm.property.weight.zero_()  # V = 0: the property no longer reaches the LSTM
        _, states, _ = model.perceive(batch)
        _, other_states, _ = model.perceive(other)
    assert torch.equal(states, other_states)


def test_property_never_enters_the_cell_candidate():
    lstm = PropertyGatedLSTM(input_dim=5, property_dim=3, hidden=4)
    assert lstm.property.weight.shape == (3 * 4, 3)  # rows for i, f, o only
    assert lstm.input.weight.shape == (4 * 4, 5)


def test_property_gated_lstm_without_property_is_a_standard_lstm():
    torch.manual_seed(0)
    pg = PropertyGatedLSTM(input_dim=5, property_dim=3, hidden=4)
    ref = nn.LSTM(5, 4, batch_first=True)
    order = torch.cat(
        [torch.arange(0, 8), torch.arange(12, 16), torch.arange(8, 12)]
    )  # i, f, o, g <- i, f, g, o
    with torch.no_grad():
        pg.input.weight.copy_(ref.weight_ih_l0[order])
        pg.input.bias.copy_((ref.bias_ih_l0 + ref.bias_hh_l0)[order])
        pg.recurrent.weight.copy_(ref.weight_hh_l0[order])
        pg.property.weight.zero_()
        x, props = torch.randn(2, 6, 5), torch.randn(2, 6, 3)
        assert torch.allclose(pg.reference(x, props), ref(x)[0], atol=1e-6)
        assert torch.allclose(pg(x, props, torch.tensor([6, 6])), ref(x)[0], atol=1e-6)


@pytest.mark.parametrize("lengths", [[2, 1, 1, 0], [6, 6, 5, 0]], ids=["packed", "padded"])
def test_packed_property_gated_lstm_equals_the_step_loop_forward_and_gradients(lengths):
    from marn.models.layers import packing_pays

    torch.manual_seed(0)
    lstm = PropertyGatedLSTM(input_dim=5, property_dim=3, hidden=4).double()
    with torch.no_grad():
        for p in lstm.parameters():
            p.normal_(0.0, 0.7)
    lengths = torch.tensor(lengths)
    assert packing_pays(lengths, 6) == (int(lengths[0]) == 2)  # the case's branch
    real = (torch.arange(6)[None, :] < lengths[:, None])[..., None]
    inputs = [torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)]
    runs = []
    for packed in (False, True):
        lstm.zero_grad()
        x, props = (t.clone().requires_grad_(True) for t in inputs)
        out = lstm(x, props, lengths) if packed else lstm.reference(x, props) * real
        out.sin().sum().backward()
        runs.append((out.detach(), [p.grad for p in lstm.parameters()] + [x.grad, props.grad]))
    (a, ga), (b, gb) = runs
    assert (a - b).abs().max() < 1e-10
    assert all((x - y).abs().max() < 1e-10 for x, y in zip(ga, gb, strict=True))


def test_dupn_attention_is_zero_on_padding_and_sums_to_one(tiny_world, batch):
    model = _build(tiny_world, "dupn").eval()
    with torch.no_grad():
        _, states, weights = model.perceive(batch)
    lengths = batch["hist_len"]
    assert weights.shape[1] == states.shape[1] == int(lengths.max())
    pad = ~(torch.arange(weights.shape[1])[None, :] < lengths[:, None])
    assert pad.any()
    assert torch.all(weights[pad] == 0)
    assert torch.all(states[pad] == 0)
    assert torch.allclose(weights.sum(1)[lengths > 0], torch.ones(int((lengths > 0).sum())))
    assert torch.all(weights[lengths == 0] == 0)


# -- DIEN -------------------------------------------------------------------------------------------------


def test_dien_aux_loss_in_training_only(tiny_world, batch):
    model = _build(tiny_world, "dien").train()
    out = model(batch)
    assert out.aux_loss is not None and out.aux_loss.dim() == 0
    assert out.aux_loss.item() > 0
    assert set(out.aux) == {"dien_aux"} and not out.aux["dien_aux"].requires_grad
    out.aux_loss.backward()
    assert model.aux_net[0].weight.grad.abs().sum() > 0
    assert model.extractor.weight_ih_l0.grad.abs().sum() > 0  # L_aux supervises the extractor GRU
    model.eval()
    out = model(batch)
    assert out.aux_loss is None and out.aux == {}


def test_dien_aux_loss_averages_bce_over_real_next_behaviours(tiny_world):
    model = _build(tiny_world, "dien")
    h_dim = tiny_world.model_cfg.sequence_dim
    e_dim = model.aux_net[0].in_features - h_dim
    states, history, negative = torch.randn(3, 4, h_dim), torch.randn(3, 4, e_dim), torch.randn(3, 3, e_dim)
    mask = sequence_mask(torch.tensor([4, 2, 0]), 4)
    terms = []
    for row, t in [(0, 0), (0, 1), (0, 2), (1, 0)]:  # every (h_t, e_{t+1}) with a real next behaviour
        clicked = model.aux_net(torch.cat([states[row, t], history[row, t + 1]]))
        sampled = model.aux_net(torch.cat([states[row, t], negative[row, t]]))
        terms.append(
            F.binary_cross_entropy_with_logits(clicked, torch.ones(1))
            + F.binary_cross_entropy_with_logits(sampled, torch.zeros(1))
        )
    expected = torch.stack(terms).mean()
    assert torch.allclose(model.auxiliary_loss(states, history, negative, mask), expected, atol=1e-6)


def test_dien_alpha_weights_the_aux_loss(tiny_world, batch):
    base, heavy = _build(tiny_world, "dien").train(), _build(tiny_world, "dien", alpha=2.5).train()
    heavy.load_state_dict(base.state_dict())
    torch.manual_seed(3)
    a = base(batch)
    torch.manual_seed(3)
    b = heavy(batch)
    assert torch.allclose(b.aux_loss, 2.5 * a.aux_loss)
    assert torch.allclose(a.aux["dien_aux"], b.aux["dien_aux"])
    with pytest.raises(ValueError, match="alpha"):
        _build(tiny_world, "dien", alpha=-1.0)


def test_dien_negatives_are_catalogue_items_from_the_global_rng(tiny_world):
    model = _build(tiny_world, "dien")
    n = len(tiny_world.catalog.items)
    torch.manual_seed(11)
    first = model.sample_negatives((200, 50), torch.device("cpu"))
    torch.manual_seed(11)
    assert torch.equal(first, model.sample_negatives((200, 50), torch.device("cpu")))
    assert first.min() == 1 and first.max() == n - 1


def test_augru_with_zero_attention_keeps_the_initial_state():
    torch.manual_seed(0)
    augru = AUGRU(input_dim=5, hidden=4)
    x = torch.randn(3, 7, 5)
    assert torch.equal(augru(x, torch.zeros(3, 7)), torch.zeros(3, 4))
    # attention 0 after step 3 freezes the state reached at step 3
    attention = torch.rand(3, 7)
    frozen = attention.clone()
    frozen[:, 3:] = 0
    assert torch.equal(augru(x, frozen), augru(x[:, :3], attention[:, :3]))
    assert not torch.allclose(augru(x, attention), augru(x[:, :3], attention[:, :3]))


def test_augru_with_unit_attention_is_a_standard_gru():
    torch.manual_seed(0)
    augru, ref = AUGRU(input_dim=5, hidden=4), nn.GRU(5, 4, batch_first=True)
    flip = torch.tensor([1.0] * 4 + [-1.0] * 4 + [1.0] * 4)[:, None]  # nn.GRU's z keeps h: u = 1 - z
    with torch.no_grad():
        ref.bias_hh_l0.zero_()
        augru.input.weight.copy_(ref.weight_ih_l0 * flip)
        augru.input.bias.copy_(ref.bias_ih_l0 * flip[:, 0])
        augru.recurrent.weight.copy_(ref.weight_hh_l0 * flip)
        x = torch.randn(2, 6, 5)
        assert torch.allclose(augru(x, torch.ones(2, 6)), ref(x)[0][:, -1], atol=1e-6)
