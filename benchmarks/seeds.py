"""The results table over several student seeds: every distill run of a recipe, repeated per seed.

    python benchmarks/seeds.py [--params params.yaml] [--seeds 0 1 2] [--out data/seeds]

Uses the recipe's store and teacher as `dvc repro` left them (run it first) and
the same stage code as the pipeline: for each seed, each run of ``distill.runs``
is distilled with ``distill.common.seed`` set to it and evaluated; the table
gives the mean and the spread (min to max) of val top-1 per run and predictor.
The DVC way to the same runs is ``dvc exp run --queue -S distill.common.seed=0,1,2``
then ``dvc exp run --run-all`` and ``dvc exp show``; this script adds the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gendd_pipe.config import apply_sets  # noqa: E402
from gendd_pipe.distill import evaluate, stage  # noqa: E402
from gendd_pipe.layout import eval_result  # noqa: E402
from gendd_pipe.recipe import load_params, section  # noqa: E402
from gendd_pipe.report import label  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="data/seeds")
    args = parser.parse_args()
    params = load_params(args.params)
    scores: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        root = os.path.join(args.out, f"seed{seed}")
        seeded = apply_sets(params, [f"distill.common.seed={seed}", f"distill.out={root}/distill",
                                     f"evaluate.distill={root}/distill", f"evaluate.out={root}/eval"])
        runs, scoring = section(seeded, "distill", args.params), section(seeded, "evaluate", args.params)
        for name in runs.runs:
            if not os.path.exists(eval_result(scoring.out, name)):
                stage.run_stage(runs, name, progress=False)  # resumes a run killed midway, as under dvc repro
                evaluate.run_stage(scoring, name)
            with open(eval_result(scoring.out, name)) as f:
                result = json.load(f)
            for predictor, score in result.items():
                if isinstance(score, dict) and "top1" in score:
                    scores.setdefault(name, {}).setdefault(predictor, []).append(score["top1"])
            print(f"seed {seed} {name}: " + ", ".join(f"{p} {v[-1]:.2f}" for p, v in scores[name].items()),
                  flush=True)
    used = list(dict.fromkeys(p for by in scores.values() for p in by))
    print(f"\nval top-1 (%), mean and min-max over seeds {', '.join(map(str, args.seeds))}\n")
    print("| run | " + " | ".join(label(p) for p in used) + " |")
    print("|---|" + "---|" * len(used))
    for name, by in scores.items():
        cells = [f"{statistics.mean(by[p]):.2f} ({min(by[p]):.1f}-{max(by[p]):.1f})" if p in by else "" for p in used]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
