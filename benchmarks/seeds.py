"""The results table over several student seeds: every distill run of a recipe, repeated per seed.

    python benchmarks/seeds.py [--params params.yaml] [--seeds 0 1 2] [--out data/seeds]

Uses the recipe's store and teacher as `dvc repro` left them (run it first) and
the same stage code as the pipeline: for each seed, each run of ``distill.runs``
is distilled with ``distill.common.seed`` set to it and evaluated; the table
gives the mean and the spread (min to max) of val top-1 per run and predictor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's stages

from gendd_pipe.report import PREDICTORS  # noqa: E402
from stages import distill, evaluate  # noqa: E402
from stages.params import load_section, merged  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="data/seeds")
    args = parser.parse_args()
    section, scoring = load_section("distill", args.params), load_section("evaluate", args.params)
    scores: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        root = os.path.join(args.out, f"seed{seed}")
        runs = merged(section, {"common": {"seed": seed}, "out": os.path.join(root, "distill")})
        for name in section["runs"]:
            if not os.path.exists(os.path.join(root, "eval", f"{name}.json")):
                distill.run(runs, name, args.params)
                evaluate.run({**scoring, "runs": os.path.join(root, "distill", "runs"),
                              "out": os.path.join(root, "eval")}, name)
            result = json.load(open(os.path.join(root, "eval", f"{name}.json")))
            for predictor in PREDICTORS:
                if predictor in result:
                    scores.setdefault(name, {}).setdefault(predictor, []).append(result[predictor]["top1"])
            print(f"seed {seed} {name}: " + ", ".join(f"{p} {v[-1]:.2f}" for p, v in scores[name].items()),
                  flush=True)
    used = [p for p in PREDICTORS if any(p in s for s in scores.values())]
    print(f"\nval top-1 (%), mean and min-max over seeds {', '.join(map(str, args.seeds))}\n")
    print("| run | " + " | ".join(PREDICTORS[p] for p in used) + " |")
    print("|---|" + "---|" * len(used))
    for name, by in scores.items():
        cells = [f"{statistics.mean(by[p]):.2f} ({min(by[p]):.1f}-{max(by[p]):.1f})" if p in by else "" for p in used]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
