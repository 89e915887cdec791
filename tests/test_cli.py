"""The `lowbit` command line: each subcommand on a tiny converted model, checked against the Python API."""
from __future__ import annotations

import json
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
    assert "blk.0.attn_q.weight" in out and "Q8_0" in out and "total tensor data" in out


def test_run_greedy_equals_api(capsys):
    path = tiny_gguf("f32")
    assert main(["run", "-m", str(path), "-p", "hello world", "-n", "12", "--temp", "0", "--no-echo", "-t", "1"]) == 0
    captured = capsys.readouterr()
    expected = lowbit.load(path, n_threads=1).generate("hello world", max_new_tokens=12, temperature=0.0)
    assert captured.out.rstrip("\n") == expected
    assert "tokens/s" in captured.err


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
    assert main(["quantize", str(out), str(q4), "q4_0", "--no-progress"]) == 0
    types = {t.name: t.qtype for t in lowbit.GGUFFile(q4).tensors}
    assert types["blk.0.ffn_up.weight"] == lowbit.QType.Q4_0
    assert types["blk.0.attn_norm.weight"] == lowbit.QType.F32


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
