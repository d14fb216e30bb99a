"""The `cdm-fast` command: doctor reports versions, the device and a backend decision per op; every other
command's flags reach its config under the config's own names and defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

from cdm_fast import cli
from cdm_fast.cli import main
from cdm_fast.distill.latent import LatentDistillConfig
from cdm_fast.distill.latents import CacheLatentsConfig
from cdm_fast.distill.lora import LoraDistillConfig
from cdm_fast.scoring import DemoConfig, ScoreConfig

CONFIGS = {
    "score": ScoreConfig,
    "demo": DemoConfig,
    "lora-distill": LoraDistillConfig,
    "cache-latents": CacheLatentsConfig,
    "latent-distill": LatentDistillConfig,
}
# Flags that steer the command rather than fill its config.
NOT_CONFIG = {"help", "no_progress", "seeds"}


def _flag_names(command: str) -> set[str]:
    parser = cli.build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return {action.dest for action in commands.choices[command]._actions}


def test_doctor_json_names_a_backend_for_every_example_call(capsys):
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"]
    assert "extension" in data
    for precision, case in data["ops"]["projection"].items():
        assert precision in ("bf16", "fp8", "fp8-features")
        assert set(case["backends"]) >= {"torch"}
        assert case["backends"]["torch"] == "ok"
        assert not case["auto"].startswith("none"), case


def test_python_dash_m_cdm_fast_doctor_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "cdm_fast", "doctor"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "projection [fp8]" in out
    assert "torch" in out and "extension" in out


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_flag_names_a_config_field(command):
    fields = {field.name for field in dataclasses.fields(CONFIGS[command])}
    assert _flag_names(command) - NOT_CONFIG - fields == set()


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_a_bare_command_builds_the_default_config(command):
    # The flags' defaults are the config's: neither can drift from the other unseen.
    args = cli.build_parser().parse_args([command])
    assert cli._config(CONFIGS[command], args) == CONFIGS[command]()


def test_flags_are_parsed_into_the_config_types():
    args = cli.build_parser().parse_args(
        ["lora-distill", "--target-modules", "q_proj, v_proj", "--rank", "8", "--no-progress"]
    )
    config = cli._config(LoraDistillConfig, args)
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.rank == 8 and config.progress is False
    args = cli.build_parser().parse_args(
        ["cache-latents", "--layers", "5,10", "--problems-per-task", "3", "--freetext", "0"]
    )
    config = cli._config(CacheLatentsConfig, args)
    assert config.layers == (5, 10)
    assert config.default_problems_per_task == 3 and config.default_freetext == 0
    args = cli.build_parser().parse_args(
        ["latent-distill", "--cache-layers", "3", "--student-lora-rank", "4"]
    )
    config = cli._config(LatentDistillConfig, args)
    assert config.cache_layers == (3,) and config.student_lora_rank == 4
