"""lowbit vs llama.cpp (through llama-cpp-python) on the same GGUF files, same thread count, same run.

Measures prompt tokens/s (128 and 512), decode tokens/s, warm load time and peak RSS, each engine in its own
subprocess (so RSS is its own), several repetitions, medians; prints a markdown table with ratios
lowbit / llama.cpp, plus a memory-read bandwidth probe and the bandwidth each decode achieves.

    python tests/bench/vs_llamacpp.py [--threads 2] [--reps 3] [--models smollm2,tiny11b] [--out results.json]

Needs `pip install llama-cpp-python` (builds llama.cpp from source: several minutes; cache the wheel).
Models: SmolLM2-135M-Instruct requantized by lowbit from llama.cpp's Q4_1 file to F16, Q8_0, Q4_0, NF4, and a
random model with TinyLlama-1.1B shapes (hidden 2048, ffn 5632, 22 layers, 32 heads, 4 KV heads) written by
lowbit in Q4_0, Q8_0 and NF4 (SmolLM2's tokenizer, so llama.cpp accepts it). NF4 has no llama.cpp counterpart: it
is compared with lowbit's own Q4_0 on the same model and with transformers + bitsandbytes' NF4 on the CPU
(SmolLM2). lowbit runs with an fp16 KV cache, as llama.cpp does by default.

K-quant files made by llama.cpp's own quantizer (llama_model_quantize, its normal per-tensor mix) from an F16
source: `smollm2-kq` (SmolLM2's F16, dequantized by lowbit from the Q4_1 file) and `tiny11b-kq` (the 1.1B-shaped
random model written in F16), each in Q4_K_M, Q5_K_M and Q6_K. SmolLM2's rows of 576 are not a multiple of 256,
so llama.cpp gives most of its tensors the fallback types (Q5_0, Q5_1, Q8_0); the table of tensor types per file
is printed.

    python tests/bench/vs_llamacpp.py --models smollm2-kq,tiny11b-kq --reps 3 --no-bnb

Other architectures, random models of real models' shapes written in F16 by lowbit (SmolLM2's byte-level BPE
vocabulary padded with unused tokens to the model's vocabulary size) and quantized by llama.cpp:
`qwen25-05b-kq` (Qwen2.5-0.5B: hidden 896, 24 blocks, 14 heads / 2 KV heads, q/k/v biases, vocabulary 151,936,
tied head) and `gemma3-1b-kq` (Gemma 3 1B: hidden 1152, 26 blocks, 4 heads of 256 / 1 KV head, q/k norms,
sandwich norms, GELU, 5 sliding blocks of 512 positions to 1 global, vocabulary 262,144, tied head), each
in Q4_K_M and Q8_0.

    python tests/bench/vs_llamacpp.py --models qwen25-05b-kq,gemma3-1b-kq --reps 3 --no-bnb
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# ---- the measurement that runs inside a child process ---------------------------------------------

CHILD = r"""
import json, sys, time
import numpy as np
engine, path, threads, reps, n_gen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(0)
out = {"pp128": [], "pp512": [], "tg": []}
t0 = time.perf_counter()
if engine == "lowbit":
    import os, lowbit
    # Which build of the core ran (its file's modification time): a core rebuilt during a long run shows here.
    out["core_mtime"] = os.path.getmtime(lowbit._core.__file__)
    # An fp16 KV cache, as llama.cpp's default, so both engines do the same attention work.
    m = lowbit.load(path, n_ctx=1024, n_threads=threads, n_batch=512, kv_f16=True)
    n_vocab = m.n_vocab
    def prompt(toks):
        m.reset(); m.generate_tokens(toks, max_new_tokens=0, add_bos=False)
    def decode(toks, n):
        m.reset(); m.generate_tokens(toks, max_new_tokens=n + 1, temperature=0.0, add_bos=False, stop_at_eos=False)
        return m.last_timings["generate_seconds"], m.last_timings["generated_tokens"] - 1
else:
    import llama_cpp
    m = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                        n_ubatch=512, n_gpu_layers=0, verbose=False)
    n_vocab = m.n_vocab()
    def prompt(toks):
        m.reset(); m.eval(toks)
    def decode(toks, n):
        m.reset(); m.eval(toks)
        tok = int(np.argmax(m.scores[m.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(n):
            m.eval([tok])
            tok = int(np.argmax(m.scores[m.n_tokens - 1]))
        return time.perf_counter() - t, n
out["load_s"] = time.perf_counter() - t0
# Warm-up, not measured: a prompt and a whole decode (llama.cpp's first decode in a process runs ~15% below
# its later ones; both engines get the same treatment).
prompt(rng.integers(0, n_vocab, 16).tolist())
decode(rng.integers(0, n_vocab, 8).tolist(), n_gen)
for _ in range(reps):
    for n in (128, 512):
        toks = rng.integers(0, n_vocab, n).tolist()
        t = time.perf_counter(); prompt(toks); dt = time.perf_counter() - t
        out[f"pp{n}"].append(n / dt)
    secs, n = decode(rng.integers(0, n_vocab, 8).tolist(), n_gen)
    out["tg"].append(n / secs)
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across exec on Linux).
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
out["rss_mib"] = hwm()
# Then the peak once text has been tokenized: lowbit builds its tokenizer on first use (token ids alone never
# need it); llama.cpp holds its vocabulary from the start.
if engine == "lowbit":
    m.tokenize("The quick brown fox jumps over the lazy dog.")
else:
    m.tokenize(b"The quick brown fox jumps over the lazy dog.")
out["rss_text_mib"] = hwm()
print("RESULT " + json.dumps(out))
"""


BNB_CHILD = r"""
import json, os, sys, tempfile, time
import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
path, threads, reps, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
tmp = tempfile.mkdtemp()
# transformers reads the GGUF (dequantized to fp32, q/k un-permuted), saved as a plain checkpoint, then loaded
# again with bitsandbytes' NF4 (transformers will not quantize a model it loaded from GGUF directly).
f = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                         torch_dtype=torch.float32)
if hasattr(f.config, "quantization_config"):
    delattr(f.config, "quantization_config")
f.config.save_pretrained(tmp)
save_model(f, os.path.join(tmp, "model.safetensors"))
del f
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
m = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=cfg, device_map="cpu")
ids = torch.randint(0, m.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
out = {"tg": [], "layer_type": type(m.model.layers[0].mlp.down_proj).__name__}
for _ in range(reps):
    t = time.perf_counter()
    m.generate(ids, max_new_tokens=n_gen, min_new_tokens=n_gen, do_sample=False)
    out["tg"].append(n_gen / (time.perf_counter() - t))
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across exec on Linux).
out["rss_mib"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print("RESULT " + json.dumps(out))
"""


def run_bnb(path: Path, threads: int, reps: int, n_gen: int) -> dict:
    """transformers + bitsandbytes NF4 on the CPU: decode tokens/s (prompt of 8 tokens included)."""
    proc = subprocess.run([sys.executable, "-c", BNB_CHILD, str(path), str(threads), str(reps), str(n_gen)],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"bitsandbytes on {path.name} failed:\n{proc.stderr[-3000:]}")


def run_child(engine: str, path: Path, threads: int, reps: int, n_gen: int, tries: int = 3) -> dict:
    """One measuring child process. A failed start is tried again after a pause (on a shared development machine
    the library may be mid-rebuild for a minute); a second and third failure is an error."""
    for attempt in range(tries):
        proc = subprocess.run([sys.executable, "-c", CHILD, engine, str(path), str(threads), str(reps), str(n_gen)],
                              capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        if attempt + 1 < tries:
            print(f"{engine} on {path.name} failed, trying again in 30 s:\n{proc.stderr[-500:]}", file=sys.stderr)
            time.sleep(30)
    raise RuntimeError(f"{engine} on {path.name} failed:\n{proc.stderr[-3000:]}")


def merge_child(acc: dict, one: dict) -> None:
    """Fold one child's result into acc: rates are lists (one per repetition), peaks the largest seen."""
    for k, v in one.items():
        if isinstance(v, list):
            acc.setdefault(k, []).extend(v)
        elif k.startswith("rss"):
            acc[k] = max(acc.get(k, 0.0), v)
        else:
            acc.setdefault(k + "_all", []).append(v)


def warm_load(engine: str, path: Path, threads: int) -> float:
    """Second-load time (page cache warm), median of 3 child processes."""
    code = ("import time,sys;t=time.perf_counter();"
            + ("import lowbit;m=lowbit.load(sys.argv[1],n_ctx=1024,n_threads=%d,kv_f16=True)" % threads if engine == "lowbit" else
               "import llama_cpp;m=llama_cpp.Llama(model_path=sys.argv[1],n_ctx=1024,n_threads=%d,verbose=False)"
               % threads)
            + ";print('LOAD',time.perf_counter()-t)")
    times = []
    for _ in range(3):
        # Import time is excluded: measure from just before the import to after the constructor, minus a bare import.
        p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
        for line in p.stdout.splitlines():
            if line.startswith("LOAD "):
                times.append(float(line.split()[1]))
    return statistics.median(times) if times else float("nan")


# ---- models ---------------------------------------------------------------------------------------


def smollm2_files(cache: Path, types: tuple[str, ...] = ("f16", "q8_0", "q4_0", "nf4")) -> dict[str, Path]:
    from lowbit.hub import fetch_smollm2

    src = fetch_smollm2(cache)
    files = {}
    for qt in types:
        out = cache / f"bench-smollm2-135m-{qt}.gguf"
        if not out.exists():
            requantize_file(src, out, qt)
        files[qt] = out
    return files


def requantize_file(src: Path, out: Path, qt: str) -> Path:
    """lowbit's quantize_file on an already quantized source (the Q4_1 download; a K-quant file dequantized to
    F32), which it does only when asked to."""
    from lowbit.converter import quantize_file

    return quantize_file(src, out, qt, progress=False, allow_requantize=True)


def tiny11b_files(cache: Path, types: tuple[str, ...] = ("q4_0", "q8_0", "nf4")) -> dict[str, Path]:
    """A random model with TinyLlama-1.1B shapes, written tensor by tensor (never whole in memory); "f16" is the
    source of llama.cpp's K-quant files."""
    files = {}
    for qt in types:
        out = cache / f"bench-tiny11b-{qt}.gguf"
        files[qt] = out
        if not out.exists():
            write_tiny11b(cache, out, qt)
    return files


def write_tiny11b(cache: Path, out: Path, qt: str) -> None:
    import lowbit
    from lowbit.hub import fetch_smollm2

    vocab_src = lowbit.GGUFFile(fetch_smollm2(cache))
    tok_keys = {k: v for k, v in vocab_src.metadata.items() if k.startswith("tokenizer.")}
    n_vocab = len(tok_keys["tokenizer.ggml.tokens"])
    n_embd, n_ff, n_layer, n_head, n_head_kv = 2048, 5632, 22, 32, 4
    head_dim = n_embd // n_head
    qtype = lowbit.QType.from_name(qt)
    shapes = [("token_embd.weight", (n_vocab, n_embd), qtype), ("output_norm.weight", (n_embd,), lowbit.QType.F32)]
    for i in range(n_layer):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (n_embd,), lowbit.QType.F32),
            (f"blk.{i}.attn_q.weight", (n_embd, n_embd), qtype),
            (f"blk.{i}.attn_k.weight", (n_head_kv * head_dim, n_embd), qtype),
            (f"blk.{i}.attn_v.weight", (n_head_kv * head_dim, n_embd), qtype),
            (f"blk.{i}.attn_output.weight", (n_embd, n_embd), qtype),
            (f"blk.{i}.ffn_norm.weight", (n_embd,), lowbit.QType.F32),
            (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), qtype),
            (f"blk.{i}.ffn_up.weight", (n_ff, n_embd), qtype),
            (f"blk.{i}.ffn_down.weight", (n_embd, n_ff), qtype),
        ]
    rng = np.random.default_rng(0)
    with lowbit.GGUFWriter(out) as w:
        md = {
            "general.architecture": "llama", "general.name": "random-tinyllama-1.1b-shape",
            "general.file_type": {"f16": 1, "q4_0": 2, "q8_0": 7, "nf4": int(lowbit.QType.NF4)}[qt],
            "general.quantization_version": 2,
            "llama.context_length": 2048, "llama.embedding_length": n_embd, "llama.block_count": n_layer,
            "llama.feed_forward_length": n_ff, "llama.rope.dimension_count": head_dim,
            "llama.attention.head_count": n_head, "llama.attention.head_count_kv": n_head_kv,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0,
        }
        from lowbit.gguf import GGUFValueType as VT

        u32 = {"general.file_type", "general.quantization_version", "llama.context_length",
               "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
               "llama.rope.dimension_count", "llama.attention.head_count", "llama.attention.head_count_kv"}
        for k, v in md.items():
            w.add_metadata(k, v, VT.UINT32 if k in u32 else (VT.FLOAT32 if isinstance(v, float) else None))
        for k in tok_keys:
            w.add_metadata(k, vocab_src.field(k))  # a GGUFField keeps its exact GGUF types
        for name, shape, t in shapes:
            w.add_tensor_info(name, shape, t)
        w.write_header()
        for name, shape, t in shapes:
            if t == lowbit.QType.F32:
                w.write_tensor_data(np.ones(shape, np.float32).tobytes())
                continue
            x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
            w.write_tensor_data(x.astype(np.float16).tobytes() if t == lowbit.QType.F16 else lowbit.quantize(x, t))
        w.finish()


# ---- random models of other architectures' shapes ---------------------------------------------------

ARCH_SHAPES = {
    "qwen25-05b": dict(arch="qwen2", name="random-qwen2.5-0.5b-shape", n_vocab=151936, n_embd=896, n_ff=4864,
                       n_layer=24, n_head=14, n_head_kv=2, head_dim=64, rope_base=1e6, eps=1e-6, bias=True),
    "gemma3-1b": dict(arch="gemma3", name="random-gemma-3-1b-shape", n_vocab=262144, n_embd=1152, n_ff=6912,
                      n_layer=26, n_head=4, n_head_kv=1, head_dim=256, rope_base=1e6, eps=1e-6, qk_norm=True,
                      sandwich=True, window=512),
}


def write_random_arch(cache: Path, out: Path, shape: str) -> None:
    """An F16 GGUF of ARCH_SHAPES[shape] with random weights (std 0.02, norms 1), written tensor by tensor."""
    import lowbit
    from lowbit.gguf import GGUFValueType as VT
    from lowbit.hub import fetch_smollm2

    s = ARCH_SHAPES[shape]
    a, d, ff, hd = s["arch"], s["n_embd"], s["n_ff"], s["head_dim"]
    q_dim, kv_dim = s["n_head"] * hd, s["n_head_kv"] * hd
    vocab_src = lowbit.GGUFFile(fetch_smollm2(cache))
    tokens = list(vocab_src.metadata["tokenizer.ggml.tokens"])
    types = list(vocab_src.metadata["tokenizer.ggml.token_type"])
    pad = s["n_vocab"] - len(tokens)
    tokens += [f"<|unused_{i}|>" for i in range(pad)]
    types += [5] * pad  # UNUSED
    F32, F16 = lowbit.QType.F32, lowbit.QType.F16
    shapes = [("token_embd.weight", (s["n_vocab"], d), F16), ("output_norm.weight", (d,), F32)]
    for i in range(s["n_layer"]):
        b = f"blk.{i}."
        shapes += [(b + "attn_norm.weight", (d,), F32), (b + "attn_q.weight", (q_dim, d), F16),
                   (b + "attn_k.weight", (kv_dim, d), F16), (b + "attn_v.weight", (kv_dim, d), F16)]
        if s.get("bias"):
            shapes += [(b + "attn_q.bias", (q_dim,), F32), (b + "attn_k.bias", (kv_dim,), F32),
                       (b + "attn_v.bias", (kv_dim,), F32)]
        if s.get("qk_norm"):
            shapes += [(b + "attn_q_norm.weight", (hd,), F32), (b + "attn_k_norm.weight", (hd,), F32)]
        shapes += [(b + "attn_output.weight", (d, q_dim), F16)]
        if s.get("sandwich"):
            shapes += [(b + "post_attention_norm.weight", (d,), F32)]
        shapes += [(b + "ffn_norm.weight", (d,), F32), (b + "ffn_gate.weight", (ff, d), F16),
                   (b + "ffn_up.weight", (ff, d), F16), (b + "ffn_down.weight", (d, ff), F16)]
        if s.get("sandwich"):
            shapes += [(b + "post_ffw_norm.weight", (d,), F32)]
    rng = np.random.default_rng(0)
    tmp = out.with_name(out.name + ".part")
    with lowbit.GGUFWriter(tmp) as w:
        w.add_metadata("general.architecture", a)
        w.add_metadata("general.name", s["name"])
        w.add_metadata("general.file_type", 1, VT.UINT32)
        w.add_metadata("general.quantization_version", 2, VT.UINT32)
        for key, v in (("context_length", 32768), ("embedding_length", d), ("block_count", s["n_layer"]),
                       ("feed_forward_length", ff), ("attention.head_count", s["n_head"]),
                       ("attention.head_count_kv", s["n_head_kv"]), ("attention.key_length", hd),
                       ("attention.value_length", hd)):
            w.add_metadata(f"{a}.{key}", v, VT.UINT32)
        w.add_metadata(f"{a}.rope.freq_base", float(s["rope_base"]), VT.FLOAT32)
        w.add_metadata(f"{a}.attention.layer_norm_rms_epsilon", float(s["eps"]), VT.FLOAT32)
        if s.get("window"):
            w.add_metadata(f"{a}.attention.sliding_window", s["window"], VT.UINT32)
        for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.merges",
                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                  "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token"):
            w.add_metadata(k, vocab_src.field(k))
        w.add_metadata("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING)
        w.add_metadata("tokenizer.ggml.token_type", types, VT.ARRAY, VT.INT32)
        for name, shp, t in shapes:
            w.add_tensor_info(name, shp, t)
        w.write_header()
        for name, shp, t in shapes:
            if t == F32:
                w.write_tensor_data(np.ones(shp, np.float32).tobytes())
            else:
                w.write_tensor_data((rng.standard_normal(shp, dtype=np.float32) * 0.02).astype(np.float16).tobytes())
        w.finish()
    tmp.rename(out)


def arch_llamacpp_files(shape: str):
    def make(cache: Path, types: tuple[str, ...] = ("q4_k_m", "q8_0")) -> dict[str, Path]:
        f16 = cache / f"bench-{shape}-f16.gguf"
        if not f16.exists():
            write_random_arch(cache, f16, shape)
        return {qt: llamacpp_quantize(f16, cache / f"bench-{shape}-llamacpp-{qt}.gguf", qt) for qt in types}
    return make


# ---- files made by llama.cpp's quantizer ----------------------------------------------------------

# llama.h's llama_ftype ids of the file types measured here.
LLAMA_FTYPE = {"q4_0": 2, "q8_0": 7, "q2_k": 10, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "iq4_xs": 30}
KQ_TYPES = ("q4_k_m", "q5_k_m", "q6_k")

QUANTIZE_CHILD = r"""
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3])
p.nthread = int(sys.argv[4])
p.pure = False
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def llamacpp_quantize(src: Path, out: Path, ftype: str, threads: int = 2) -> Path:
    """out = llama.cpp's quantizer applied to src (an F16 GGUF), with llama-quantize's per-tensor choice of types
    for this file type (pure=False, no importance matrix). In a child process: its log goes to a pipe."""
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".part")
    proc = subprocess.run([sys.executable, "-c", QUANTIZE_CHILD, str(src), str(tmp), str(LLAMA_FTYPE[ftype]),
                           str(threads)], capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.exists():
        raise RuntimeError(f"llama.cpp could not quantize {src.name} to {ftype}:\n{proc.stderr[-3000:]}")
    tmp.rename(out)
    return out


def smollm2_llamacpp_files(cache: Path, types: tuple[str, ...] = KQ_TYPES) -> dict[str, Path]:
    """SmolLM2-135M quantized by llama.cpp from the F16 file lowbit dequantizes out of the Q4_1 download."""
    f16 = smollm2_files(cache, ("f16",))["f16"]
    return {qt: llamacpp_quantize(f16, cache / f"bench-smollm2-135m-llamacpp-{qt}.gguf", qt) for qt in types}


def tiny11b_llamacpp_files(cache: Path, types: tuple[str, ...] = KQ_TYPES) -> dict[str, Path]:
    f16 = tiny11b_files(cache, ("f16",))["f16"]
    return {qt: llamacpp_quantize(f16, cache / f"bench-tiny11b-llamacpp-{qt}.gguf", qt) for qt in types}


def tensor_mix(path: Path) -> str:
    """The tensor types of a file, as 'TYPE count (MB)' for the 2-D tensors, largest share first."""
    import lowbit

    acc: dict[str, list[int]] = {}
    for t in lowbit.GGUFFile(path).tensors:
        if len(t.shape) < 2:
            continue
        name = getattr(t.qtype, "name", str(t.qtype))
        a = acc.setdefault(name, [0, 0])
        a[0] += 1
        a[1] += t.nbytes
    return ", ".join(f"{k} {n} ({b / 1e6:.1f} MB)" for k, (n, b) in sorted(acc.items(), key=lambda kv: -kv[1][1]))


# ---- bandwidth probe ------------------------------------------------------------------------------


def read_bandwidth(threads: int, gib: float = 1.0, reps: int = 5) -> float:
    """GB/s of a STREAM-like sum over a buffer much larger than the caches, split over `threads` threads."""
    a = np.ones(int(gib * 2**30) // 8, dtype=np.float64)
    parts = np.array_split(a, threads)
    best = []
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(reps):
            t = time.perf_counter()
            list(ex.map(np.sum, parts))
            best.append(a.nbytes / (time.perf_counter() - t) / 1e9)
    return statistics.median(best)


def weight_bytes(path: Path) -> int:
    """Bytes read per decoded token: every tensor but the token embedding (a row gather), plus the output head,
    which for tied embeddings is token_embd itself."""
    import lowbit

    f = lowbit.GGUFFile(path)
    names = {t.name: t.nbytes for t in f.tensors}
    total = sum(v for k, v in names.items() if k != "token_embd.weight")
    if "output.weight" not in names:
        total += names["token_embd.weight"]
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--models", default="smollm2,tiny11b",
                    help="comma-separated: smollm2, tiny11b (files lowbit writes), smollm2-kq, tiny11b-kq, "
                         "qwen25-05b-kq, gemma3-1b-kq (files llama.cpp's quantizer makes)")
    ap.add_argument("--only", default=None, help="comma-separated file types to keep (for example q4_k_m)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None, help="write raw results as JSON")
    ap.add_argument("--no-bnb", action="store_true", help="skip the transformers + bitsandbytes NF4 baseline")
    args = ap.parse_args()
    from lowbit.hub import default_cache_dir

    cache = Path(args.cache) if args.cache else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        import llama_cpp  # noqa: F401
        have_llamacpp = True
    except ImportError:
        have_llamacpp = False
        print("llama-cpp-python is not installed: measuring lowbit only", file=sys.stderr)

    models = args.models.split(",")
    makers = {"smollm2": ("SmolLM2-135M", smollm2_files), "tiny11b": ("1.1B-shape", tiny11b_files),
              "smollm2-kq": ("SmolLM2-135M", smollm2_llamacpp_files),
              "tiny11b-kq": ("1.1B-shape", tiny11b_llamacpp_files),
              "qwen25-05b-kq": ("Qwen2.5-0.5B-shape", arch_llamacpp_files("qwen25-05b")),
              "gemma3-1b-kq": ("Gemma-3-1B-shape", arch_llamacpp_files("gemma3-1b"))}
    unknown = [m for m in models if m not in makers]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; use {', '.join(makers)}")
    files = []
    for m in models:
        label, make = makers[m]
        files += [(label, qt, p) for qt, p in make(cache).items()]
    if args.only:
        files = [f for f in files if f[1] in args.only.split(",")]
    mixes = {p.name: tensor_mix(p) for _, _, p in files}

    bnb = None
    if "smollm2" in models and not args.no_bnb:
        from lowbit.hub import fetch_smollm2

        try:
            bnb = run_bnb(fetch_smollm2(cache), args.threads, args.reps, args.n_gen)
        except Exception as e:  # noqa: BLE001 - report and go on with the rest
            print(f"bitsandbytes NF4 baseline skipped: {e}", file=sys.stderr)
    bw = read_bandwidth(args.threads)
    load_before = os.getloadavg()
    results = []
    for model, qt, path in files:
        row = {"model": model, "type": qt, "file": path.name, "weight_bytes": weight_bytes(path)}
        # One child process per engine per repetition, the engines alternating, so a slow minute on this shared
        # machine hits both rather than whichever engine ran in it.
        engines = ["lowbit"] + (["llamacpp"] if have_llamacpp and qt != "nf4" else [])
        for _ in range(args.reps):
            for engine in engines:
                merge_child(row.setdefault(engine, {}), run_child(engine, path, args.threads, 1, args.n_gen))
        for engine in engines:
            row[engine]["warm_load_s"] = warm_load(engine, path, args.threads)
        results.append(row)
        # Each file's medians as soon as it is done, and the raw results so far: a long run on a busy machine
        # that is stopped early keeps what it measured.
        summary = "; ".join(f"{e} decode {statistics.median(row[e]['tg']):.1f}, prompt 128 "
                            f"{statistics.median(row[e]['pp128']):.1f} tok/s, RSS {row[e]['rss_mib']:.0f} MiB"
                            for e in engines)
        print(f"done: {model} {qt}: {summary}", file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps({"bandwidth_gbs": bw, "threads": args.threads, "results": results,
                                                  "partial": True}, indent=1))

    med = statistics.median
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; threads {args.threads}; "
          f"read bandwidth {bw:.1f} GB/s (median of 5); "
          f"rates are median [min-max] of {args.reps} child processes per engine, alternating; "
          f"load average (1, 5, 15 min) {' '.join(f'{x:.1f}' for x in load_before)} at the start, "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end\n")
    print("| model | type | metric | lowbit | llama.cpp | ratio |")
    print("|---|---|---|---|---|---|")
    for r in results:
        lb, lc = r["lowbit"], r.get("llamacpp")
        for metric, key, fmt in (("prompt 128 (tok/s)", "pp128", "{:.1f}"), ("prompt 512 (tok/s)", "pp512", "{:.1f}"),
                                 (f"decode {args.n_gen} (tok/s)", "tg", "{:.1f}")):
            def cell(vals: list) -> str:  # median [min-max]
                return f"{fmt.format(med(vals))} [{fmt.format(min(vals))}-{fmt.format(max(vals))}]"

            a = med(lb[key])
            b = med(lc[key]) if lc else None
            print(f"| {r['model']} | {r['type']} | {metric} | {cell(lb[key])} | "
                  + (f"{cell(lc[key])} | {a / b:.2f} |" if b else "- | - |"))
        for metric, key, fmt in (("warm load (s)", "warm_load_s", "{:.3f}"), ("peak RSS (MiB)", "rss_mib", "{:.0f}"),
                                 ("peak RSS after tokenizing text (MiB)", "rss_text_mib", "{:.0f}")):
            a = lb[key]
            b = lc[key] if lc else None
            print(f"| {r['model']} | {r['type']} | {metric} | {fmt.format(a)} | "
                  + (f"{fmt.format(b)} | {a / b:.2f} |" if b else "- | - |"))
        gbs = r["weight_bytes"] * med(lb["tg"]) / 1e9
        extra = f"; llama.cpp {r['weight_bytes'] * med(lc['tg']) / 1e9:.1f} GB/s" if lc else ""
        print(f"| {r['model']} | {r['type']} | decode bandwidth | {gbs:.1f} GB/s ({100 * gbs / bw:.0f}% of probe)"
              f"{extra} | | |")
    builds = sorted({t for r in results for t in r["lowbit"].get("core_mtime_all", [])})
    if len(builds) > 1:
        print("\nWARNING: lowbit's core was rebuilt during the run; builds used (modification times): "
              + ", ".join(time.strftime("%H:%M:%S", time.localtime(t)) for t in builds))
    elif builds:
        print(f"\nlowbit core built {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(builds[0]))}")
    print("\nTensor types of each file (2-D tensors):\n")
    for name, mix in mixes.items():
        print(f"- {name}: {mix}")
    by = {(r["model"], r["type"]): r for r in results}
    print()
    for model in ("SmolLM2-135M", "1.1B-shape"):
        nf4, q40 = by.get((model, "nf4")), by.get((model, "q4_0"))
        if nf4 and q40:
            a, b = med(nf4["lowbit"]["tg"]), med(q40["lowbit"]["tg"])
            print(f"NF4 decode / lowbit Q4_0 decode ({model}): {a:.1f} / {b:.1f} = {a / b:.2f}")
    nf4 = by.get(("SmolLM2-135M", "nf4"))
    if nf4:
        a = med(nf4["lowbit"]["tg"])
        if bnb:
            print(f"NF4 decode, lowbit / transformers + bitsandbytes NF4 ({bnb['layer_type']}, CPU): {a:.1f} / "
                  f"{med(bnb['tg']):.1f} = {a / med(bnb['tg']):.2f}  (bitsandbytes peak RSS {bnb['rss_mib']:.0f} MiB)")
    if args.out:
        Path(args.out).write_text(json.dumps({"bandwidth_gbs": bw, "threads": args.threads, "results": results,
                                              "bitsandbytes_nf4": bnb, "tensor_types": mixes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
