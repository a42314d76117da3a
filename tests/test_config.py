"""Stage configs: dataclass defaults < YAML file < command line, with errors that name the source."""

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from mmed_rag.config import ConfigError, add_config_arguments, config_from_args, load_config, save_config


@dataclass
class ToyConfig:
    out: str = field(default="out", metadata={"help": "output directory"})
    epochs: int = 3
    lr: float = 1e-4
    amp: bool = False
    modalities: tuple[str, ...] = ("radiology", "pathology")
    precision: Literal["fp32", "bf16"] = "fp32"
    val_file: str | None = None


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ToyConfig)
    return config_from_args(ToyConfig, parser.parse_args(argv))


def test_defaults_come_from_the_dataclass():
    assert parse([]) == ToyConfig()


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("epochs: 10\nlr: 1\nmodalities: [pathology]\n")
    config = parse(["--config", str(path), "--lr", "0.5", "--amp", "--val-file", "v.json"])
    assert config == ToyConfig(epochs=10, lr=0.5, amp=True, modalities=("pathology",), val_file="v.json")
    assert parse(["--config", str(path)]).lr == 1.0  # YAML int accepted for a float field
    assert parse(["--modalities", "a", "b", "--no-amp"]).modalities == ("a", "b")


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("epoch: 10\n")
    with pytest.raises(ConfigError, match=r"toy.yaml: unknown field\(s\) epoch"):
        load_config(ToyConfig, path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("epochs: ten\n", "epochs: expected int"),
        ("amp: 1\n", "amp: expected true or false"),
        ("precision: fp8\n", "precision: expected one of"),
        ("- 1\n", "expected a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_values_are_clear(tmp_path, text, expected):
    path = tmp_path / "toy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(ToyConfig, path)


def test_bad_choice_on_the_command_line_exits():
    with pytest.raises(SystemExit):
        parse(["--precision", "fp8"])


def test_saved_config_loads_back(tmp_path):
    config = ToyConfig(epochs=5, modalities=("a",))
    path = save_config(config, tmp_path)
    assert yaml.safe_load(path.read_text())["modalities"] == ["a"]
    assert load_config(ToyConfig, path) == config


@dataclass
class NeedsOut:
    out: str
    n: int = 1


def test_missing_required_field_names_the_option():
    with pytest.raises(ConfigError, match=r"missing required field\(s\) out \(give --out"):
        load_config(NeedsOut, overrides={"n": 2})


@dataclass
class Negated:
    no_retrieval: bool = False


def test_a_flag_named_no_something_is_true_when_given():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Negated)
    assert config_from_args(Negated, parser.parse_args(["--no-retrieval"])).no_retrieval is True
    assert config_from_args(Negated, parser.parse_args(["--no-no-retrieval"])).no_retrieval is False
