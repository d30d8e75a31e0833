import pytest
import torch
from torch import nn

import omnic
from omnic.core.ir import trace
from omnic.examples.zoo import get_model


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return y
        return -y


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = DataDependent()

    def forward(self, x):
        return self.block(x)


def test_shapes_are_recorded():
    model, x = get_model("resnet_small")
    traced = trace(model, x)
    metas = [n.meta.get("tensor_meta") for n in traced.gm.graph.nodes if n.op == "call_module"]
    assert metas and all(m is not None for m in metas)
    assert traced.input_shapes == [(1, 3, 32, 32)]


def test_hash_ignores_weights_but_not_architecture_or_shape():
    a, x = get_model("resnet_small", seed=0)
    b, _ = get_model("resnet_small", seed=1)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)
    assert trace(a, x).structural_hash == trace(b, x).structural_hash
    assert trace(a, x).structural_hash != trace(a, torch.randn(1, 3, 16, 16)).structural_hash
    c = omnic.examples.zoo.ResNet((1, 2, 2), (16, 32, 48), 10, stem="small").eval()
    assert trace(c, x).structural_hash != trace(a, x).structural_hash


def test_hash_is_stable_across_processes():
    import subprocess
    import sys

    code = ("from omnic.examples.zoo import get_model; from omnic.core.ir import trace; "
            "m, x = get_model('resnet_small'); print(trace(m, x).structural_hash)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    model, x = get_model("resnet_small")
    assert out.stdout.strip().splitlines()[-1] == trace(model, x).structural_hash


def test_untraceable_model_names_module_line_and_fix():
    with pytest.raises(omnic.TraceError) as info:
        trace(Outer(), torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "block (DataDependent)" in msg
    assert "if y.sum() > 0" in msg and "test_ir.py" in msg
    assert "torch.where" in msg


def test_missing_and_wrong_example_inputs():
    model, _ = get_model("resnet_small")
    with pytest.raises(omnic.InputShapeError, match="example_inputs are required"):
        trace(model)
    with pytest.raises(omnic.InputShapeError, match="shape"):
        trace(model, torch.randn(1, 5, 32, 32))
    with pytest.raises(omnic.TraceError):
        trace(42, torch.randn(1))


def test_accepts_graph_module_and_exported_program():
    model, x = get_model("resnet_small")
    gm = torch.fx.symbolic_trace(model)
    t_gm = trace(gm, x)
    assert t_gm.source == "graph_module"
    assert t_gm.structural_hash == trace(model, x).structural_hash
    ep = torch.export.export(model, (x,))
    t_ep = trace(ep)
    assert t_ep.source == "exported_program" and t_ep.input_shapes == [(1, 3, 32, 32)]
