"""Stage `report`: the results table (markdown) and plots of every distill run of the recipe."""

from __future__ import annotations

from gendd_pipe.report import collect, write_report
from stages.params import load_section, stage_args


def run(section: dict, runs: list[str]) -> str:
    """``section``: distill (the distill stage's out), evaluate (its out), out; optional teacher (the fine-tune's
    metrics.json) and references (reference probes JSON). ``runs``: the run names, in table order."""
    data = collect(section["distill"], section["evaluate"], runs, section.get("teacher"), section.get("references"))
    return write_report(data, section["out"])


if __name__ == "__main__":
    args = stage_args("report")
    run(load_section("report", args.params), list(load_section("distill", args.params)["runs"]))
