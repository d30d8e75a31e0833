"""The demo's whole pipeline with a tiny budget, so the README's first command cannot silently break."""
import dataclasses
import json

import pytest

from omnic.examples.demo import QUICK, DemoConfig, run_demo


@pytest.mark.slow
def test_demo_pipeline_writes_a_report_and_reuses_on_second_run(tmp_path, fresh_cache):
    cfg = dataclasses.replace(DemoConfig(out_dir=str(tmp_path / "report"), threads=2), **QUICK)
    lines: list[str] = []
    report = run_demo(cfg, say=lines.append)
    out = tmp_path / "report"
    for name in ("report.md", "report.json", "pareto.png", "profile.txt", "adapt.txt"):
        assert (out / name).exists() and (out / name).stat().st_size > 0
    data = json.loads((out / "report.json").read_text())
    methods = [r["method"] for r in data["rows"]]
    assert methods.count("FastNAS") == len(cfg.budgets) and methods.count("AutoNAS") == len(cfg.budgets)
    for row in data["rows"]:
        assert row["omnic_ms"] > 0 and row["onnxruntime_ms"] > 0 and row["pytorch_eager_ms"] > 0
        assert row["max_rel_error"] < 1e-4  # every compiled result matches PyTorch
        assert 0.0 <= row["accuracy"] <= 1.0
    for row in data["rows"][1:]:
        assert row["search_measured_ms"] <= row["budget_ms"]  # budgets are met by measurement
    assert report["oracle"]["fresh_measurements"] > 0
    assert any(line.startswith("[") for line in lines)  # progress lines

    second = run_demo(dataclasses.replace(cfg, out_dir=str(tmp_path / "again")), say=lines.append)
    assert "trained base weights" in second["reused"] and "trained supernet weights" in second["reused"]
    assert second["oracle"]["fresh_measurements"] < report["oracle"]["fresh_measurements"]
