"""Group 3 of the paper's Table 2 (DMF, MMSS, NAML): what defines each fusion, and the shared user model."""

from functools import partial

import pytest
import torch
from conftest import item_states  # tests/ is on sys.path

from marn.data.schema import BEHAVIORS
from marn.data.tensors import GAP_BUCKETS
from marn.models.dmf import DMF, GRUAttentionUser
from marn.models.mmss import MMSS
from marn.models.naml import NAML

BUILDERS = {
    "dmf": DMF,
    "mmss": MMSS,
    "naml": NAML,
    "naml_own_user": partial(NAML, user_encoder="naml"),
}


def _build(name, world, **options):
    torch.manual_seed(0)
    return BUILDERS[name](world.catalog, world.features, world.model_cfg, **options).eval()


@pytest.fixture(scope="module")
def batch(tiny_world):
    return tiny_world.train.batch(torch.arange(64))


@pytest.fixture(scope="module")
def items(tiny_world):
    return item_states(tiny_world.features, torch.arange(1, 33))  # real item codes (0 is padding)


@pytest.mark.parametrize("name", BUILDERS)
def test_logits_and_item_reps_have_the_right_shapes(name, tiny_world, batch, items):
    model = _build(name, tiny_world)
    with torch.no_grad():
        out = model(batch)
        reps = model.represent(items)
    assert out.logits.shape == (64,)
    assert out.aux_loss is None
    assert torch.isfinite(out.logits).all()
    assert reps.shape == (len(items), tiny_world.model_cfg.rep_dim)


@pytest.mark.parametrize("name", BUILDERS)
def test_empty_histories_give_finite_logits_and_gradients(name, tiny_world, batch):
    model = _build(name, tiny_world).train()
    empty = dict(batch)
    for key in ("hist_items", "hist_stats", "hist_behavior", "hist_gap"):
        empty[key] = torch.zeros_like(batch[key])
    empty["hist_len"] = torch.zeros_like(batch["hist_len"])
    logits = model(empty).logits
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    for param in model.parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all()


@pytest.mark.parametrize("name", BUILDERS)
def test_padded_history_positions_do_not_change_the_logits(name, tiny_world, batch):
    model = _build(name, tiny_world)
    length = batch["hist_items"].shape[1]
    padded = torch.arange(length)[None, :] >= batch["hist_len"][:, None]  # (B, L)
    assert padded.any() and (~padded).any()
    generator = torch.Generator().manual_seed(1)
    noisy = dict(batch)
    n_items = len(tiny_world.catalog.items)
    for key, high in (
        ("hist_items", n_items),
        ("hist_behavior", len(BEHAVIORS) + 1),
        ("hist_gap", GAP_BUCKETS),
        ("hist_stats", min(tiny_world.features.statistics.buckets)),
    ):
        junk = torch.randint(1, high, batch[key].shape, generator=generator).to(batch[key].dtype)
        noisy[key] = torch.where(padded.view(*padded.shape, *[1] * (junk.dim() - 2)), junk, batch[key])
    real = dict(batch)  # the same junk on the first (real) behaviour must change the logits
    real["hist_items"] = batch["hist_items"].clone()
    real["hist_items"][:, 0] = torch.randint(1, n_items, (64,), generator=generator)
    with torch.no_grad():
        base, with_junk, changed = (model(b).logits for b in (batch, noisy, real))
    torch.testing.assert_close(with_junk, base)
    assert not torch.allclose(changed, base)


@pytest.mark.parametrize("name", ["mmss", "naml"])
def test_modality_attention_weights_are_a_distribution_over_modalities(name, tiny_world, items):
    model = _build(name, tiny_world)
    with torch.no_grad():
        weights = model.fusion(model.embedding(items))[1]  # (U, M)
    assert weights.shape == (len(items), model.embedding.n_modalities)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(len(items)))
    assert weights.std(0).max() > 0  # item-dependent, not a fixed mix


def test_mmss_gate_lies_in_the_unit_interval_and_the_title_filters_the_image(tiny_world, items):
    model = _build("mmss", tiny_world)
    fusion = model.fusion
    with torch.no_grad():
        e = model.embedding(items)  # (U, M, D_e)
        rep, _, gate, image = fusion(e)
        other_title = e.clone()
        other_title[:, fusion.title_slot] = torch.randn_like(e[:, fusion.title_slot])
        rep2, _, gate2, image2 = fusion(other_title)
    assert ((gate > 0) & (gate < 1)).all()
    assert not torch.allclose(gate2, gate)
    assert not torch.allclose(image2, image)
    assert not torch.allclose(rep2, rep)
    # the filtered image, not the raw one, is what the modality attention fuses: a closed gate removes it
    other_image = e.clone()
    other_image[:, fusion.image_slot] = torch.randn_like(e[:, fusion.image_slot])
    with torch.no_grad():
        assert not torch.allclose(fusion(other_image)[0], rep)
        fusion.filter.text.bias.fill_(-1e4)  # gate = 0
        closed, _, closed_gate, _ = fusion(e)
        assert closed_gate.max() == 0
        torch.testing.assert_close(fusion(other_image)[0], closed)


def test_mmss_without_image_or_title_fails_clearly(tiny_world):
    for modalities in (("ids", "title", "stats"), ("ids", "image", "stats")):
        with pytest.raises(ValueError, match="MMSS filters the image by the title"):
            _build("mmss", tiny_world, modalities=modalities)


def test_dmf_top_layer_depends_on_every_modality(tiny_world, items):
    model = _build("dmf", tiny_world)
    with torch.no_grad():
        e = model.embedding(items)  # (U, M, D_e)
        top = model.fusion(e)[-1]
        for m in range(e.shape[1]):
            perturbed = e.clone()
            perturbed[:, m] += torch.randn_like(e[:, m])
            assert not torch.allclose(model.fusion(perturbed)[-1], top), model.embedding.modalities[m]


def test_dmf_shared_layers_are_densely_connected(tiny_world, items):
    model = _build("dmf", tiny_world, depth=3)
    with torch.no_grad():
        e = model.embedding(items)
        shared = model.fusion(e)
        assert len(shared) == 3 and all(z.shape == (len(items), tiny_world.model_cfg.rep_dim) for z in shared)
        model.fusion.below[0].weight.zero_()  # cut z^1 -> z^2
        cut = model.fusion(e)
    torch.testing.assert_close(cut[0], shared[0])
    assert not torch.allclose(cut[-1], shared[-1])  # the top layer also sees the lower shared layers


def test_bad_options_raise_value_errors(tiny_world):
    with pytest.raises(ValueError, match="depth"):
        _build("dmf", tiny_world, depth=0)
    with pytest.raises(ValueError, match="user_encoder"):
        _build("naml", tiny_world, user_encoder="dot")


def test_shared_user_model_projects_the_candidate_when_widths_differ(tiny_world, batch):
    cfg = tiny_world.model_cfg.model_copy(update={"rep_dim": 24})
    torch.manual_seed(0)
    user = GRUAttentionUser(cfg.rep_dim, cfg)
    assert isinstance(user.query, torch.nn.Linear)
    history = torch.randn(*batch["hist_items"].shape, 24)
    logits = user(history, torch.randn(64, 24), batch["hist_len"])
    assert logits.shape == (64,) and torch.isfinite(logits).all()
