"""Behavioural tests for every registered model: it learns on synthetic data and can overfit a tiny batch."""

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marn.models import build_model, model_names
from marn.train import predict


def _distinct_item_rows(data, n):
    """Rows whose candidate items are all different, so even an IDs-only model can fit every label."""
    items = data.tensors["item"].numpy()
    _, first = np.unique(items, return_index=True)
    rows = np.sort(first)[:n]
    return torch.as_tensor(rows)


def test_registry_lists_the_papers_models():
    expected = {
        "popularity", "lr", "fm", "youtubenet", "xdeepfm", "dupn", "din", "dien", "dmf", "mmss", "naml",
        "base_ids", "base_image", "base_conc", "base_maf", "base_maf_adv", "base_maf_ddma", "marn",
    }  # fmt: skip
    assert set(model_names()) == expected


@pytest.mark.parametrize("name", model_names())
def test_model_trains_with_falling_loss(name, tiny_world):
    torch.manual_seed(0)
    model = build_model(name, tiny_world.catalog, tiny_world.features, tiny_world.model_cfg)
    probe = tiny_world.train.batch(torch.arange(256))

    def probe_loss():
        model.eval()
        with torch.no_grad():
            return F.binary_cross_entropy_with_logits(model(probe).logits, probe["label"]).item()

    before = probe_loss()
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.1)
    order = torch.randperm(len(tiny_world.train), generator=torch.Generator().manual_seed(0))
    for step, index in enumerate(order.split(64)[:40]):
        model.train()
        batch = tiny_world.train.batch(index)
        out = model(batch, progress=step / 40)
        assert out.logits.shape == (len(index),) and torch.isfinite(out.logits).all()
        loss = F.binary_cross_entropy_with_logits(out.logits, batch["label"])
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert probe_loss() < before
    scores = predict(model, tiny_world.valid)
    assert scores.shape == (len(tiny_world.valid),) and np.isfinite(scores).all()


@pytest.mark.parametrize("name", model_names())
def test_model_overfits_a_tiny_batch(name, tiny_world):
    torch.manual_seed(0)
    model = build_model(name, tiny_world.catalog, tiny_world.features, tiny_world.model_cfg)
    batch = tiny_world.train.batch(_distinct_item_rows(tiny_world.train, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(300):
        model.train()
        out = model(batch)
        loss = F.binary_cross_entropy_with_logits(out.logits, batch["label"])
        optimizer.zero_grad()
        (loss if out.aux_loss is None else loss + out.aux_loss).backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05


@pytest.mark.parametrize("name", model_names())
def test_empty_history_gives_finite_scores(name, tiny_world):
    model = build_model(name, tiny_world.catalog, tiny_world.features, tiny_world.model_cfg).eval()
    batch = tiny_world.train.batch(torch.arange(8))
    batch["hist_len"] = torch.zeros_like(batch["hist_len"])
    for key in ("hist_items", "hist_behavior", "hist_gap"):
        batch[key] = torch.zeros_like(batch[key])
    with torch.no_grad():
        assert torch.isfinite(model(batch).logits).all()


@pytest.mark.parametrize("name", ["marn", "din"])
def test_read_only_tables_from_the_object_store_are_shared_without_a_warning(name, tiny_world):
    """In a Ray worker the catalogue and feature arrays are read-only views of the object store: the model
    shares them (no copy of a large image table) and torch's non-writable-array warning stays out of logs."""

    def read_only(array):
        view = array.view()
        view.flags.writeable = False
        return view

    features = tiny_world.features
    features = replace(
        features,
        image=read_only(features.image),
        title=read_only(features.title),
        word_vectors=read_only(features.word_vectors),
    )
    catalog = replace(tiny_world.catalog, attributes=read_only(tiny_world.catalog.attributes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(name, catalog, features, tiny_world.model_cfg)
    shared = {buffer.data_ptr() for buffer in model.buffers()}
    assert catalog.attributes.ctypes.data in shared
    if name == "marn":
        assert features.image.ctypes.data in shared
    scores = predict(model, tiny_world.valid)
    assert np.isfinite(scores).all()
