"""Tests that pin MARN's math to the paper (sections 3.2-3.4) and to docs/design.md's reading of Eq. 10."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import item_states  # tests/ is on sys.path: pytest imports conftest from there

from marn.config import ModelConfig
from marn.models.layers import ItemStates, grad_reverse
from marn.models.marn import APGRU, MARN, VARIANTS, adversarial_weight


@pytest.fixture
def model(tiny_world):
    torch.manual_seed(0)
    return MARN(tiny_world.catalog, tiny_world.features, tiny_world.model_cfg).train()


@pytest.fixture
def items(tiny_world):
    return item_states(tiny_world.features, torch.arange(1, tiny_world.features.n_items))  # every real item


def _with(world, **switches) -> ModelConfig:
    """The tiny model config with some fields changed, validated like a config file."""
    return ModelConfig.model_validate({**world.model_cfg.model_dump(), **switches})


def _grads(module):
    return [p.grad for p in module.parameters()]


def _zero_or_none(grads):
    return all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_gradient_reversal_flips_and_scales_gradients():
    x = torch.randn(5, 3, requires_grad=True)
    weights = torch.randn(5, 3)
    (grad_reverse(x, scale=0.3) * weights).sum().backward()
    assert torch.allclose(x.grad, -0.3 * weights)
    y = torch.randn(4, requires_grad=True)
    assert torch.equal(grad_reverse(y, 2.0), y)  # identity forward


def test_no_gradient_of_l_d0_reaches_the_invariant_projection(model, items):
    losses = model.adversarial_losses(items, model.decompose(items))
    losses["d0"].backward()
    assert _zero_or_none(_grads(model.invariant))
    assert _zero_or_none(_grads(model.embedding))
    assert not _zero_or_none(_grads(model.d0))  # D0 itself learns


def test_no_gradient_of_l_ds_reaches_the_embedding_layer(model, items):
    losses = model.adversarial_losses(items, model.decompose(items))
    losses["ds"].backward()
    assert _zero_or_none(_grads(model.embedding))
    assert not _zero_or_none(_grads(model.specific))  # S_m learns to be separable
    assert not _zero_or_none(_grads(model.d1))  # through D1's (shared) weights


def test_ds_shares_d1s_parameters(model, items):
    before = model.adversarial_losses(items, model.decompose(items))["ds"].item()
    with torch.no_grad():
        model.d1.weight.add_(torch.randn_like(model.d1.weight))
    assert model.adversarial_losses(items, model.decompose(items))["ds"].item() != pytest.approx(before)
    names = [name for name, _ in model.named_parameters() if name.startswith(("d0.", "d1.", "ds"))]
    assert sorted(names) == ["d0.bias", "d0.weight", "d1.bias", "d1.weight"]  # no third discriminator


def test_invariant_projection_gets_the_reversed_gradient_of_d1(model, items):
    parts = model.decompose(items)
    model.adversarial_losses(items, parts)["adv"].backward()
    reversed_grad = model.invariant.weight.grad.clone()
    d1_grad = model.d1.weight.grad.clone()
    model.zero_grad()
    # The same Eq. 7 loss without the GRL: I's gradient flips sign, D1's does not.
    parts = model.decompose(items)
    logits = model.d1(parts.adv_input)  # (U, M, M)
    labels = torch.arange(logits.shape[1]).expand(logits.shape[0], -1)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    (ce * parts.w / parts.w.mean()).mean().backward()  # the default: w over its batch mean (IWAN)
    assert torch.count_nonzero(reversed_grad) > 0
    assert torch.allclose(reversed_grad, -model.invariant.weight.grad, atol=1e-7)
    assert torch.allclose(d1_grad, model.d1.weight.grad, atol=1e-7)


def test_importance_weights_lie_in_unit_interval_and_are_constants(model, items):
    parts = model.decompose(items)
    assert parts.w.shape == (len(items), 4)
    assert ((parts.w >= 0) & (parts.w <= 1)).all()
    assert not parts.w.requires_grad  # w = 1 - D0(c), detached
    expected = 1 - torch.softmax(model.d0(parts.invariant), -1).diagonal(dim1=1, dim2=2)
    assert torch.allclose(parts.w, expected.detach(), atol=1e-6)


def test_c_is_the_elementwise_max_of_weighted_invariant_features_and_rep_is_s_plus_c(model, items):
    parts = model.decompose(items)
    weighted = parts.w[..., None] * parts.invariant  # (U, M, D)
    for m in range(weighted.shape[1]):
        assert (parts.c >= weighted[:, m] - 1e-7).all()
    hits = torch.isclose(parts.c[:, None, :], weighted).any(dim=1)  # every entry equals some modality's
    assert hits.all()
    assert torch.allclose(parts.rep, parts.s + parts.c)


def test_attention_is_a_vector_per_modality(model, items):
    parts = model.decompose(items)
    u, m, d = parts.specific.shape
    assert parts.atten.shape == (u, m, d)
    assert ((parts.atten > -1) & (parts.atten < 1)).all()  # tanh
    assert (parts.atten.std(dim=2) > 0).all()  # not one scalar per modality: varies across dimensions
    assert torch.allclose(parts.s, (parts.atten * parts.specific).sum(1), atol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_lambda_schedule_equals_the_papers_formula(p):
    expected = 0.05 * (2 / (1 + math.exp(-10 * p)) - 1)
    assert adversarial_weight(p, lambda0=0.05, gamma=10.0) == pytest.approx(expected, abs=1e-12)
    assert adversarial_weight(0.0, 0.05, 10.0) == 0.0


def test_aux_loss_is_lambda_times_the_sum_of_the_three_losses(model, tiny_world):
    batch = tiny_world.train.batch(torch.arange(64))
    torch.manual_seed(1)
    out = model(batch, progress=0.5)
    assert {"adv", "d0", "ds"} <= set(out.aux)
    weight = adversarial_weight(0.5, model.cfg.lambda0, model.cfg.gamma)
    losses = sum(out.aux[name].item() for name in ("adv", "d0", "ds"))
    assert out.aux_loss.item() == pytest.approx(weight * losses, rel=1e-5)
    assert model.eval()(batch).aux_loss is None  # inference computes no adversarial terms


def test_apgru_update_gate_depends_on_the_behaviour_property():
    torch.manual_seed(0)
    cell = APGRU(input_dim=6, property_dim=4, hidden=5, attention_hidden=(3,))
    reps, mask = torch.randn(2, 7, 6), torch.ones(2, 7, dtype=torch.bool)
    props_a, props_b = torch.randn(2, 7, 4), torch.randn(2, 7, 4)
    _, gates_a = cell.states(reps, props_a, mask)
    _, gates_b = cell.states(reps, props_b, mask)
    assert not torch.allclose(gates_a, gates_b)
    with torch.no_grad():
        cell.property.weight.zero_()  # P^u = 0: the property no longer reaches the gate
    assert torch.allclose(cell.states(reps, props_a, mask)[1], cell.states(reps, props_b, mask)[1])


def test_apgru_ignores_padding_and_attends_with_the_candidate():
    torch.manual_seed(0)
    cell = APGRU(input_dim=6, property_dim=4, hidden=5, attention_hidden=(3,))
    reps, props = torch.randn(2, 7, 6), torch.randn(2, 7, 4)
    mask = torch.arange(7)[None, :] < torch.tensor([[4], [7]])
    out = cell(reps, props, mask, torch.randn(2, 6))
    reps2 = reps.clone()
    reps2[0, 4:] = 100.0  # padding of row 0
    candidate = torch.randn(2, 6)
    assert torch.allclose(cell(reps, props, mask, candidate), cell(reps2, props, mask, candidate))
    assert not torch.allclose(out, cell(reps, props, mask, candidate))  # a new candidate, a new user vector


def test_ablations_switch_parts_off(tiny_world):
    cfg = tiny_world.model_cfg
    ids = MARN(tiny_world.catalog, tiny_world.features, cfg, VARIANTS["base_ids"])
    assert ids.embedding.modalities == ("ids",) and not hasattr(ids, "d1")
    adv = MARN(tiny_world.catalog, tiny_world.features, cfg, VARIANTS["base_maf_adv"])
    assert hasattr(adv, "d1") and not hasattr(adv, "d0")
    parts = adv.decompose(item_states(tiny_world.features, torch.arange(1, 10)))
    assert torch.equal(parts.w, torch.ones_like(parts.w))  # one plain discriminator, no importance weights
    conc = MARN(tiny_world.catalog, tiny_world.features, cfg, VARIANTS["base_conc"])
    parts = conc.decompose(item_states(tiny_world.features, torch.arange(1, 10)))
    assert parts.atten is None and torch.allclose(parts.rep, parts.specific.sum(1))


@pytest.mark.parametrize(
    ("name", "switches"),
    [
        ("marn", {}),
        ("marn", {"pool_weights": "per_item"}),
        ("base_conc", {}),
        ("base_maf_adv", {}),
        ("base_maf_adv", {"pool_weights": "per_item"}),
        ("base_ids", {}),
    ],
)
def test_rep_splits_exactly_into_a_static_part_and_the_statistics_part(tiny_world, name, switches):
    """Serving (4.9.2) precomputes every modality but the statistics and adds an item's current counts."""
    torch.manual_seed(0)
    model = MARN(
        tiny_world.catalog, tiny_world.features, _with(tiny_world, **switches), VARIANTS[name]
    ).eval()
    states = item_states(tiny_world.features, torch.arange(0, tiny_world.features.n_items), seed=3)
    with torch.no_grad():
        full = model.represent(states)
        split = model.represent_from_static(model.static_parts(states.items), states)
        other = item_states(tiny_world.features, states.items, seed=4)  # the same items, other counts
        moved = model.represent_from_static(model.static_parts(states.items), other)
    assert (full - split).abs().max() < 1e-5
    assert (model.represent(other) - moved).abs().max() < 1e-5
    if "stats" in model.embedding.modalities:
        assert not torch.allclose(full, moved)  # the statistics do reach rep


def test_the_same_item_on_two_days_is_two_states(tiny_world):
    from marn.models.layers import distinct_states

    stats = torch.zeros(3, tiny_world.features.statistics.n_stats, 2, dtype=torch.int16)
    stats[1] += 1  # the same item 5, its counts moved
    states, inverse = distinct_states(torch.tensor([5, 5, 5]), stats)
    assert isinstance(states, ItemStates) and len(states) == 2 and inverse.tolist() == [0, 1, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lengths", [[7, 4, 1, 0, 6], [3, 1, 1, 0, 1]], ids=["padded", "packed"])
def test_fused_apgru_equals_the_reference_loop_forward_and_gradients(seed, lengths):
    """One ATen GRU call instead of the step loop: the same states on real steps, the same user vector and
    the same gradients for every weight and input, within 1e-6 (float64); run padded for mostly full
    histories and packed for mostly empty ones (both kinds tested)."""
    from marn.models.layers import packing_pays

    torch.manual_seed(seed)
    cell = APGRU(input_dim=6, property_dim=4, hidden=5, attention_hidden=(3,)).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_(0.0, 0.7)  # larger than the init: saturating gates show a wrong sign
    lengths = torch.tensor(lengths)
    assert packing_pays(lengths, 7) == (int(lengths[0]) == 3)  # the case's branch
    mask = torch.arange(7)[None, :] < lengths[:, None]  # left-aligned, one empty history
    inputs = [torch.randn(5, 7, 6, dtype=torch.float64), torch.randn(5, 7, 4, dtype=torch.float64)]
    candidate = torch.randn(5, 6, dtype=torch.float64)

    def run(fused: bool):
        cell.zero_grad()
        reps, props = (x.clone().requires_grad_(True) for x in inputs)
        if fused:
            states = cell.fused_states(reps, props, mask)
        else:
            states = cell.states(reps, props, mask)[0] * mask[..., None]
        user = cell.attend(states, mask, candidate)
        (user.sin().sum() + states.cos().sum()).backward()
        grads = [p.grad.clone() for p in cell.parameters()] + [reps.grad, props.grad]
        return states.detach(), user.detach(), grads

    reference, fused = run(False), run(True)
    assert (reference[0] - fused[0]).abs().max() < 1e-6
    assert (reference[1] - fused[1]).abs().max() < 1e-6
    for a, b in zip(reference[2], fused[2], strict=True):
        assert (a - b).abs().max() < 1e-6


def test_split_attention_layers_equal_the_concatenated_inputs():
    """DIN's activation unit and APGRU's candidate attention split their first layer; the scores equal the
    published concatenations [k, q, k - q, k * q] and [h_t, rep_X] within 1e-10 (float64)."""
    from marn.models.layers import CandidateAttention, masked_softmax

    torch.manual_seed(0)
    unit = CandidateAttention(dim=6, hidden=(5, 3), normalize=False).double()
    keys, query = torch.randn(4, 7, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    mask = torch.ones(4, 7, dtype=torch.bool)
    assert (unit.weights(keys, query, mask) - unit.scores_reference(keys, query)).abs().max() < 1e-10

    cell = APGRU(input_dim=6, property_dim=4, hidden=5, attention_hidden=(3,)).double()
    states, candidate = torch.randn(4, 7, 5, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    mask = torch.arange(7)[None, :] < torch.tensor([[7], [3], [1], [5]])
    query = candidate[:, None, :].expand(-1, 7, -1)
    scores = cell.attention(torch.cat([states, query], dim=-1)).squeeze(-1)
    expected = torch.einsum("bl,blh->bh", masked_softmax(scores, mask), states)
    assert (cell.attend(states, mask, candidate) - expected).abs().max() < 1e-10


@pytest.mark.parametrize("name", ["marn", "base_conc", "base_maf_adv", "base_ids"])
def test_per_item_decomposition_equals_computing_every_state_in_full(tiny_world, name):
    """decompose computes every modality but the statistics once per item; the same numbers (and the same
    losses) as running the whole network on each state."""
    torch.manual_seed(0)
    model = MARN(tiny_world.catalog, tiny_world.features, tiny_world.model_cfg, VARIANTS[name]).train()
    base = item_states(tiny_world.features, torch.arange(1, 12), seed=5)
    again = item_states(tiny_world.features, torch.arange(1, 12), seed=6)  # the same items, other counts
    states = ItemStates(torch.cat([base.items, again.items]), torch.cat([base.stats, again.stats]))
    parts = model.decompose(states)
    for k in range(len(states)):  # one state at a time: nothing shared between states
        one = model.decompose(ItemStates(states.items[k : k + 1], states.stats[k : k + 1]))
        assert torch.allclose(one.rep, parts.rep[k : k + 1], atol=1e-6)
        assert torch.allclose(one.specific, parts.specific[k : k + 1], atol=1e-6)
        if one.w is not None:
            assert torch.allclose(one.w, parts.w[k : k + 1], atol=1e-6)
    if "stats" in model.embedding.modalities:
        assert not torch.allclose(parts.rep[:11], parts.rep[11:])  # the counts reach rep


# -- the adversary's switches (issue 16) ----------------------------------------------------------------


def _build(world, name="marn", seed=0, **switches):
    torch.manual_seed(seed)
    return MARN(world.catalog, world.features, _with(world, **switches), VARIANTS[name]).train()


def test_adversarial_switches_are_validated():
    for field, bad in (("d1_weights", "mean"), ("pool_weights", "item"), ("reversal_reaches", "e"),
                       ("lambda_role", "grl"), ("ds_weights", "shared")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            ModelConfig.model_validate({field: bad})
    defaults = ModelConfig()
    assert (defaults.d1_weights, defaults.pool_weights) == ("batch_mean", "raw")
    assert (defaults.reversal_reaches, defaults.lambda_role) == ("invariant", "loss_weight")
    assert defaults.ds_weights == "shared_with_d1"


def test_ds_with_its_own_weights_leaves_d1_to_the_invariant_features(tiny_world, items):
    """``ds_weights="own"``: L_Ds trains a third discriminator and S_m, never D1; L_adv still trains D1."""
    model = _build(tiny_world, ds_weights="own")
    losses = model.adversarial_losses(items, model.decompose(items))
    losses["ds"].backward(retain_graph=True)
    assert _zero_or_none(_grads(model.d1)) and not _zero_or_none(_grads(model.ds))
    assert not _zero_or_none(_grads(model.specific)) and _zero_or_none(_grads(model.embedding))
    model.zero_grad()
    losses["adv"].backward()
    assert not _zero_or_none(_grads(model.d1)) and _zero_or_none(_grads(model.ds))
    names = sorted(n for n, _ in model.named_parameters() if n.startswith(("d0.", "d1.", "ds.")))
    assert names == ["d0.bias", "d0.weight", "d1.bias", "d1.weight", "ds.bias", "ds.weight"]
    # the training path (factored, with instrumentation) reads the same Ds
    out = model(tiny_world.train.batch(torch.arange(64)))
    assert torch.isfinite(out.aux_loss) and "ds_acc" in out.aux


@pytest.mark.parametrize("name", ["marn", "base_maf_adv"])
def test_the_reversed_gradient_updates_i_only(tiny_world, items, name):
    """D1 plays "for updating I": L_adv moves D1 and I, never the embedding layer or S_m (which also feed
    rep); with ``reversal_reaches="embedding"`` the reversed gradient flows on into e^m."""
    model = _build(tiny_world, name)
    model.adversarial_losses(items, model.decompose(items))["adv"].backward()
    assert _zero_or_none(_grads(model.embedding)) and _zero_or_none(_grads(model.specific))
    assert not _zero_or_none(_grads(model.invariant)) and not _zero_or_none(_grads(model.d1))
    through = _build(tiny_world, name, reversal_reaches="embedding")
    through.adversarial_losses(items, through.decompose(items))["adv"].backward()
    assert not _zero_or_none(_grads(through.embedding))
    assert torch.allclose(model.invariant.weight.grad, through.invariant.weight.grad, atol=1e-7)  # I: same


def test_the_ctr_gradient_still_reaches_the_embedding_through_c(tiny_world, items):
    model = _build(tiny_world)
    model.decompose(items).c.sum().backward()
    assert not _zero_or_none(_grads(model.embedding)) and not _zero_or_none(_grads(model.invariant))


@pytest.mark.parametrize("d1_weights", ["batch_mean", "raw"])
def test_d1_loss_scale_is_invariant_to_a_common_factor_of_w_only_when_normalised(
    tiny_world, items, d1_weights
):
    """IWAN: w / mean(w) leaves Eq. 8's optimum and now also L_adv's scale unchanged by w -> k w; raw weights
    scale it by k (D0's growing confidence then switches the adversary off)."""
    from dataclasses import replace

    model = _build(tiny_world, d1_weights=d1_weights)
    parts = model.decompose(items)
    base = model.adversarial_losses(items, parts)["adv"]
    scaled = model.adversarial_losses(items, replace(parts, w=parts.w * 0.01))["adv"]
    if d1_weights == "batch_mean":
        assert scaled.item() == pytest.approx(base.item(), rel=1e-5)
        assert model.d1_weights(parts.w).mean().item() == pytest.approx(1.0, rel=1e-6)
    else:
        assert scaled.item() == pytest.approx(0.01 * base.item(), rel=1e-5)


def test_per_item_pool_weights_sum_to_m_and_rescale_c(tiny_world, items):
    raw = _build(tiny_world)
    per_item = _build(tiny_world, pool_weights="per_item")  # the same weights (same seed)
    parts, normed = raw.decompose(items), per_item.decompose(items)
    m = parts.w.shape[1]
    assert torch.allclose(raw.pool_weights(parts.w), parts.w)  # the paper's raw weights by default
    weights = per_item.pool_weights(normed.w)
    assert torch.allclose(weights.sum(1), torch.full((len(items),), float(m)), atol=1e-5)
    expected = (weights[..., None] * normed.invariant).amax(1)
    assert torch.allclose(normed.c, expected, atol=1e-6) and not torch.allclose(normed.c, parts.c)
    assert torch.allclose(normed.rep, normed.s + normed.c)


def test_lambda_as_the_reversal_coefficient_leaves_the_discriminators_at_full_rate(tiny_world):
    """``lambda_role="reversal"``: I and S_m get the same lambda-scaled gradients as with lambda as a loss
    weight, but D0 and D1 learn at full rate (their gradients 1 / lambda times larger)."""
    batch = tiny_world.train.batch(torch.arange(64))
    grads = {}
    for role in ("loss_weight", "reversal"):
        model = _build(tiny_world, lambda_role=role)
        out = model(batch, progress=0.3)
        out.aux_loss.backward()
        grads[role] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    weight = adversarial_weight(0.3, tiny_world.model_cfg.lambda0, tiny_world.model_cfg.gamma)
    as_weight, as_reversal = grads["loss_weight"], grads["reversal"]
    for name in ("invariant.weight", "specific.weight"):
        assert torch.count_nonzero(as_weight[name]) > 0
        assert torch.allclose(as_reversal[name], as_weight[name], rtol=1e-4, atol=1e-9)
    for name in ("d0.weight", "d1.weight"):
        assert torch.allclose(as_reversal[name] * weight, as_weight[name], rtol=1e-4, atol=1e-9)


def test_training_output_carries_the_adversarial_instrumentation(model, tiny_world):
    batch = tiny_world.train.batch(torch.arange(64))
    out = model(batch, progress=0.5)
    modalities = model.embedding.modalities
    expected = {"d1_ce", "d1_acc", "d0_acc", "ds_acc"}
    expected |= {f"{kind}_{m}" for kind in ("w_raw", "w_norm") for m in modalities}
    assert expected <= set(out.aux)
    assert all(0 <= out.aux[k].item() <= 1 for k in ("d1_acc", "d0_acc", "ds_acc"))
    norm = torch.stack([out.aux[f"w_norm_{m}"] for m in modalities])
    raw = torch.stack([out.aux[f"w_raw_{m}"] for m in modalities])
    assert norm.mean().item() == pytest.approx(1.0, rel=1e-5)  # over the batch mean: 1 on average
    assert torch.allclose(norm / raw, (norm / raw)[0].expand(len(modalities)))  # one common factor
    # d1_ce is the unweighted cross-entropy: with every w equal it is L_adv itself.
    states = item_states(tiny_world.features, torch.arange(1, 20))
    parts = model.decompose(states)
    from dataclasses import replace

    flat = replace(parts, w=torch.full_like(parts.w, 0.3))
    diagnostics = model.adversarial_diagnostics(states, flat)
    assert diagnostics["d1_ce"].item() == pytest.approx(model.adversarial_losses(states, flat)["adv"].item())
    per_item = _build(tiny_world, pool_weights="per_item")
    assert {f"w_pool_{m}" for m in modalities} <= set(per_item(batch).aux)
