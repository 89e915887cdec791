"""Regenerate spec/golden/*.json from the independent oracles (gguf.quants, bitsandbytes); run once, commit."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def inputs() -> dict[str, np.ndarray]:
    ramp = (np.arange(64, dtype=np.float32) - 31) / np.float32(4)  # hand-checkable: quarter steps
    ties = np.concatenate([np.arange(-8, 8, 0.5, dtype=np.float32), np.arange(-16, 16, dtype=np.float32)])
    rng = np.random.default_rng(2024)
    return {"ramp": ramp, "ties": ties, "normal": rng.standard_normal(64).astype(np.float32)}


def main() -> None:
    import gguf
    import torch
    import bitsandbytes.functional as F
    from gguf import GGMLQuantizationType as G

    out = Path(__file__).parent
    for name, x in inputs().items():
        rec: dict[str, object] = {"input_f32_hex": x.tobytes().hex()}
        for t in ("Q8_0", "Q4_0", "Q4_1", "F16", "BF16"):
            q = np.ascontiguousarray(gguf.quants.quantize(x.reshape(1, -1), G[t])).view(np.uint8).reshape(-1)
            rec[t] = q.tobytes().hex()
        packed, st = F.quantize_4bit(torch.from_numpy(x.copy()), blocksize=64, quant_type="nf4")
        rec["NF4"] = (st.absmax.numpy().astype(np.float32).tobytes() + packed.numpy().tobytes()).hex()
        (out / f"{name}.json").write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
