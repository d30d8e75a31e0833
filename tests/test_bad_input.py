"""Issue #27, section 2 ("inputs"): bad input gets a typed error that says what to do, never a
raw ValueError/TypeError or a silent acceptance."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import omnic
from omnic import Deployment, engine, nas
from omnic.core.ir import trace
from omnic.search.searcher import Constraints
from tests.cli_models import ConvBNNet, MaxPoolNet


def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()


# ---------------------------------------------------------------------------------- Deployment
@pytest.mark.parametrize("text", ["1,3,32,32", "1x3x32x32", " 1, 3, 32, 32 "])
def test_input_shape_as_text_is_read_as_the_shape_it_spells(text):
    assert Deployment(input_shape=text).input_shape == (1, 3, 32, 32)


@pytest.mark.parametrize("shape", ["abc", "1,3,-2", "", (1, 3.5, 4), 7, (1, 0, 3)])
def test_input_shape_that_is_no_shape_is_a_deployment_error_with_the_fix(shape):
    with pytest.raises(omnic.DeploymentError, match=r"input_shape.*\(1, 3, 224, 224\)"):
        Deployment(input_shape=shape)


@pytest.mark.parametrize("fields", [
    {"tuning_time_s": -5}, {"tuning_time_s": "abc"}, {"tuning_time_s": math.nan},
    {"tuning_time_s": math.inf}, {"tuning_time_s": True},
    {"threads": True}, {"batch": False}, {"threads": 2.0}, {"tuning_trials": True},
])
def test_wrong_typed_numbers_are_deployment_errors(fields):
    name = next(iter(fields))
    with pytest.raises(omnic.DeploymentError, match=name):
        Deployment(**fields)
    with pytest.raises(omnic.DeploymentError, match=name):
        Deployment.coerce(fields)  # the dict form takes the same checks


def test_valid_numbers_still_pass():
    d = Deployment(threads=2, batch=1, tuning_trials=0, tuning_time_s=0)
    assert d.threads == 2 and d.tuning_time_s == 0
    assert Deployment(tuning_time_s=600).tuning_time_s == 600
    assert Deployment(input_shape=torch.Size([1, 3, 8, 8])).input_shape == (1, 3, 8, 8)


# ---------------------------------------------------------------------------------- constraints
@pytest.mark.parametrize("budget", ["5ms", "5 ms", " 5.0MS ", "5", 5, 5.0])
def test_latency_budget_with_its_unit_reads_as_ms(budget):
    assert Constraints.coerce({"latency": budget}).latency == 5.0
    assert Constraints.coerce(budget).latency == 5.0


@pytest.mark.parametrize("budget", [math.nan, math.inf, -1.0, 0, "5s", "fast", True, [5]])
def test_latency_budget_that_is_no_budget_is_a_search_error(budget):
    with pytest.raises(omnic.SearchError, match="latency"):
        Constraints.coerce({"latency": budget})


@pytest.mark.parametrize("key", ["params", "flops", "memory"])
def test_other_limits_refuse_nan_and_text(key):
    for bad in (math.nan, "lots"):
        with pytest.raises(omnic.SearchError, match=key):
            Constraints.coerce({key: bad})


# ---------------------------------------------------------------------------------- search options
def test_misspelled_search_option_names_the_closest_valid_one():
    x = torch.randn(1, 3, 8, 8)
    omni = nas.omnimize(ConvBNNet().eval(), mode="autonas", example_inputs=x)

    class NoOracle:  # the option check comes before any measurement
        def measure(self, *a, **k):
            raise AssertionError("measured despite a misspelled option")

    with pytest.raises(omnic.SearchError) as info:
        nas.search(omni, {"latency": 5.0}, "host", score_fn=lambda m: 0.0, oracle=NoOracle(), populaton=8)
    msg = str(info.value)
    assert "'populaton'" in msg and "did you mean 'population'" in msg
    with pytest.raises(omnic.SearchError, match="did you mean 'width_ratios'"):
        nas.omnimize(ConvBNNet().eval(), example_inputs=x, width_ratio=(0.5, 1.0))
    with pytest.raises(omnic.SearchError, match="did you mean 'epochs'"):
        nas.train_supernet(omni, [(x, torch.tensor([0]))], epoch=1)


# ---------------------------------------------------------------------------------- example inputs
@pytest.mark.parametrize("x, first_line", [
    (torch.randn(1, 4, 8, 8), "expected 3 input channels, got 4"),
    (torch.randn(1, 3, 8, 8, dtype=torch.float64), "float64 input, model is float32"),
    (torch.randint(0, 5, (1, 3, 8, 8)), "int64 input, model is float32"),
    (torch.randn(8, 8), "expected a 4-d input (N, C, H, W), got 2-d"),
])
def test_wrong_example_input_says_the_cause_first_in_a_few_lines(x, first_line, capfd):
    with pytest.raises(omnic.InputShapeError) as info:
        trace(_conv_net(), x)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(first_line), lines[0]
    assert len(lines) <= 4 and "ShapeProp" not in str(info.value) and "tlparse" not in str(info.value)
    assert lines[1].lstrip().startswith("torch: RuntimeError")  # torch's own words, one line
    assert "Traceback" not in capfd.readouterr().err  # ShapeProp's printed traceback is gone


def test_linear_first_model_names_the_feature_count():
    with pytest.raises(omnic.InputShapeError, match=r"^expected 16 input features in the last dimension, got 8"):
        trace(nn.Sequential(nn.Linear(16, 4)), torch.randn(2, 8))


def test_integer_inputs_are_not_cast_silently_when_calling_a_compiled_model():
    dm = engine.compile(_conv_net(), "host", torch.randn(1, 3, 8, 8))
    with pytest.raises(omnic.InputShapeError, match="int64.*float32"):
        dm(torch.randint(0, 5, (1, 3, 8, 8)))
    assert dm(torch.randn(1, 3, 8, 8, dtype=torch.float64)).shape == (1, 2)  # float widths convert


def test_get_latency_lets_unsupported_operator_error_reach_the_user():
    with pytest.raises(omnic.UnsupportedOperatorError, match="adaptive_max_pool2d"):
        engine.get_latency(MaxPoolNet().eval(), "host", torch.randn(1, 3, 10, 10))
