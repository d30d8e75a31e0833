"""Precision helpers beyond the core int8 flow in :mod:`omnic.quantize` (datasets and models
used to check that quantization keeps accuracy)."""
from omnic.precision.digits import DigitsData, digits_data, evaluate, train_digits_cnn

__all__ = ["DigitsData", "digits_data", "evaluate", "train_digits_cnn"]
