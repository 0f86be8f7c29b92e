"""Data validation of a canonical dataset with Great Expectations (GX Core 1.x) before anything trains on it.

Two layers, one report:

- Structure, checked by hand from the parquet files and their arrow schemas (cheap, and GX cannot run on a
  column that is absent or has the wrong type): every required table file exists and is readable, every
  required column exists, ids are strings, timestamps are UTC timestamps, counts are numeric.
- Values, checked by one GX expectation suite per table, run once on the whole table through an ephemeral
  context: nulls, ranges, allowed sets, uniqueness, and events pointing at unknown items.

Both layers produce :class:`Failure` entries naming table, column and expectation, with a few bad rows, so
a pipeline step can stop on failure (:func:`check_dataset`) and publish ``to_html()`` as an artifact.

Modules: :mod:`~marn.validate.dataset` (``validate_dataset``, ``check_dataset``: both layers, one report),
:mod:`~marn.validate.checks` (structure), :mod:`~marn.validate.suites` (the GX suites) and
:mod:`~marn.validate.report` (failures, the text and HTML report).
"""
