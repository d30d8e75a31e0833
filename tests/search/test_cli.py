"""`omnic search` end to end (small: no training, two exact measurements)."""
from __future__ import annotations

import json

from omnic.cli.app import main


def test_cli_search_writes_report(tmp_path, capsys):
    rc = main(["search", "digits_resnet", "--latency", "1000", "--epochs", "0", "--population", "3",
               "--generations", "1", "--measurements", "2", "--divisor", "4", "-o", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("\n{\n") + 1:])
    assert summary["latency_ms"] <= 1000
    assert (tmp_path / "search.json").exists() and (tmp_path / "search_pareto.png").exists()
    assert (tmp_path / "search_model.pt").exists()


def test_cli_search_infeasible_exits_with_error(tmp_path, capsys):
    rc = main(["search", "digits_cnn", "--latency", "0.00001", "--mode", "fastnas", "--epochs", "0",
               "-o", str(tmp_path)])
    assert rc == 2
    assert "smallest" in capsys.readouterr().err
