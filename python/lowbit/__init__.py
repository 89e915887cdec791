"""lowbit: run quantized LLaMA-family models from one GGUF file on a laptop CPU, with layers on a CUDA GPU.

    import lowbit
    m = lowbit.load("model.gguf", n_gpu_layers=0)
    print(m.generate("Once upon a time", max_new_tokens=32))
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# Development builds: LOWBIT_CORE_DIR names a CMake build folder that holds _core*.so, so the package
# can run from the source tree without installing.
if _os.environ.get("LOWBIT_CORE_DIR"):
    __path__.append(_os.environ["LOWBIT_CORE_DIR"])  # type: ignore[name-defined]  # noqa: F821

from ._core import LowbitError, build_info, cuda_info  # noqa: E402
from .quants import QType, dequantize, quantize  # noqa: E402

# Heavier parts (tokenizers, jinja2, the converter) load on first use.
_LAZY = {
    "GGUFFile": ".gguf",
    "GGUFWriter": ".gguf",
    "GGUFValueType": ".gguf",
    "load": ".model",
    "BatchEngine": ".batch",
    "Model": ".model",
    "TokenLogprob": ".model",
    "convert": ".converter",
    "quantize_file": ".converter",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "LowbitError",
    "build_info",
    "cuda_info",
    "QType",
    "quantize",
    "dequantize",
    "GGUFFile",
    "GGUFWriter",
    "GGUFValueType",
    "load",
    "Model",
    "TokenLogprob",
    "BatchEngine",
    "convert",
    "quantize_file",
]
