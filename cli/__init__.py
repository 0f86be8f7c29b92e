"""The ``marn`` console script, assembled outside the library: ``marn``'s own commands plus the adapters'
groups (``cli.main:app``). The library (``marn/``) never imports this package or the adapters."""
