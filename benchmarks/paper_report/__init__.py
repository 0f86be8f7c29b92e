"""The paper reproduction's report: tables, figures and the results JSON of ``python -m benchmarks.paper
run``.

Reads only what the runs wrote (``WORK/runs``, ``WORK/cold``, ``WORK/tune``) and the trained MARN of seed 1
for the representation figures; trains nothing. Writes, into ``OUT``:

- ``paper-movielens.json``: ``{"models": {NAME: {"auc": [...], "user_auc": [...]}}, "command", "commit",
  "hardware", "wall_s", ...}`` plus the references, the ablation, popularity and held-out-item tables;
- ``paper-movielens.md``: Tables 2-5 analogues, the paper's claims checked one by one, the figures;
- ``paper-movielens/*.png``: Figures 4-6 analogues.

Modules: ``runs`` (the model rows and what the runs wrote), ``significance`` (Welch's test, an AUC's standard
error), ``claims`` (the paper's claims checked), ``markdown`` (the tables), ``figures`` and ``report``
(``write_report``, everything together).
"""
