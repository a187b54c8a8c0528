"""Stage `evaluate@RUN`: score a run's checkpoint on the val shards (each predictor, and a linear probe)."""

from gendd_pipe.distill.evaluate import run_stage as run
from gendd_pipe.recipe import stage_main

if __name__ == "__main__":
    stage_main("evaluate", run)
