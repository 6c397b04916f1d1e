"""One module per job; each exposes a class built from ``cfg.job`` with a ``run(context)``."""
