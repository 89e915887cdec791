"""Shared pytest set-up: reseed per test, skip CUDA tests where no GPU is visible."""
from __future__ import annotations

import random

import numpy as np
import pytest

import lowbit


@pytest.fixture(autouse=True)
def _reseed():
    random.seed(0)
    np.random.seed(0)


def _cuda_devices() -> int:
    info = lowbit.cuda_info()
    return len(info["devices"]) if info["compiled"] else 0


def pytest_collection_modifyitems(config, items):
    if _cuda_devices() > 0:
        return
    skip = pytest.mark.skip(reason="no CUDA device visible (or CPU-only build): " + str(lowbit.cuda_info()["error"]))
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
