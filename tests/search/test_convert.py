"""Conversion of the zoo's CNNs and two user-written nets into supernets; export equivalence."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from omnic import nas
from omnic.examples import zoo
from omnic.core.errors import SearchError
from omnic.examples.digits import DigitsResNet
from omnic.search.elastic import DepthGate, ElasticConv2d
from tests.search.nets import ConcatNet, GroupedNet


def _plain(module: nn.Module) -> bool:
    from omnic.search.elastic import ELASTIC_TYPES

    return not any(isinstance(m, ELASTIC_TYPES + (DepthGate,)) for m in module.modules())


def _check_subnets(omni, x, n: int, seed: int = 0, tol: float = 1e-5) -> None:
    rng = random.Random(seed)
    cfgs = [omni.max(), omni.min()] + [omni.sample(rng) for _ in range(n)]
    for cfg in cfgs:
        omni.set_active(cfg)
        xin = omni.example_input(cfg)[0] if x is None else x
        with torch.no_grad():
            ref = omni(xin)
            sub = omni.export(cfg).eval()
            out = sub(xin)
        assert _plain(sub)
        assert torch.allclose(out, ref, atol=tol, rtol=tol), (cfg, (out - ref).abs().max())
        assert omni.cost(cfg)["params"] == sum(p.numel() for p in sub.parameters())
        torch.fx.symbolic_trace(sub)  # exported subnets stay traceable
    omni.set_active(omni.max())


ZOO_CASES = [("resnet_small", (1, 3, 32, 32), {"width", "depth"}, 1000),
             ("resnet18", (1, 3, 64, 64), {"width", "depth", "kernel"}, 1000),
             ("mobilenet_v2", (1, 3, 32, 32), {"width", "depth"}, 1000),
             ("mobilenet_v3_small", (1, 3, 32, 32), {"width", "depth", "kernel"}, 1000),
             # attention widths stay fixed (reshapes move channels); the conv parts are elastic
             ("conv_attention", (1, 3, 32, 32), {"width", "depth", "kernel"}, 10)]


@pytest.mark.parametrize("name,shape,kinds,min_subnets", ZOO_CASES, ids=[c[0] for c in ZOO_CASES])
def test_zoo_conversion(name, shape, kinds, min_subnets):
    model, x = zoo.get_model(name, input_shape=shape)
    omni = nas.omnimize(model, example_inputs=x)
    assert set(omni.space.summary()["by_kind"]) == kinds
    assert omni.space.num_subnets > min_subnets
    with torch.no_grad():  # the maximal subnet is the original model
        assert torch.allclose(omni(x), model(x), atol=1e-5)
    _check_subnets(omni, x, n=3)


def test_resnet_channel_groups_follow_residual_adds():
    model, x = zoo.get_model("resnet_small", input_shape=(1, 3, 32, 32))
    omni = nas.omnimize(model, example_inputs=x)
    # stem, layer1's block output and its residual share one width choice
    stem_group = omni.space["width:conv1"]
    assert {"conv1", "bn1", "layer1.0.bn2"} <= set(stem_group.modules)
    # the downsample conv of layer2 and both blocks' last convs are tied
    assert {"layer2.0.conv2", "layer2.1.conv2", "layer2.0.downsample.0"} <= set(
        omni.space["width:layer2.0.downsample.0"].modules)
    assert omni.space["depth:layer2"].values == (0, 1)
    assert "fc" not in " ".join(c.name for c in omni.space)  # the classifier output is fixed


def test_mobilenet_depthwise_shares_width_with_expansion():
    model, x = zoo.get_model("mobilenet_v2", input_shape=(1, 3, 32, 32))
    omni = nas.omnimize(model, example_inputs=x)
    group = omni.space["width:features.2.conv.0.0"]  # the 1x1 expansion of block 2
    assert "features.2.conv.1.0" in group.modules  # its depthwise conv
    assert "features.2.conv.1.1" in group.modules  # and the BN behind it
    v3, x3 = zoo.get_model("mobilenet_v3_small", input_shape=(1, 3, 32, 32))
    omni3 = nas.omnimize(v3, example_inputs=x3)
    assert omni3.space["kernel:features.4.conv.1.0"].values == (3, 5)  # 5x5 depthwise -> 3 or 5


def test_user_net_with_concatenation():
    torch.manual_seed(0)
    model = ConcatNet().eval()
    x = torch.randn(2, 1, 8, 8)
    omni = nas.omnimize(model, example_inputs=x, divisor=4)
    names = set(omni.space.choices)
    assert {"width:stem", "width:b1", "width:b2", "kernel:b2"} <= names
    # the depthwise conv on the concatenation follows both branches: no choice of its own
    assert not any("dw" in n for n in names)
    # a narrow b1 with a full b2 makes every consumer of the concatenation gather channels
    cfg = omni.max()
    cfg["width:b1"] = 4
    omni.set_active(cfg)
    assert isinstance(omni.model.fuse.in_idx, torch.Tensor)
    _check_subnets(omni, x, n=6)


def test_user_net_with_grouped_convs():
    torch.manual_seed(0)
    model = GroupedNet().eval()
    x = torch.randn(2, 1, 8, 8)
    omni = nas.omnimize(model, example_inputs=x, divisor=4)
    inner = omni.space["width:blocks.0.conv1"]
    assert "blocks.0.conv2" in inner.modules
    assert all(v % 8 == 0 for v in inner.values)  # 4 groups of 8 channels: whole groups only
    assert "width:se_fc1" in omni.space.choices  # the squeeze-excite bottleneck is elastic
    _check_subnets(omni, x, n=6)


def test_restrict_space_by_module_name():
    model = DigitsResNet(width=16).eval()
    x = torch.randn(1, 1, 8, 8)
    full = nas.omnimize(model, example_inputs=x, divisor=4)
    omni = nas.omnimize(model, example_inputs=x, divisor=4, freeze=["stage1.*"],
                        choices={"stage2.1.conv1": {"width": [16, 32]}, "stage2": {"depth": [1]}})
    assert not any(m.startswith("stage1") for c in omni.space for m in c.modules)
    assert "width:stem.0" not in omni.space.choices  # tied to the frozen stage's residual adds
    assert omni.space["width:stage2.1.conv1"].values == (16, 32)
    assert "depth:stage2" not in omni.space.choices  # one value left: no longer a choice
    assert omni.space.num_subnets < full.space.num_subnets
    with pytest.raises(SearchError):
        nas.omnimize(model, example_inputs=x, freeze=["nope.*"])
    with pytest.raises(SearchError):
        nas.omnimize(model, example_inputs=x, choices={"stage2.1.conv1": {"width": [33]}})


def test_resolution_and_space_summary():
    model = DigitsResNet(width=16).eval()
    omni = nas.omnimize(model, example_inputs=torch.randn(1, 1, 16, 16), divisor=4, resolutions=(8, 12, 16))
    summary = omni.space.summary()
    assert summary["by_kind"]["resolution"] == 1
    assert summary["num_subnets"] == omni.space.num_subnets
    cfg = omni.min()
    assert omni.example_input(cfg)[0].shape[-1] == 8
    assert omni.cost(cfg)["flops"] < omni.cost(omni.max())["flops"]
    _check_subnets(omni, None, n=3)
    # the supernet resizes full-size inputs itself, so a user's loop scores any resolution
    omni.set_active(cfg)
    with torch.no_grad():
        big = torch.randn(1, 1, 16, 16)
        small = torch.nn.functional.interpolate(big, size=(8, 8), mode="bilinear", align_corners=False)
        assert torch.allclose(omni(big), omni.export(cfg).eval()(small), atol=1e-5)


def test_kernel_centre_crop():
    conv = nn.Conv2d(4, 4, 5, padding=2)
    e = ElasticConv2d.from_module(conv, ((None, 4),), ((None, 4),), "k")
    e.set_active({"k": 3})
    exported = e.export()
    assert exported.kernel_size == (3, 3) and exported.padding == (1, 1)
    assert torch.equal(exported.weight, conv.weight[:, :, 1:4, 1:4])


def test_user_training_loop_updates_supernet_weights(digits):
    """The supernet is an ordinary module: a user's own loop trains it."""
    omni = nas.omnimize(DigitsResNet(width=8), example_inputs=torch.randn(1, 1, 8, 8), divisor=4)
    opt = torch.optim.SGD(omni.parameters(), lr=0.05)
    before = omni.model.stem[0].weight.detach().clone()
    omni.train()
    for i, (x, y) in enumerate(digits[0]):
        omni.set_active(omni.sample(i))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(omni(x), y).backward()
        opt.step()
        if i == 3:
            break
    assert not torch.equal(before, omni.model.stem[0].weight)
    assert "model.stem.0.weight" in omni.state_dict()


def test_supernet_and_export_keep_the_wrapped_models_mode():
    torch.manual_seed(0)
    model, x = zoo.get_model("resnet_small", input_shape=(2, 3, 32, 32))
    model.eval()
    omni = nas.omnimize(model, example_inputs=x)
    assert omni.training is False
    rng = random.Random(1)
    for _ in range(5):
        cfg = omni.sample(rng)
        sub = omni.export(cfg)
        assert sub.training is False and not any(m.training for m in sub.modules())
        with torch.no_grad(), omni.active(cfg):
            assert torch.allclose(sub(x), omni(x), atol=1e-5, rtol=1e-5)
    train_omni = nas.omnimize(model.train(), example_inputs=x)
    assert train_omni.training is True and train_omni.export(train_omni.sample(rng)).training is True


class _IdentityShortcutBlock(nn.Module):
    """A residual block whose shortcut is a module (``nn.Identity``), as timm and many repos write it."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.short = nn.Identity()

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.short(x))  # a trailing activation after the add


class _IdentityShortcutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage = nn.Sequential(*[_IdentityShortcutBlock(16) for _ in range(3)])
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


def test_identity_module_shortcuts_get_depth_choices_and_export_exactly():
    torch.manual_seed(0)
    model = _IdentityShortcutNet()
    with torch.no_grad():  # non-trivial BN statistics
        model(torch.randn(8, 3, 16, 16))
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    omni = nas.omnimize(model, example_inputs=x)
    depth = [c for c in omni.space.choices.values() if c.kind == "depth"]
    # the first block of a stage is always kept (it may change the shape), the others may be skipped
    assert depth and depth[0].modules == ("stage.1", "stage.2") and depth[0].values == (0, 1, 2)
    _check_subnets(omni, x, n=8)
