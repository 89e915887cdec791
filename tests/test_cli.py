"""The `lowbit` command line: each subcommand on a tiny converted model, checked against the Python API."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import lowbit
from lowbit.cli import main
from model_helpers import tiny_gguf, tiny_hf


def test_info_reports_isas_and_cuda(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    info = lowbit.build_info()
    assert "generic" in info["cpu_isas_compiled"]
    for isa in info["cpu_isas_compiled"]:
        assert isa in out
    assert ("compiled in" in out) == lowbit.cuda_info()["compiled"]
    # One line per registry type with the ISA serving its dot product.
    for name, dot, *_ in lowbit._core.type_kernels():
        assert re.search(rf"^  {name}\s+{dot}\s", out, re.M), name


def test_inspect_json_matches_gguf_package(capsys):
    import gguf

    path = tiny_gguf("q4_0")
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    reader = gguf.GGUFReader(path)
    theirs = {t.name: t for t in reader.tensors}
    assert {t["name"] for t in report["tensors"]} == set(theirs)
    for t in report["tensors"]:
        ref = theirs[t["name"]]
        assert t["shape"] == [int(x) for x in reversed(ref.shape.tolist())]
        assert t["type"] == ref.tensor_type.name
        assert t["nbytes"] == int(ref.n_bytes)
    assert report["metadata"]["general.architecture"] == "llama"


def test_inspect_table(capsys):
    assert main(["inspect", str(tiny_gguf("q8_0"))]) == 0
    out = capsys.readouterr().out
    assert "blk.0.attn_q.weight" in out and "Q8_0" in out and "file type = q8_0 (7)" in out


@pytest.fixture(scope="module")
def k_quant_file(tmp_path_factory):
    """A q4_k_m file of a model with rows of 256 (test_convert's F16 writer), and its F16 source."""
    from test_convert import MODELS, write_f16_llama

    d = tmp_path_factory.mktemp("k")
    src = write_f16_llama(d / "f16.gguf", **MODELS["k256"])
    out = d / "q4_k_m.gguf"
    assert main(["quantize", str(src), str(out), "q4_k_m", "--no-progress"]) == 0
    return src, out


def test_inspect_type_mix_and_bits_per_weight(k_quant_file, capsys):
    import gguf

    _, path = k_quant_file
    reader = gguf.GGUFReader(path)
    counts: dict[str, list[int]] = {}
    for t in reader.tensors:
        row = counts.setdefault(t.tensor_type.name, [0, 0])
        row[0] += 1
        row[1] += int(t.n_bytes)
    assert set(counts) == {"Q4_K", "Q6_K", "F32"}
    n_all = sum(int(t.n_elements) for t in reader.tensors)
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    bpw = 8 * sum(int(t.n_bytes) for t in reader.tensors) / n_all
    bpw_mat = 8 * sum(int(t.n_bytes) for t in matrices) / sum(int(t.n_elements) for t in matrices)

    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for name, (n, _) in counts.items():
        assert f"type {name + ':':<7} {n:4d} tensors" in out
    assert "file type = q4_k_m (15)" in out
    assert f"({bpw:.2f} BPW)" in out.split("file size =")[1].splitlines()[0]
    assert f"({bpw_mat:.2f} BPW over {sum(int(t.n_elements) for t in matrices):,} weights)" in out
    assert 4.5 < bpw_mat < 5.5

    assert main(["inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert {k: [v["tensors"], v["bytes"]] for k, v in summary["types"].items()} == counts
    assert list(summary["types"])[0] == "Q4_K"  # most bytes first
    assert summary["bpw"] == pytest.approx(bpw) and summary["matrix_bpw"] == pytest.approx(bpw_mat)
    assert summary["file_type"] == "q4_k_m (15)" and summary["file_size"] == path.stat().st_size


def test_quantize_pure_keep_and_requantize(k_quant_file, tmp_path, capsys):
    src, mixed = k_quant_file
    types = {t.name: t.qtype for t in lowbit.GGUFFile(mixed).tensors}
    assert types["output.weight"] == lowbit.QType.Q6_K and types["blk.0.ffn_down.weight"] == lowbit.QType.Q6_K
    pure = tmp_path / "pure.gguf"
    assert main(["quantize", str(src), str(pure), "q4_k_m", "--pure", "--no-progress"]) == 0
    for t in lowbit.GGUFFile(pure).tensors:
        assert t.qtype == (lowbit.QType.Q4_K if len(t.shape) == 2 else lowbit.QType.F32), t.name
    kept = tmp_path / "kept.gguf"
    assert main(["quantize", str(src), str(kept), "q4_k_m", "--keep", "output=q8_0", "--keep", "blk.*.ffn_down*=q4_k",
                 "--no-progress"]) == 0
    got = {t.name: t.qtype for t in lowbit.GGUFFile(kept).tensors}
    assert got["output.weight"] == lowbit.QType.Q8_0 and got["blk.0.ffn_down.weight"] == lowbit.QType.Q4_K
    assert got["blk.0.attn_v.weight"] == types["blk.0.attn_v.weight"] == lowbit.QType.Q6_K
    capsys.readouterr()
    # Requantizing a quantized file needs --allow-requantize.
    again = tmp_path / "again.gguf"
    assert main(["quantize", str(mixed), str(again), "q5_k_m", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error:") and "--allow-requantize" in err and "Q4_K: " in err
    assert not again.exists()
    assert main(["quantize", str(mixed), str(again), "q5_k_m", "--no-progress", "--allow-requantize"]) == 0
    assert lowbit.GGUFFile(again).metadata["general.file_type"] == 17


def test_quantize_bad_inputs(tmp_path):
    src = tiny_gguf("f16")
    cases = [(["quantize", str(src), str(tmp_path / "o.gguf"), "q4_km"], "unknown file type 'q4_km'; choose one of"),
             (["quantize", str(src), str(tmp_path / "o.gguf"), "q4_k_m", "--keep", "output=q7"], "unknown quant type"),
             (["quantize", str(tmp_path / "missing.gguf"), str(tmp_path / "o.gguf"), "q4_0"], "missing.gguf"),
             (["convert", str(tmp_path), "--outtype", "int3", "-o", str(tmp_path / "o.gguf")], "unknown file type")]
    for argv, message in cases:
        r = subprocess.run([sys.executable, "-m", "lowbit", *argv], capture_output=True, text=True)
        assert r.returncode == 1, (argv, r.stderr)
        assert r.stderr.startswith("lowbit: error:") and message in r.stderr and "Traceback" not in r.stderr
        if "unknown file type" in message:
            for choice in ("q4_k_m", "q5_k_s", "q3_k_l", "iq4_nl", "q8_0", "bf16", "nf4_dq", "fp4"):
                assert choice in r.stderr
    assert not (tmp_path / "o.gguf").exists()
    r = subprocess.run([sys.executable, "-m", "lowbit", "quantize", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "q4_k_m" in r.stdout and "--allow-requantize" in r.stdout and "--pure" in r.stdout


def test_run_greedy_equals_api(capsys):
    path = tiny_gguf("f32")
    assert main(["run", "-m", str(path), "-p", "hello world", "-n", "12", "--temp", "0", "--no-echo", "-t", "1"]) == 0
    captured = capsys.readouterr()
    expected = lowbit.load(path, n_threads=1).generate("hello world", max_new_tokens=12, temperature=0.0)
    assert captured.out.rstrip("\n") == expected
    assert "tokens/s" in captured.err


def test_kv_type_reaches_the_model(monkeypatch, capsys):
    """--kv-type f16|f32 picks the KV cache element type; serve defaults to f16 (as llama.cpp's server), the
    others to the library's f32."""
    from lowbit.cli import build_parser

    seen = []
    real_load = lowbit.load

    def spy(*a, **kw):
        seen.append(kw.get("kv_f16"))
        return real_load(*a, **kw)

    monkeypatch.setattr(lowbit, "load", spy)
    path = tiny_gguf("f32")
    for flag, want in (([], False), (["--kv-type", "f16"], True), (["--kv-type", "f32"], False)):
        assert main(["run", "-m", str(path), "-p", "hi", "-n", "2", "--temp", "0", "-t", "1", *flag]) == 0
        assert seen.pop() is want
    capsys.readouterr()
    assert build_parser().parse_args(["serve", "-m", "x.gguf"]).kv_type == "f16"
    assert build_parser().parse_args(["chat", "-m", "x.gguf"]).kv_type == "f32"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "-m", "x.gguf", "--kv-type", "q8_0"])


def test_chat_one_shot(capsys):
    path = tiny_gguf("f32")
    assert main(["chat", "-m", str(path), "-p", "hi there", "-n", "8", "--temp", "0", "-t", "1"]) == 0
    out = capsys.readouterr().out
    expected = lowbit.load(path, n_threads=1).chat([{"role": "user", "content": "hi there"}], max_new_tokens=8,
                                                    temperature=0.0)
    assert out.rstrip("\n") == expected


def test_convert_and_quantize_subcommands(tmp_path, capsys):
    out = tmp_path / "c.gguf"
    assert main(["convert", str(tiny_hf()), "--outtype", "q8_0", "-o", str(out), "--no-progress"]) == 0
    q4 = tmp_path / "q4.gguf"
    assert main(["quantize", str(out), str(q4), "q4_0", "--no-progress", "--allow-requantize"]) == 0
    types = {t.name: t.qtype for t in lowbit.GGUFFile(q4).tensors}
    assert types["blk.0.ffn_up.weight"] == lowbit.QType.Q4_0
    assert types["blk.0.attn_norm.weight"] == lowbit.QType.F32


def test_run_flags_match_the_api(capsys):
    """--stop, --repeat-last-n and -n -1 reach generate(); a reply cut by a full context says so; --version."""
    path = tiny_gguf("f32")
    api = lowbit.load(path, n_threads=1, n_ctx=48)
    full = api.generate("hello world", max_new_tokens=20, temperature=0.0)
    stop = full[4:7]
    assert len(full) > 8 and stop
    assert main(["run", "-m", str(path), "-p", "hello world", "-n", "20", "--temp", "0", "--no-echo", "-t", "1",
                 "--stop", stop]) == 0
    assert capsys.readouterr().out.rstrip("\n") == full[:full.find(stop)]
    # A prompt that ends with the model's own greedy continuation: a penalty over the last 64 tokens covers
    # what it would say next, one over the last 3 does not.
    prompt = "hello world" + full
    kw = dict(max_new_tokens=10, temperature=0.0, repeat_penalty=5.0, repeat_last_n=3)
    assert main(["run", "-m", str(path), "-p", prompt, "-n", "10", "--temp", "0", "--no-echo", "-t", "1",
                 "--repeat-penalty", "5", "--repeat-last-n", "3"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == api.generate(prompt, **kw)
    assert api.generate(prompt, **kw) != api.generate(prompt, **{**kw, "repeat_last_n": 64})
    # -n -1 on a 48-token context: runs until an end token or the context is full, and says which.
    assert main(["run", "-m", str(path), "-p", "hello world", "-n", "-1", "--temp", "0", "--no-echo", "-t", "1",
                 "-c", "48"]) == 0
    out = capsys.readouterr()
    unlimited = api.generate("hello world", max_new_tokens=-1, temperature=0.0)
    assert out.out.rstrip("\n") == unlimited
    assert ("context of 48 tokens is full" in out.err) == (api.last_finish_reason == "length")
    r = subprocess.run([sys.executable, "-m", "lowbit", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"lowbit {lowbit.__version__}"


def test_chat_prints_speed_after_each_reply(capsys):
    path = tiny_gguf("f32")
    assert main(["chat", "-m", str(path), "-p", "hi there", "-n", "8", "--temp", "0", "-t", "1"]) == 0
    err = capsys.readouterr().err
    assert "prompt:" in err and "generation:" in err and "tokens/s" in err


def test_bench_and_perplexity(tmp_path, capsys):
    path = tiny_gguf("f32")
    assert main(["bench", "-m", str(path), "-p", "16", "-n", "8", "-r", "1", "-t", "1"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["perplexity", "-m", str(path), "-f", str(text), "--ppl-ctx", "64", "--chunks", "2", "-t", "1"]) == 0
    out = capsys.readouterr().out
    ppl = float(out.split("perplexity:")[1].split()[0])
    # Oracle: the same windows scored from the Python API's logits.
    m = lowbit.load(path, n_threads=1)
    toks = m.tokenize(text.read_text(), add_bos=False)
    nll = []
    for c in range(2):
        w = list(toks[c * 64:(c + 1) * 64])
        w[0] = m.tokenizer.bos_id
        lg = m.logits(w).astype(np.float64)
        for i in range(32, 63):
            row = lg[i]
            nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[w[i + 1]])
    assert ppl == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-3)


def test_errors_are_one_line_and_exit_nonzero(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    for argv in (["run", "-m", str(tmp_path / "missing.gguf"), "-p", "x"], ["inspect", str(bad)]):
        r = subprocess.run([sys.executable, "-m", "lowbit", *argv], capture_output=True, text=True)
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith("lowbit: error:") and "Traceback" not in r.stderr


def test_every_subcommand_rejects_bad_input_without_a_traceback(tmp_path):
    """Each subcommand with a mistake a user makes: a clear message on stderr, exit status 1 (2 for argparse's
    usage errors), never a Python traceback."""
    model = str(tiny_gguf("f32"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    short = tmp_path / "short.txt"
    short.write_text("Too short for one window.")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    missing = str(tmp_path / "missing.gguf")
    cases = [
        (["run", "-m", missing, "-p", "x"], 1, "does not exist"),
        (["run", "-m", model], None, "prompt"),
        (["run", "-m", model, "-p", "x", "-n", "-5"], 1, "max_new_tokens"),
        (["run", "-m", model, "-p", "x", "--temp", "-1"], 1, "temperature"),
        (["run", "-m", model, "-p", "x", "-c", "-3"], 2, "-c must be at least 0"),
        (["run", "-m", model, "-p", "x", "-t", "0"], 2, "-t must be at least 1"),
        (["run", "-m", model, "-p", "x", "-t", "two"], 2, "-t must be an integer"),
        (["run", "-m", model, "-p", "x", "-b", "0"], 2, "-b must be at least 1"),
        (["run", "-m", model, "-p", "   "], 1, "the prompt is empty"),
        (["run", "-m", model, "-f", str(tmp_path / "nope.txt")], 1, "nope.txt"),
        (["run", "-m", str(bad), "-p", "x"], 1, "GGUF"),
        (["run", "-m", model, "-p", "x", "--keep", "-4", "--context-shift"], 1, "n_keep"),
        (["chat", "-m", missing, "-p", "x"], 1, "does not exist"),
        (["embed", "-m", model], None, "-p TEXT"),
        (["embed", "-m", model, "-f", str(empty)], None, "-p TEXT"),
        (["bench", "-m", model, "-p", "0"], 1, ""),
        (["perplexity", "-m", model, "-f", str(short), "--ppl-ctx", "64"], 1, "too short"),
        (["perplexity", "-m", model, "-f", str(short), "--ppl-ctx", "1"], 1, ""),
        (["inspect", str(bad)], 1, "GGUF"),
        (["inspect", missing], 1, "missing.gguf"),
        (["quantize", missing, str(tmp_path / "o.gguf"), "q4_0"], 1, "missing.gguf"),
        (["quantize", model, str(tmp_path / "o.gguf"), "q9_9"], 1, "unknown file type"),
        (["convert", str(tmp_path), "--outtype", "q4_0", "-o", str(tmp_path / "c.gguf")], 1, "config.json"),
        (["serve", "-m", missing, "--port", "1"], 1, "does not exist"),
    ]
    if not lowbit.cuda_info()["compiled"]:
        cases.append((["run", "-m", model, "-p", "x", "-ngl", "4"], 1, "built without CUDA; drop -ngl"))
    for argv, code, words in cases:
        r = subprocess.run([sys.executable, "-m", "lowbit", *argv], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in r.stderr, (argv, r.stderr[-2000:])
        assert r.returncode != 0, (argv, r.stdout[-500:])
        if code is not None:
            assert r.returncode == code, (argv, r.returncode, r.stderr[-500:])
        assert words.lower() in r.stderr.lower(), (argv, r.stderr[-500:])
