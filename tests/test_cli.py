"""The `cdm-fast` command: doctor reports versions, the device and a backend decision per op."""

from __future__ import annotations

import json
import subprocess
import sys

from cdm_fast.cli import main


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
