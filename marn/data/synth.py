"""Synthetic canonical dataset with a planted multimodal signal.

The generator writes a dataset directory in the canonical contract (:mod:`marn.data.schema`):
``items.parquet``, ``images/<item_id>.png``, ``users.parquet``, ``events.parquet`` and
``item_stats.parquet`` (daily point-in-time counts, :mod:`marn.data.stats`).

Planted signal
--------------
Every item has five latent attributes, each visible in a different set of modalities (as in the paper's
*Girls Ballet Tutu Zebra Hot Pink*: the yarn material shows only in the image, the hot pink color in both
image and title):

=========  ==============  ==================================================================
attribute  visible in      how it is rendered
=========  ==============  ==================================================================
color      image + title   the color word in the title and the dominant color of the pixels
texture    image only      a pattern over the background: plain, stripes, dots or checks
shape      image only      a neutral-colored silhouette in the middle of the image
style      title only      a style word (vintage, sporty, ...)
material   title only      a material word (cotton, wool, ...)
=========  ==============  ==================================================================

(``ATTRIBUTE_MODALITIES`` holds this table.) Titles also carry the category's noun and one to three filler
words in varying order; images carry per-item color jitter, a random pattern phase, a jittered silhouette
position and pixel noise, so no two images are identical. Category, brand and shop IDs correlate only weakly
with the attributes: each category prefers a style and a shape, each brand a color and a material, each
shop a texture, and an item takes its owner's preference with probability ``id_correlation`` (else a
uniform value). Price (the one static statistic) depends on category and, mildly, on material.

Each user has a taste, a preferred value, for ``n_tastes`` attributes drawn at random. Every event picks
an item with probability ``∝ popularity_i · exp(beta · matches(user, i))``, where ``matches`` counts the
user's tastes the item satisfies and popularity is a mild log-normal factor. So a user's history items
share the user's taste, and a model that sees images and titles can predict the next click from the
history far better than one that sees only IDs. Cart and purchase events are rarer than clicks and more
likely the more of the user's tastes the item matches. Profile columns (age bucket, gender) carry no
signal. Sequence lengths are ``4 + geometric`` with mean ``cfg.events_per_user`` (at least 4); times
increase strictly along each user's sequence and fall in ``[cfg.start, cfg.start + cfg.days)``.

Ground truth, never model inputs
--------------------------------
``latent_items.parquet`` (item_id, the five attributes, popularity) and ``latent_users.parquet``
(user_id, ``taste_<attribute>``, null where the user has no taste for it) are NOT part of the canonical
contract. They exist for tests and analyses only (is the signal learnable, which modality carries it);
no importer, feature or model may read them.

Scale and determinism
---------------------
Items (and their images) are held in memory; events never are. Users are generated in fixed blocks of
``USER_BLOCK`` users, each from its own ``numpy`` generator seeded by ``SeedSequence([seed, stream,
block])``, and all per-event sampling inside a block is vectorised (item choice is exact inverse-CDF
sampling from a mixture over taste subsets, see ``_ItemSampler``). ``cfg.chunk_users`` only decides how
many users are written per parquet row group and between progress calls, so the output is the same for
any chunk size. Item statistics are counted per (item, day, behaviour) chunk by chunk, since counts are
additive, and accumulated at the end.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from marn.config import SynthConfig
from marn.data.schema import EVENTS, ITEM_STATS, ITEMS, TABLE_FILES, USERS, conform, write_table
from marn.data.stats import STAT_PREFIX

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "teal")
TEXTURES = ("plain", "stripes", "dots", "checks")
SHAPES = ("circle", "square", "triangle", "diamond")
STYLES = ("vintage", "sporty", "classic", "elegant", "casual", "modern")
MATERIALS = ("cotton", "wool", "silk", "leather", "denim", "linen")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "texture": TEXTURES,
    "shape": SHAPES,
    "style": STYLES,
    "material": MATERIALS,
}
ATTRIBUTE_MODALITIES: dict[str, tuple[str, ...]] = {
    "color": ("image", "title"),
    "texture": ("image",),
    "shape": ("image",),
    "style": ("title",),
    "material": ("title",),
}

# One noun per category (reused cyclically when there are more categories than nouns).
CATEGORY_NOUNS = (
    "dress", "shirt", "skirt", "jacket", "coat", "sweater", "hat", "scarf", "bag", "shoes",
    "boots", "sandals", "socks", "gloves", "belt", "wallet", "backpack", "pillow", "blanket", "towel",
    "mug", "lamp", "vase", "rug", "curtain", "umbrella", "tie", "vest", "hoodie", "shorts",
    "tutu", "pants", "blouse", "cardigan", "tote", "purse", "sneakers", "slippers", "pajamas", "apron",
)  # fmt: skip
FILLER_WORDS = (
    "new", "women", "men", "girls", "boys", "kids", "size", "large", "small", "fashion",
    "quality", "gift", "set", "pack", "sale", "original", "premium", "everyday", "summer", "winter",
    "daily", "home", "travel", "party", "unisex",
)  # fmt: skip
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
GENDERS = ("female", "male", "unknown")
BEHAVIOR_CODES = ("click", "cart", "purchase")  # code -> behaviour name in events.behavior

LATENT_ITEMS_FILE = "latent_items.parquet"
LATENT_USERS_FILE = "latent_users.parquet"
IMAGE_DIR = "images"

USER_BLOCK = 1024  # users per random stream: part of the seeding contract, so changing it changes the data
IMAGE_BATCH = 512  # items per image random stream (seeding contract) and per rendering batch (memory)
MIN_EVENTS = 4  # DIN protocol: train, validation and test each need a step, plus one history item

# One row per COLORS entry, chosen to have distinct chromaticity.
_RGB = np.array(
    [[210, 40, 40], [240, 150, 30], [230, 210, 40], [50, 170, 70],
     [40, 90, 210], [140, 60, 190], [245, 120, 190], [40, 170, 170]],
    dtype=np.float32,
)  # fmt: skip
_MATERIAL_PRICE = np.array([1.0, 1.4, 1.8, 2.0, 1.2, 1.3])  # per MATERIALS entry; a mild stats signal
_DAY_US = 86_400 * 1_000_000
_DAY_STRIDE = 1 << 20  # days per item in item-stats keys (~2800 years): keys stay int64 for 1e7 items
_ITEM_STREAM, _IMAGE_STREAM, _USER_STREAM = 1, 2, 3  # SeedSequence stream ids: independent sub-streams

_A = len(ATTRIBUTES)
_CARD = np.array([len(v) for v in ATTRIBUTES.values()], dtype=np.int64)
_COLOR, _TEXTURE, _SHAPE, _STYLE, _MATERIAL = range(_A)


@dataclass(frozen=True)
class PlantedSignal:
    """Strength of the planted signal; the defaults are what ``marn data synth`` writes."""

    n_tastes: int = 2  # attributes each user has a preferred value for
    beta: float = 2.0  # log-weight per matched taste; 0 removes the signal
    popularity_sigma: float = 0.7  # log-normal spread of item popularity (mild)
    id_correlation: float = 0.2  # chance an item takes its category's/brand's/shop's preferred value


@dataclass(frozen=True)
class SynthSummary:
    path: Path
    users: int
    items: int
    events: int
    images: int


def synthesize(
    out_dir: Path,
    cfg: SynthConfig,
    progress: Callable[[int, int], None] | None = None,
    *,
    signal: PlantedSignal | None = None,
) -> SynthSummary:
    """Write a synthetic canonical dataset (plus ground-truth latent tables) into ``out_dir``.

    ``progress(done_users, total_users)`` is called after each chunk of ``cfg.chunk_users`` users.
    The result depends only on ``cfg`` (not on ``cfg.chunk_users``) and ``signal``.
    """
    signal = PlantedSignal() if signal is None else signal
    _check(cfg, signal)
    out_dir = Path(out_dir)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    start_us = _to_us(cfg.start)

    items, attrs, pop = _make_items(cfg, signal, start_us)
    item_ids = items["item_id"].to_numpy(dtype=object)
    write_table(out_dir, ITEMS, items)
    latent_items = pd.DataFrame({"item_id": item_ids})
    for a, (name, values) in enumerate(ATTRIBUTES.items()):
        latent_items[name] = np.asarray(values, dtype=object)[attrs[:, a]]
    latent_items["popularity"] = pop
    pq.write_table(pa.Table.from_pandas(latent_items, preserve_index=False), out_dir / LATENT_ITEMS_FILE)
    n_images = _write_images(out_dir, cfg, attrs)

    sampler = _ItemSampler(attrs, pop, signal)
    stats = ItemStatsAccumulator(item_ids, start_us)
    writers = {
        name: _StreamWriter(out_dir / file)
        for name, file in (
            (EVENTS, TABLE_FILES[EVENTS]),
            (USERS, TABLE_FILES[USERS]),
            ("latent_users", LATENT_USERS_FILE),
        )
    }
    n_events = 0
    user_width = len(str(cfg.users - 1))
    try:
        for lo, hi, chunk in _user_chunks(cfg, signal, sampler, start_us):
            user_ids = np.array([f"u{u:0{user_width}d}" for u in range(lo, hi)], dtype=object)
            writers[USERS].write(conform(USERS, chunk.users_frame(user_ids)))
            writers["latent_users"].write(chunk.latent_frame(user_ids))
            ts = pd.Series(chunk.ts.astype("datetime64[us]")).dt.tz_localize("UTC")
            events = pd.DataFrame(
                {
                    "user_id": user_ids[chunk.user - lo],
                    "item_id": item_ids[chunk.item],
                    "behavior": np.asarray(BEHAVIOR_CODES, dtype=object)[chunk.behavior],
                    "ts": ts,
                }
            )
            writers[EVENTS].write(conform(EVENTS, events))
            stats.add(chunk.item, chunk.ts, chunk.behavior)
            n_events += len(chunk.item)
            if progress is not None:
                progress(hi, cfg.users)
    finally:
        for writer in writers.values():
            writer.close()
    write_table(out_dir, ITEM_STATS, stats.frame())
    return SynthSummary(path=out_dir, users=cfg.users, items=cfg.items, events=n_events, images=n_images)


def _check(cfg: SynthConfig, signal: PlantedSignal) -> None:
    # SynthConfig validates ranges itself, but model_construct() or a hand-made config can bypass that.
    if cfg.seed < 0:
        raise ValueError(f"synth.seed must be >= 0 (numpy SeedSequence needs it), got {cfg.seed}")
    if cfg.users < 1 or cfg.items < 2:
        raise ValueError(f"synth needs users >= 1 and items >= 2, got users={cfg.users}, items={cfg.items}")
    if cfg.events_per_user <= 0 or cfg.days < 1 or cfg.chunk_users < 1 or cfg.image_size < 8:
        raise ValueError(
            "synth needs events_per_user > 0, days >= 1, chunk_users >= 1 and image_size >= 8, got "
            f"{cfg.events_per_user}, {cfg.days}, {cfg.chunk_users}, {cfg.image_size}"
        )
    if not 1 <= signal.n_tastes <= _A:
        raise ValueError(
            f"n_tastes={signal.n_tastes}: each user can have a taste for 1 to {_A} attributes "
            f"({', '.join(ATTRIBUTES)})"
        )
    if signal.beta < 0 or signal.popularity_sigma < 0 or not 0 <= signal.id_correlation <= 1:
        raise ValueError(f"signal needs beta >= 0, popularity_sigma >= 0, 0 <= id_correlation <= 1: {signal}")


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *stream])))


def _to_us(when: datetime) -> int:
    ts = pd.Timestamp(when)
    ts = ts.tz_localize(UTC) if ts.tzinfo is None else ts.tz_convert(UTC)  # a naive start means UTC
    return int(ts.value) // 1000  # Timestamp.value is in nanoseconds


def _ids(prefix: str, n: int) -> np.ndarray:
    width = len(str(n - 1))  # zero-padded, so string order equals numeric order
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


# ----------------------------------------------------------------------------------------------- items


def _make_items(
    cfg: SynthConfig, signal: PlantedSignal, start_us: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Items table, latent attribute codes (n x A) and popularity, all from the item stream."""
    n = cfg.items
    rng = _rng(cfg.seed, _ITEM_STREAM)
    n_cat, n_brand, n_shop = (int(np.clip(n // d, 2, hi)) for d, hi in ((50, 40), (10, 500), (20, 200)))
    category = rng.integers(0, n_cat, n)
    brand = rng.integers(0, n_brand, n)
    shop = rng.integers(0, n_shop, n)

    attrs = (rng.random((n, _A)) * _CARD).astype(np.int64)
    # Weak ID correlation: each owner (category, brand, shop) prefers one value of some attributes.
    for owner, n_owner, attributes in (
        (category, n_cat, (_STYLE, _SHAPE)),
        (brand, n_brand, (_COLOR, _MATERIAL)),
        (shop, n_shop, (_TEXTURE,)),
    ):
        for a in attributes:
            preferred = rng.integers(0, _CARD[a], n_owner)
            take = rng.random(n) < signal.id_correlation
            attrs[take, a] = preferred[owner[take]]
    pop = np.exp(signal.popularity_sigma * rng.standard_normal(n))

    base_price = np.exp(rng.normal(3.0, 0.5, n_cat))
    price = base_price[category] * _MATERIAL_PRICE[attrs[:, _MATERIAL]] * np.exp(rng.normal(0.0, 0.35, n))
    first_seen = start_us - (rng.random(n) * 365 * _DAY_US).astype(np.int64)  # items predate the log

    # Title: filler words, then style/color/material in a random order, then the category noun, then fillers.
    n_fill = rng.integers(1, 4, n)
    fill = np.argsort(rng.random((n, len(FILLER_WORDS))), axis=1)[:, :3]  # distinct filler words
    fill_before = rng.random((n, 3)) < 0.5
    adj_order = np.argsort(rng.random((n, 3)), axis=1)
    words = np.stack(
        [
            np.asarray(STYLES, dtype=object)[attrs[:, _STYLE]],
            np.asarray(COLORS, dtype=object)[attrs[:, _COLOR]],
            np.asarray(MATERIALS, dtype=object)[attrs[:, _MATERIAL]],
        ],
        axis=1,
    )
    nouns = np.asarray(CATEGORY_NOUNS, dtype=object)[category % len(CATEGORY_NOUNS)]
    titles = []
    for i in range(n):
        before = [FILLER_WORDS[fill[i, j]] for j in range(n_fill[i]) if fill_before[i, j]]
        after = [FILLER_WORDS[fill[i, j]] for j in range(n_fill[i]) if not fill_before[i, j]]
        titles.append(" ".join([*before, *words[i, adj_order[i]], nouns[i], *after]))

    item_ids = _ids("i", n)
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "category_id": _ids("c", n_cat)[category],
            "brand_id": _ids("b", n_brand)[brand],
            "shop_id": _ids("s", n_shop)[shop],
            "title": titles,
            "image_uri": [f"{IMAGE_DIR}/{i}.png" for i in item_ids],
            "first_seen": pd.Series(first_seen.astype("datetime64[us]")).dt.tz_localize("UTC"),
            "price": np.round(price, 2),
        }
    )
    return items, attrs, pop


def _write_images(out_dir: Path, cfg: SynthConfig, attrs: np.ndarray) -> int:
    item_ids = _ids("i", cfg.items)
    for b, lo in enumerate(range(0, cfg.items, IMAGE_BATCH)):
        hi = min(lo + IMAGE_BATCH, cfg.items)
        pixels = render_images(attrs[lo:hi], cfg.image_size, _rng(cfg.seed, _IMAGE_STREAM, b))
        for i in range(hi - lo):
            # compress_level=1: PNG size barely matters here, encoding time does (1e5 items). Encoding to
            # memory and writing once is ~3x faster than Image.save(path), which writes in small pieces.
            png = io.BytesIO()
            Image.fromarray(pixels[i]).save(png, format="PNG", compress_level=1)
            (out_dir / IMAGE_DIR / f"{item_ids[lo + i]}.png").write_bytes(png.getvalue())
    return cfg.items


def render_images(attrs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 images (n, size, size, 3) for items with latent attribute codes ``attrs`` (n x A).

    Background in the item's color (jittered), the texture as a darker pattern over it at a random phase,
    the shape as a neutral silhouette at a jittered position (about a quarter of the area, so the color
    stays dominant), plus pixel noise.
    """
    n = len(attrs)
    textures, shapes, period, jitter = _pattern_canvases(size)
    yy, xx = np.mgrid[0:size, 0:size]
    # Each item's pattern and silhouette is a window of a shared canvas: one gather instead of per-item math.
    phase = rng.integers(0, period, (n, 2))[:, :, None, None]
    texture = textures[attrs[:, _TEXTURE, None, None], yy + phase[:, 0], xx + phase[:, 1]]
    offset = rng.integers(0, 2 * jitter + 1, (n, 2))[:, :, None, None]
    shape = shapes[attrs[:, _SHAPE, None, None], yy + offset[:, 0], xx + offset[:, 1]]

    color = _RGB[attrs[:, _COLOR]] + rng.normal(0.0, 10.0, (n, 3)).astype(np.float32)
    neutral = np.where(rng.random(n) < 0.5, 235.0, 35.0).astype(np.float32)  # white or near-black
    shade = np.where(texture, np.float32(0.55), np.float32(1.0))
    img = np.where(shape[..., None], neutral[:, None, None, None], color[:, None, None, :] * shade[..., None])
    img += np.float32(6.0) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _pattern_canvases(size: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Boolean canvases, one per TEXTURES / SHAPES entry, larger than an image by the phase / jitter range."""
    period = max(4, size // 6)
    half = period // 2
    yy, xx = np.mgrid[0 : size + period, 0 : size + period]
    cell = period / 2 - 0.5  # a dot's centre within its cell
    textures = np.stack(
        [
            np.zeros(yy.shape, dtype=bool),  # plain
            ((xx + yy) // half) % 2 == 1,  # diagonal stripes
            ((xx % period) - cell) ** 2 + ((yy % period) - cell) ** 2 <= (period / 3) ** 2,  # dots
            ((xx // half) + (yy // half)) % 2 == 1,  # checks
        ]
    )
    jitter = max(1, round(0.08 * size))
    yy, xx = np.mgrid[0 : size + 2 * jitter, 0 : size + 2 * jitter]
    centre = jitter + size / 2 - 0.5
    dx, dy, radius = xx - centre, yy - centre, size * 0.27
    shapes = np.stack(
        [
            dx**2 + dy**2 <= radius**2,  # circle
            np.maximum(np.abs(dx), np.abs(dy)) <= radius * 0.88,  # square
            (dy <= radius * 0.8) & (np.abs(dx) <= (dy + radius) * 0.58),  # triangle
            np.abs(dx) + np.abs(dy) <= radius * 1.25,  # diamond
        ]
    )
    return textures, shapes, period, jitter


# ------------------------------------------------------------------------------------------- sampling


class _ItemSampler:
    """Exact sampling of items with weight ``pop_i · exp(beta · matches(user, i))``.

    With c = e^beta - 1, exp(beta · matches) = Π_{a ∈ tastes} (1 + c·[match_a]) = Σ_{S ⊆ tastes} c^|S|·
    [item matches the user on all of S]. So: pick a subset S of the user's tastes with probability
    ∝ c^|S| · Z(S, values), Z being the popularity mass of items with those values on S, then pick an item
    from that group ∝ popularity by inverse CDF. Groups of every attribute subset up to n_tastes are laid
    out in one array sorted by group, with one running popularity sum, so a single searchsorted serves all.
    """

    def __init__(self, attrs: np.ndarray, pop: np.ndarray, signal: PlantedSignal) -> None:
        self.attrs = attrs
        self.k = signal.n_tastes
        self.c = float(np.expm1(signal.beta))
        subsets = [s for r in range(self.k + 1) for s in itertools.combinations(range(_A), r)]
        self.sid_of_mask = np.full(1 << _A, -1, dtype=np.int64)
        self.mult = np.zeros((len(subsets), _A), dtype=np.int64)  # mixed-radix group key per subset
        self.group_base = np.zeros(len(subsets), dtype=np.int64)
        orders, starts, ends = [], [], []
        n_groups, position = 0, 0
        for sid, subset in enumerate(subsets):
            self.sid_of_mask[sum(1 << a for a in subset)] = sid
            m = 1
            for a in subset:
                self.mult[sid, a] = m
                m *= int(_CARD[a])
            key = attrs @ self.mult[sid]
            counts = np.bincount(key, minlength=m)
            first = position + np.concatenate([[0], np.cumsum(counts)[:-1]])
            orders.append(np.argsort(key, kind="stable"))
            starts.append(first)
            ends.append(first + counts)
            self.group_base[sid] = n_groups
            n_groups += m
            position += len(key)
        self.order = np.concatenate(orders)
        self.cum = np.cumsum(pop[self.order])
        self.start = np.concatenate(starts)
        self.end = np.concatenate(ends)
        before = np.where(self.start > 0, self.cum[np.maximum(self.start - 1, 0)], 0.0)
        mass = np.where(self.end > self.start, self.cum[np.maximum(self.end - 1, 0)] - before, 0.0)
        self.before, self.mass = before, np.maximum(mass, 0.0)

    def sample(
        self, taste_attr: np.ndarray, taste_val: np.ndarray, user: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Item codes for events of ``user`` (indices into the taste arrays, one per event)."""
        n, k = taste_attr.shape
        groups = np.zeros((n, 1 << k), dtype=np.int64)
        weights = np.zeros((n, 1 << k))
        for m in range(1 << k):
            slots = [j for j in range(k) if m >> j & 1]
            bitmask = np.zeros(n, dtype=np.int64)
            for j in slots:
                bitmask |= 1 << taste_attr[:, j]
            sid = self.sid_of_mask[bitmask]
            key = np.zeros(n, dtype=np.int64)
            for j in slots:
                key += taste_val[:, j] * self.mult[sid, taste_attr[:, j]]
            groups[:, m] = self.group_base[sid] + key
            weights[:, m] = self.c ** len(slots) * self.mass[groups[:, m]]
        cw = np.cumsum(weights, axis=1)
        u = rng.random(len(user)) * cw[user, -1]
        pick = np.minimum((u[:, None] >= cw[user]).sum(axis=1), (1 << k) - 1)
        group = groups[user, pick]
        target = self.before[group] + rng.random(len(user)) * self.mass[group]
        pos = np.clip(np.searchsorted(self.cum, target, side="right"), self.start[group], self.end[group] - 1)
        return self.order[pos]


@dataclass
class _UserChunk:
    """Users [lo, hi) and their events, grouped by user in time order (user indices are global)."""

    taste_attr: np.ndarray  # (n, k) attribute codes, ascending
    taste_val: np.ndarray  # (n, k) value codes
    age: np.ndarray
    gender: np.ndarray
    offsets: np.ndarray  # (n + 1,) event range per user
    user: np.ndarray  # per event
    item: np.ndarray
    behavior: np.ndarray
    ts: np.ndarray  # int64 microseconds since the epoch

    def take(self, a: int, b: int) -> _UserChunk:
        """Users a..b-1 of this chunk (local indices)."""
        e0, e1 = self.offsets[a], self.offsets[b]
        return _UserChunk(
            self.taste_attr[a:b], self.taste_val[a:b], self.age[a:b], self.gender[a:b],
            self.offsets[a : b + 1] - e0, self.user[e0:e1], self.item[e0:e1], self.behavior[e0:e1],
            self.ts[e0:e1],
        )  # fmt: skip

    @staticmethod
    def concat(parts: list[_UserChunk]) -> _UserChunk:
        if len(parts) == 1:
            return parts[0]
        offsets = [parts[0].offsets]
        for p in parts[1:]:
            offsets.append(p.offsets[1:] + offsets[-1][-1])
        fields = ("taste_attr", "taste_val", "age", "gender")
        events = ("user", "item", "behavior", "ts")
        return _UserChunk(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in fields),
            np.concatenate(offsets),
            *(np.concatenate([getattr(p, f) for p in parts]) for f in events),
        )

    def users_frame(self, user_ids: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user_id": user_ids,
                "age_bucket": np.asarray(AGE_BUCKETS, dtype=object)[self.age],
                "gender": np.asarray(GENDERS, dtype=object)[self.gender],
            }
        )

    def latent_frame(self, user_ids: np.ndarray) -> pa.Table:
        columns: dict[str, np.ndarray] = {"user_id": user_ids}
        for a, (name, values) in enumerate(ATTRIBUTES.items()):
            has = self.taste_attr == a
            value = np.where(has.any(axis=1), (self.taste_val * has).sum(axis=1), -1)
            columns[f"taste_{name}"] = np.where(
                value >= 0, np.asarray(values, dtype=object)[np.maximum(value, 0)], None
            )
        return pa.Table.from_pandas(pd.DataFrame(columns), schema=_LATENT_USERS_SCHEMA, preserve_index=False)


_LATENT_USERS_SCHEMA = pa.schema(
    [pa.field("user_id", pa.string())] + [pa.field(f"taste_{name}", pa.string()) for name in ATTRIBUTES]
)


def _user_block(
    block: int, cfg: SynthConfig, signal: PlantedSignal, sampler: _ItemSampler, start_us: int
) -> _UserChunk:
    """Users of one fixed block, from that block's own random stream."""
    lo = block * USER_BLOCK
    n = min(lo + USER_BLOCK, cfg.users) - lo
    rng = _rng(cfg.seed, _USER_STREAM, block)
    k = signal.n_tastes
    taste_attr = np.sort(np.argsort(rng.random((n, _A)), axis=1)[:, :k], axis=1)
    taste_val = (rng.random((n, k)) * _CARD[taste_attr]).astype(np.int64)
    age = rng.integers(0, len(AGE_BUCKETS), n)
    gender = rng.integers(0, len(GENDERS), n)

    extra_mean = max(cfg.events_per_user - MIN_EVENTS, 0.0)
    extra = rng.geometric(1.0 / (extra_mean + 1.0), n) - 1 if extra_mean > 0 else np.zeros(n, np.int64)
    lengths = (MIN_EVENTS + extra).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    local = np.repeat(np.arange(n), lengths)
    item = sampler.sample(taste_attr, taste_val, local, rng)

    # More of the user's tastes matched -> more carts and purchases.
    attrs = sampler.attrs
    matched = np.zeros(len(item))
    for j in range(k):
        matched += attrs[item, taste_attr[local, j]] == taste_val[local, j]
    share = matched / k
    u = rng.random(len(item))
    p_purchase = 0.01 + 0.03 * share
    p_cart = 0.03 + 0.07 * share
    behavior = np.where(u < p_purchase, 2, np.where(u < p_purchase + p_cart, 1, 0)).astype(np.int8)

    # Times: each user is active in a window of the span; event times are sorted uniforms in it (as
    # normalised cumulative exponential gaps), and adding the event's position makes them strictly increase.
    span = cfg.days * _DAY_US
    w0 = (rng.random(n) * 0.6 * span).astype(np.int64)
    width = ((span - w0) * rng.uniform(0.4, 1.0, n)).astype(np.int64)
    gaps = rng.standard_exponential(len(item) + n)
    seg = offsets + np.arange(n + 1)  # L + 1 gaps per user
    cum = np.cumsum(gaps)
    before = np.concatenate([[0.0], cum[seg[1:-1] - 1]])
    total = cum[seg[1:] - 1] - before
    pos = np.arange(len(item)) - offsets[local]
    frac = (cum[seg[local] + pos] - before[local]) / total[local]
    ts = start_us + w0[local] + np.floor(frac * (width - lengths)[local]).astype(np.int64) + pos

    return _UserChunk(taste_attr, taste_val, age, gender, offsets, local + lo, item, behavior, ts)


def _user_chunks(
    cfg: SynthConfig, signal: PlantedSignal, sampler: _ItemSampler, start_us: int
) -> Iterator[tuple[int, int, _UserChunk]]:
    """(lo, hi, users lo..hi-1) for consecutive chunks of cfg.chunk_users users, cut from fixed blocks."""
    cached: tuple[int, _UserChunk] | None = None
    for lo in range(0, cfg.users, cfg.chunk_users):
        hi = min(lo + cfg.chunk_users, cfg.users)
        parts = []
        for block in range(lo // USER_BLOCK, (hi - 1) // USER_BLOCK + 1):
            if cached is None or cached[0] != block:
                cached = (block, _user_block(block, cfg, signal, sampler, start_us))
            b0 = block * USER_BLOCK
            parts.append(cached[1].take(max(lo, b0) - b0, min(hi, b0 + USER_BLOCK) - b0))
        yield lo, hi, _UserChunk.concat(parts)


# -------------------------------------------------------------------------------------------- writing


class _StreamWriter:
    """A ParquetWriter opened on the first table, so its schema is that table's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ItemStatsAccumulator:
    """Streaming equivalent of :func:`marn.data.stats.daily_item_stats` for chunks of events.

    Counts per (item, day, behaviour) are additive across chunks, so each chunk is reduced to sparse
    counts and merged; ``frame()`` then takes cumulative sums per item exactly as ``daily_item_stats``.
    """

    def __init__(self, item_ids: np.ndarray, start_us: int) -> None:
        self.item_ids = np.asarray(item_ids, dtype=object)
        self.day0 = start_us - start_us % _DAY_US  # UTC midnight at or before the start
        self.keys = np.zeros(0, dtype=np.int64)  # sorted (item, day, behaviour) keys with counts
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, item: np.ndarray, ts_us: np.ndarray, behavior: np.ndarray) -> None:
        """Count events given as item codes, int64 microsecond times and BEHAVIOR_CODES indices."""
        if len(item) == 0:
            return
        day = (ts_us - self.day0) // _DAY_US
        if day.min() < 0 or day.max() >= _DAY_STRIDE:
            raise ValueError(f"event days must lie in [0, {_DAY_STRIDE}) after the first day")
        key = (item.astype(np.int64) * _DAY_STRIDE + day) * len(BEHAVIOR_CODES) + behavior
        keys, counts = np.unique(key, return_counts=True)
        merged = np.concatenate([self.keys, keys])
        order = np.argsort(merged, kind="stable")
        merged = merged[order]
        weights = np.concatenate([self.counts, counts])[order]
        first = np.flatnonzero(np.concatenate([[True], merged[1:] != merged[:-1]]))
        self.keys, self.counts = merged[first], np.add.reduceat(weights, first)

    def frame(self) -> pd.DataFrame:
        """The accumulated statistics, equal to ``daily_item_stats(all events)``."""
        if len(self.keys) == 0:
            return pd.DataFrame(
                {"item_id": pd.Series(dtype=str), "ts": pd.Series(dtype="datetime64[us, UTC]")}
            )
        n_beh = len(BEHAVIOR_CODES)
        rows, inverse = np.unique(self.keys // n_beh, return_inverse=True)
        matrix = np.zeros((len(rows), n_beh), dtype=np.int64)
        matrix[inverse, self.keys % n_beh] = self.counts
        item, day = rows // _DAY_STRIDE, rows % _DAY_STRIDE
        rank = np.argsort(np.argsort(self.item_ids, kind="stable"), kind="stable")  # item_id string order
        order = np.lexsort((day, rank[item]))
        item, day, matrix = item[order], day[order], matrix[order]
        present = sorted(BEHAVIOR_CODES[b] for b in range(n_beh) if matrix[:, b].any())
        counts = np.column_stack([matrix.sum(axis=1)] + [matrix[:, BEHAVIOR_CODES.index(b)] for b in present])
        # Cumulative sums restart at each item's first row.
        total = np.cumsum(counts, axis=0)
        first = np.flatnonzero(np.concatenate([[True], item[1:] != item[:-1]]))
        base = np.zeros_like(total)
        base[first[1:]] = total[first[1:] - 1]
        base = np.maximum.accumulate(base, axis=0)
        cumulative = total - base
        ts = self.day0 + (day + 1) * _DAY_US  # counts through day D are visible from D + 1, 00:00
        out = pd.DataFrame({"item_id": self.item_ids[item]})
        out["ts"] = pd.Series(ts.astype("datetime64[us]")).dt.tz_localize("UTC")
        for j, name in enumerate(["events", *present]):
            out[f"{STAT_PREFIX}{name}"] = cumulative[:, j].astype(np.int64)
        return out
