"""Models, offline datasets and baselines that the demo, the tests and the benchmarks use."""
