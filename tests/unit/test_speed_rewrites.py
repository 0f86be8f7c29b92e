"""The training-speed rewrites are exact: a request group shares one history run, the title CNN scores
winners only, the attention reads distinct histories. Each is held to the plain computation it replaces,
forward and gradients."""

import pytest
import torch

from marn.models.din import DIN
from marn.models.layers import CandidateAttention, TitleCNN, batch_items, distinct_histories, grouping_pays
from marn.models.marn import MARN, VARIANTS, over_modalities, per_modality_affine


def _paired_batch(world, n=24):
    """The first ``n`` training samples in stored order: positive then negative of each target, so every
    history appears twice."""
    return world.train.batch(torch.arange(n))


def test_request_groups_pair_each_positive_with_its_negative(tiny_world):
    data = tiny_world.train
    groups = data.request_groups()
    assert len(groups) == len(data) and int(groups.max()) + 1 == len(data) // 2
    assert torch.equal(groups, torch.arange(len(data)) // 2)  # stored as positive, negative, ...
    labels = data.tensors["label"]
    assert torch.equal(labels[0::2], torch.ones(len(data) // 2)) and not labels[1::2].any()


def test_shuffled_keeps_groups_adjacent_and_is_a_seeded_permutation(tiny_world):
    data = tiny_world.train
    groups = data.request_groups()
    order = data.shuffled(torch.Generator().manual_seed(3), groups)
    assert torch.equal(torch.sort(order).values, torch.arange(len(data)))
    assert torch.equal(groups[order][0::2], groups[order][1::2])  # each pair lands side by side
    assert torch.equal(data.tensors["label"][order][0::2], torch.ones(len(data) // 2))  # in stored order
    again = data.shuffled(torch.Generator().manual_seed(3))
    other = data.shuffled(torch.Generator().manual_seed(4))
    assert torch.equal(order, again) and not torch.equal(order, other)


def test_distinct_histories_finds_exactly_the_shared_inputs(tiny_world):
    batch = _paired_batch(tiny_world)
    _, inverse = batch_items(batch)
    rows, which = distinct_histories(batch, inverse)
    assert len(rows) == len(batch["item"]) // 2
    for name in ("hist_items", "hist_stats", "hist_behavior", "hist_gap", "hist_len"):
        assert torch.equal(batch[name][rows][which], batch[name])  # every sample reads its own history
    changed = dict(batch, hist_gap=batch["hist_gap"].clone())
    changed["hist_gap"][1, 0] = (changed["hist_gap"][1, 0] % 5) + 1  # sample 1 differs in one gap only
    assert batch["hist_len"][1] > 0
    rows2, which2 = distinct_histories(changed, batch_items(changed)[1])
    assert len(rows2) == len(rows) + 1 and which2[0] != which2[1]


def _one_by_one(model, batch):
    """Logits of each sample run alone (no history shared with anything)."""
    n = len(batch["item"])
    return torch.cat([model({k: v[i : i + 1] for k, v in batch.items()}).logits for i in range(n)])


@pytest.mark.parametrize(
    "name", ["marn", "base_maf", "base_conc", "din", "dupn", "dmf", "mmss", "naml", "naml[naml user]"]
)
def test_a_shared_history_gives_the_scores_and_gradients_of_separate_runs(tiny_world, name):
    from marn.models.naml import NAML
    from marn.models.registry import build_model

    torch.manual_seed(0)
    if name == "din":
        model = DIN(tiny_world.catalog, tiny_world.features, tiny_world.model_cfg)
    elif name == "naml[naml user]":
        model = NAML(tiny_world.catalog, tiny_world.features, tiny_world.model_cfg, user_encoder="naml")
    elif name in VARIANTS:
        model = MARN(tiny_world.catalog, tiny_world.features, tiny_world.model_cfg, VARIANTS[name])
    else:
        model = build_model(name, tiny_world.catalog, tiny_world.features, tiny_world.model_cfg)
    model = model.double().eval()  # eval: batch statistics (Dice, BatchNorm) would couple the samples
    batch = _paired_batch(tiny_world)
    together = model(batch).logits
    alone = _one_by_one(model, batch)
    assert (together - alone).abs().max() < 1e-10
    grads = []
    for logits in (lambda: model(batch).logits, lambda: _one_by_one(model, batch)):
        model.zero_grad()
        logits().pow(2).sum().backward()
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None) and (a is None or (a - b).abs().max() < 1e-9)


@pytest.mark.parametrize("normalize", [False, True])
def test_attention_over_distinct_histories_equals_the_expanded_keys(normalize):
    torch.manual_seed(0)
    unit = CandidateAttention(dim=6, hidden=(5, 3), normalize=normalize).double()
    keys = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(7)[None, :] < torch.tensor([[7], [2], [0]])  # one empty history
    which = torch.tensor([0, 0, 1, 2, 1, 0])
    query = torch.randn(6, 6, dtype=torch.float64)
    shared = unit(keys, query, mask, which)
    expanded = unit(keys[which], query, mask[which])
    assert (shared - expanded).abs().max() < 1e-12
    assert (
        unit.weights(keys, query, mask, which) - unit.weights(keys[which], query, mask[which])
    ).abs().max() < 1e-12
    (g_shared,) = torch.autograd.grad(shared.pow(2).sum(), keys)
    (g_expanded,) = torch.autograd.grad(unit(keys[which], query, mask[which]).pow(2).sum(), keys)
    assert (g_shared - g_expanded).abs().max() < 1e-12


@pytest.mark.parametrize("fill", ["full", "short", "empty"])
def test_title_cnn_winner_rescoring_equals_conv1d(fill):
    """Titles with no padding, short ones (trailing columns trimmed) and empty ones; with and without
    autograd."""
    torch.manual_seed(1)
    words = torch.randn(40, 7, dtype=torch.float64)
    words[0] = 0.0  # PAD
    cnn = TitleCNN(words, windows=(1, 3, 4), filters=6).double()
    tokens = torch.randint(1, 40, (11, 9))
    if fill == "short":
        tokens[:, 4:] = 0
    elif fill == "empty":
        tokens[:3] = 0
    grads = []
    for run in (cnn.reference, cnn.forward):
        cnn.zero_grad()
        out = run(tokens)
        out.pow(2).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in cnn.parameters()]))
    (a, ga), (b, gb) = grads
    assert (a - b).abs().max() < 1e-10
    assert all((x - y).abs().max() < 1e-10 for x, y in zip(ga, gb, strict=True))
    with torch.no_grad():
        assert (cnn(tokens) - a).abs().max() < 1e-10


@pytest.mark.parametrize("lengths", [[2, 1, 1, 0], [6, 6, 5, 0]], ids=["packed", "padded"])
def test_run_gru_equals_each_sequence_run_alone(lengths):
    from marn.models.layers import packing_pays, run_gru

    torch.manual_seed(0)
    gru = torch.nn.GRU(5, 4, batch_first=True).double()
    lengths = torch.tensor(lengths)
    assert packing_pays(lengths, 6) == (int(lengths[0]) == 2)
    x = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    out = run_gru(gru, x, lengths)
    for row, n in enumerate(lengths.tolist()):
        if n:
            assert (out[row, :n] - gru(x[row : row + 1, :n])[0][0]).abs().max() < 1e-12
        assert not out[row, n:].any()  # padding reads 0
    (grad,) = torch.autograd.grad(out.sin().sum(), x)
    for row, n in enumerate(lengths.tolist()):
        assert not grad[row, n:].any() and (n == 0 or grad[row, :n].any())  # nothing flows from padding


def test_dupn_shared_history_gives_the_scores_of_separate_runs(tiny_world):
    from marn.models.dupn import DUPN

    torch.manual_seed(0)
    model = DUPN(tiny_world.catalog, tiny_world.features, tiny_world.model_cfg).double().eval()
    batch = _paired_batch(tiny_world)
    assert (model(batch).logits - _one_by_one(model, batch)).abs().max() < 1e-10


def test_dien_shared_history_gives_the_scores_and_aux_loss_of_separate_runs(tiny_world):
    from marn.models.dien import DIEN

    torch.manual_seed(0)
    model = DIEN(tiny_world.catalog, tiny_world.features, tiny_world.model_cfg).double().eval()
    batch = _paired_batch(tiny_world)
    assert (model(batch).logits - _one_by_one(model, batch)).abs().max() < 1e-10
    # the auxiliary loss over K distinct histories weighted by their sample counts equals the loss over
    # every sample's own copy of its history (the same negatives)
    k, length, h, e = 3, 5, tiny_world.model_cfg.sequence_dim, model.aux_net[0].in_features
    states = torch.randn(k, length, h, dtype=torch.float64)
    history = torch.randn(k, length, e - h, dtype=torch.float64)
    negative = torch.randn(k, length - 1, e - h, dtype=torch.float64)
    mask = torch.arange(length)[None, :] < torch.tensor([[5], [2], [3]])
    which = torch.tensor([0, 0, 1, 2, 2, 2])
    counts = torch.bincount(which).double()
    shared = model.auxiliary_loss(states, history, negative, mask, counts)
    expanded = model.auxiliary_loss(states[which], history[which], negative[which], mask[which])
    assert (shared - expanded).abs() < 1e-12
    assert (model.auxiliary_loss(states, history, negative, mask) - expanded).abs() > 1e-3  # counts matter


@pytest.mark.parametrize("min_rows", [1, 3, 100])
def test_length_buckets_give_the_user_vectors_and_gradients_of_one_padded_call(min_rows):
    """APGRU + candidate attention over histories of lengths 0..11, run per power-of-two length bucket
    (floor 2), against one call over the whole padded width; buckets of fewer than ``min_rows`` merge
    upward (100: everything in one call)."""
    from marn.models.layers import by_length, sequence_mask
    from marn.models.marn import APGRU

    torch.manual_seed(0)
    apgru = APGRU(input_dim=6, property_dim=3, hidden=5, attention_hidden=(4,)).double()
    hist_len = torch.tensor([11, 0, 1, 2, 3, 5, 8, 9, 4, 2, 1, 7])  # (K,)
    k, width = len(hist_len), int(hist_len.max())
    reps = torch.randn(k, width, 6, dtype=torch.float64, requires_grad=True)
    props = torch.randn(k, width, 3, dtype=torch.float64)
    mask = sequence_mask(hist_len, width)
    which = torch.tensor([3, 0, 0, 11, 5, 1, 2, 7, 7, 6, 9, 10, 4, 8, 8, 3])  # (B,) every history read
    candidate = torch.randn(len(which), 6, dtype=torch.float64, requires_grad=True)
    calls = []

    def encode(rows, samples, own, steps):
        calls.append((len(rows), steps))
        assert steps == max(int(hist_len[rows].max()), 1)
        return apgru(reps[rows, :steps], props[rows, :steps], mask[rows, :steps], candidate[samples], own)

    bucketed = by_length(hist_len, which, encode, floor=2, min_rows=min_rows)
    whole = apgru(reps, props, mask, candidate, which)
    assert (bucketed - whole).abs().max() < 1e-12
    expected_calls = {1: 4, 3: 3, 100: 1}[min_rows]  # ranges (0,2], (2,4], (4,8], (8,16]: 5, 2, 3, 2 rows
    assert len(calls) == expected_calls and sum(n for n, _ in calls) == k
    g_bucketed = torch.autograd.grad(bucketed.pow(2).sum(), (reps, candidate))
    g_whole = torch.autograd.grad(whole.pow(2).sum(), (reps, candidate))
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(g_bucketed, g_whole, strict=True))


def test_length_buckets_handle_an_empty_batch():
    from marn.models.layers import by_length

    out = by_length(
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), lambda *a: torch.zeros(0, 4)
    )
    assert out.shape == (0, 4)


@pytest.mark.parametrize(
    ("name", "switches", "weighting", "scale"),
    [
        ("marn", {}, "loss", 1.0),
        ("marn", {"d1_weights": "raw", "pool_weights": "per_item"}, "loss", 0.3),
        ("marn", {"reversal_reaches": "embedding"}, "input", 1.0),
        ("base_maf_adv", {}, "loss", 1.0),
    ],
)
def test_factored_adversary_equals_the_per_state_losses(tiny_world, name, switches, weighting, scale):
    """Training scores each item's own modalities once and counts them per state: the losses, their
    gradients and the diagnostics equal those of every state's parts computed and stored separately."""
    torch.manual_seed(0)
    cfg = type(tiny_world.model_cfg).model_validate({**tiny_world.model_cfg.model_dump(), **switches})
    model = MARN(tiny_world.catalog, tiny_world.features, cfg, VARIANTS[name], d1_weighting=weighting)
    model = model.double().train()
    unique, _ = batch_items(tiny_world.train.batch(torch.arange(64)))  # PAD and items on several days
    counts = torch.bincount(unique.items)
    assert counts[0] == 1 and counts[1:].max() > 1  # the factoring has states to share
    factored = model.factor(unique)
    parts = model.decompose(unique)
    assert (factored.rep - parts.rep).abs().max() < 1e-12
    losses, diagnostics = model.adversary(unique, factored, scale)
    expected = model.adversarial_losses(unique, parts, scale)
    assert set(losses) == set(expected)
    for key in expected:
        assert (losses[key] - expected[key]).abs() < 1e-12, key
    expected_diagnostics = model.adversarial_diagnostics(unique, parts)
    assert set(diagnostics) == set(expected_diagnostics)
    for key, value in expected_diagnostics.items():
        assert (diagnostics[key] - value).abs() < 1e-6, key  # accuracies: float32 means there
    grads = []
    for total in (sum(losses.values()) + factored.rep.sum(), sum(expected.values()) + parts.rep.sum()):
        model.zero_grad()
        total.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None) and (a is None or (a - b).abs().max() < 1e-10)


@pytest.mark.parametrize("per_modality", [False, True])
def test_relu_linear_of_a_constant_reuses_the_value_and_stops_at_the_input(per_modality):
    from marn.models.marn import relu_linear_of_constant

    torch.manual_seed(0)
    x = torch.randn(7, 3, 5, dtype=torch.float64, requires_grad=True)
    if per_modality:
        weight = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

        def product(inputs):
            return torch.einsum("uki,kio->uko", inputs, weight) + bias
    else:
        weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

        def product(inputs):
            return torch.nn.functional.linear(inputs, weight, bias)

    live = torch.relu(product(x))
    reused = relu_linear_of_constant(live, x, weight, bias, per_modality)
    recomputed = torch.relu(product(x.detach()))
    assert torch.equal(reused, recomputed)
    probe = torch.randn_like(live)
    got = torch.autograd.grad((reused * probe).sum(), (weight, bias), retain_graph=True)
    want = torch.autograd.grad((recomputed * probe).sum(), (weight, bias))
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(got, want, strict=True))
    (reused * probe).sum().backward()
    assert x.grad is None  # nothing reaches the input


@pytest.mark.parametrize(
    "name, modalities",
    [
        ("dmf", None),
        ("dmf", ("ids", "title")),  # no statistics: one group
        ("dmf", ("stats",)),  # statistics alone: one group, per state
        ("mmss", None),
        ("mmss", ("image", "title")),
        ("naml", None),
        ("naml", ("ids", "stats")),
    ],
)
def test_fusion_over_modality_groups_equals_the_stacked_embeddings(tiny_world, name, modalities):
    """DMF, MMSS and NAML run their per-modality layers once per distinct item for the item's own
    modalities (``ItemModalities.groups``): the same item reps, attention weights and gradients as the
    fusion over every state's stacked embeddings."""
    from marn.models.dmf import DMF
    from marn.models.mmss import MMSS
    from marn.models.naml import NAML

    kind = {"dmf": DMF, "mmss": MMSS, "naml": NAML}[name]
    torch.manual_seed(0)
    args = {} if modalities is None else {"modalities": modalities}
    model = kind(tiny_world.catalog, tiny_world.features, tiny_world.model_cfg, **args).double()
    states, _ = batch_items(tiny_world.train.batch(torch.arange(64)))
    assert len(torch.unique(states.items)) < len(states.items)  # items recur with other statistics
    assert grouping_pays(states) == (2 * len(torch.unique(states.items)) <= len(states.items))
    runs = []
    for fusion in (
        lambda: model.fusion(model.embedding(states)),
        lambda: model.fusion.over_groups(model.embedding.groups(states)),
    ):
        model.zero_grad()
        out = fusion()
        out = out if isinstance(out, tuple) else tuple(out)  # DMF: its shared layers
        sum(o.sin().sum() for o in out).backward()
        runs.append(([o.detach() for o in out], [p.grad for p in model.parameters()]))
    (plain, plain_grads), (grouped, grouped_grads) = runs
    assert len(plain) == len(grouped)
    for a, b in zip(plain, grouped, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-12
    for a, b in zip(plain_grads, grouped_grads, strict=True):
        assert (a is None) == (b is None) and (a is None or (a - b).abs().max() < 1e-12)
    assert any(g is not None and g.abs().max() > 0 for g in grouped_grads)


def test_grouping_pays_only_when_items_recur():
    from marn.models.layers import ItemStates

    stats = torch.zeros(8, 2, 2, dtype=torch.long)
    assert grouping_pays(ItemStates(torch.tensor([1, 1, 1, 1, 2, 2, 2, 2]), stats))  # a training batch
    assert not grouping_pays(ItemStates(torch.arange(8), stats))  # a request's distinct candidates


@pytest.mark.parametrize("k", [1, 3])
def test_per_modality_maps_and_reductions_equal_the_batched_forms_values_and_gradients(k):
    """One modality (the statistics, per state) takes addmm and no reduction over its single slot; the
    numbers and gradients are the batched einsum's and the sum's and max's."""
    generator = torch.Generator().manual_seed(k)
    x, weight, bias = (torch.randn(*s, generator=generator) for s in ((7, k, 5), (k, 5, 4), (k, 4)))
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    fast = per_modality_affine(*leaves)
    reference = [t.clone().requires_grad_() for t in (x, weight, bias)]
    slow = torch.einsum("uki,kio->uko", *reference[:2]) + reference[2]
    torch.testing.assert_close(fast, slow)
    for reduce in (lambda t: t.sum(1), lambda t: t.amax(1)):
        torch.testing.assert_close(over_modalities(fast, reduce), reduce(fast))
    upstream = torch.randn(7, 4, generator=generator)
    (over_modalities(fast, lambda t: t.amax(1)) * upstream).sum().backward()
    (slow.amax(1) * upstream).sum().backward()
    for a, b in zip(leaves, reference, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
