"""Failure behaviour: a model file changed on disk while mapped, conversions interrupted by Ctrl-C or an exception,
two threads on one Model, and a Model used again after an exception (KeyboardInterrupt from a stream consumer
included). Anything that could kill the process (SIGBUS on a truncated mapping) runs in a child process, so a
crash is a failed test with the child's signal, not a dead pytest. The guarantees are listed in RELIABILITY.md."""
from __future__ import annotations

import _thread
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lowbit
from model_helpers import N_THREADS, tiny_gguf, tiny_hf

ROOT = Path(__file__).resolve().parent.parent
# Children import the lowbit this process imported (the installed package, or the source tree with
# LOWBIT_CORE_DIR in development), never the bare source tree, which has no compiled core.
LOWBIT_PARENT = str(Path(lowbit.__file__).resolve().parent.parent)
PROMPT = "Once upon a time"


def run_child(code: str, timeout: float = 120) -> dict:
    """Runs code in a fresh interpreter (same lowbit, tests/ importable); it prints one JSON line last."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([LOWBIT_PARENT, str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode >= 0, (f"child killed by signal {-proc.returncode} "
                                  f"({signal.Signals(-proc.returncode).name}); stderr:\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the model file changes on disk while it is mapped --------------------------------------------------

# How the file is changed after load. After each, the next use must raise a LowbitError that says the file
# changed; the Python reader reports file_changed_on_disk() too.
CHANGES = {
    "truncate_half": "with open(p, 'r+b') as f: f.truncate(os.path.getsize(p) // 2)",
    "truncate_zero": "with open(p, 'r+b') as f: f.truncate(0)",
    "overwrite_in_place": "n = os.path.getsize(p); f = open(p, 'r+b'); f.write(bytes(n)); f.close()",
    "replace_by_rename": "shutil.copy(other, str(p) + '.new'); os.replace(str(p) + '.new', p)",
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_file_changed_between_calls_is_a_clear_error(tmp_path, change):
    r = run_child(f"""
        import json, os, shutil, time
        import lowbit
        p, other = {str(tmp_path / 'm.gguf')!r}, {str(tiny_gguf('q8_0'))!r}
        shutil.copy({str(tiny_gguf('f32'))!r}, p)
        time.sleep(0.05)  # change detection compares mtimes: let the clock move past the copy's
        m = lowbit.load(p, n_threads=1)
        reader = lowbit.GGUFFile(p)
        base = m.generate({PROMPT!r}, max_new_tokens=6, temperature=0)
        {CHANGES[change]}
        out = {{"changed": reader.file_changed_on_disk()}}
        for call in ("generate", "logits", "again"):
            try:
                if call == "logits":
                    m.logits([1, 2, 3])
                else:
                    m.generate({PROMPT!r}, max_new_tokens=6, temperature=0)
                out[call] = "no error"
            except lowbit.LowbitError as e:
                out[call] = str(e)
        print(json.dumps(out))
    """)
    assert r["changed"] is True
    for call in ("generate", "logits", "again"):
        assert "replaced or truncated on disk" in r[call] and "load it again" in r[call], (call, r[call])


def test_file_truncated_during_a_stream(tmp_path):
    """Truncated between two tokens of one streaming generation: the next token raises, the process lives."""
    r = run_child(f"""
        import json, os, shutil, time
        import lowbit
        p = {str(tmp_path / 'm.gguf')!r}
        shutil.copy({str(tiny_gguf('f32'))!r}, p)
        time.sleep(0.05)
        m = lowbit.load(p, n_threads=1)
        pieces, err = [], None
        try:
            for piece in m.generate({PROMPT!r}, max_new_tokens=16, temperature=0, stream=True):
                pieces.append(piece)
                if len(pieces) == 2:
                    with open(p, "r+b") as f:
                        f.truncate(4096)
        except lowbit.LowbitError as e:
            err = str(e)
        print(json.dumps({{"pieces": len(pieces), "err": err}}))
    """)
    assert r["err"] and "replaced or truncated on disk" in r["err"], r
    assert 2 <= r["pieces"] < 16


def test_file_replaced_during_a_stream_keeps_the_old_weights(tmp_path):
    """Replaced by rename (a new inode): the mapping still holds the old bytes, so nothing can fault; the next
    call after the change is refused, and the model never mixes the two files."""
    r = run_child(f"""
        import json, os, shutil, time
        import lowbit
        p = {str(tmp_path / 'm.gguf')!r}
        shutil.copy({str(tiny_gguf('f32'))!r}, p)
        time.sleep(0.05)
        m = lowbit.load(p, n_threads=1)
        err = None
        try:
            for i, piece in enumerate(m.generate({PROMPT!r}, max_new_tokens=16, temperature=0, stream=True)):
                if i == 1:
                    shutil.copy({str(tiny_gguf('q8_0'))!r}, p + ".new")
                    os.replace(p + ".new", p)
        except lowbit.LowbitError as e:
            err = str(e)
        print(json.dumps({{"err": err}}))
    """)
    assert r["err"] and "replaced or truncated on disk" in r["err"], r


@pytest.mark.xfail(strict=False, reason="known gap (RELIABILITY.md): a truncation that lands while an eval is "
                   "reading the mapping faults (SIGBUS); the model checks the file only between calls. Not strict: "
                   "when the truncation happens to land between two evals the child survives")
def test_file_truncated_while_an_eval_runs(tmp_path):
    r = run_child(f"""
        import json, shutil, threading, time
        import lowbit
        p = {str(tmp_path / 'm.gguf')!r}
        shutil.copy({str(tiny_gguf('f32'))!r}, p)
        m = lowbit.load(p, n_threads=1, n_ctx=512)
        done = threading.Event()
        def cut():
            time.sleep(0.02)
            with open(p, "r+b") as f:
                f.truncate(100)
            done.set()
        t = threading.Thread(target=cut)
        t.start()
        errors, after = 0, 0
        while after < 3:
            after += done.is_set()
            try:
                m.logits(list(range(3, 300)))
            except lowbit.LowbitError:
                errors += 1
        t.join()
        print(json.dumps({{"errors": errors}}))
    """, timeout=300)
    assert r["errors"] >= 3


# ---- conversion interrupted ---------------------------------------------------------------------------

# Runs convert.py as __main__ with its tensor encoder slowed down at the third tensor, announcing "WRITING"
# on stdout, so the parent can interrupt it while the output is half written.
SLOW_CONVERT = """
import runpy, signal, sys, time
# As in a terminal: a runner started in the background (nohup, '&') hands SIGINT down ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
import lowbit.converter.core as core
real, calls = core.encode, [0]
def slow(x, qtype):
    calls[0] += 1
    if calls[0] == 3:
        print("WRITING", flush=True)
        time.sleep(60)
    return real(x, qtype)
core.encode = slow
sys.argv = ["convert.py"] + sys.argv[1:]
runpy.run_path("convert.py", run_name="__main__")
"""


def leftovers(d: Path, before: set[str]) -> list[str]:
    return sorted(set(os.listdir(d)) - before)


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "over-existing-with-force"])
def test_ctrl_c_during_convert_leaves_nothing(tmp_path, existing):
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    old = b"an older model that must survive"
    if existing:
        out.write_bytes(old)
    before = set(os.listdir(out.parent))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([LOWBIT_PARENT, os.environ.get("PYTHONPATH", "")]))
    args = [str(tiny_hf()), "--outtype", "q4_0", "-o", str(out)] + (["--force"] if existing else [])
    child = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "WRITING", child.stderr.read()
        assert any(".tmp-" in n for n in os.listdir(out.parent)), "the temporary file should exist mid-way"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err
    assert "interrupted; no output file was written" in err
    assert leftovers(out.parent, before) == []
    assert out.exists() == existing
    if existing:
        assert out.read_bytes() == old


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "over-existing-with-force"])
def test_exception_during_convert_leaves_nothing(tmp_path, monkeypatch, existing):
    import lowbit.converter.core as core

    out = tmp_path / "model.gguf"
    old = b"an older model that must survive"
    if existing:
        out.write_bytes(old)
    before = set(os.listdir(tmp_path))
    real, calls = core.encode, [0]

    def failing(x, qtype):
        calls[0] += 1
        if calls[0] == 4:
            raise MemoryError("simulated failure while encoding a tensor")
        return real(x, qtype)

    monkeypatch.setattr(core, "encode", failing)
    with pytest.raises(MemoryError, match="simulated"):
        lowbit.convert(tiny_hf(), out, outtype="q8_0", progress=False, force=existing)
    assert calls[0] == 4
    assert leftovers(tmp_path, before) == []
    assert out.exists() == existing
    if existing:
        assert out.read_bytes() == old


# ---- one Model, several threads ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    m = lowbit.load(tiny_gguf("q4_0"), n_threads=N_THREADS, n_ctx=128)
    yield m
    m.close()


PROMPTS = [PROMPT, "The quick brown fox", "def fibonacci(n):", "Paris is"]


@pytest.fixture(scope="module")
def greedy(model):
    """Each prompt's greedy continuation, one call at a time."""
    return {p: model.generate(p, max_new_tokens=16, temperature=0) for p in PROMPTS}


def test_two_threads_generate_on_one_model(model, greedy):
    results: dict[tuple[int, int], str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for r in range(3):
                prompt = PROMPTS[(k + r) % len(PROMPTS)] if k else PROMPTS[r % 2]
                results[(k, r)] = (prompt, model.generate(prompt, max_new_tokens=16, temperature=0))
        except BaseException as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a generate() call never returned (deadlock?)"
    # One at a time per model (model.py): both threads get their own prompt's output, never a mix.
    assert not errors, errors
    assert len(results) == 6
    for (prompt, text) in results.values():
        assert text == greedy[prompt]


def test_stream_in_one_thread_generate_in_another(model, greedy):
    got: dict[str, str] = {}

    def other() -> None:
        got["other"] = model.generate(PROMPTS[1], max_new_tokens=16, temperature=0)

    pieces = []
    t = None
    for i, piece in enumerate(model.generate(PROMPTS[0], max_new_tokens=16, temperature=0, stream=True)):
        pieces.append(piece)
        if i == 1:
            t = threading.Thread(target=other)
            t.start()
            time.sleep(0.05)  # the other thread is now waiting for this stream to finish
    assert t is not None
    t.join(60)
    assert "".join(pieces) == greedy[PROMPTS[0]]
    assert got["other"] == greedy[PROMPTS[1]]


# ---- a Model is usable after an exception from each of its methods -----------------------------------------

BAD_CALLS = {
    "generate_tokens-bad-id": lambda m: m.generate_tokens([1, 5, 10**9], max_new_tokens=2),
    "generate_tokens-bad-top_k": lambda m: m.generate_tokens(PROMPT, top_k="many"),
    "generate_tokens-too-long": lambda m: m.generate_tokens(list(range(3, 200)), max_new_tokens=1),
    "generate-bad-temperature": lambda m: m.generate(PROMPT, temperature="hot"),
    "generate-bad-seed": lambda m: m.generate(PROMPT, seed="x"),
    "stream-bad-top_p": lambda m: list(m.generate(PROMPT, top_p=-1, stream=True)),
    "logits-empty": lambda m: m.logits([]),
    "logits-too-long": lambda m: m.logits(list(range(3, 200))),
    "tokenize-not-str": lambda m: m.tokenize(42),
    "chat-bad-messages": lambda m: m.chat([{"content": "no role"}]),
    "core-eval-out-of-range": lambda m: m._core.eval(np.array([1, -3], dtype=np.int32)),
    "core-truncate-past-end": lambda m: m._core.truncate(10**6),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_model_is_usable_after_an_error(model, greedy, name):
    with pytest.raises(lowbit.LowbitError) as e:
        BAD_CALLS[name](model)
    assert len(str(e.value)) > 15
    assert model.generate(PROMPT, max_new_tokens=16, temperature=0) == greedy[PROMPT]


def test_keyboard_interrupt_from_a_stream_consumer(model, greedy):
    def consume() -> None:
        for i, _ in enumerate(model.generate(PROMPT, max_new_tokens=16, temperature=0, stream=True)):
            if i == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        consume()
    # The cache holds only fully evaluated tokens, and the next call (any thread) can run.
    assert model.n_past == len(model.cached_tokens)
    assert model.generate(PROMPT, max_new_tokens=16, temperature=0) == greedy[PROMPT]
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("x", model.generate(PROMPT, max_new_tokens=16, temperature=0)))
    t.start()
    t.join(60)
    assert got["x"] == greedy[PROMPT]


def test_interrupted_stream_still_held_is_a_clear_error_until_closed(model, greedy):
    it = model.generate(PROMPT, max_new_tokens=16, temperature=0, stream=True)
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(it):
            if i == 2:
                raise KeyboardInterrupt
    # The iterator is still referenced, so it still owns the model: the same thread gets a clear error.
    with pytest.raises(lowbit.LowbitError, match="close"):
        model.generate(PROMPT, max_new_tokens=4)
    it.close()
    assert model.generate(PROMPT, max_new_tokens=16, temperature=0) == greedy[PROMPT]


def test_ctrl_c_during_generate(model, greedy):
    """A real KeyboardInterrupt delivered to the main thread in the middle of a long generation."""
    stop = threading.Event()

    def ctrl_c() -> None:  # Ctrl-C every 50 ms until the main thread has seen one (robust to scheduling)
        while not stop.wait(0.05):
            _thread.interrupt_main()

    # interrupt_main() does nothing while SIGINT is ignored, as it is under a runner started in the background.
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    presser = threading.Thread(target=ctrl_c, daemon=True)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                model.generate(PROMPT, max_new_tokens=100, temperature=0.8, seed=1)
    finally:
        stop.set()
        while True:  # a second press may have raced with the first: absorb it here, not in the asserts below
            try:
                presser.join()
                time.sleep(0.01)
                break
            except KeyboardInterrupt:
                continue
        signal.signal(signal.SIGINT, old_handler)
    assert model.n_past == len(model.cached_tokens)
    assert model.generate(PROMPT, max_new_tokens=16, temperature=0) == greedy[PROMPT]


# ---- a valid file whose tensor data sits at odd addresses (general.alignment 1) ---------------------------
@pytest.mark.parametrize("qtype", ["f32", "q8_0", "nf4"])
def test_model_with_alignment_1_runs_like_the_aligned_file(tmp_path, monkeypatch, qtype):
    """GGUF allows any power-of-two alignment; with 1, tensor data can start at an odd address. The loader
    copies such tensors to aligned storage (typed loads need it), so the logits equal the aligned file's."""
    from lowbit.converter import core
    from lowbit.gguf import GGUFWriter

    src = tiny_gguf("f32")
    aligned = lowbit.quantize_file(src, tmp_path / "aligned.gguf", qtype, progress=False)
    odd = None
    for pad in range(4):  # a metadata string of 0..3 bytes moves the data section to each residue mod 4
        def open_writer(path, pad=pad):
            w = GGUFWriter(path, alignment=1)
            w.add_metadata("test.pad", "x" * pad)
            return w

        monkeypatch.setattr(core, "_open_writer", open_writer)
        out = lowbit.quantize_file(src, tmp_path / f"odd{pad}.gguf", qtype, progress=False)
        with lowbit.GGUFFile(out) as f:
            if f.data_offset % 2 == 1 and any(t.offset % 4 for t in f.tensors):
                odd = out
                break
    assert odd is not None, "could not place tensor data at an odd address"
    ids = [1, 5, 9, 42, 7, 3, 100, 11]
    # Rows on both sides: the aligned file's matrices would otherwise be regrouped into load-time panels and the
    # odd file's aligned copies not, and on ISAs where panels and rows sum in another order (AVX2) the logits
    # then differ in the last bits for a reason that has nothing to do with alignment.
    monkeypatch.setenv("LOWBIT_REPACK", "0")
    ref = lowbit.load(aligned, n_threads=N_THREADS).logits(ids)
    m = lowbit.load(odd, n_threads=N_THREADS)
    np.testing.assert_array_equal(m.logits(ids), ref)
    assert m.generate(PROMPT, max_new_tokens=8, temperature=0) == \
        lowbit.load(aligned, n_threads=N_THREADS).generate(PROMPT, max_new_tokens=8, temperature=0)
