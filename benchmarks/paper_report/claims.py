"""The paper's claims, checked on these runs."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.paper_report.runs import GROUP2, GROUP3, LABELS, TABLE2, TABLE3, Summary
from benchmarks.paper_report.significance import ALPHA, welch


@dataclass(frozen=True)
class Claim:
    text: str  # what the paper says
    here: str  # what the numbers here say
    holds: bool | None  # None: cannot be checked (missing runs)


def _beats(runs: dict[str, Summary], a: str, b: str, text: str) -> Claim:
    if a not in runs or b not in runs:
        return Claim(text, "not run", None)
    test = welch(runs[a].auc, runs[b].auc)
    diff = runs[a].mean - runs[b].mean
    here = (
        f"{LABELS[a]} {runs[a].mean:.4f} vs {LABELS[b]} {runs[b].mean:.4f} ({diff:+.4f}; Welch t "
        f"{test['t']:.2f}, one-sided p {test['p_one_sided']:.3f})"
    )
    return Claim(text, here, bool(diff > 0 and test["p_one_sided"] < ALPHA))


def table_claims(runs: dict[str, Summary]) -> list[Claim]:
    claims = []
    others = [n for n in TABLE2 + TABLE3 if n != "marn" and n in runs]
    if "marn" in runs and others:
        best = max(others, key=lambda n: runs[n].mean)
        claims.append(_beats(runs, "marn", best, "MARN beats the best other model significantly (Table 2)"))
    neural = [n for n in TABLE2 if n not in ("popularity", "lr", "fm") and n in runs]
    if {"lr", "fm"} <= runs.keys() and neural:
        worst = min(neural, key=lambda n: runs[n].mean)
        linear = max(runs["lr"].mean, runs["fm"].mean)
        claims.append(
            Claim(
                "Neural models beat LR and FM (group 1)",
                f"weakest neural {LABELS[worst]} {runs[worst].mean:.4f} vs best of LR/FM {linear:.4f}",
                runs[worst].mean > linear,
            )
        )
    g2, g3 = [n for n in GROUP2 if n in runs], [n for n in GROUP3 if n in runs]
    if g2 and g3:
        best2, worst3 = max(g2, key=lambda n: runs[n].mean), min(g3, key=lambda n: runs[n].mean)
        claims.append(
            Claim(
                "Multimodal item models (DMF, MMSS, NAML) beat every concatenation model (group 2)",
                f"weakest of group 3 {LABELS[worst3]} {runs[worst3].mean:.4f} vs best of group 2 "
                f"{LABELS[best2]} {runs[best2].mean:.4f}",
                runs[worst3].mean > runs[best2].mean,
            )
        )
    for a, b, text in (
        ("base_conc", "base_ids", "CONC beats the unimodal BaseModel+IDs (Table 3)"),
        ("base_conc", "base_image", "CONC beats the unimodal BaseModel+IMAGE"),
        ("base_ids", "base_image", "IDs beat IMAGE alone"),
        ("base_maf", "base_conc", "MAF beats CONC"),
        ("base_maf_adv", "base_maf", "ADV improves on MAF"),
        ("base_maf_ddma", "base_maf", "DDMA improves on MAF"),
        ("base_maf_ddma", "base_maf_adv", "DDMA beats ADV"),
        ("marn", "base_maf_ddma", "APGRU improves on BaseModel+MAF+DDMA (= MARN)"),
    ):
        claims.append(_beats(runs, a, b, text))
    return claims
