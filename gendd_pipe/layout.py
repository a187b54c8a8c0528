"""Where each stage reads and writes: the one definition of the pipeline's file layout.

Stages, the CLI, the report and the loaders take their paths from here, and
``tests/test_dvc.py`` checks that every dvc.yaml declares exactly these outputs.
Each stage also writes the config it ran with (``config.yaml``) next to its outputs.

```
prepare.out/              train-NNNNNN.tar, val-NNNNNN.tar, prepare.json, config.yaml
teacher.out/              model.safetensors, metrics.json, metrics.csv, config.yaml (last.safetensors while it runs)
extract.out               the feature store (config.yaml at its root); extract.metrics: a JSON summary
probes.out                a JSON of reference probes (probes.out + .config.yaml beside it)
distill.out/runs/RUN/     last.safetensors, best.safetensors, metrics.jsonl, metrics.csv, summary.json, config.yaml
distill.out/metrics/RUN.json, distill.out/plots/RUN.csv
distill.out/stage1/KEY.safetensors  GenDD stage 1, shared by the runs of the same stage-1 settings (a cache)
evaluate.out/RUN.json     and RUN.config.yaml
report.out/               results.md, results.json, accuracy.png, comparison.png, config.yaml
```
"""

from __future__ import annotations

import os

CONFIG = "config.yaml"
MODEL = "model.safetensors"  # the fine-tuned teacher
LAST, BEST = "last.safetensors", "best.safetensors"  # checkpoints of a run (and of a fine-tune in progress)
LEGACY = {LAST: "last.pt", BEST: "best.pt"}  # their names in earlier versions, still read
EPOCHS, EPOCHS_CSV, SUMMARY, METRICS = "metrics.jsonl", "metrics.csv", "summary.json", "metrics.json"
REPORT = ("results.md", "results.json", "accuracy.png", "comparison.png")


def run_dir(distill_out: str, run: str) -> str:
    """A distill run's directory: checkpoints and per-epoch metrics."""
    return os.path.join(distill_out, "runs", run)


def stage1_cache(distill_out: str) -> str:
    """Finished GenDD stage-1 phases that runs with the same stage-1 settings share (one file per key)."""
    return os.path.join(distill_out, "stage1")


def run_metrics(distill_out: str, run: str) -> str:
    """A run's summary for ``dvc metrics`` (best and last epoch)."""
    return os.path.join(distill_out, "metrics", f"{run}.json")


def run_plot(distill_out: str, run: str) -> str:
    """A run's val top-1 per epoch for ``dvc plots``."""
    return os.path.join(distill_out, "plots", f"{run}.csv")


def checkpoint(distill_out: str, run: str, which: str = "last") -> str:
    """``last`` or ``best`` checkpoint of a run."""
    return checkpoint_in(run_dir(distill_out, run), BEST if which == "best" else LAST)


def checkpoint_in(directory: str, name: str = LAST) -> str:
    """The checkpoint ``name`` in ``directory``, or its earlier version's file where only that exists."""
    path, legacy = os.path.join(directory, name), os.path.join(directory, LEGACY[name])
    return legacy if not os.path.exists(path) and os.path.exists(legacy) else path


def eval_result(evaluate_out: str, run: str) -> str:
    return os.path.join(evaluate_out, f"{run}.json")


def config_beside(output: str, is_dir: bool = True) -> str:
    """Where a stage writes its resolved config: inside an output directory, or beside an output file."""
    return os.path.join(output, CONFIG) if is_dir else os.path.splitext(output)[0] + ".config.yaml"
