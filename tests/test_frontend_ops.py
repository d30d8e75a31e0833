"""Ops TVM 0.27's ExportedProgram importer lowered wrongly (issue #27, section 1): negative indices
(every LSTM/GRU/RNN head reading ``out[:, -1]``) and ``grid_sample``. Each is built for ``host`` and
compared with PyTorch, or refused with ``UnsupportedOperatorError`` before anything is built."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

import omnic
from omnic import engine
from omnic.compile import frontend
from omnic.core import ir
from omnic.examples.zoo import ZOO, get_model


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def _compiled_matches(model: nn.Module, *xs: torch.Tensor):
    """Build ``model`` for host and check it against PyTorch on the example and on fresh inputs."""
    model = model.eval()
    dm = engine.compile(model, "host", xs)
    assert dm.report["max_rel_error"] is not None and dm.report["max_rel_error"] <= 1e-4
    fresh = tuple(torch.randn_like(x) if x.is_floating_point() else x for x in xs)
    for inputs in (xs, fresh):
        with torch.no_grad():
            expected = model(*inputs)
        out = dm(*inputs)
        assert out.shape == expected.shape
        assert _rel(out, expected) <= 1e-4
    return dm


class LastStep(nn.Module):
    """The issue's model: a recurrent layer, then a Linear on the last time step (``out[:, -1]``)."""

    def __init__(self, cell=nn.LSTM, **kwargs):
        super().__init__()
        self.rnn = cell(8, 16, batch_first=True, **kwargs)
        self.fc = nn.Linear(16 * (2 if self.rnn.bidirectional else 1), 4)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def test_lstm_head_on_the_last_step_matches_pytorch():
    """Was garbage (max_rel_error 0.63 .. 1e37, different on every run): ``out[:, -1]`` became
    ``R.take(out, -1, mode="fast")``, an out-of-bounds read."""
    torch.manual_seed(0)
    _compiled_matches(LastStep(nn.LSTM), torch.randn(1, 5, 8))


@pytest.mark.parametrize("cell,kwargs,batch", [
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}, 3),
    (nn.GRU, {}, 1),
    (nn.GRU, {"num_layers": 2, "bidirectional": True}, 2),
    (nn.RNN, {"num_layers": 2, "bidirectional": True}, 2),
    (nn.RNN, {"nonlinearity": "relu"}, 1),
])
def test_recurrent_layers_match_pytorch(cell, kwargs, batch):
    _compiled_matches(LastStep(cell, **kwargs), torch.randn(batch, 5, 8))


class Select(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.index = index

    def forward(self, x):
        return x[self.index] * 2


class GatherRows(nn.Module):
    """``x[:, idx]`` with negative entries in a constant index tensor (``aten.index.Tensor``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("idx", torch.tensor([-1, 0, -3, 2]))

    def forward(self, x):
        return x[:, self.idx] + torch.take(x, self.idx)[None, :, None]


class GatherByInput(nn.Module):
    def forward(self, x, idx):
        return x[:, idx] * 2


@pytest.mark.parametrize("model,xs", [
    (Select((slice(None), -2)), (torch.randn(2, 5, 6),)),
    (Select((Ellipsis, -1)), (torch.randn(2, 5, 6),)),
    (Select((-1, slice(None), -3)), (torch.randn(2, 5, 6),)),
    (GatherRows(), (torch.randn(2, 5, 6),)),
    (GatherByInput(), (torch.randn(2, 5, 6), torch.tensor([-1, 3, -5]))),
], ids=["x[:,-2]", "x[...,-1]", "x[-1,:,-3]", "x[:,const_idx]+take", "x[:,input_idx]"])
def test_negative_indices_match_pytorch(model, xs):
    _compiled_matches(model, *xs)


def test_negative_indices_with_a_symbolic_size_wrap_at_run_time():
    """A user's ExportedProgram with a dynamic dimension: the size is unknown until run time."""
    model = GatherByInput()
    x, idx = torch.randn(2, 5, 6), torch.tensor([-1, 0, -2])
    dims = ({1: torch.export.Dim("steps", min=2)}, None)

    class Both(nn.Module):
        def forward(self, x, idx):
            return x[:, -1] + model(x, idx).sum(1)

    both = Both()
    ep = torch.export.export(both, (x, idx), dynamic_shapes=dims)
    vm = relax.VirtualMachine(tvm.compile(frontend.lower(ir.trace(ep, (x, idx))), "llvm"), tvm.cpu())
    for steps in (5, 3, 8):
        xs = torch.randn(2, steps, 6)
        out = vm["main"](tvm.runtime.tensor(xs.numpy()), tvm.runtime.tensor(idx.numpy())).numpy()
        np.testing.assert_allclose(out, both(xs, idx).numpy(), rtol=1e-5, atol=1e-5)


class AffineSample(nn.Module):
    """The issue's grid_sample: a constant affine grid, folded by torch.export into a constant."""

    def forward(self, x):
        theta = torch.tensor([[[0.9, 0.1, 0.05], [-0.1, 0.8, 0.0]]])
        grid = F.affine_grid(theta, (1, 4, 32, 32), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)


class SpatialTransformer(nn.Module):
    """theta computed from the input, so affine_grid and grid_sample both run in the program."""

    def __init__(self, align_corners):
        super().__init__()
        self.fc = nn.Linear(4 * 8 * 8, 6)
        self.align_corners = align_corners

    def forward(self, x):
        theta = self.fc(x.flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, x.size(), align_corners=self.align_corners)
        return F.grid_sample(x, grid, align_corners=self.align_corners)


class EveryGridSample(nn.Module):
    """All 18 mode x padding x align_corners combinations in one program (one build), sampling a
    grid that reaches outside [-1, 1] so the padding modes matter."""

    def forward(self, x, grid):
        outs = [F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=corners)
                for mode in ("bilinear", "nearest", "bicubic")
                for padding in ("zeros", "border", "reflection")
                for corners in (False, True)]
        return torch.cat(outs, 1)


def test_grid_sample_after_affine_grid_keeps_its_shape_and_values():
    """Was ``[1, 4, 32, 2]`` instead of ``[1, 4, 32, 32]``: the importer handed PyTorch's grid
    ``[N, H, W, 2]`` to Relax's grid_sample, which reads ``[N, 2, H, W]``."""
    dm = _compiled_matches(AffineSample(), torch.randn(1, 4, 32, 32))
    assert tuple(dm(torch.randn(1, 4, 32, 32)).shape) == (1, 4, 32, 32)


@pytest.mark.parametrize("align_corners", [False, True])
def test_spatial_transformer_matches_pytorch(align_corners):
    _compiled_matches(SpatialTransformer(align_corners), torch.randn(2, 4, 8, 8))


def test_every_grid_sample_mode_and_padding_matches_pytorch():
    grid = torch.rand(2, 5, 6, 2) * 2.6 - 1.3
    _compiled_matches(EveryGridSample(), torch.randn(2, 3, 7, 9), grid)


def test_3d_grid_sample_is_refused_before_building_naming_op_module_and_fix():
    class Volume(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(2, 2, 1)

        def forward(self, x, grid):
            return F.grid_sample(self.conv(x), grid, align_corners=False)

    with pytest.raises(omnic.UnsupportedOperatorError) as info:
        engine.compile(Volume().eval(), "host", (torch.randn(1, 2, 4, 4, 4), torch.rand(1, 3, 3, 3, 3)))
    text = str(info.value)
    assert "grid_sampler_3d" in text and "top-level forward()" in text
    assert "fix: sample each depth slice with 2-D grid_sample" in text


@pytest.mark.parametrize("name", list(ZOO))
def test_models_without_these_ops_lower_exactly_as_before(name):
    """The converters touch only negative indices and grid_sample: every zoo model imports to the
    same Relax program as TVM's own importer gives, so built code and store keys stay as they were."""
    model, x = get_model(name, input_shape=ZOO[name].test_shape)
    traced = ir.trace(model, x)
    ours = frontend.lower(traced)
    theirs = from_exported_program(frontend._export(traced), keep_params_as_input=False,
                                   unwrap_unit_return_tuple=True)
    tvm.ir.assert_structural_equal(ours, theirs, map_free_vars=True)


def test_non_negative_indices_keep_the_importers_code():
    class Positive(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("idx", torch.tensor([3, 0, 1]))

        def forward(self, x):
            return x[:, 1] + x[:, self.idx].sum(1)

    x = torch.randn(2, 5, 6)
    traced = ir.trace(Positive().eval(), x)
    theirs = from_exported_program(frontend._export(traced), keep_params_as_input=False,
                                   unwrap_unit_return_tuple=True)
    tvm.ir.assert_structural_equal(frontend.lower(traced), theirs, map_free_vars=True)
    # ... and negative ones do not: the rewrite is not a no-op.
    negative = ir.trace(Select((slice(None), -1)).eval(), x)
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(
            frontend.lower(negative),
            from_exported_program(frontend._export(negative), unwrap_unit_return_tuple=True),
            map_free_vars=True)
