"""Stage `teacher`: fine-tune the teacher on the train shards (model.safetensors + its val accuracy)."""

from gendd_pipe.finetune import run_stage as run
from gendd_pipe.recipe import stage_main

if __name__ == "__main__":
    stage_main("teacher", run)
