"""Stage `distill@RUN`: train one student from the feature store (one per entry of distill.runs)."""

from gendd_pipe.distill.stage import run_stage as run
from gendd_pipe.recipe import stage_main

if __name__ == "__main__":
    stage_main("distill", run)
