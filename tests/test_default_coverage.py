"""Every kernel of the zoo models and of a held-out-style model gets a default CPU schedule:
built untuned on host (small inputs), no kernel is left a plain loop nest, every PrimFunc says
which rule scheduled it, and the outputs match PyTorch. The kernels made only of spatial ops
belong to the injective rule; a kernel of a family whose specialist rule is registered (convs,
pools, matmuls, normalizations) does not end in the fallback."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omnic import engine
from omnic.examples.zoo import get_model
from tests.test_default_injective import is_spatial_kernel, kernels

pytestmark = pytest.mark.slow

#: kernel-name token -> the specialist rules that should take a kernel holding that op
SPECIALISTS = {
    "conv2d": ("conv2d_nhwc", "depthwise_nhwc"),
    "pool2d": ("pool",),
    "matmul": ("matmul",),
    "dense": ("matmul",),
    "softmax": ("reduction",),
    "norm": ("reduction",),
    "mean": ("pool", "reduction"),
    "sum": ("reduction",),
}

#: kernels a specialist could take but leaves to the fallback, by the ops their names hold, and why
#: (each is a gap in that specialist, listed so that any other kernel reaching the fallback fails)
KNOWN_FALLBACKS = {
    frozenset({"softmax", "where"}): "the reduction rule declines a softmax whose epilogue selects by a "
                                     "second input (nn.MultiheadAttention's guard of fully masked rows)",
}


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class HeldOut(nn.Module):
    """Not in the zoo: hard-swish, a 5x5 depthwise with squeeze-excite, odd widths, a concat with
    a nearest-upsampled branch, an Identity shortcut, then LayerNorm / multi-head attention /
    GELU MLP over the positions."""

    def __init__(self, dim: int = 44, heads: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 20, 3, 2, 1), nn.BatchNorm2d(20), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(20, 20, 5, 1, 2, groups=20), nn.BatchNorm2d(20), nn.Hardswish())
        self.se = SqueezeExcite(20, 8)
        self.pw = nn.Sequential(nn.Conv2d(20, 36, 1), nn.BatchNorm2d(36))
        self.branch = nn.Sequential(nn.Conv2d(20, 8, 3, 2, 1), nn.ReLU())
        self.fuse = nn.Conv2d(44, dim, 1)
        self.shortcut = nn.Identity()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim + 6), nn.GELU(), nn.Linear(2 * dim + 6, dim))
        self.head = nn.Linear(dim, 7)

    def forward(self, x):
        x = self.stem(x)
        y = self.se(self.dw(x))
        up = F.interpolate(self.branch(x), size=x.shape[2:], mode="nearest")
        z = self.fuse(torch.cat([self.pw(y), up], dim=1))
        z = z + self.shortcut(z)
        t = z.flatten(2).transpose(1, 2)
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(dim=1))


def _held_out():
    torch.manual_seed(0)
    model = HeldOut()
    model.train()
    with torch.no_grad():  # calibrate BN statistics so that BN bugs would show
        for _ in range(2):
            model(torch.randn(4, 3, 34, 34))
    return model.eval(), torch.randn(1, 3, 34, 34)


MODELS = {
    "mobilenet_v2": lambda: get_model("mobilenet_v2", input_shape=(1, 3, 64, 64)),
    "resnet18": lambda: get_model("resnet18", input_shape=(1, 3, 64, 64)),
    "mobilenet_v3_small": lambda: get_model("mobilenet_v3_small", input_shape=(1, 3, 64, 64)),
    "conv_attention": lambda: get_model("conv_attention", input_shape=(1, 3, 32, 32)),
    "resnet_small": lambda: get_model("resnet_small", input_shape=(1, 3, 32, 32)),
    "held_out": _held_out,
}


@pytest.fixture(scope="module")
def builds():
    """name -> (model, input, device model), built once for the module's tests."""
    cache = {}

    def get(name):
        if name not in cache:
            model, x = MODELS[name]()
            cache[name] = (model, x, engine.compile(model, "host", x))  # refuses outputs off PyTorch's
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_every_kernel_has_a_default_schedule_and_outputs_match(name, builds):
    model, x, dm = builds(name)
    assert dm.report["max_rel_error"] is not None and dm.report["max_rel_error"] <= 1e-4
    assert dm.report["kernels_unscheduled"] == 0
    found = kernels(dm)
    assert found and all(p is not None and p.startswith("default:") for p, _ in found.values()), \
        {n: p for n, (p, _) in found.items() if p is None or not p.startswith("default:")}
    with torch.no_grad():
        ref = model(x)
    out = dm(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("name", list(MODELS))
def test_spatial_kernels_are_injective_and_specialists_keep_their_families(name, builds):
    """Kernels of only spatial ops are the injective rule's. A kernel holding an op of a family
    whose specialist rule is registered in DEFAULT_RULES is not left to the fallback (families
    without a registered specialist are not checked: the fallback is their rule until then), but
    for the :data:`KNOWN_FALLBACKS`."""
    from omnic.compile.rules.cpu import DEFAULT_RULES

    registered = {rule.name for rule in DEFAULT_RULES}
    _, _, dm = builds(name)
    wrong = {}
    for kernel, (provenance, _) in kernels(dm).items():
        if is_spatial_kernel(kernel):
            if provenance != "default:injective":
                wrong[kernel] = provenance
            continue
        tokens = {re.sub(r"\d+$", "", t) for t in kernel.split("_")}
        expected = {r for t in tokens for r in SPECIALISTS.get(t, ()) if r in registered}
        known = any(ops <= tokens for ops in KNOWN_FALLBACKS)
        if expected and provenance == "default:fallback" and not known:
            wrong[kernel] = f"{provenance} (expected one of {sorted(expected)})"
    assert not wrong, wrong
