"""Calibrated quantization (lowbit/calibrate.py, lowbit/wquant.py, converter/calibrated.py): the activation
statistics against transformers' own forward pass, the files against gguf-py and llama.cpp, the methods
against uncalibrated rounding, AWQ's folding against the unscaled model, and the bad inputs of the CLI."""
from __future__ import annotations

import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest

import lowbit
import lowbit.calibrate as cal
import lowbit.converter.calibrated as calq
from lowbit import wquant
from lowbit.converter import quantize_file
from model_helpers import N_THREADS, kl_and_top1, tiny_gguf, tiny_hf
from tiny_models import load_hf_model

N_CTX, N_TOKENS = 64, 512
SITE_MODULES = {0: "self_attn.q_proj", 1: "self_attn.o_proj", 2: "mlp.gate_proj", 3: "mlp.down_proj"}
FLOAT_TYPES = {"F32", "F16", "BF16"}


def _text(n_words: int = 1500, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["the", "model", "reads", "a", "quantized", "block", "of", "weights", "and", "writes", "tokens",
             "river", "stone", "seven", "light", "under", "every", "small", "file", "loads", "fast", "!", ",", "."]
    return " ".join(rng.choice(words, size=n_words))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(_text())
    return p


@pytest.fixture(scope="module")
def stats(calib_file):
    return cal.collect(tiny_gguf("f32"), calib_file.read_text(), n_tokens=N_TOKENS, n_ctx=N_CTX, progress=False,
                       n_threads=N_THREADS)


def _hf_site_rows(text: str) -> dict[tuple[int, int], list[np.ndarray]]:
    """The inputs of each layer's q/o/gate/down projections in transformers' forward pass, per window."""
    import torch

    model = load_hf_model(tiny_hf())
    tokens = lowbit.load(tiny_gguf("f32")).tokenize(text, add_bos=False)
    rows: dict[tuple[int, int], list[np.ndarray]] = {}
    hooks = []
    for li, layer in enumerate(model.model.layers):
        for site, path in SITE_MODULES.items():
            mod = layer.get_submodule(path)
            hooks.append(mod.register_forward_pre_hook(
                lambda m, inp, key=(li, site): rows.setdefault(key, []).append(inp[0][0].double().numpy())))
    with torch.no_grad():
        for k in range(N_TOKENS // N_CTX):
            model(torch.as_tensor(np.asarray(tokens[k * N_CTX:(k + 1) * N_CTX], dtype=np.int64))[None])
    for h in hooks:
        h.remove()
    return rows


def test_statistics_match_transformers(stats, calib_file):
    rows = _hf_site_rows(calib_file.read_text())
    assert stats.n_tokens == N_TOKENS and stats.n_chunks == N_TOKENS // N_CTX
    assert set(stats.sites) == set(rows)
    for key, per_window in rows.items():
        X = np.concatenate(per_window)
        s = stats.sites[key]
        assert s.n == len(X)
        np.testing.assert_allclose(s.mean_sq, (X * X).mean(0), rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(s.mean_abs, np.abs(X).mean(0), rtol=2e-4, atol=1e-7)
        H = X.T @ X / len(X)
        np.testing.assert_allclose(s.hessian(), H, rtol=2e-3, atol=2e-4 * np.abs(H).max())
        np.testing.assert_allclose(np.asarray(s.first_rows), np.stack([w[0] for w in per_window]), rtol=1e-3,
                                   atol=1e-4)
        F = np.stack([w[0] for w in per_window])
        np.testing.assert_allclose(s.hessian(0.5), H + 0.5 * F.T @ F / len(F), rtol=2e-3,
                                   atol=2e-4 * np.abs(H).max())


def test_memory_budget_splits_passes_same_result(stats, calib_file):
    # a budget that holds one block's X^T X at a time: one pass per block, the same statistics
    small = cal.collect(tiny_gguf("f32"), calib_file.read_text(), n_tokens=N_TOKENS, n_ctx=N_CTX, progress=False,
                        memory_budget=1, n_threads=N_THREADS)
    for key, s in stats.sites.items():
        np.testing.assert_allclose(small.sites[key].hessian(), s.hessian(), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(small.sites[key].sum_sq, s.sum_sq)


def test_imatrix_written_and_read_back(stats, tmp_path):
    from lowbit.imatrix import write_imatrix

    for fmt, name in (("gguf", "m.gguf"), ("dat", "m.dat")):
        write_imatrix(tmp_path / name, stats.imatrix(), fmt=fmt)
        back = cal.stats_from_imatrix(tmp_path / name)
        for key, s in stats.sites.items():
            np.testing.assert_allclose(back.sites[key].mean_sq, s.mean_sq, rtol=1e-6)
            assert back.sites[key].xtx is None


def _tensor_bytes(path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def _tensor_data(path) -> dict[str, bytes]:
    return {t.name: t.data.tobytes() for t in gguf.GGUFReader(path).tensors}


def _weights(path) -> dict[str, tuple[str, np.ndarray]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        [int(d) for d in reversed(t.shape)]).astype(np.float64)) for t in r.tensors}


@pytest.mark.parametrize("qtype,method", [("q4_0", "imatrix"), ("q4_0", "gptq"), ("q4_1", "gptq"),
                                          ("q5_0", "imatrix"), ("q8_0", "gptq")])
def test_calibrated_file_is_standard_and_lowers_output_error(stats, tmp_path, qtype, method):
    src = tiny_gguf("f32")
    plain, calibrated = tmp_path / "plain.gguf", tmp_path / "cal.gguf"
    quantize_file(src, plain, qtype, progress=False)
    quantize_file(src, calibrated, qtype, stats=stats, method=method, progress=False)
    ref, p, c = _weights(src), _weights(plain), _weights(calibrated)
    assert {k: v[0] for k, v in p.items()} == {k: v[0] for k, v in c.items()}   # same types, same size
    assert _tensor_bytes(calibrated) == _tensor_bytes(plain)
    err_plain = err_cal = 0.0
    n_matrices = 0
    for name, (typ, W) in c.items():
        key = cal.tensor_site(name)
        if key is None or typ in FLOAT_TYPES:
            continue
        H = stats.sites[key].hessian()
        err_plain += wquant.output_error(ref[name][1], p[name][1], H)
        err_cal += wquant.output_error(ref[name][1], W, H)
        n_matrices += 1
        # lowbit reads back exactly what gguf-py decodes
        m = lowbit.GGUFFile(calibrated)
        np.testing.assert_array_equal(m.tensor(name).to_numpy().astype(np.float64), W)
    assert n_matrices == 14
    assert err_cal < 0.9 * err_plain, (err_cal, err_plain)


def test_calibrated_q4_0_runs_in_llama_cpp(stats, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the llama.cpp oracle (test extra)")
    out = tmp_path / "cal.gguf"
    quantize_file(tiny_gguf("f32"), out, "q4_0", stats=stats, method="gptq", progress=False)
    ids = [5, 17, 99, 3, 250, 41, 7, 12]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_batch=64, logits_all=True, n_threads=N_THREADS,
                          verbose=False)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    ours = lowbit.load(out, n_threads=N_THREADS).logits(ids)
    kl, top1 = kl_and_top1(theirs, ours)
    assert kl < 1e-3 and top1 == 1.0, (kl, top1)


def test_nf4_and_kquant_grids_pack_exactly():
    # codes and scales written by each grid decode (lowbit, and gguf-py for ggml's types) to the values the
    # methods scored
    rng = np.random.default_rng(1)
    W = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    W[2, 7] = 1.0
    W[5, :64] = 0.0
    X = rng.standard_normal((600, 512)) * rng.random(512) ** 2
    H = X.T @ X / len(X)
    for t in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "nf4", "q4_k", "q5_k", "q6_k"):
        qt = lowbit.QType.parse(t)
        for data, vals in (wquant.quantize_weighted(W, t, np.diag(H), return_values=True),
                           wquant.quantize_gptq(W, t, H, return_values=True),
                           wquant.quantize_gptq(W, t, H, act_order=True, return_values=True)):
            np.testing.assert_array_equal(lowbit.quants.dequantize(data.reshape(-1), qt, W.shape), vals)
            if t != "nf4":
                g = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, t.upper()))
                np.testing.assert_array_equal(g.reshape(W.shape), vals)
        # the search never does worse than ggml's rounding on the error it weighs
        rtn = lowbit.quants.dequantize(lowbit.quants.quantize(W, qt), qt, W.shape)
        _, v = wquant.quantize_weighted(W, t, np.diag(H), return_values=True)
        w_err = lambda V: float(((W - V) ** 2 * np.diag(H)).sum())  # noqa: E731
        assert w_err(v) <= w_err(rtn) * 1.0001, t
        _, g = wquant.quantize_gptq(W, t, H, return_values=True)
        assert wquant.output_error(W, g, H) < wquant.output_error(W, v, H), t


def test_awq_folding_keeps_the_function(stats, tmp_path, monkeypatch):
    # Q8_0 rounds finely enough that any mistake in folding the scales into the norms and the v / up rows
    # would show in the logits; alpha fixed at 0.5 so that every site is scaled
    monkeypatch.setattr(calq, "ALPHAS", np.array([0.5]))
    src = tiny_gguf("f32")
    out = tmp_path / "awq.gguf"
    quantize_file(src, out, "q8_0", stats=stats, method="awq+imatrix", progress=False)
    before, after = _weights(src), _weights(out)
    changed = [n for n in before if n.endswith("norm.weight") and n.startswith("blk.")
               and not np.allclose(before[n][1], after[n][1])]
    assert len(changed) == 4          # attn_norm and ffn_norm of both blocks
    ids = list(range(3, 60))
    ref = lowbit.load(src, n_threads=N_THREADS).logits(ids)
    kl_awq, top1 = kl_and_top1(ref, lowbit.load(out, n_threads=N_THREADS).logits(ids))
    plain = tmp_path / "plain.gguf"
    quantize_file(src, plain, "q8_0", progress=False)
    kl_plain, _ = kl_and_top1(ref, lowbit.load(plain, n_threads=N_THREADS).logits(ids))
    assert kl_awq < max(3 * kl_plain, 1e-5) and top1 >= 0.95, (kl_awq, kl_plain, top1)


def test_imatrix_file_drives_the_weighted_method(stats, tmp_path):
    from lowbit.imatrix import write_imatrix

    write_imatrix(tmp_path / "m.gguf", stats.imatrix())
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    quantize_file(tiny_gguf("f32"), a, "q4_0", imatrix=tmp_path / "m.gguf", progress=False)
    quantize_file(tiny_gguf("f32"), b, "q4_0", stats=stats, method="imatrix", progress=False)
    assert _tensor_data(a) == _tensor_data(b)
    with pytest.raises(lowbit.LowbitError, match="second moments"):
        quantize_file(tiny_gguf("f32"), tmp_path / "c.gguf", "q4_0", imatrix=tmp_path / "m.gguf", method="gptq",
                      progress=False)
    assert not (tmp_path / "c.gguf").exists()


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "lowbit", *map(str, argv)], capture_output=True, text=True)


def test_cli_calibrate_and_save_imatrix(tmp_path, calib_file):
    out, im = tmp_path / "o.gguf", tmp_path / "o.imatrix.gguf"
    r = _cli("quantize", tiny_gguf("f32"), out, "q4_0", "--calibrate", calib_file, "--calib-tokens", N_TOKENS,
             "--calib-ctx", N_CTX, "--save-imatrix", im, "--threads", N_THREADS)
    assert r.returncode == 0, r.stderr
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} <= {"Q4_0", "Q8_0", "F32"}
    assert cal.stats_from_imatrix(im).n_chunks == N_TOKENS // N_CTX


def _nan_model(tmp_path):
    bad = tmp_path / "nan.gguf"
    shutil.copy(tiny_gguf("f32"), bad)
    r = gguf.GGUFReader(bad, "r+")
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_norm.weight")
    t.data[3] = np.nan
    r.data.flush()
    return bad


@pytest.mark.parametrize("case", ["empty", "short", "quantized", "nan", "missing", "both", "tokens"])
def test_cli_bad_calibration_input(tmp_path, calib_file, case):
    out = tmp_path / "o.gguf"
    src, text = tiny_gguf("f32"), calib_file
    extra: list = []
    if case == "empty":
        text = tmp_path / "empty.txt"
        text.write_text("  \n")
        message = "calibration text is empty"
    elif case == "short":
        text = tmp_path / "short.txt"
        text.write_text("the river")
        message = "calibration text is too short"
    elif case == "quantized":
        src = tiny_gguf("q8_0")
        message = "unquantized"
    elif case == "nan":
        src = _nan_model(tmp_path)
        message = "NaN or infinite"
    elif case == "missing":
        text = tmp_path / "nope.txt"
        message = "no such calibration text file"
    elif case == "both":
        extra = ["--imatrix", tmp_path / "x.gguf"]
        message = "not both"
    else:
        extra = ["--calib-tokens", "16"]
        message = "less than one window"
    r = _cli("quantize", src, out, "q4_0", "--calibrate", text, "--calib-ctx", N_CTX, *extra)
    assert r.returncode == 1, r.stderr
    assert "lowbit: error:" in r.stderr and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob("o.gguf*"))


def test_cli_convert_with_calibration(tmp_path, calib_file):
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    r = _cli("convert", tiny_hf(), "--outtype", "q4_0", "-o", out, "--calibrate", calib_file, "--calib-tokens",
             N_TOKENS, "--calib-ctx", N_CTX, "--threads", N_THREADS, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]      # the temporary F16 file is gone
    # the same bytes as quantizing lowbit's F16 conversion with the same statistics
    f16 = tmp_path / "f16.gguf"
    lowbit.convert(tiny_hf(), f16, outtype="f16", progress=False)
    again = tmp_path / "again.gguf"
    r = _cli("quantize", f16, again, "q4_0", "--calibrate", calib_file, "--calib-tokens", N_TOKENS, "--calib-ctx",
             N_CTX, "--threads", N_THREADS, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == out.read_bytes()


def test_calibrated_file_says_what_it_was_calibrated_on(tmp_path, calib_file):
    out = tmp_path / "o.gguf"
    quantize_file(tiny_gguf("f32"), out, "q4_0", calibrate=calib_file, calib_tokens=N_TOKENS, calib_ctx=N_CTX,
                  method="imatrix", progress=False, n_threads=N_THREADS)
    f = gguf.GGUFReader(out).fields
    assert f["quantize.imatrix.file"].contents() == calib_file.name
    assert f["quantize.imatrix.dataset"].contents() == calib_file.name
    assert f["quantize.imatrix.entries_count"].contents() == 14          # 2 blocks x 7 matrices
    assert f["quantize.imatrix.chunks_count"].contents() == N_TOKENS // N_CTX
