"""Pipeline stages: one module per DVC stage, each a `run(params)` plus a thin entry point."""
