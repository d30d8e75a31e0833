import json
import subprocess
import sys

import pytest

from omnic.cli.app import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_devices_table_and_json(capsys):
    code, out, _ = run_cli(capsys, "devices")
    assert code == 0 and "S888-gpu" in out and "rasp4b" in out
    code, out, _ = run_cli(capsys, "devices", "--json")
    rows = json.loads(out)
    assert {r["name"] for r in rows} >= {"host", "a100", "jetson-orin-nano"}


def test_latency_and_profile_json(capsys):
    code, out, _ = run_cli(capsys, "latency", "resnet_small", "--json")
    data = json.loads(out)
    assert code == 0 and data["latency_ms"] > 0 and data["device"] == "host"
    code, out, _ = run_cli(capsys, "profile", "tests.cli_models:tiny", "--input-shape", "1,3,16,16")
    assert code == 0 and "kernel" in out and "FLOPs" in out


def test_compile_exports_for_a_cross_device(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "compile", "tests.cli_models:tiny", "--input-shape", "1,3,16,16",
                           "--device", "rasp4b", "-o", str(tmp_path / "pi"), "--json")
    data = json.loads(out)
    assert code == 0 and data["device"] == "rasp4b"
    assert (tmp_path / "pi" / "model.tar").exists()


def test_onnx_path_and_errors(capsys, tmp_path):
    import torch

    from tests.cli_models import tiny

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17)
    code, out, _ = run_cli(capsys, "latency", str(path))
    assert code == 0 and "ms" in out
    code, _, err = run_cli(capsys, "latency", "resnet_small", "--device", "nokia3310")
    assert code == 2 and "known devices" in err
    code, _, err = run_cli(capsys, "latency", "tests.cli_models:tiny")
    assert code == 2 and "--input-shape" in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "omnic.cli", "devices"], capture_output=True, text=True)
    assert out.returncode == 0 and "host" in out.stdout


def test_demo_command_maps_its_flags_onto_the_demo_config(monkeypatch, capsys):
    from omnic.cli import demo as demo_cli

    seen = []
    monkeypatch.setattr(demo_cli, "run_demo", seen.append)
    code, _, _ = run_cli(capsys, "demo", "--quick", "--out", "somewhere", "--threads", "2")
    assert code == 0 and len(seen) == 1
    cfg = seen[0]
    assert cfg.out_dir == "somewhere" and cfg.threads == 2 and cfg.tuning_trials == 0
    assert (cfg.width, cfg.budgets) == (demo_cli.QUICK["width"], demo_cli.QUICK["budgets"])
