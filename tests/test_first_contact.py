"""Issue #27, section 2 ("first contact"): the command line as a new user meets it, a quiet
console, progress where a person waits, FLOPs for ONNX models."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

from omnic import engine, nas
from omnic.cli.app import main
from omnic.compile.profiler import count_flops
from omnic.core.ir import trace
from tests.cli_models import ConvBNNet

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMNIC_CACHE_DIR=str(tmp_path / "cache"), TVM_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    return env


def test_cli_input_shape_the_model_cannot_take_exits_2_with_the_cause(capsys):
    code = main(["latency", "resnet_small", "--input-shape", "1,3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("omnic: error: expected a 4-d input (N, C, H, W), got 2-d"), err
    assert "Traceback" not in err and len(err.splitlines()) <= 5


def test_cli_input_shape_that_is_no_shape_exits_2(capsys):
    assert main(["latency", "resnet_small", "--input-shape", "1,3,a"]) == 2
    assert "input_shape" in capsys.readouterr().err


def test_module_factory_is_found_in_the_working_directory(tmp_path):
    """`omnic latency mymod:factory` from the folder holding mymod.py: the console script's
    sys.path has the script's folder, not the working directory (python -m has the latter)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "mymod.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def factory():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8)
    """))
    launcher = tmp_path / "bin" / "omnic"  # what pip's console script does
    launcher.parent.mkdir()
    launcher.write_text("import sys\nfrom omnic.cli.app import main\nsys.exit(main())\n")
    out = subprocess.run([sys.executable, str(launcher), "latency", "mymod:factory", "--json"], cwd=work,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert '"latency_ms"' in out.stdout and "No module named" not in out.stderr


def test_compile_and_export_print_no_known_warnings(tmp_path):
    """One compile and export printed a torch FutureWarning (per compile) and TVM's 'Scope
    Saving' lines (one per memory scope, per export): gone, while other warnings still show."""
    script = tmp_path / "flow.py"
    script.write_text(textwrap.dedent(f"""
        import warnings
        import torch
        from torch import nn
        from omnic import engine
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2)).eval()
        dm = engine.compile(m, "host", torch.randn(1, 3, 8, 8))
        dm.export({str(tmp_path / "art")!r})
        warnings.warn("a user's own warning", FutureWarning)
        print("done")
    """))
    out = subprocess.run([sys.executable, str(script)], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr
    assert "Scope Saving" not in out.stderr
    assert "LeafSpec" not in out.stderr
    assert "a user's own warning" in out.stderr  # only the known ones are filtered
    assert (tmp_path / "art" / "metadata.json").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_training_shows_progress_on_a_terminal_and_nothing_in_a_pipe(monkeypatch):
    x = torch.randn(4, 3, 8, 8)
    loader = [(x, torch.tensor([0, 1, 0, 1]))] * 3
    omni = nas.omnimize(ConvBNNet().eval(), mode="autonas", example_inputs=x[:1])
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    nas.train_supernet(omni, loader, epochs=1)
    assert "train supernet" in term.getvalue() and "3/3" in term.getvalue()
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    nas.train_supernet(omni, loader, epochs=1)
    assert pipe.getvalue() == ""


def test_search_shows_progress_on_a_terminal(monkeypatch, tmp_path):
    from omnic.core.measure import MeasureConfig
    from omnic.oracle import LatencyStore, Oracle

    x = torch.randn(1, 3, 8, 8)
    omni = nas.omnimize(ConvBNNet().eval(), mode="autonas", example_inputs=x)
    oracle = Oracle(LatencyStore(tmp_path / "lat.sqlite"),
                    MeasureConfig(min_repeat_ms=5, repeats=3, max_rounds=1, time_budget_s=0.1),
                    compile_fn=engine.compile)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    nas.search(omni, {"latency": 100.0}, "host", score_fn=lambda m: 0.0, oracle=oracle,
               mode="random", max_measurements=2)
    assert "search random on host" in term.getvalue()


def test_profile_counts_flops_of_onnx_models_as_of_the_pytorch_model(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    expected = count_flops(trace(model, x))
    assert expected and expected > 0
    assert count_flops(trace(str(path))) == expected
