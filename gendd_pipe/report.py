"""The report: one markdown table and two PNG plots comparing the distill runs of a pipeline.

Inputs are what the stages wrote: per run its ``metrics.jsonl`` (val top-1 per
epoch) and its evaluate JSON (final scores of every predictor), the teacher's
``metrics.json`` when it was fine-tuned, and optional reference probes (the
teacher's cached features, a randomly initialised student). Outputs:
``results.md`` (the table), ``results.json`` (the same numbers),
``accuracy.png`` (val top-1 per epoch per run) and ``comparison.png`` (final
top-1 per run, teacher as a line).
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from gendd_pipe.config import OutputDir, configclass, to_dict  # noqa: E402
from gendd_pipe.files import write_json, write_text, write_yaml  # noqa: E402
from gendd_pipe.layout import config_beside, eval_result, run_dir, run_metrics  # noqa: E402
from gendd_pipe.metrics import read_epochs  # noqa: E402

LABELS = {"student": "student head", "probe": "linear probe"}  # a method's own predictors keep their names


def label(predictor: str) -> str:
    return LABELS.get(predictor, predictor)


def collect(distill_out: str, eval_dir: str, names: list[str], teacher: str | None = None,
            references: str | None = None) -> dict:
    """Gather the numbers of runs ``names``: their per-epoch metrics and summary from the distill stage's out,
    and their scores from the evaluate stage's out (`gendd_pipe.layout`)."""
    out = {"runs": {}, "teacher": None, "references": {}}
    for name in names:
        lines = read_epochs(run_dir(distill_out, name))
        record = json.load(open(run_metrics(distill_out, name)))
        final = json.load(open(eval_result(eval_dir, name)))
        scored = [k for k, v in final.items() if isinstance(v, dict) and "top1" in v]
        # unsupervised: the probe, and the method's own predictor in the teacher's label space, trained on no label
        # (GenDD's sampled features read by the teacher's classifier, the KL student's logits; the paper's metric)
        own = record.get("predictor")  # the method's primary predictor (runs of earlier versions: none)
        used = [p for p in ("probe", own) if p in final] if record["unsupervised"] else scored
        out["runs"][name] = {
            "method": record["method"] + (" (unsupervised)" if record["unsupervised"] else ""),
            "primary": record["primary"],
            "final": {k: final[k]["top1"] for k in used if k in final},
            "best": {k: final["best"][k]["top1"] for k in used if k in final.get("best", {})},
            "best_epoch": final.get("best", {}).get("epoch"),
            "curve": {p: [m["val"][p]["top1"] for m in lines] for p in used if p in lines[0]["val"]},
            "epochs": len(lines),
            "images_per_s": sum(m["images_per_s"] for m in lines) / len(lines),
        }
    if teacher and os.path.exists(teacher):
        metrics = json.load(open(teacher))
        out["teacher"] = {"name": metrics["teacher"], "top1": metrics["val"]["top1"] if metrics.get("val") else None}
    if references and os.path.exists(references):
        out["references"] = json.load(open(references))
    return out


def _primary(run: dict) -> str:
    return run["primary"] if run["primary"] in run["final"] else next(iter(run["final"]))


def _cell(run: dict, predictor: str, both: bool) -> str:
    if predictor not in run["final"]:
        return ""
    last = f"{run['final'][predictor]:.2f}"
    return f"{run['best'][predictor]:.2f} / {last}" if both and predictor in run.get("best", {}) else last


def markdown(data: dict) -> str:
    """The results table (val top-1, percent) as markdown: the best and the last checkpoint where both were
    scored."""
    used = list(dict.fromkeys(p for r in data["runs"].values() for p in r["final"]))
    both = any(r.get("best") for r in data["runs"].values())
    suffix = " (best / last)" if both else ""
    head = ["run", "method", *(f"{label(p)} top-1{suffix}" for p in used), "epochs", "train img/s"]
    rows = [head, ["---"] * len(head)]
    for name, run in data["runs"].items():
        cells = [_cell(run, p, both) for p in used]
        rows.append([name, run["method"], *cells, str(run["epochs"]), f"{run['images_per_s']:.0f}"])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    if data["teacher"] and data["teacher"]["top1"] is not None:
        lines.append(f"\nTeacher {data['teacher']['name']} (fine-tuned): val top-1 {data['teacher']['top1']:.2f}.")
    for name, value in data["references"].items():
        lines.append(f"\nReference: {name} linear probe top-1 {value['top1']:.2f}.")
    return "\n".join(lines) + "\n"


def plot_curves(data: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in data["runs"].items():
        for predictor, values in run["curve"].items():
            if predictor == _primary(run) or predictor == "student":
                style = "-" if predictor == _primary(run) else ":"
                ax.plot(range(1, len(values) + 1), values, style, marker="o", markersize=3,
                        label=f"{name} ({label(predictor)})")
    if data["teacher"] and data["teacher"]["top1"] is not None:
        ax.axhline(data["teacher"]["top1"], color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="Val accuracy per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_comparison(data: dict, path: str) -> None:
    names = list(data["runs"])
    values = [data["runs"][n]["final"][_primary(data["runs"][n])] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    refs = [("teacher", data["teacher"]["top1"])] if data["teacher"] and data["teacher"]["top1"] is not None else []
    refs += [(k, v["top1"]) for k, v in data["references"].items()]
    for (label, value), color in zip(refs, ["black", "tab:gray", "tab:orange"]):
        ax.axhline(value, color=color, linestyle="--", linewidth=1, label=label)
    low = min(values + [v for _, v in refs])
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set(ylabel="val top-1 (%)", title="Final val top-1 per run (each run's primary predictor)")
    if refs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(data: dict, out: str) -> str:
    """Write results.md, results.json, accuracy.png and comparison.png to ``out``; returns the table."""
    os.makedirs(out, exist_ok=True)
    table = markdown(data)
    write_text(os.path.join(out, "results.md"), table)
    write_json(os.path.join(out, "results.json"), data)
    plot_curves(data, os.path.join(out, "accuracy.png"))
    plot_comparison(data, os.path.join(out, "comparison.png"))
    return table


@configclass(kw_only=True)
class ReportStage:
    """Stage ``report``: the table and plots of a recipe's runs."""

    distill: str  # the distill stage's out
    evaluate: str  # the evaluate stage's out
    runs: tuple[str, ...]  # the runs in the table, in order (default: every run of distill.runs)
    teacher: str | None = None  # the fine-tune's metrics.json (its val top-1 is drawn as a line)
    references: str | None = None  # reference probes (the probes stage's out)
    out: OutputDir  # results.md, results.json, accuracy.png, comparison.png

    @staticmethod
    def defaults_from(params: dict) -> dict:
        return {"runs": list((params.get("distill") or {}).get("runs") or {})}


def run_stage(cfg: ReportStage) -> str:
    """Write the report to ``cfg.out``; returns the markdown table."""
    data = collect(cfg.distill, cfg.evaluate, list(cfg.runs), cfg.teacher, cfg.references)
    table = write_report(data, cfg.out)
    write_yaml(config_beside(cfg.out), to_dict(cfg))
    return table
