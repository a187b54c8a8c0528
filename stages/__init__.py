"""Pipeline stages: one entry point per DVC stage, ``python -m stages.NAME [RUN] [--params FILE] [--set K=V]``.

Each validates its section of the recipe and calls the stage's ``run_stage``,
which lives beside the stage's library code so that the CLI runs the same
thing (``gendd-pipe NAME --config FILE``).
"""
