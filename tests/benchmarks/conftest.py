"""Makes the benchmark scripts importable (they live in benchmarks/, outside the package)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def _import(name: str):
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def bench():
    return _import("bench_mor_lora")


@pytest.fixture(scope="session")
def bench_cases():
    return _import("bench_mor_lora_cases")
