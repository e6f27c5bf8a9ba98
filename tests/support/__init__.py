"""Helpers the tests and benchmarks share (no tests here): peers, processes, inputs.
Fixtures live in ``tests/conftest.py``; test modules import from this package, never
from each other."""

import os

# ONNX Runtime's telemetry is on by default (a device ID under $HOME, uploads): off
# for the tests' and benchmarks' own sessions, as service.cli.main() turns it off for
# the node. Here, because conftest.py and every benchmark import this package first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
