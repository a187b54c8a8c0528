"""Stage `probes`: the reference linear probes of an unsupervised recipe (teacher features, random student)."""

from gendd_pipe.distill.probe import run_stage as run
from gendd_pipe.recipe import stage_main

if __name__ == "__main__":
    stage_main("probes", run)
