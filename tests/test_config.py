"""One validated schema for params.yaml, ``--set`` and the CLI's typed options; one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing

import pytest
import yaml
from typer.testing import CliRunner

from gendd_pipe.cli import app, keyed_options, option_schema
from gendd_pipe.config import ConfigError, field_types, type_at
from gendd_pipe.distill.config import DistillConfig
from gendd_pipe.errors import GenddError
from gendd_pipe.recipe import SECTIONS, load_params, section
from tests.test_recipes import RECIPES
RECIPE = """
distill:
  store: s.zarr
  shards: train-000000.tar
  val_shards: [val-000000.tar]
  out: out
  common:
    lr: 2e-3        # YAML reads this as a string
    epochs: "3"
    logit: {temperature: 2}
  runs:
    kd: {}
    kd-t8: {method: kd, logit: {temperature: 8}}
"""


@pytest.fixture
def recipe(tmp_path) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(RECIPE)
    return str(path)


def _distill(recipe: str, *sets: str):
    return section(load_params(recipe, list(sets)), "distill", recipe)


def test_yaml_ambiguities_are_coerced_to_the_field_types(recipe):
    with open(recipe) as f:
        assert yaml.safe_load(f)["distill"]["common"]["lr"] == "2e-3"
    run = _distill(recipe).run("kd-t8")
    assert run.lr == 2e-3 and isinstance(run.lr, float) and run.epochs == 3
    assert run.options.temperature == 8.0 and _distill(recipe).run("kd").options.temperature == 2.0
    assert run.method == "kd" and _distill(recipe).shards == ("train-000000.tar",)  # one string is a list of one


@pytest.mark.parametrize("sets, message", [
    (["distill.runs.kd.logit.temperature=-1"], "distill.runs.kd.logit.temperature: must be > 0, got -1"),
    (["distill.common.logit.temperature=-1"], "distill.common.logit.temperature: must be > 0, got -1"),
    (["distill.common.epoch=2"], "distill.common.epoch: unknown key (did you mean 'epochs'?; known: beta2, decay_epochs"),
    (["distill.runs.kd.logit.temprature=1"], "distill.runs.kd.logit.temprature: unknown key (did you mean "
                                             "'temperature'?"),
    (["distill.common.loader.batch_size=0"], "distill.common.loader.batch_size: must be > 0, got 0"),
    (["distill.common.lr=fast"], "distill.common.lr: must be a number, got 'fast'"),
    (["distill.common.student.name=[a]"], "distill.common.student.name: must be a string, got ['a']"),
    (["distill.common.beta2=[0.9]"], "distill.common.beta2: needs 2 items"),
    (["distill.common.beta2=[0.99, 0.9]"], "distill.common.beta2: must be a range [low, high] with low <= high"),
    (["distill.runs.kd.method=kdd"], "distill.runs.kd.method: must be one of ce, dkd, gdkd, gendd, kd, got 'kdd'"),
    (["distill.runs.kd.logit=3"], "distill.runs.kd.logit: must be a mapping of keys, got 3"),
    (["distill.common.unsupervised=true", "distill.runs.kd.method=dkd"],
     "distill.runs.kd: method dkd needs labels and cannot run unsupervised"),
    (["distill.common.gendd.predict.sampling_steps=0"], "distill.common.gendd.predict.sampling_steps: must be > 0"),
    (["distill.store=null"], "distill.store: run kd names no live teacher, so it learns from a store"),
])
def test_every_error_is_one_line_naming_the_key_path(recipe, sets, message):
    with pytest.raises(ConfigError) as error:
        _distill(recipe, *sets)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_sections_and_bad_files_name_the_file(recipe, tmp_path):
    with pytest.raises(GenddError, match=r"params.yaml: extrakt: unknown key \(did you mean 'extract'\?"):
        load_params(recipe, ["extrakt.out=x"])
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(GenddError, match="list.yaml: must be a mapping of stage sections, not list"):
        load_params(str(tmp_path / "list.yaml"))
    (tmp_path / "bad.yaml").write_text("distill: [unclosed\n")
    with pytest.raises(GenddError, match="bad.yaml: not valid YAML"):
        load_params(str(tmp_path / "bad.yaml"))
    with pytest.raises(GenddError, match="no 'extract' section"):
        section(load_params(recipe), "extract", recipe)


def test_set_reads_values_as_yaml_and_creates_mappings(recipe):
    cfg = _distill(recipe, "distill.runs.kd-t8.logit={temperature: 3, logit_std: true}",
                   "distill.common.beta2=[0.9, 0.99]", "distill.runs.new.method=ce")
    assert cfg.run("kd-t8").options.temperature == 3 and cfg.run("kd-t8").options.logit_std is True
    assert cfg.run("kd").beta2 == (0.9, 0.99) and cfg.run("new").method == "ce"
    with pytest.raises(GenddError, match="--set distill.out.x: distill.out holds 'out', not a mapping of keys"):
        _distill(recipe, "distill.out.x=1")


def _kind(hint) -> type:
    """What a type takes from the command line: ``Optional[list[str]]`` -> list, ``Literal['a']`` -> str."""
    while typing.get_origin(hint) in (typing.Annotated, typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        return type(typing.get_args(hint)[0])
    return {tuple: list}.get(typing.get_origin(hint) or hint, typing.get_origin(hint) or hint)


def test_every_typed_option_sets_a_key_of_the_schema_with_its_type():
    """No setting can exist in the CLI and not in params.yaml: each typed option names a schema key and takes the
    key's kind of value (or a string it converts, such as LOW,HIGH)."""
    checked = 0
    for info in app.registered_commands:
        callback = info.callback  # as registered: the options' types filled in from the schema
        hints = {name: p.annotation for name, p in inspect.signature(callback).parameters.items()}
        for param, key in keyed_options(callback).items():
            assert info.name in SECTIONS, f"{info.name} has typed options but no section"
            cls = option_schema(info.name, key)
            for path in key.paths:
                hint = type_at(cls, tuple(path.split(".")))
                where = f"gendd-pipe {info.name} --{param.replace('_', '-')}"
                assert hint is not None, f"{where}: no key {path} in {cls.__name__}"
                assert not dataclasses.is_dataclass(hint), f"{where} sets a whole section ({path})"
                taken, wanted = _kind(hints[param]), _kind(hint)
                if key.convert:
                    assert taken is str, where
                else:
                    assert taken is wanted or (taken, wanted) == (int, float), f"{where}: {taken} for {wanted}"
                checked += 1
    assert checked > 40


def test_typed_options_cover_the_common_settings():
    """The settings a user changes most have typed options on their commands, under the schema's names."""
    names = {info.name: {p.replace("_", "-") for p in keyed_options(info.callback)} for info in app.registered_commands}
    assert {"teacher", "weights", "input-size", "views", "logits", "batch-size", "dask-workers", "on-error"} <= names[
        "extract"]
    assert {"method", "student", "epochs", "lr", "batch-size", "num-workers", "seed", "store"} <= names["distill"]
    assert {"epochs", "lr", "num-workers", "batch-size"} <= names["teacher"]
    assert "workers" not in names["extract"] | names["distill"]  # Dask workers and DataLoader workers differ
    assert "num_workers" in field_types(field_types(DistillConfig)["loader"])


def test_cli_config_set_and_options_apply_in_that_order(recipe, tmp_path):
    result = CliRunner().invoke(app, ["config", "show", "--config", recipe, "--run", "kd-t8",
                                      "--set", "distill.runs.kd-t8.epochs=7"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)["distill"]
    assert shown["common"] == {} and list(shown["runs"]) == ["kd-t8"]
    run = shown["runs"]["kd-t8"]
    assert run["epochs"] == 7 and run["lr"] == 0.002 and run["logit"]["temperature"] == 8.0
    assert run["loader"]["batch_size"] == DistillConfig().loader.batch_size  # defaults filled in
    every = yaml.safe_load(CliRunner().invoke(app, ["config", "show", "--config", recipe]).output)
    assert list(every["distill"]["runs"]) == ["kd", "kd-t8"]


@pytest.mark.parametrize("args, message", [
    (["--set", "distill.common.epochs"], "--set 'distill.common.epochs': expected KEY.PATH=VALUE"),
    (["--set", "distill.common.epochs=[1,"], "--set 'distill.common.epochs=[1,': the value is not valid YAML"),
    (["--run", "dkd"], "--run dkd: not in the recipe (distill.runs has: kd, kd-t8)"),
    ([], "--run is needed: the recipe has runs kd, kd-t8"),
    (["--run", "kd", "--method", "nope"], "distill.runs.kd.method: must be one of ce, dkd, gdkd, gendd, kd, "
                                          "got 'nope' (option --method)"),
    (["--run", "kd", "--epochs", "0"], "distill.runs.kd.epochs: must be > 0, got 0 (option --epochs)"),
    (["--run", "kd", "--set", "distill.common.logit.tau=1"], "distill.common.logit.tau: unknown key"),
])
def test_bad_cli_input_is_one_line_and_touches_nothing(recipe, tmp_path, args, message):
    out = tmp_path / "out" / "runs" / "kd"
    out.mkdir(parents=True)
    (out / "last.safetensors").write_bytes(b"an earlier run")
    result = CliRunner().invoke(app, ["distill", "--config", recipe, "--set", f"distill.out={tmp_path / 'out'}", *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert os.listdir(out) == ["last.safetensors"] and (out / "last.safetensors").read_bytes() == b"an earlier run"


def test_config_show_validates_every_recipe():
    for recipe in RECIPES:
        result = CliRunner().invoke(app, ["config", "show", "--config", recipe])
        assert result.exit_code == 0, f"{recipe}: {result.output}"
        shown = yaml.safe_load(result.output)
        assert set(shown) <= set(SECTIONS) and "distill" in shown, recipe
