"""The ``gendd-pipe`` command line: one command per stage, plus ``info``, ``verify`` and ``config show``.

A thin front end over the code the DVC stages run. A stage command reads the
recipe (``--config params.yaml``; none: the defaults), applies ``--set
KEY.PATH=VALUE`` overrides, then its typed options, validates the stage's
section and calls the stage's ``run_stage`` (`recipe.stage_runner`):
``gendd-pipe distill --config F --run R`` runs what ``dvc repro`` runs for
``distill@R``. A typed option is declared by the schema key it sets and its
help (`option`); its type and the default its help shows are the schema's,
filled in when the command is registered (`stage_command`). Method settings
have no typed options: ``--set distill.common.gendd.head.width=256``. Errors a
user can cause print one line and exit 1 (`errors.one_line_errors`).
"""

import dataclasses
import functools
import inspect
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

from gendd_pipe.config import RUN_NAME, ConfigError, default_of, join_key, parse, set_key, to_dict, type_at
from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.distill.methods import method_names
from gendd_pipe.errors import GenddError, one_line_errors
from gendd_pipe.files import dump_yaml, redact
from gendd_pipe.logs import setup_logging
from gendd_pipe.recipe import SECTIONS, load_params, section, section_class, stage_runner
from gendd_pipe.runtime import RuntimeConfig
from gendd_pipe.storage import configure, parse_options, urls_in
from gendd_pipe.store.audit import summarize
from gendd_pipe.store.format import logits_spec, renderer_of
from gendd_pipe.store.reader import FeatureStore
from gendd_pipe.verify import verify

app = typer.Typer(help="Offline teacher-feature cache and GenDD distillation.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
config_app = typer.Typer(help="The resolved configuration of a recipe.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console(soft_wrap=True)  # messages stay one line however narrow the terminal
log = logging.getLogger("gendd_pipe.cli")


@dataclasses.dataclass(frozen=True)
class Key:
    """A typed option: the key(s) it sets under its command's section (``run``: under ``distill.runs.RUN``),
    its help, its flags (default: from the parameter's name), ``convert`` for a value given as text (LOW,HIGH),
    and whether it is the command's argument."""

    paths: tuple[str, ...]
    help: str
    flags: tuple[str, ...] = ()
    run: bool = False
    convert: Callable | None = None
    argument: bool = False


def option(*paths: str, help: str, flags: tuple[str, ...] = (), run: bool = False, convert: Callable | None = None,
           argument: bool = False) -> Key:
    """A typed option setting ``paths``, given as a command parameter's default; `stage_command` makes it a typer
    option of the schema's type, defaulting to None (unset: the recipe's value stands)."""
    return Key(paths, help, flags, run, convert, argument)


def _cli_type(hint) -> type:
    """What typer parses for a schema type: its scalar, a list of text for a list, text for anything else."""
    if typing.get_origin(hint) is typing.Literal:
        return type(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (list, tuple):
        return list[str]
    return hint if hint in (bool, int, float, str) else str


def _shown(default) -> str | bool:
    if default is dataclasses.MISSING or default is None:
        return False
    return ",".join(f"{v:g}" for v in default) if isinstance(default, list) else str(default)


def option_schema(command: str, key: Key) -> type:
    """The config class a typed option of ``command`` sets its keys in."""
    return DistillConfig if key.run else section_class(command)


def stage_command(name: str, app: typer.Typer = app):
    """Register a command named ``name``: each `option` parameter becomes a typer option (or argument) of the
    schema's type for its key, showing the schema's default; errors a user can cause are one line."""

    def register(command):
        signature = inspect.signature(command)
        parameters = []
        for param in signature.parameters.values():
            key = param.default if isinstance(param.default, Key) else None
            if key is not None:
                schema = option_schema(name, key)
                kind = str if key.convert else _cli_type(type_at(schema, tuple(key.paths[0].split("."))))
                info = (typer.Argument(help=key.help) if key.argument else
                        typer.Option(*key.flags, help=key.help, show_default=_shown(default_of(schema, key.paths[0]))))
                param = param.replace(annotation=Annotated[Optional[kind], info, key], default=None)
            parameters.append(param)

        @functools.wraps(command)
        def run(*args, **kwargs):
            with one_line_errors():
                return command(*args, **kwargs)

        run.__signature__ = signature.replace(parameters=parameters)
        return app.command(name)(run)

    return register


def _key(annotation) -> Key | None:
    return next((m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, Key)), None)


def _pair(text: str) -> list[float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise GenddError(f"expected two numbers like 0.08,1.0, got {text!r}") from None
    return [low, high]


def keyed_options(command) -> dict[str, Key]:
    """Parameter name -> `Key` of a command's typed options."""
    return {name: key for name, param in inspect.signature(command).parameters.items()
            if (key := _key(param.annotation)) is not None}  # (the registered command's signature)


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

Shards = option("shards", help="Train image shards (repeatable; patterns or URLs).")
ValShards = option("val_shards", help="Val image shards (repeatable).")
Store = option("store", help="Feature store path or URL.")
NumWorkers = option("num_workers", help="DataLoader worker processes (default: sized to the cores).")
BatchSize = option("batch_size", help="Images per batch.")
TeacherName = option("teacher.name", help="timm name: resnet50, resnet50.a1_in1k, hf-hub:org/model.",
                     flags=("--teacher",))
Weights = option("teacher.weights", help="none | bundled:efficientnet-lite0 | pretrained | PATH.")
TeacherSize = option("teacher.input_size", help="Square input size override (recorded).", flags=("--input-size",))
ViewScale = option("views.scale", help="Random-resized-crop area range, LOW,HIGH.", convert=_pair)
ViewRatio = option("views.ratio", help="Random-resized-crop aspect range, LOW,HIGH.", convert=_pair)
Hflip = option("views.hflip", help="Horizontal flip probability.")
Renderer = option("views.renderer", help="How pixels are cut from views: pil | tensor (torchvision; one decode per "
                                         "image). Recorded in the store; students render alike.")


def _runtime_options(run: bool = False):
    """The ``--device --amp --channels-last --compile`` options, setting ``runtime.*`` (of the run with ``run``)."""
    return (
        option("runtime.device", help="auto | cpu | cuda | cuda:N (auto: a GPU when there is one).", run=run),
        option("runtime.amp", help="Autocast precision: off | bf16 | fp16 (fp16 needs a GPU).", run=run),
        option("runtime.channels_last", help="NHWC models and inputs.", flags=("--channels-last/--no-channels-last",),
               run=run),
        option("runtime.compile", help="torch.compile the network.", flags=("--compile/--no-compile",), run=run),
    )


Device, Amp, ChannelsLast, Compile = _runtime_options()
RunDevice, RunAmp, RunChannelsLast, RunCompile = _runtime_options(run=True)


@stage_command("prepare")
def prepare_command(
    config: Config = None, sets: Sets = None,
    dataset=option("dataset", help="mnist5k, fashion-mnist, or an ImageFolder root SRC/<class>/<image>."),
    data_dir=option("data_dir", help="fashion-mnist: the directory of its IDX files."),
    out=option("out", help="Directory of the shards.", flags=("--out", "-o")),
    val_fraction=option("val_fraction", help="Share of each class held out for val."),
    shard_size=option("shard_size", help="Samples per shard."),
    seed=option("seed", help="Seed of the split and sample order."),
    quiet: Quiet = False, verbose: Verbose = False,
):
    """Write ImageNet-style WebDataset shards (KEY.png + KEY.cls) of a real image set."""
    cfg = _resolve("prepare", prepare_command, locals())
    summary = stage_runner("prepare")(cfg)
    console.print(f"wrote {summary['train']['samples']} train samples in {len(summary['train']['shards'])} shards "
                  f"and {summary['val']['samples']} val samples in {len(summary['val']['shards'])} shards to {cfg.out}")


@stage_command("teacher")
def teacher_command(
    config: Config = None, sets: Sets = None, shards=Shards, val_shards=ValShards,
    out=option("out", help="Directory: model.safetensors, metrics.json.", flags=("--out", "-o")),
    teacher=TeacherName, weights=Weights, input_size=TeacherSize,
    num_classes=option("num_classes", help="Classes (default: largest train label + 1)."),
    epochs=option("epochs", help="0 keeps the teacher as it ships."),
    batch_size=option("batch_size", help="Images per step."),
    lr=option("lr", help="AdamW peak learning rate."),
    weight_decay=option("weight_decay", help="AdamW weight decay."),
    label_smoothing=option("label_smoothing", help="Cross-entropy label smoothing."),
    view_scale=ViewScale, view_ratio=ViewRatio, hflip=Hflip, renderer=Renderer,
    seed=option("views.seed", help="Seed of the new classifier, crops and order."),
    num_workers=NumWorkers, device=Device, amp=Amp, channels_last=ChannelsLast,
    compile=Compile, resume: Resume = False, storage_options: StorageOptions = None, quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Fine-tune a teacher on labeled shards; extract then loads weights OUT/model.safetensors."""
    cfg = _resolve("teacher", teacher_command, locals())
    metrics = stage_runner("teacher")(cfg, resume=resume, progress=not quiet)
    top1 = f"val top-1 {metrics['val']['top1']:.2f}" if metrics.get("val") else "no val labels it can score"
    console.print(f"{metrics['model']}: {metrics['num_classes']} classes, {top1}", highlight=False)


@stage_command("extract")
def extract_command(
    shards=option("shards", help="Input shards: paths, brace patterns or URLs.", argument=True),
    config: Config = None, sets: Sets = None,
    out=option("out", help="Store path or URL (created or resumed).", flags=("--out", "-o")),
    teacher=TeacherName, weights=Weights, input_size=TeacherSize,
    views=option("views.count", help="Views per image; view 0 is the eval view."),
    view_scale=ViewScale, view_ratio=ViewRatio, hflip=Hflip, renderer=Renderer,
    seed=option("views.seed", "teacher.seed", help="View seed (and init seed for --weights none)."),
    randaugment=option("augment.randaugment", help="timm RandAugment string drawn per view (rand-n2-m7-mstd0.5); "
                                                    "replayed by the loader."),
    mixup=option("augment.mixup", help="Mixup alpha of the views (timm Mixup's); 0: off."),
    cutmix=option("augment.cutmix", help="CutMix alpha of the views (timm Mixup's); 0: off."),
    color_jitter=option("augment.color_jitter", help="ColorJitter(j, j, j) of the views before RandAugment "
                                                      "(torchvision's); 0: off."),
    logits=option("logits", help="auto | derived | full | topk:K (auto: derived, computed from the stored head, "
                                  "where the classifier is one linear layer)."),
    features_dtype=option("features_dtype", help="float16 | int8 (lossy: one scale per channel and chunk; the "
                                                  "round-trip cosine goes in the manifest)."),
    int8_floor=option("int8_floor", help="int8: the lowest round-trip cosine a view may have; a shard under it "
                                          "is refused."),
    batch_size=option("batch_size", help="Images per teacher forward."),
    chunk_size=option("chunk_size", help="Samples per Zarr chunk."),
    dask_workers=option("dask_workers", help="Dask LocalCluster workers; 0 runs in this process."),
    scheduler=option("scheduler", help="Address of an existing Dask scheduler."),
    threads=option("threads", help="torch threads per Dask worker (default cores/workers)."),
    render_threads=option("render_threads", help="Threads decoding and rendering views ahead of the forward "
                                                  "(default: --threads)."),
    on_error=option("on_error", help="fail | skip (skipped samples go in the manifest)."),
    device=Device, amp=Amp, channels_last=ChannelsLast, compile=Compile,
    storage_options: StorageOptions = None, quiet: Quiet = False, verbose: Verbose = False,
):
    """Run a teacher once over image shards and write (or resume) a feature store."""
    cfg = _resolve("extract", extract_command, locals())
    metrics = stage_runner("extract")(cfg, progress=not quiet)
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


@stage_command("info")
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


@stage_command("verify")
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


StudentName = option("student.name", help="timm model name of the student.", flags=("--student",))
StudentSize = option("student.input_size", help="Student input size (square).", flags=("--input-size",))


@stage_command("probes")
def probes_command(
    config: Config = None, sets: Sets = None, store=Store, shards=Shards,
    val_shards=ValShards, student=StudentName, input_size=StudentSize,
    seed=option("seed", help="Seed of the random-init student."),
    batch_size=BatchSize,
    out=option("out", help="JSON of the probes.", flags=("--out", "-o")),
    device=Device, amp=Amp, channels_last=ChannelsLast, compile=Compile,
    storage_options: StorageOptions = None, quiet: Quiet = False, verbose: Verbose = False,
):
    """Reference linear probes: the teacher's cached features and a randomly initialised student."""
    cfg = _resolve("probes", probes_command, locals())
    print(json.dumps(stage_runner("probes")(cfg), indent=2))


@stage_command("distill")
def distill_command(
    config: Config = None, sets: Sets = None, run: Run = None, store=Store, shards=Shards,
    val_shards=ValShards,
    out=option("out", help="Root of runs/RUN, metrics/RUN.json, plots/RUN.csv.", flags=("--out", "-o")),
    method=option("method", help="A registered method: " + ", ".join(method_names()) + ".", run=True),
    unsupervised=option("unsupervised", help="No label enters any loss.", flags=("--unsupervised/--supervised",),
                         run=True),
    student=option("student.name", help="timm model name of the student.", run=True),
    input_size=option("student.input_size", help="Student input size (square); default timm's.", run=True),
    epochs=option("epochs", help="Training epochs.", run=True),
    batch_size=option("loader.batch_size", help="Samples per step, all torchrun ranks together.", run=True),
    lr=option("lr", help="AdamW peak learning rate.", run=True),
    weight_decay=option("weight_decay", help="AdamW weight decay of the student.", run=True),
    warmup_epochs=option("warmup_epochs", help="Linear learning-rate warmup.", run=True),
    seed=option("seed", help="Init, order, views and noise.", run=True),
    num_workers=option("loader.num_workers", help="DataLoader worker processes (default: sized to the cores).",
                        run=True),
    smoothing=option("loader.label_smoothing", help="Label smoothing of the soft labels (mixed views' labels are "
                                                     "mixed after it).", run=True),
    views=option("loader.views", help="Train on the store's first N views, as from a store of N.", run=True),
    teacher=option("teacher.name", help="A live teacher in place of the store (timm name): run beside the student "
                   "on a fresh view every epoch.", flags=("--teacher",), run=True),
    teacher_weights=option("teacher.weights", help="The live teacher's weights: none | bundled:efficientnet-lite0 | "
                           "pretrained | PATH | URL.", flags=("--teacher-weights",), run=True),
    teacher_size=option("teacher.input_size", help="The live teacher's square input size.",
                        flags=("--teacher-input-size",), run=True),
    device=RunDevice, amp=RunAmp, channels_last=RunChannelsLast, compile=RunCompile,
    resume: Resume = False, storage_options: StorageOptions = None, quiet: Quiet = False, verbose: Verbose = False,
):
    """Train a student from a feature store, without the teacher, or beside a live one (GenDD or a logit
    baseline)."""
    if store is not None and teacher is not None:
        raise GenddError(f"--store {store} and --teacher {teacher}: a run takes its teacher outputs from a store or "
                         "from a live teacher, not both")
    params = load_params(config, sets or [])
    run = _pick_run(params, run, method or DistillConfig.method)
    cfg = _resolve("distill", distill_command, locals(), run)
    summary = stage_runner("distill")(cfg, run, resume=resume, progress=not quiet)
    if not summary:  # a torchrun process other than rank 0
        return
    for which in ("best", "last"):
        scores = ", ".join(f"{k} {v['top1']:.2f}" for k, v in summary[which].items() if isinstance(v, dict))
        console.print(f"{which} epoch {summary[which]['epoch']}: top-1 {scores}", highlight=False)
    console.print(f"{cfg.out}: run {run}, {summary['images_per_s']:.0f} images/s in training", highlight=False)


@stage_command("evaluate")
def evaluate_command(
    config: Config = None, sets: Sets = None, run: Run = None,
    distill=option("distill", help="The distill output root (runs/RUN/last.safetensors)."),
    checkpoint=option("checkpoint", help="both (last and best) | last | best checkpoint of the run, or a file."),
    val_shards=ValShards,
    train_shards=option("train_shards", help="Train shards to fit a linear probe on."),
    out=option("out", help="Directory of RUN.json (default: print only).", flags=("--out", "-o")),
    batch_size=BatchSize,
    num_workers=NumWorkers,
    input_size=option("input_size", help="Refuse a checkpoint trained at another size."),
    device=Device, amp=Amp, channels_last=ChannelsLast, compile=Compile,
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
    print(json.dumps({"run": run, **stage_runner("evaluate")(cfg, run)}, indent=2))


@stage_command("report")
def report_command(
    config: Config = None, sets: Sets = None,
    distill=option("distill", help="The distill output root."),
    evaluate=option("evaluate", help="The evaluate output directory."),
    runs=option("runs", help="Runs in the table, in order (repeatable).", flags=("--runs",)),
    teacher=option("teacher", help="The fine-tune's metrics.json."),
    references=option("references", help="Reference probes JSON."),
    out=option("out", help="Directory of the report.", flags=("--out", "-o")),
    quiet: Quiet = False, verbose: Verbose = False,
):
    """The results table (markdown) and plots of a recipe's runs."""
    cfg = _resolve("report", report_command, locals())
    print(stage_runner("report")(cfg), end="")


@stage_command("show", config_app)
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


@stage_command("dvc", config_app)
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


if __name__ == "__main__":
    app()
