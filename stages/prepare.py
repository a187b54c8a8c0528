"""Stage `prepare`: write the train/val image shards of the recipe's data set."""

from gendd_pipe.data.prepare import run_stage as run
from gendd_pipe.recipe import stage_main

if __name__ == "__main__":
    stage_main("prepare", run)
