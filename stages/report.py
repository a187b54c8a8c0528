"""Stage `report`: the results table and plots of every distill run of the recipe."""

from gendd_pipe.report import run_stage as run
from gendd_pipe.recipe import stage_main

if __name__ == "__main__":
    stage_main("report", run)
