"""Speed, quality and paper-reproduction benchmarks. A package, so its scripts import each other as
``benchmarks.*``; run them from the repository root with ``python -m benchmarks.<script>``."""
