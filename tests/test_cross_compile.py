"""Every device in the table compiles here and exports its artifact."""
import json

import pytest

from omnic import engine
from omnic.core.targets import DEVICES
from omnic.examples.zoo import get_model


@pytest.fixture(scope="module")
def model_and_input():
    return get_model("resnet_small")


@pytest.mark.parametrize("name", [n for n in DEVICES if n != "host"])
def test_device_compiles_and_exports(name, model_and_input, tmp_path):
    model, x = model_and_input
    spec = DEVICES[name]
    dm = engine.compile(model, name, x)
    assert dm.report["max_rel_error"] is None  # not measurable here
    out = dm.export(tmp_path / name)
    meta = json.loads((out / "metadata.json").read_text())
    lib = out / meta["library"]
    assert lib.exists() and lib.stat().st_size > 1000
    assert meta["device"] == name
    if spec.kind == "gpu":
        # GPU targets need default schedules: every kernel is scheduled, the source is written
        assert dm.report["kernels_unscheduled"] == 0
        source = (out / ("kernels.cu" if spec.device_api == "cuda" else "kernels.cl")).read_text()
        assert ("__global__" in source) if spec.device_api == "cuda" else ("__kernel" in source)
    if spec.export_format == "tar":
        import tarfile

        with tarfile.open(lib) as tar:
            assert any(n.endswith(".o") for n in tar.getnames())
