"""``write_report``: the tables, figures and results JSON of the finished runs (see
:mod:`benchmarks.paper_report`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.paper_report.claims import Claim, table_claims
from benchmarks.paper_report.figures import (
    attention_by_genre,
    figure_attention,
    figure_auc,
    figure_lambda,
    figure_losses,
    figure_tsne,
    figure_valid_curves,
    item_parts,
)
from benchmarks.paper_report.markdown import (
    batch_side_markdown,
    cold_markdown,
    instrumentation_table,
    markdown_table,
    model_table,
    popularity_ladder_markdown,
    popularity_markdown,
)
from benchmarks.paper_report.runs import (
    LABELS,
    REFERENCES,
    RESULTS,
    SIDE_BATCH_SIZE,
    SWITCH_ROWS,
    TABLE2,
    TABLE3,
    batch_side_table,
    cold_table,
    instrumentation,
    popularity_table,
    read_runs,
    read_tune_reports,
    stopped_early,
)
from benchmarks.paper_report.significance import auc_standard_error
from marn.config import load_config
from marn.data.schema import read_dataset
from marn.train import METRICS


def write_report(
    data: Path, work: Path, config: Path, out: Path, seeds: int, hardware: str, commit: str
) -> None:
    cfg = load_config(config)
    dataset = read_dataset(data)
    fig_dir = out / RESULTS
    fig_dir.mkdir(parents=True, exist_ok=True)
    runs = read_runs(work / "runs", list(dict.fromkeys(TABLE2 + TABLE3 + tuple(SWITCH_ROWS))), seeds)
    references = read_runs(work / "runs", REFERENCES, seeds)
    tune_reports = read_tune_reports(work)
    timing = json.loads((work / "timing.json").read_text()) if (work / "timing.json").exists() else {}
    path = work / "command.json"
    invocations = json.loads(path.read_text()).get("invocations", []) if path.exists() else []
    command = " && ".join(dict.fromkeys(i["command"] for i in invocations))
    report_commit = commit
    commit = invocations[0]["commit"] if invocations else commit  # the code the runs came from
    later = sorted({i["commit"][:10] for i in invocations} - {commit[:10]})
    claims = table_claims(runs)
    sections: list[str] = []
    figures: dict[str, str] = {}

    pop = popularity_table(work, seeds)
    pop_md = ""
    if pop:
        pop_md, pop_claims = popularity_markdown(pop)
        claims += pop_claims
    # The same levels for MARN's ablation ladder and the strongest other model of Table 2: where MARN's
    # difference to each comes from (rare or popular items)
    best_other = max(
        (n for n in TABLE2 if n in runs and n not in ("marn", "popularity")),
        key=lambda n: float(np.mean(runs[n].auc)),
        default=None,
    )
    ladder = [n for n in dict.fromkeys([*TABLE3, *([best_other] if best_other else [])]) if n in runs]
    pop_ladder = popularity_table(work, seeds, ladder) if "marn" in ladder else None
    cold = cold_table(work, seeds)
    batch_side = batch_side_table(work, seeds, cfg.train.batch_size)
    cold_md = ""
    if cold:
        cold_md, cold_claims = cold_markdown(cold)
        claims += cold_claims

    extras: dict[str, Any] = {}
    marn_dir = work / "runs" / "marn" / "seed-1"
    if (marn_dir / "model.pt").exists():
        _, ids, modalities, parts = item_parts(marn_dir / "model.pt", dataset)
        items = dataset.items.set_index("item_id").reindex(ids)
        genres_of_item = [str(c).split("|") for c in items["category_id"].fillna("unknown")]
        if parts.atten is not None:
            genres, matrix = attention_by_genre(parts, modalities, genres_of_item)
            counts = [sum(g in gs for gs in genres_of_item) for g in genres]
            figure_attention(fig_dir / "fig4-attention-by-genre.png", genres, modalities, matrix, counts)
            figures["fig4"] = f"{RESULTS}/fig4-attention-by-genre.png"
            extras["attention_by_genre"] = {
                "modalities": modalities,
                "genres": {
                    g: {m: round(float(v), 4) for m, v in zip(modalities, row, strict=True)}
                    for g, row in zip(genres, matrix, strict=True)
                },
            }
        if parts.invariant is not None:
            mixing = figure_tsne(fig_dir / "fig5-tsne.png", parts, modalities)
            figures["fig5"] = f"{RESULTS}/fig5-tsne.png"
            extras["tsne_image_title_mixing"] = mixing
            # DDMA's importance weights w^m = 1 - D0's probability of the true modality: raw ones near 0
            # mean D0 tells every c^m's modality apart. Over their mean (as D1's loss uses them), a modality
            # near 0 is one the adversary has given up on; about 1 each, all take part alike.
            w_raw = parts.w.mean(0)  # (M,)
            w_norm = (parts.w / parts.w.mean()).mean(0)  # (M,)
            extras["ddma_w_mean"] = {m: round(float(w), 4) for m, w in zip(modalities, w_norm, strict=True)}
            extras["ddma_w_mean_raw"] = {
                m: round(float(w), 4) for m, w in zip(modalities, w_raw, strict=True)
            }
            claims.append(
                Claim(
                    "Modality-invariant features of image and title overlap; modality-specific ones do not "
                    "(Figure 5)",
                    f"image/title nearest-neighbour mixing {mixing['invariant']:.2f} for c^m, "
                    f"{mixing['specific']:.2f} for s^m (0.5 = overlap, 0 = apart)",
                    mixing["invariant"] >= 0.25 and mixing["invariant"] > mixing["specific"],
                )
            )
    if (marn_dir / "curves.json").exists():
        trend = figure_losses(
            fig_dir / "fig6a-losses.png", json.loads((marn_dir / "curves.json").read_text())
        )
        figures["fig6a"] = f"{RESULTS}/fig6a-losses.png"
        extras["adversarial_loss_trend"] = trend
        if trend:
            what = "D1's unweighted cross-entropy" if trend["loss"] == "d1_ce" else "L_adv (w-weighted)"
            claims.append(
                Claim(
                    "The adversarial loss grows during training (Figure 6a)",
                    f"{what} mean {trend['adv_first_tenth']:.4f} over the first tenth of the steps, "
                    f"{trend['adv_last_tenth']:.4f} over the last",
                    trend["adv_last_tenth"] > trend["adv_first_tenth"],
                )
            )
    if tune_reports:
        figure_lambda(fig_dir / "fig6b-auc-vs-lambda0.png", tune_reports)
        figures["fig6b"] = f"{RESULTS}/fig6b-auc-vs-lambda0.png"
    if runs:
        figure_auc(fig_dir / "auc-by-model.png", runs, references)
        figures["auc"] = f"{RESULTS}/auc-by-model.png"
        figure_valid_curves(fig_dir / "valid-auc-by-epoch.png", runs)
        figures["curves"] = f"{RESULTS}/valid-auc-by-epoch.png"

    complete = [n for n in runs if len(runs[n].auc) == seeds]
    wall_s = float(sum(timing.values()))
    results = {
        "models": {
            n: {
                "auc": s.auc,
                "user_auc": s.user_auc,
                "epochs_run": s.epochs,
                "best_epoch": s.best_epochs,
                "stopped_early": stopped_early(s, cfg.train.patience),
                **({"adversary": adversary} if (adversary := instrumentation(s)) else {}),
            }
            for n, s in runs.items()
        },
        "references": {n: {"auc": s.auc, "user_auc": s.user_auc} for n, s in references.items()},
        "command": command,
        "commit": commit,  # the code of the first `run`; `invocations` lists every one
        "invocations": invocations,
        "report_commit": report_commit,
        "hardware": hardware,
        "wall_s": wall_s,
        "wall_s_by_stage": timing,
        "seeds": seeds,
        "complete_models": len(complete),
        "lambda0": tune_reports["marn"]["best"]["lambda0"] if "marn" in tune_reports else None,
        "lambda0_by_model": {row: r["best"]["lambda0"] for row, r in tune_reports.items()},
        "t_test": {c.text: c.here for c in claims[:1]},
        "claims": [{"claim": c.text, "here": c.here, "holds": c.holds} for c in claims],
        "popularity": pop,
        "popularity_by_model": pop_ladder,
        "cold": cold,
        "batch_side": batch_side,
        **extras,
        "config": cfg.model_dump(mode="json"),
    }
    (out / f"{RESULTS}.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")

    sections.append(
        f"# MARN on MovieLens-100k: the paper's experiments\n\n"
        f"Generated by `benchmarks/paper_report/` (commit `{report_commit[:10]}`) from the runs of "
        f"`{command}` at commit `{commit[:10]}`"
        + (f" (continued at {', '.join(later)})" if later else "")
        + f" on {hardware}. Grid wall time: {wall_s / 60:.0f} min "
        f"({', '.join(f'{k} {v / 60:.0f} min' for k, v in timing.items())}).\n"
    )
    test_users, typical = 0, 0.85
    if (marn_dir / METRICS).exists():
        marn_metrics = json.loads((marn_dir / METRICS).read_text())
        test_users, typical = marn_metrics["samples"]["test"] // 2, marn_metrics["auc"]
    sections.append(
        _setup_text(cfg, dataset, tune_reports, seeds, len(complete), len(runs), test_users, typical)
    )
    sections.append(
        "## The paper's claims on this data\n\n"
        + markdown_table(
            ["paper's claim", "here", "holds?"],
            [[c.text, c.here, {True: "yes", False: "**no**", None: "n/a"}[c.holds]] for c in claims],
        )
    )
    reading = out / f"{RESULTS}-reading.md"
    if reading.exists():
        sections.append(reading.read_text().strip())
    sections.append(
        "## Table 2 analogue: all models\n\n"
        + model_table(runs, TABLE2)
        + (f"\n\n![test AUC by model]({figures['auc']})" if "auc" in figures else "")
    )
    sections.append("## Table 3 analogue: ablations\n\n" + model_table(runs, TABLE3))
    switches = ["marn", *SWITCH_ROWS]
    if any(n in runs for n in SWITCH_ROWS):
        sections.append(
            "## MARN's adversary, one switch at a time\n\nMARN as configured (the faithful reading: w over "
            "its batch mean in D1's loss, the reversed gradient stopped at I, the raw w in the max-pool, "
            "lambda weighting the discriminator losses, lambda0 tuned, Ds on D1's weights) against MARN with "
            "one of those choices flipped.\n\n" + model_table(runs, switches, paper=False)
        )
    adversary = instrumentation_table(runs, [*TABLE3, *SWITCH_ROWS])
    if adversary:
        sections.append(
            "## The adversary at the best epoch\n\nTraining-batch means over the best epoch, mean over "
            "seeds: D1's cross-entropy on c^m without the w weights (the paper's adversarial loss; ln M "
            "= chance), the share of c^m (D1, D0) and s^m (Ds) whose modality the discriminator names, and "
            "each modality's mean w^m over the batch's mean w (1 each: all modalities weigh alike in D1's "
            f"loss; near 0: that modality has left the game).\n\n{adversary}"
        )
    if "curves" in figures:
        sections.append(
            "## Training budget: validation AUC per epoch\n\nEvery model gets the same epoch cap; a curve "
            "still rising at the last epoch means that model was stopped by the budget, not by early "
            f"stopping.\n\n![validation AUC per epoch]({figures['curves']})"
        )
    if references:
        ours = [n for n in ("base_ids", "din", "dien") if n in runs]
        sections.append(
            "## Outside references: DeepCTR-Torch on the same split\n\n"
            "DeepCTR-Torch 0.3.0's DIN and DIEN (AUGRU, auxiliary loss on sampled negatives) see the ID "
            "fields only (item, genre; MovieLens has no brand or shop), with our widths, optimiser, "
            "clipping, early stopping and seeds. Their dense layers get our Glorot initialisation: with "
            "DeepCTR's own (std 1e-4, made for Adam) neither learns under AdaGrad. BaseModel+IDs is ours "
            "on the same IDs-only inputs; our DIN and DIEN see every modality.\n\n"
            + model_table({**runs, **references}, [*REFERENCES, *ours], paper=False)
        )
    if pop_md:
        sections.append(
            "## Table 4 analogue: AUC by item popularity\n\nTest items cut into 10 equal-frequency "
            "levels by their training clicks (level 0 the least popular); AUC of each level's test "
            f"samples, mean over seeds.\n\n{pop_md}"
        )
    if pop_ladder:
        names = [n for n in pop_ladder if n != "levels"]
        sections.append(
            "## AUC by item popularity, model by model\n\nThe same levels for MARN's ablation ladder"
            + (f" and the strongest other model of Table 2 ({LABELS[best_other]})" if best_other else "")
            + "; the last rows are MARN's "
            "difference to each, in AUC points per level: where MARN's gap comes from, rare or popular "
            f"items.\n\n{popularity_ladder_markdown(pop_ladder, names)}"
        )
    if cold_md:
        held = cold.get("held_out") or {}
        sections.append(
            "## Table 5 analogue: recall of items unseen in training\n\n"
            f"{100 * held.get('share', float('nan')):.0f}% of the items (seed {held.get('seed')}) are held "
            "out: their samples leave train and valid and they are cut out of train and valid histories. "
            "Each test user who clicked a held-out item ranks every held-out test item; recall@N is the "
            f"share whose click is in the top N (mean ± std over seeds).\n\n{cold_md}"
        )
    if batch_side:
        sections.append(
            "## Side experiment: the paper's batch size\n\nThe grid trains at batch "
            f"{cfg.train.batch_size} so that it fits 2 cores; the paper trained at 32. The same rows (tuned "
            "lambda0, optimiser, early stopping) at both sizes, on the same split; fewer seeds at 32, which "
            f"costs {cfg.train.batch_size // SIDE_BATCH_SIZE}x the optimiser steps per epoch.\n\n"
            + batch_side_markdown(batch_side)
        )
    for key, title in (
        ("fig4", "Figure 4 analogue: modality attention by genre"),
        ("fig5", "Figure 5 analogue: t-SNE of modality-specific and -invariant features"),
        ("fig6a", "Figure 6a analogue: training losses"),
        ("fig6b", "Figure 6b analogue: validation AUC against lambda0"),
    ):
        if key in figures:
            sections.append(f"## {title}\n\n![{title}]({figures[key]})")
    (out / f"{RESULTS}.md").write_text("\n\n".join(sections) + "\n")
    print(f"wrote {out / RESULTS}.md, {out / RESULTS}.json and {len(figures)} figures in {fig_dir}")


def _setup_text(
    cfg,
    dataset,
    tune_reports: dict[str, dict[str, Any]],
    seeds: int,
    complete: int,
    total: int,
    test_users: int = 0,
    typical: float = 0.85,
) -> str:
    from marn.data.schema import item_stat_columns

    m, t = cfg.model, cfg.train
    lam = (
        ", ".join(f"{LABELS.get(row, row)} {r['best']['lambda0']:.3g}" for row, r in tune_reports.items())
        if tune_reports
        else "not tuned yet"
    )
    items = dataset.items
    with_image = int(items["image_uri"].notna().sum())
    stats = ", ".join(item_stat_columns(items)) or "none"
    return (
        "## Setup\n\n"
        f"- Data: {dataset.events['user_id'].nunique():,} users, {len(items):,} items "
        f"({with_image:,} with an image), {len(dataset.events):,} events. Modalities: IDs (item, category), "
        "image (MobileNetV2 ImageNet features from `marn embed`; the paper used VGG16 fc7), title text "
        f"(GloVe words, Kim CNN), statistics (event counts before the held-out events; {stats}).\n"
        "- DIN protocol: each user's last event is test, the one before valid, earlier ones train; one "
        f"sampled negative per positive; history = the {cfg.samples.max_history} most recent events.\n"
        f"- Training: AdaGrad lr {t.lr} for every model, batch {t.batch_size}, at most {t.epochs} epochs, "
        f"early stopping on validation AUC (patience {t.patience}); the test split is scored once, with the "
        "best validation epoch's weights.\n"
        f"- Widths (the paper's: 96, 256, not given, 100; narrower ones fit 2 cores): modality "
        f"{m.modality_dim}, representation s^m, c^m {m.rep_dim}, GRU {m.sequence_dim}, {m.title_filters} "
        f"title filters per window, MLP {list(m.hidden)}.\n"
        f"- lambda0 chosen by Ray Tune on validation AUC for each adversarial variant: {lam} (a switch "
        "row trains with MARN's unless it searched its own).\n"
        f"- {seeds} seeds per model (initialisation and batch order; the split and negatives are fixed); "
        f"{complete} of {total} models have all {seeds}. t-tests are Welch's over seeds: they say whether a "
        "model is reliably ahead on this split, not on another sample of users.\n"
        + (
            f"- The test split has {test_users} positives and as many negatives; at AUC {typical:.2f} its "
            f"sampling standard error is about {auc_standard_error(typical, test_users, test_users):.3f} "
            "(Hanley & McNeil), so differences smaller than that may not carry over to other users.\n"
            if test_users
            else ""
        )
    )
