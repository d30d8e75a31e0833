"""pytest-benchmark cases: `pytest benchmarks/ --benchmark-only` (not part of the unit suite)."""
import pytest
import torch

from omnic import engine
from omnic.examples.zoo import get_model


@pytest.fixture(scope="module")
def compiled():
    model, x = get_model("resnet_small")
    return model, x, engine.compile(model, "host", x)


def test_omnic_untuned_resnet_small(benchmark, compiled):
    _, x, dm = compiled
    benchmark(dm, x)


def test_torch_eager_resnet_small(benchmark, compiled):
    model, x, _ = compiled
    torch.set_num_threads(2)
    with torch.inference_mode():
        benchmark(model, x)
