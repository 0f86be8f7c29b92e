"""The report's markdown tables: Tables 2 and 3 analogues, the adversary's instrumentation, and the Table 4
and 5 analogues with the claims they check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.paper_report.claims import Claim
from benchmarks.paper_report.runs import INSTRUMENTS, LABELS, PAPER_AUC, Summary, instrumentation


def mean_sd(values: Sequence[float]) -> str:
    """``mean ± sd`` over seeds (one value alone as it is), as every table of the report shows AUC."""
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def _fmt_percent(values: Sequence[float]) -> str:
    spread = f" ± {100 * np.std(values, ddof=1):.1f}" if len(values) > 1 else ""
    return f"{100 * np.mean(values):.1f}%{spread}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def model_table(runs: dict[str, Summary], names: Sequence[str], paper: bool = True) -> str:
    header = ["model", "test AUC", "user AUC", "seeds", "epochs run", "best epoch", "s / run"]
    header += ["paper AUC (Electro. / Clothe. / Taobao)"] if paper else []
    rows = []
    for name in names:
        if name not in runs:
            rows.append([LABELS[name], "not run", *[""] * (len(header) - 2)])
            continue
        s = runs[name]
        paper_cols = [" / ".join(f"{v:.4f}" for v in PAPER_AUC[name])] if paper and name in PAPER_AUC else []
        rows.append(
            [
                LABELS[name],
                mean_sd(s.auc),
                mean_sd(s.user_auc),
                len(s.auc),
                f"{np.mean(s.epochs):.1f}",
                f"{np.mean(s.best_epochs):.1f}",
                f"{np.mean(s.wall_s):.0f}",
                *(paper_cols or ([""] if paper else [])),
            ]
        )
    return markdown_table(header, rows)


def instrumentation_table(runs: dict[str, Summary], names: Sequence[str]) -> str:
    """D1's unweighted cross-entropy and accuracy, D0's and Ds' accuracy and the normalised mean w per
    modality at the best epoch (mean over seeds), for the rows that logged them; "" when none did."""
    logged = {n: instrumentation(runs[n]) for n in names if n in runs}
    logged = {n: cols for n, cols in logged.items() if cols}
    if not logged:
        return ""
    weights = list(dict.fromkeys(k for cols in logged.values() for k in cols if k.startswith("w_norm_")))
    header = ["model", "D1 CE (unweighted)", "D1 acc", "D0 acc", "Ds acc"]
    header += [f"mean w/batch mean, {k.removeprefix('w_norm_')}" for k in weights]
    rows = [
        [LABELS[n], *[f"{np.mean(cols[k]):.3f}" if k in cols else "" for k in (*INSTRUMENTS, *weights)]]
        for n, cols in logged.items()
    ]
    return markdown_table(header, rows)


def popularity_markdown(table: dict[str, Any]) -> tuple[str, list[Claim]]:
    levels = table["levels"]
    ids = [float(np.mean(v)) if v else math.nan for v in table["base_ids"]]
    marn = [float(np.mean(v)) if v else math.nan for v in table["marn"]]
    header = ["popularity level", *[str(level["level"]) for level in levels]]
    rows = [
        ["training clicks per item", *[f"{lv['min_count']}-{lv['max_count']}" for lv in levels]],
        ["test samples", *[str(lv["samples"]) for lv in levels]],
        ["BaseModel+IDs", *[f"{v:.3f}" for v in ids]],
        ["MARN", *[f"{v:.3f}" for v in marn]],
        ["GAP", *[f"{100 * (m - i):+.1f}%" for m, i in zip(marn, ids, strict=True)]],
    ]
    gaps = np.array(marn) - np.array(ids)
    low, high = float(np.nanmean(gaps[:4])), float(np.nanmean(gaps[-3:]))
    claim = Claim(
        "MARN's gain over BaseModel+IDs is largest on unpopular items (Table 4: levels 0-3 vs 7-9)",
        f"mean gap {100 * low:+.1f} points on levels 0-3, {100 * high:+.1f} on levels 7-9",
        bool(low > high and low > 0),
    )
    return markdown_table(header, rows), [claim]


def popularity_ladder_markdown(table: dict[str, Any], names: Sequence[str]) -> str:
    """Mean AUC per popularity level for each of ``names``, then MARN minus each per level (points): on
    which items, rare or popular, MARN gains or loses against each row."""
    levels = table["levels"]
    means = {n: [float(np.mean(v)) if v else math.nan for v in table[n]] for n in names}
    header = ["popularity level", *[str(level["level"]) for level in levels]]
    rows = [["training clicks per item", *[f"{lv['min_count']}-{lv['max_count']}" for lv in levels]]]
    rows += [[LABELS[n], *[f"{v:.3f}" for v in means[n]]] for n in names]
    rows += [
        [
            f"MARN - {LABELS[n]}",
            *[f"{100 * (m - o):+.1f}" for m, o in zip(means["marn"], means[n], strict=True)],
        ]
        for n in names
        if n != "marn"
    ]
    return markdown_table(header, rows)


def cold_markdown(table: dict[str, Any]) -> tuple[str, list[Claim]]:
    ns = list(table["marn"]["recall"])
    pool = table["marn"]["pool"]
    rows = [["RANDOM (expected)", *[f"{100 * min(int(n), pool) / pool:.1f}%" for n in ns], ""]]
    for name in ("base_ids", "marn"):
        r = table[name]
        rows.append(
            [
                LABELS[name],
                *[_fmt_percent(r["recall"][n]) for n in ns],
                mean_sd(r["auc"]),
            ]
        )
    header = ["model", *[f"recall@{n}" for n in ns], "test AUC (all items)"]
    wins = [np.mean(table["marn"]["recall"][n]) > np.mean(table["base_ids"]["recall"][n]) for n in ns]
    claim = Claim(
        "MARN recalls more unseen items than BaseModel+IDs at every N (Table 5)",
        f"MARN ahead at {sum(wins)} of {len(ns)} cut-offs ({table['marn']['users']} users, pool of "
        f"{pool} held-out items)",
        all(wins),
    )
    return markdown_table(header, rows), [claim]


def batch_side_markdown(table: dict[str, Any]) -> str:
    """One line per (model, batch size): test and user AUC (mean ± std over seeds), epochs, wall time."""
    rows = []
    for name, by_batch in table.items():
        for batch, r in by_batch.items():
            rows.append(
                [
                    LABELS.get(name, name),
                    batch,
                    mean_sd(r["auc"]),
                    mean_sd(r["user_auc"]),
                    f"{np.mean(r['epochs_run']):.1f} (best {np.mean(r['best_epoch']):.1f})",
                    f"{np.mean(r['wall_s']) / 60:.1f}",
                    str(len(r["auc"])),
                ]
            )
    header = ["model", "batch", "test AUC", "user AUC", "epochs run", "wall min / run", "seeds"]
    return markdown_table(header, rows)
