"""The ``gendd-pipe`` command line: one command per stage, plus ``info``, ``verify`` and ``config show``.

A thin front end over the code the DVC stages run. A stage command reads the
recipe (``--config params.yaml``; none: the defaults), applies ``--set
KEY.PATH=VALUE`` overrides, then its typed options, validates the stage's
section and calls the stage's ``run_stage``: ``gendd-pipe distill --config F
--run R`` runs what ``dvc repro`` runs for ``distill@R``. Each typed option
names the key it sets (`Key`), and a test checks every key against the schema.
Method settings have no typed options: ``--set distill.common.gendd.head.width=256``.
Errors a user can cause print one line and exit 1.
"""

import dataclasses
import functools
import json
import logging
import os
import re
import typing
from collections.abc import Callable
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gendd_pipe.config import RUN_NAME, ConfigError, default_of, join_key, parse, set_key, to_dict
from gendd_pipe.data import prepare as prepare_stage
from gendd_pipe.distill import evaluate as evaluate_stage
from gendd_pipe.distill import probe as probes_stage
from gendd_pipe.distill import stage as distill_stage
from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.distill.methods import method_names
from gendd_pipe.errors import GenddError, user_message
from gendd_pipe import extract as extract_stage
from gendd_pipe import finetune as teacher_stage
from gendd_pipe.files import dump_yaml, redact
from gendd_pipe.logs import setup_logging
from gendd_pipe import report as report_stage
from gendd_pipe.recipe import SECTIONS, load_params, section, section_class
from gendd_pipe.runtime import RuntimeConfig
from gendd_pipe.storage import configure, parse_options, urls_in
from gendd_pipe.store.audit import summarize
from gendd_pipe.verify import verify
from gendd_pipe.store.format import logits_spec, renderer_of
from gendd_pipe.store.reader import FeatureStore

app = typer.Typer(help="Offline teacher-feature cache and GenDD distillation.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
config_app = typer.Typer(help="The resolved configuration of a recipe.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console(soft_wrap=True)  # messages stay one line however narrow the terminal
log = logging.getLogger("gendd_pipe.cli")


@dataclasses.dataclass(frozen=True)
class Key:
    """The key(s) a typed option sets under its command's section; ``run=True``: under ``distill.runs.RUN``."""

    paths: tuple[str, ...]
    run: bool = False
    convert: Callable | None = None

    def __init__(self, *paths: str, run: bool = False, convert: Callable | None = None):
        object.__setattr__(self, "paths", paths)
        object.__setattr__(self, "run", run)
        object.__setattr__(self, "convert", convert)


def user_errors(command):
    """Turn a `GenddError`, or a filesystem refusing a write (full, read-only, not a directory), into
    ``error: ...`` on stderr and exit code 1, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (GenddError, OSError) as exc:
            Console(stderr=True).print(Text.assemble(("error:", "red"), " ", user_message(exc)), highlight=False,
                                       soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _pair(text: str) -> list[float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise GenddError(f"expected two numbers like 0.08,1.0, got {text!r}") from None
    return [low, high]


def keyed_options(command) -> dict[str, Key]:
    """Parameter name -> `Key` of a command's typed options."""
    hints = typing.get_type_hints(command, include_extras=True)
    return {name: meta for name, hint in hints.items() for meta in getattr(hint, "__metadata__", ())
            if isinstance(meta, Key)}


def _pick_run(params: dict, given: str | None, default: str | None) -> str:
    """The run a distill or evaluate command is about: ``--run``, the recipe's only run, or ``default``."""
    runs = (params.get("distill") or {}).get("runs") or {}
    if given is not None and not re.fullmatch(RUN_NAME, given):
        raise GenddError(f"--run {given!r}: a run name is letters, digits, _ . - (it names a directory)")
    if given is not None:
        if runs and given not in runs:
            raise GenddError(f"--run {given}: not in the recipe (distill.runs has: {', '.join(runs)})")
        return given
    if len(runs) == 1:
        return next(iter(runs))
    if runs:
        raise GenddError(f"--run is needed: the recipe has runs {', '.join(runs)}")
    if default is None:
        raise GenddError("--run is needed (or --checkpoint PATH, whose directory names the run)")
    return default


def _resolve(name: str, command, values: dict, run: str | None = None):
    """Recipe + ``--set`` + typed options -> the validated section ``name`` of ``command``."""
    setup_logging(-1 if values.get("quiet") else 1 if values.get("verbose") else 0)
    params = load_params(values.get("config"), values.get("sets") or [])
    params[name] = dict(params.get(name) or {})
    if run is not None and name == "distill":
        params = set_key(params, ["distill", "runs", run], (params["distill"].get("runs") or {}).get(run) or {})
    options = keyed_options(command)
    for param, key in options.items():
        value = values.get(param)
        if value is None or value == []:
            continue
        value = key.convert(value) if key.convert else value
        for path in key.paths:
            params = set_key(params, [name, *(["runs", run] if key.run else []), *path.split(".")], value)
    try:
        cfg = section(params, name, values.get("config") or "the command line")
        log.debug("%s: %s", name, json.dumps(redact(to_dict(cfg)), default=str))
        configure(parse_options(values.get("storage_options") or []), urls_in(to_dict(cfg)))
        return cfg
    except ConfigError as exc:  # say which option sets the key, where one does
        for param, key in options.items():
            if any(join_key(exc.where, *exc.loc) == join_key(name, *(["runs", run] if key.run else []), p)
                   for p in key.paths):
                raise GenddError(f"{exc} (option --{param.replace('_', '-')})") from None
        raise


Config = Annotated[Optional[str], typer.Option("--config", "-c", help="The recipe's params file (params.yaml).")]
Sets = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a param, KEY.PATH=VALUE as in `dvc exp run -S` (repeatable).")]
Run = Annotated[Optional[str], typer.Option(
    "--run", "-r", help="The run: a key of distill.runs (default: the recipe's only run, else the method's name). "
                        "Under torchrun write -r: its own parser takes --run for its --run-path.")]
StorageOptions = Annotated[Optional[list[str]], typer.Option(
    "--storage-option", help="An fsspec option of the store's, shards' and weights' filesystems, KEY=VALUE "
                             "(repeatable; s3: endpoint_url=..., profile=..., anon=true). Never recorded.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only (no progress).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug messages as well.")]
Resume = Annotated[bool, typer.Option(help="Continue the run in its output directory from its last checkpoint.")]
Shards = Annotated[Optional[list[str]], typer.Option(help="Train image shards (repeatable; patterns or URLs)."),
                   Key("shards")]
ValShards = Annotated[Optional[list[str]], typer.Option(help="Val image shards (repeatable)."), Key("val_shards")]
Store = Annotated[Optional[str], typer.Option(help="Feature store path or URL."), Key("store")]
NumWorkers = Annotated[Optional[int], typer.Option(help="DataLoader worker processes (default: sized to the cores)."),
                      Key("num_workers")]
TeacherName = Annotated[Optional[str], typer.Option(
    "--teacher", help="timm name: resnet50, resnet50.a1_in1k, hf-hub:org/model."), Key("teacher.name")]
Weights = Annotated[Optional[str], typer.Option(help="none | bundled:efficientnet-lite0 | pretrained | PATH."),
                    Key("teacher.weights")]
TeacherSize = Annotated[Optional[int], typer.Option("--input-size", help="Square input size override (recorded)."),
                        Key("teacher.input_size")]
ViewScale = Annotated[Optional[str], typer.Option(help="Random-resized-crop area range, LOW,HIGH."),
                      Key("views.scale", convert=_pair)]
ViewRatio = Annotated[Optional[str], typer.Option(help="Random-resized-crop aspect range, LOW,HIGH."),
                      Key("views.ratio", convert=_pair)]
Hflip = Annotated[Optional[float], typer.Option(help="Horizontal flip probability."), Key("views.hflip")]
Renderer = Annotated[Optional[str], typer.Option(
    help="How pixels are cut from views: pil | tensor (torchvision; decodes and resizes on the GPU when there is "
         "one). Recorded in the store; students render alike."), Key("views.renderer")]


def _runtime_options(run: bool = False):
    """The ``--device --amp --channels-last --compile`` options, setting ``runtime.*`` (of the run with ``run``)."""
    return (
        Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N (auto: a GPU when there is one)."),
                  Key("runtime.device", run=run)],
        Annotated[Optional[str], typer.Option(help="Autocast precision: off | bf16 | fp16 (fp16 needs a GPU)."),
                  Key("runtime.amp", run=run)],
        Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="NHWC models and inputs."),
                  Key("runtime.channels_last", run=run)],
        Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the network."),
                  Key("runtime.compile", run=run)],
    )


Device, Amp, ChannelsLast, Compile = _runtime_options()
RunDevice, RunAmp, RunChannelsLast, RunCompile = _runtime_options(run=True)


@app.command("prepare")
@user_errors
def prepare_command(
    config: Config = None, sets: Sets = None,
    dataset: Annotated[Optional[str], typer.Option(help="mnist5k, or an ImageFolder root SRC/<class>/<image>."),
                       Key("dataset")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Directory of the shards."), Key("out")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Share of each class held out for val."),
                            Key("val_fraction")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Samples per shard."), Key("shard_size")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the split and sample order."), Key("seed")] = None,
    quiet: Quiet = False, verbose: Verbose = False,
):
    """Write ImageNet-style WebDataset shards (KEY.png + KEY.cls) of a real image set."""
    cfg = _resolve("prepare", prepare_command, locals())
    summary = prepare_stage.run_stage(cfg)
    console.print(f"wrote {summary['train']['samples']} train samples in {len(summary['train']['shards'])} shards "
                  f"and {summary['val']['samples']} val samples in {len(summary['val']['shards'])} shards to {cfg.out}")


@app.command("teacher")
@user_errors
def teacher_command(
    config: Config = None, sets: Sets = None, shards: Shards = None, val_shards: ValShards = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Directory: model.safetensors, metrics.json."),
                   Key("out")] = None,
    teacher: TeacherName = None, weights: Weights = None, input_size: TeacherSize = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes (default: largest train label + 1)."),
                           Key("num_classes")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="0 keeps the teacher as it ships."), Key("epochs")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step."), Key("batch_size")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW peak learning rate."), Key("lr")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay."), Key("weight_decay")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Cross-entropy label smoothing."),
                               Key("label_smoothing")] = None,
    view_scale: ViewScale = None, view_ratio: ViewRatio = None, hflip: Hflip = None, renderer: Renderer = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the new classifier, crops and order."),
                    Key("views.seed")] = None,
    num_workers: NumWorkers = None, device: Device = None, amp: Amp = None, channels_last: ChannelsLast = None,
    compile: Compile = None, resume: Resume = False, storage_options: StorageOptions = None, quiet: Quiet = False, verbose: Verbose = False,
):
    """Fine-tune a teacher on labeled shards; extract then loads weights OUT/model.safetensors."""
    cfg = _resolve("teacher", teacher_command, locals())
    metrics = teacher_stage.run_stage(cfg, resume=resume, progress=not quiet)
    top1 = f"val top-1 {metrics['val']['top1']:.2f}" if metrics.get("val") else "no val labels it can score"
    console.print(f"{metrics['model']}: {metrics['num_classes']} classes, {top1}", highlight=False)


@app.command("extract")
@user_errors
def extract_command(
    shards: Annotated[Optional[list[str]], typer.Argument(help="Input shards: paths, brace patterns or URLs."),
                      Key("shards")] = None,
    config: Config = None, sets: Sets = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Store path or URL (created or resumed)."),
                   Key("out")] = None,
    teacher: TeacherName = None, weights: Weights = None, input_size: TeacherSize = None,
    views: Annotated[Optional[int], typer.Option(help="Views per image; view 0 is the eval view."),
                     Key("views.count")] = None,
    view_scale: ViewScale = None, view_ratio: ViewRatio = None, hflip: Hflip = None, renderer: Renderer = None,
    seed: Annotated[Optional[int], typer.Option(help="View seed (and init seed for --weights none)."),
                    Key("views.seed", "teacher.seed")] = None,
    randaugment: Annotated[Optional[str], typer.Option(
        help="timm RandAugment string drawn per view (rand-n2-m7-mstd0.5); replayed by the loader."),
        Key("augment.randaugment")] = None,
    mixup: Annotated[Optional[float], typer.Option(help="Mixup alpha of the views (timm Mixup's); 0: off."),
                     Key("augment.mixup")] = None,
    cutmix: Annotated[Optional[float], typer.Option(help="CutMix alpha of the views (timm Mixup's); 0: off."),
                      Key("augment.cutmix")] = None,
    color_jitter: Annotated[Optional[float], typer.Option(
        help="ColorJitter(j, j, j) of the views before RandAugment (torchvision's); 0: off."),
        Key("augment.color_jitter")] = None,
    logits: Annotated[Optional[str], typer.Option(
        help="auto | derived | full | topk:K (auto: derived, computed from the stored head, where the classifier "
             "is one linear layer)."), Key("logits")] = None,
    features_dtype: Annotated[Optional[str], typer.Option(
        help="float16 | int8 (lossy: one scale per channel and chunk; the round-trip cosine goes in the manifest)."),
        Key("features_dtype")] = None,
    int8_floor: Annotated[Optional[float], typer.Option(
        help="int8: the lowest round-trip cosine a view may have; a shard under it is refused."),
        Key("int8_floor")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per teacher forward."), Key("batch_size")] = None,
    chunk_size: Annotated[Optional[int], typer.Option(help="Samples per Zarr chunk."), Key("chunk_size")] = None,
    dask_workers: Annotated[Optional[int], typer.Option(help="Dask LocalCluster workers; 0 runs in this process."),
                            Key("dask_workers")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Address of an existing Dask scheduler."),
                         Key("scheduler")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads per Dask worker (default cores/workers)."),
                       Key("threads")] = None,
    render_threads: Annotated[Optional[int], typer.Option(
        help="Threads decoding and rendering views ahead of the forward (default: --threads)."),
        Key("render_threads")] = None,
    on_error: Annotated[Optional[str], typer.Option(help="fail | skip (skipped samples go in the manifest)."),
                        Key("on_error")] = None,
    device: Device = None, amp: Amp = None, channels_last: ChannelsLast = None, compile: Compile = None,
    storage_options: StorageOptions = None, quiet: Quiet = False, verbose: Verbose = False,
):
    """Run a teacher once over image shards and write (or resume) a feature store."""
    cfg = _resolve("extract", extract_command, locals())
    metrics = extract_stage.run_stage(cfg, progress=not quiet)
    console.print(f"{cfg.out}: {metrics['shards']} shards, {metrics['samples']} samples, "
                  f"{metrics['skipped']} skipped, {metrics['compression_ratio']:.2f}x smaller than fp32",
                  highlight=False)


def _store(store: str | None, config: str | None, sets: list[str] | None, storage_options: list[str] | None) -> str:
    """The store a command reads: named, or the recipe's; its filesystem takes ``--storage-option``."""
    if not store and config is None:
        raise GenddError("name a store, or a recipe with --config whose extract.out is one")
    store = store or section(load_params(config, sets or []), "extract", config).out
    configure(parse_options(storage_options or []), [store])
    return store


@app.command("info")
@user_errors
def info_command(store: Annotated[Optional[str], typer.Argument(help="Store path or URL.")] = None,
                 config: Config = None, sets: Sets = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
                 storage_options: StorageOptions = None):
    """Summarize a store (or the recipe's): teacher, preprocessing, views, sizes and compression ratio."""
    store = _store(store, config, sets, storage_options)
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
        ("views", f"{v['count']} (scale {v['scale']}, ratio {[round(r, 3) for r in v['ratio']]}, hflip {v['hflip']}, "
                  f"seed {v['seed']}, renderer {renderer_of(summary)})"),
        ("logits", logits_spec(summary["logits"])),
        ("features", summary["storage"]["features_dtype"] + (
            f" (round-trip cosine min {summary['int8_cosine']['min']:.5f}, mean {summary['int8_cosine']['mean']:.5f})"
            if "int8_cosine" in summary else "")),
        ("compute precision", summary["compute"]["precision"]),
        ("shards / samples / skipped", f"{summary['shards']} / {summary['samples']} / {summary['skipped']}"),
        ("bytes on disk", f"{summary['bytes_stored']:,} ({summary['bytes_per_view']:,.0f} per view)"),
        ("compression vs raw fp32", f"{summary['compression_ratio']:.2f}x"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command("verify")
@user_errors
def verify_command(store: Annotated[Optional[str], typer.Argument(help="Store path or URL.")] = None,
                   config: Config = None, sets: Sets = None,
                   recompute: Annotated[int, typer.Option(help="Random samples to re-run through the teacher.")] = 0,
                   seed: Annotated[int, typer.Option(help="Seed for choosing samples.")] = 0,
                   device: Annotated[Optional[str], typer.Option(
                       help="auto | cpu | cuda | cuda:N for --recompute.")] = None,
                   amp: Annotated[Optional[str], typer.Option(
                       help="off | bf16 | fp16 for --recompute (default: the store's precision).")] = None,
                   storage_options: StorageOptions = None):
    """Check every shard is complete and consistent; optionally recompute samples with the teacher."""
    store = _store(store, config, sets, storage_options)
    given = {k: v for k, v in (("device", device), ("amp", amp)) if v is not None}
    runtime = parse(RuntimeConfig, given, "verify") if given else None
    report = verify(FeatureStore.open(store), recompute, seed, runtime=runtime)
    for problem in report["problems"]:
        console.print(f"[red]problem:[/red] {problem}", highlight=False)
    line = f"{store}: {report['shards']} shards checked"
    if report["recomputed"]:
        line += (f", {report['recomputed']} samples recomputed, cosine min {report['cosine_min']:.5f} "
                 f"mean {report['cosine_mean']:.5f}")
    console.print(line + (", ok" if report["ok"] else f", {len(report['problems'])} problems"), highlight=False)
    if not report["ok"]:
        raise typer.Exit(1)


StudentName = Annotated[Optional[str], typer.Option("--student", help="timm model name of the student."),
                        Key("student.name")]
StudentSize = Annotated[Optional[int], typer.Option("--input-size", help="Student input size (square)."),
                        Key("student.input_size")]


@app.command("probes")
@user_errors
def probes_command(
    config: Config = None, sets: Sets = None, store: Store = None, shards: Shards = None,
    val_shards: ValShards = None, student: StudentName = None, input_size: StudentSize = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the random-init student."), Key("seed")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch."), Key("batch_size")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="JSON of the probes."), Key("out")] = None,
    device: Device = None, amp: Amp = None, channels_last: ChannelsLast = None, compile: Compile = None,
    storage_options: StorageOptions = None, quiet: Quiet = False, verbose: Verbose = False,
):
    """Reference linear probes: the teacher's cached features and a randomly initialised student."""
    cfg = _resolve("probes", probes_command, locals())
    print(json.dumps(probes_stage.run_stage(cfg), indent=2))


@app.command("distill")
@user_errors
def distill_command(
    config: Config = None, sets: Sets = None, run: Run = None, store: Store = None, shards: Shards = None,
    val_shards: ValShards = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Root of runs/RUN, metrics/RUN.json, "
                                                                   "plots/RUN.csv."), Key("out")] = None,
    method: Annotated[Optional[str], typer.Option(help="A registered method: " + ", ".join(method_names()) + "."),
                      Key("method", run=True)] = None,
    unsupervised: Annotated[Optional[bool], typer.Option("--unsupervised/--supervised",
                                                         help="No label enters any loss."),
                            Key("unsupervised", run=True)] = None,
    student: Annotated[Optional[str], typer.Option(help="timm model name of the student."),
                       Key("student.name", run=True)] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Student input size (square); default timm's."),
                          Key("student.input_size", run=True)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs."), Key("epochs", run=True)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per step, all torchrun ranks together."),
                          Key("loader.batch_size", run=True)] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW peak learning rate."), Key("lr", run=True)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay of the student."),
                            Key("weight_decay", run=True)] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option(help="Linear learning-rate warmup."),
                             Key("warmup_epochs", run=True)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Init, order, views and noise."), Key("seed", run=True)] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes (default: sized to the "
                                                            "cores)."), Key("loader.num_workers", run=True)] = None,
    smoothing: Annotated[Optional[float], typer.Option(
        help="Label smoothing of the soft labels (mixed views' labels are mixed after it)."),
        Key("loader.label_smoothing", run=True)] = None,
    views: Annotated[Optional[int], typer.Option(help="Train on the store's first N views, as from a store of N."),
                     Key("loader.views", run=True)] = None,
    device: RunDevice = None, amp: RunAmp = None, channels_last: RunChannelsLast = None, compile: RunCompile = None,
    resume: Resume = False, storage_options: StorageOptions = None, quiet: Quiet = False, verbose: Verbose = False,
):
    """Train a student from a feature store, without the teacher (GenDD or a logit baseline)."""
    params = load_params(config, sets or [])
    run = _pick_run(params, run, method or DistillConfig.method)
    cfg = _resolve("distill", distill_command, locals(), run)
    summary = distill_stage.run_stage(cfg, run, resume=resume, progress=not quiet)
    if not summary:  # a torchrun process other than rank 0
        return
    for which in ("best", "last"):
        scores = ", ".join(f"{k} {v['top1']:.2f}" for k, v in summary[which].items() if isinstance(v, dict))
        console.print(f"{which} epoch {summary[which]['epoch']}: top-1 {scores}", highlight=False)
    console.print(f"{cfg.out}: run {run}, {summary['images_per_s']:.0f} images/s in training", highlight=False)


@app.command("evaluate")
@user_errors
def evaluate_command(
    config: Config = None, sets: Sets = None, run: Run = None,
    distill: Annotated[Optional[str], typer.Option(help="The distill output root (runs/RUN/last.safetensors)."),
                       Key("distill")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="both (last and best) | last | best checkpoint of the "
                                                           "run, or a file."),
                          Key("checkpoint")] = None,
    val_shards: ValShards = None,
    train_shards: Annotated[Optional[list[str]], typer.Option(help="Train shards to fit a linear probe on."),
                            Key("train_shards")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Directory of RUN.json (default: print only)."),
                   Key("out")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch."), Key("batch_size")] = None,
    num_workers: NumWorkers = None,
    input_size: Annotated[Optional[int], typer.Option(help="Refuse a checkpoint trained at another size."),
                          Key("input_size")] = None,
    device: Device = None, amp: Amp = None, channels_last: ChannelsLast = None, compile: Compile = None,
    storage_options: StorageOptions = None, quiet: Quiet = False, verbose: Verbose = False,
):
    """Score a student: each predictor of its method and (with --train-shards) a linear probe.

    A method's prediction settings are overridden per method section, as GenDD's sampling:
    --set evaluate.predict.gendd.sampling_steps=8 --set evaluate.predict.gendd.samples=4.
    """
    params = load_params(config, sets or [])
    if run is None and checkpoint not in (None, "both", "last", "best") and not (params.get("distill") or {}).get("runs"):
        run = os.path.basename(os.path.dirname(os.path.abspath(checkpoint)))  # runs/RUN/best.safetensors -> RUN
        run = re.sub(r"[^A-Za-z0-9_.-]", "_", run).lstrip("_.-") or "run"
    run = _pick_run(params, run, None)
    cfg = _resolve("evaluate", evaluate_command, locals())
    print(json.dumps({"run": run, **evaluate_stage.run_stage(cfg, run)}, indent=2))


@app.command("report")
@user_errors
def report_command(
    config: Config = None, sets: Sets = None,
    distill: Annotated[Optional[str], typer.Option(help="The distill output root."), Key("distill")] = None,
    evaluate: Annotated[Optional[str], typer.Option(help="The evaluate output directory."), Key("evaluate")] = None,
    runs: Annotated[Optional[list[str]], typer.Option("--runs", help="Runs in the table, in order (repeatable)."),
                    Key("runs")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="The fine-tune's metrics.json."), Key("teacher")] = None,
    references: Annotated[Optional[str], typer.Option(help="Reference probes JSON."), Key("references")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Directory of the report."), Key("out")] = None,
    quiet: Quiet = False, verbose: Verbose = False,
):
    """The results table (markdown) and plots of a recipe's runs."""
    cfg = _resolve("report", report_command, locals())
    print(report_stage.run_stage(cfg), end="")


@config_app.command("show")
@user_errors
def config_show(
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="The recipe (default: ./params.yaml).")] = None,
    sets: Sets = None,
    run: Annotated[Optional[str], typer.Option(help="Show distill with this run alone, fully resolved.")] = None,
    sections: Annotated[Optional[list[str]], typer.Option("--section", help="Sections to show (repeatable).")] = None,
):
    """Print the resolved config of a recipe: every section validated, defaults filled in, every run resolved."""
    config = config or "params.yaml"
    params = load_params(config, sets or [])
    shown = {}
    for name in sections or [s for s in SECTIONS if s in params]:
        if name not in SECTIONS:
            raise GenddError(f"--section {name}: not a section (sections: {', '.join(SECTIONS)})")
        cfg = section(params, name, config)
        if name == "distill":
            names = [run] if run else list(cfg.runs)
            shown[name] = {**to_dict(cfg), "common": {}, "runs": {n: cfg.run(n).to_dict() for n in names}}
        else:
            shown[name] = to_dict(cfg)
    print(dump_yaml(shown), end="")


@config_app.command("dvc")
@user_errors
def config_dvc(
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="The recipe (default: ./params.yaml).")] = None,
    check: Annotated[bool, typer.Option(help="Only check that the dvc.yaml beside the recipe is current.")] = False,
):
    """Write the recipe's dvc.yaml beside it: its stages, outputs from the layout, deps from each stage's imports."""
    from gendd_pipe.dvc_pipeline import dvc_yaml, dvc_yaml_path

    config = config or "params.yaml"
    text, path = dvc_yaml(config), dvc_yaml_path(config)
    current = open(path).read() if os.path.exists(path) else None
    if check:
        if current != text:
            raise GenddError(f"{path}: out of date with {config} and the code; run gendd-pipe config dvc --config {config}")
        console.print(f"{path}: current")
        return
    with open(path, "w") as f:
        f.write(text)
    console.print(f"{path}: {'unchanged' if current == text else 'written'}")


def option_schema(command: str, key: Key) -> type:
    """The config class a typed option of ``command`` sets its keys in."""
    return DistillConfig if key.run else section_class(command)


def _show_defaults() -> None:
    """Append the schema's default to the help of every typed option, so no default is written twice."""
    done = set()
    for info in app.registered_commands:
        callback = getattr(info.callback, "__wrapped__", info.callback)
        hints = typing.get_type_hints(callback, include_extras=True)
        for param, key in keyed_options(callback).items():
            default = default_of(option_schema(info.name, key), key.paths[0])
            option = next(m for m in hints[param].__metadata__ if isinstance(m, typer.models.ParameterInfo))
            if default is not dataclasses.MISSING and default is not None and id(option) not in done:
                done.add(id(option))
                option.show_default = ",".join(f"{v:g}" for v in default) if isinstance(default, list) else str(default)


_show_defaults()

if __name__ == "__main__":
    app()
