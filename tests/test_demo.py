"""`lowbit demo`, the README's first command, runs end to end: fetch, requantize llama.cpp's Q4_1 file, chat."""
from __future__ import annotations

import shutil

import pytest

from lowbit.demo import run_demo
from lowbit.hub import fetch_smollm2


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    src = fetch_smollm2()  # the shared cache: downloaded once for all slow tests
    shutil.copy(src, tmp_path / src.name)  # a fresh cache dir, so the demo converts instead of reusing files
    assert run_demo(question="What is the capital of France?", n_threads=2, max_new_tokens=8,
                    cache_dir=tmp_path) == 0
    out = capsys.readouterr().out
    assert "converted to Q4_0" in out and "converted to NF4" in out
    assert out.count("assistant: ") == 2
