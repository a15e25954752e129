"""Benchmarks (``loramix bench``) and the GPU check (``python -m benchmarks.device_check``)."""

# The demo base the benchmarks train on: big enough to learn the demo tasks, small enough for CI.
TINY_SYNTHETIC = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 2}
