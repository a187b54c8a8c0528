"""Stage `extract`: run the teacher over the shards into the feature store."""

from gendd_pipe.extract import run_stage as run
from gendd_pipe.recipe import stage_main

if __name__ == "__main__":
    stage_main("extract", run)
