"""Everything that touches TVM on the way from a traced model to a runnable artifact: lowering,
the pass pipeline per device and precision, schedule rules, tuning, quantization, build and run."""
