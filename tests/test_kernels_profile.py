"""eval.profile's per-layer attribution of kernels, on a compiled eliminating BERT program."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from accjax import inference, models
from eval import profile as P
from eval.bench import build


def test_kernels_are_attributed_to_layers_and_parts():
    cfg, params = build("bert-base-uncased", "float32", "auto", overrides=dict(
        num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=50))
    module = models.get_family(cfg.family).module(cfg, "sequence_classification")
    pred = inference.Predictor(module, params, cfg, batch_size=2, length_buckets=(16,),
                               param_dtype="float32")
    scopes = P.hlo_scopes(pred.program(2, pred.plan(16, schedule=(8, 4))).as_text())
    by_part = {}
    for name, op in scopes.items():
        by_part.setdefault(P.layer_and_part(op), name)
    sel, gat = by_part[(1, "select")], by_part[(1, "gather")]
    assert (0, "select") in by_part and (None, "outside layers") in by_part
    # a fusion's kernel is named after its instruction with '.' -> '_'; a library GEMM and a
    # Pallas kernel carry no instruction name and take the next attributed kernel's layer
    events = [("nvjet_sm90_gemm", 0.005, "command_buffer_1"), (sel.replace(".", "_"), 0.001, ""),
              ("_attn_kernel__2", 0.003, ""), (gat.replace(".", "_"), 0.002, ""),
              ("mystery_kernel", 0.004, "")]
    table, repeated = P.per_layer(events * 2, scopes, iters=2)
    assert repeated == {}
    # per call: the GEMM (5 us) is a GEMM of layer 1; the first call's trailing unknown kernel
    # (4 us) takes the next call's first attributed kernel (select); the last has nothing after
    assert table["1"]["gemm"] == {"us": 5.0, "kernels": 1.0}
    assert table["1"]["select"] == {"us": 3.0, "kernels": 1.5}
    assert table["1"]["attention+acc"] == {"us": 3.0, "kernels": 1.0}
    assert table["1"]["gather"]["us"] == 2.0
    assert table["-"]["unattributed"] == {"us": 2.0, "kernels": 0.5}
    assert np.isclose(sum(c["us"] for layer in table.values() for c in layer.values()), 15.0)
    # the selection-and-gather kernel (kernels.keep_rows) is selection, not ACC's second pass
    table, _ = P.per_layer([("_keep_rows_kernel__3", 0.002, ""), (gat.replace(".", "_"), 0.001, "")], scopes,
                           iters=1)
    assert table["1"]["select"] == {"us": 2.0, "kernels": 1.0} and "acc" not in table["1"]
    # ... and so is its threshold search for large layers (a kernel of its own name)
    table, _ = P.per_layer([("_threshold_kernel__1", 0.004, ""), (gat.replace(".", "_"), 0.001, "")], scopes,
                           iters=1)
    assert table["1"]["select"] == {"us": 4.0, "kernels": 1.0} and "acc" not in table["1"]
    # a kernel XLA reuses for an identical fusion carries the first instance's name: where the
    # trace names the instruction that ran (no command buffer), that instruction decides
    s0, s1 = by_part[(0, "select")], by_part[(1, "select")]
    reused = [(s0.replace(".", "_"), 0.001, s1), (s0.replace(".", "_"), 0.001, "command_buffer_1")]
    table, repeated = P.per_layer(reused, scopes, iters=1)
    assert table["1"]["select"]["kernels"] == 1.0 and table["0"]["select"]["kernels"] == 1.0
    assert repeated == {}  # the name alone matched once a call
    # ... where it does not, a name matched twice a call is reported: layers merged into one
    table, repeated = P.per_layer([reused[1]] * 4, scopes, iters=2)
    assert repeated == {s0.replace(".", "_"): 2.0} and table["0"]["select"]["kernels"] == 2.0
    assert set(table) == {"0"}  # only layers in the table
    costs = P.layer_costs(cfg, 2, 16, (8, 4))
    assert [(c["rows_in"], c["rows_out"]) for c in costs] == [(16, 8), (8, 4)]
    assert costs[0]["gflop"] > costs[1]["gflop"] > 0


# eval.bench's --set flags for a 2-layer BERT (seconds on the CPU)
TINY_BERT = ["--set", "num_layers=2", "--set", "hidden_size=32", "--set", "num_heads=2",
             "--set", "intermediate_size=64", "--set", "vocab_size=50"]


def test_bench_interleaved_rounds_give_one_row_per_level(tmp_path, capsys):
    import json

    from eval import bench

    out = tmp_path / "b.json"
    tiny = TINY_BERT
    assert bench.main(["--shapes", "2x16", "--speedups", "2,99", "--iters", "2", "--interleave",
                       "--json", str(out), *tiny]) == 0
    rows = json.loads(out.read_text())["rows"]
    # 99 exceeds the maximum: it runs at the maximum (schedule.plan's one clamp rule)
    assert [r["speedup"] for r in rows] == [1.0, 2.0, 99.0] and rows[2]["schedule"] == [1, 1]
    assert rows[0]["measured"] == 1.0 and rows[0]["schedule"] == [16, 16] and rows[0]["bucket"] == 8
    assert rows[1]["schedule"][-1] < 16 and rows[1]["analytic"] > 1.0
    assert all(r["median_ms"] > 0 and r["pipelined_ms"] > 0 for r in rows)
    assert rows[0]["measured_pipelined"] == 1.0
    # the spread of the pipelined ratio over the interleaved rounds brackets the medians' ratio
    assert rows[0]["pipelined_over_analytic_range"] == [1.0, 1.0]
    for r in rows[1:]:
        lo, hi = r["pipelined_over_analytic_range"]
        assert lo <= r["pipelined_over_analytic"] * (1 + 1e-12) and r["pipelined_over_analytic"] <= hi * (1 + 1e-12)
    assert "(rounds)" in capsys.readouterr().out


def test_bench_times_the_same_programs_under_each_settle(tmp_path, monkeypatch, capsys):
    """--settle_ms 0,3: every level timed under each value (programs.SETTLE_MS set while its
    rounds run, 0 again after), its rows labelled; without --interleave a user error."""
    import json

    from accjax import programs
    from eval import bench

    seen, real = [], bench.time_interleaved
    monkeypatch.setattr(bench, "time_interleaved",
                        lambda *a, **k: seen.append(programs.SETTLE_MS) or real(*a, **k))
    # as on a GPU: nvidia-smi's power-capped counter read before and after (1.5 s apart)
    machine, counter = bench.benchmark.machine, iter([1e6, 2.5e6])
    monkeypatch.setattr(bench.benchmark, "machine", lambda: {**machine(), "backend": "gpu"})
    monkeypatch.setattr(bench.benchmark, "power_capped_us", lambda: next(counter))
    out = tmp_path / "b.json"
    tiny = TINY_BERT
    assert bench.main(["--shapes", "2x16", "--speedups", "2", "--iters", "2", "--interleave",
                       "--settle_ms", "0,3", "--json", str(out), *tiny]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert seen == [0, 3] and programs.SETTLE_MS == 0
    assert [(r["settle_ms"], r["speedup"]) for r in rows] == [(0, 1.0), (0, 2.0), (3, 1.0), (3, 2.0)]
    assert rows[0]["schedule"] == rows[2]["schedule"] and rows[2]["measured_pipelined"] == 1.0
    assert json.loads(out.read_text())["machine"]["power_capped_s"] == 1.5
    assert "software power cap for 1.5 s" in capsys.readouterr().out
    assert bench.main(["--shapes", "2x16", "--speedups", "2", "--settle_ms", "100", *tiny]) == 2
    err = capsys.readouterr().err
    assert "--settle_ms" in err and "--interleave" in err and "Traceback" not in err


def test_settle_auto_settles_rounds_on_a_gpu_only(monkeypatch, capsys):
    """--settle_ms's default ``auto``: cli.SETTLE_GPU_MS where JAX runs on a GPU and levels
    are timed in rounds; 0 on the CPU and for eval.bench without --interleave; numbers as given."""
    import jax

    from eval import bench, cli

    assert cli.settles("auto") == [0] and jax.default_backend() == "cpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert cli.SETTLE_GPU_MS > 0 and cli.settles("auto") == [cli.SETTLE_GPU_MS]
    assert cli.settles("auto", rounds=False) == [0] and cli.settles("0,7", many=True) == [0, 7]
    seen, real = [], bench.time_interleaved
    monkeypatch.setattr(bench, "time_interleaved", lambda *a, **k: seen.append(bench.programs.SETTLE_MS) or real(*a, **k))
    tiny = [*TINY_BERT, "--shapes", "2x16", "--speedups", "2", "--iters", "2"]
    assert bench.main(tiny) == 0 and seen == []  # one level after another: nothing to settle, no error
    assert bench.main([*tiny, "--interleave"]) == 0 and seen == [cli.SETTLE_GPU_MS]
    capsys.readouterr()


NVIDIA_SMI_PERFORMANCE = """
GPU 00000000:00:06.0
    Performance State                                  : P0
    Clocks Event Reasons
        Idle                                           : Active
        SW Power Cap                                   : Not Active
        HW Slowdown                                    : Not Active
    Clocks Event Reasons Counters
        SW Power Capping                               : 20468337 us
        Sync Boost                                     : 0 us
        SW Thermal Slowdown                            : 0 us
"""


def test_power_capped_time_is_read_from_nvidia_smi_counters(monkeypatch):
    """benchmark.power_capped_us: the "SW Power Capping" counter (not the "SW Power Cap"
    state line above it); None where nvidia-smi or the counter is missing."""
    from accjax import benchmark

    assert benchmark.power_capped_us(NVIDIA_SMI_PERFORMANCE) == 20468337.0
    assert benchmark.power_capped_us(NVIDIA_SMI_PERFORMANCE.split("    Clocks Event Reasons Counters")[0]) is None
    assert benchmark.power_capped_us("") is None

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(benchmark.subprocess, "run", missing)
    assert benchmark.power_capped_us() is None


def test_bench_json_keeps_the_shapes_timed_before_a_fault(tmp_path, monkeypatch):
    """--json is written after every shape, so a run cut short keeps the shapes it timed:
    here the second shape's timing fails and the first shape's rows are on disk."""
    import json

    from eval import bench

    real, shapes = bench.time_interleaved, []

    def second_fails(pred, b, n, plans, **kw):
        shapes.append((b, n))
        if len(shapes) == 2:
            raise KeyboardInterrupt  # as a timeout's signal would: not caught as a user error
        return real(pred, b, n, plans, **kw)

    monkeypatch.setattr(bench, "time_interleaved", second_fails)
    out = tmp_path / "b.json"
    tiny = TINY_BERT
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--shapes", "2x16,2x32", "--speedups", "2", "--iters", "2", "--interleave",
                    "--json", str(out), *tiny])
    rec = json.loads(out.read_text())
    assert shapes == [(2, 16), (2, 32)] and rec["partial"] is True
    assert [(r["shape"], r["speedup"]) for r in rec["rows"]] == [("2x16", 1.0), ("2x16", 2.0)]
    assert rec["machine"]["backend"] == "cpu" and not (tmp_path / "b.json.tmp").exists()


def test_settled_rounds_run_each_program_untimed_before_its_timed_calls(monkeypatch):
    """``programs.SETTLE_MS`` (``eval.bench --settle_ms``): before each timed round a program
    runs untimed for that long, right before its own timed calls (never another program's
    between); 0 runs exactly the warm-up and the timed calls."""
    import time

    from accjax import programs

    log = []

    def call(name):
        def run():
            log.append((name, time.perf_counter()))
            time.sleep(0.001)
            return np.zeros(1)
        return run

    calls = {"a": call("a"), "b": call("b")}
    for settle, depth in ((0.0, 1), (0.0, 3), (8.0, 1), (8.0, 3)):
        monkeypatch.setattr(programs, "SETTLE_MS", settle)
        log.clear()
        times = programs.time_interleaved(calls, rounds=2, warmup=1, depth=depth)
        assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
        runs = [(name, [t for _, t in group]) for name, group in itertools.groupby(log, key=lambda c: c[0])]
        if settle == 0:  # the warm-up round, then the timed calls: nothing else
            assert [(name, len(ts)) for name, ts in runs] == [("a", 1), ("b", 1)] + [("a", depth), ("b", depth)] * 2
        else:  # each timed block (its last `depth` calls) follows >= 8 ms of the same program's calls
            assert [name for name, _ in runs] == ["a", "b"] * 3
            for _, ts in runs[2:]:
                assert len(ts) > depth and (ts[-depth] - ts[0]) * 1e3 >= settle - 0.5, ts  # (0.5: the clock read before the first)


def test_profile_of_a_decoder_prefill_runs_the_kv_cache_program(tmp_path, monkeypatch):
    """--prefill profiles the program eval.lm --bench times (lm.LMEvaluator's prefill, which
    builds the pruned KV caches), not the classification program."""
    import json

    from accjax import lm

    built = []
    real = lm.LMEvaluator.prefill_program
    monkeypatch.setattr(lm.LMEvaluator, "prefill_program",
                        lambda self, sch: built.append(tuple(sch)) or real(self, sch))
    out = tmp_path / "p.json"
    tiny = ["--set", "num_layers=2", "--set", "hidden_size=32", "--set", "num_heads=2",
            "--set", "vocab_size=64"]
    assert P.main(["--model", "gpt2", "--shapes", "2x16", "--speedups", "1,2", "--iters", "2",
                   "--dtype", "float32", "--prefill", "--json", str(out), *tiny]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["speedup"] for r in rows] == [1.0, 2.0] and rows[0]["schedule"] == [16, 16]
    assert rows[1]["schedule"][-1] < 16 and rows[1]["analytic"] > 1.0
    assert [c["rows_in"] for c in rows[1]["layer_costs"]] == [16, rows[1]["schedule"][0]]
    assert built == [(16, 16), tuple(rows[1]["schedule"])]


def test_profile_json_keeps_the_programs_profiled_before_a_fault(tmp_path, monkeypatch):
    """--json is written after every program (atomically), so a run cut short keeps the rows it
    had: here the second level's profile fails and the first level's row is on disk."""
    import json

    real = P.profile_program
    calls = []

    def second_fails(pred, b, n, s, iters):
        calls.append(s)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(pred, b, n, s, iters)

    monkeypatch.setattr(P, "profile_program", second_fails)
    out = tmp_path / "p.json"
    tiny = ["--set", "num_layers=2", "--set", "hidden_size=32", "--set", "num_heads=2", "--set", "vocab_size=64"]
    with pytest.raises(RuntimeError, match="killed"):
        P.main(["--model", "bert-base-uncased", "--shapes", "2x16", "--speedups", "1,2", "--iters", "2",
                "--dtype", "float32", "--json", str(out), *tiny])
    rec = json.loads(out.read_text())
    assert [r["speedup"] for r in rec["results"]] == [1.0] and rec["machine"]["backend"] == "cpu"
    assert not (tmp_path / "p.json.tmp").exists()


def test_a_t5_decoder_layer_is_its_own_row():
    """T5's first-token program: the decoder step's layers are rows "dec0", "dec1", not the
    encoder layers of the same number."""
    import functools

    import jax
    import jax.numpy as jnp

    from accjax import seq2seq

    cfg, params = build("t5", "float32", "auto", t5=True, tiny=True)
    module = models.get_family(cfg.family).module(cfg, "lm")
    ids = jnp.full((2, 16), 5, jnp.int32)
    fn = functools.partial(seq2seq.first_token, module, schedule=(12, 8, 4))
    # the HLO as traced (op names are what the optimised module's instructions carry)
    hlo = jax.jit(fn).lower(params, ids, jnp.ones_like(ids)).compiler_ir("hlo").as_hlo_module()
    scopes = P.hlo_scopes(hlo.to_string())
    rows = {P.layer_and_part(op)[0] for op in scopes.values()}
    layers = range(cfg.num_layers)
    assert rows == {None, *layers, *(f"dec{i}" for i in range(cfg.num_decoder_layers))}, rows
    in_decoder_layers = [op for op in scopes.values() if "decoder" in op and "/layer_" in op]
    assert {P.layer_and_part(op)[0] for op in in_decoder_layers} == {f"dec{i}" for i in range(cfg.num_decoder_layers)}


def test_a_kernel_shared_by_identical_layers_is_split_between_them():
    """Two identical dense layers: their fusions pair up (kernel_groups, in schedule order),
    and a trace that names only the first instance's kernel, twice a call, puts one run in
    each layer instead of both in layer 0."""
    cfg, params = build("bert-base-uncased", "float32", "auto", overrides=dict(
        num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=50))
    module = models.get_family(cfg.family).module(cfg, "sequence_classification")
    pred = inference.Predictor(module, params, cfg, batch_size=2, length_buckets=(16,),
                               param_dtype="float32")
    text = pred.program(2, pred.plan(16, 1.0)).as_text()
    scopes, groups = P.hlo_scopes(text), P.kernel_groups(text)
    layers = {n: P.layer_and_part(scopes[n]) for n in groups if n in scopes}
    pairs = [g for g in groups.values() if [layers.get(n, (None,))[0] for n in g] == [0, 1]]
    assert pairs, "no fusion of layer 0 found its twin in layer 1"
    first, second = pairs[0]
    assert layers[first][1] == layers[second][1]  # the same part of each layer
    assert all(groups[n] == g for g in groups.values() for n in g)  # every member maps to its group
    events = [(first.replace(".", "_"), 0.002, "command_buffer_1")] * 2
    table, repeated = P.per_layer(events * 3, scopes, iters=3, groups=groups)
    part = layers[first][1]
    assert table["0"][part] == {"us": 2.0, "kernels": 1.0} and table["1"][part] == {"us": 2.0, "kernels": 1.0}
    assert repeated == {}
    table, repeated = P.per_layer(events * 3, scopes, iters=3)  # without the groups: merged, and said
    assert table["0"][part]["kernels"] == pytest.approx(2.0) and "1" not in table
    assert repeated == {first.replace(".", "_"): 2.0}
    # a third run a call has no fusion left: it lands in the first layer and is reported
    table, repeated = P.per_layer(events[:1] * 3, scopes, iters=1, groups=groups)
    assert table["0"][part]["kernels"] == 2.0 and repeated == {first.replace(".", "_"): 3.0}


def _pallas_line(n: int, fn: str, rows: int, op_name: str) -> str:
    """One Pallas custom call as XLA:GPU's optimised HLO prints it (ir shortened)."""
    return (f'  %pallas_call.{n} = bf16[{rows},768]{{1,0}} custom-call(%x.{n}, %p.{n}), '
            f'custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={{bf16[{rows},768]{{1,0}}, '
            f'bf16[768]{{0}}}}, api_version=API_VERSION_TYPED_FFI, metadata={{op_name="jit(f)/BertModel/encoder/'
            f'{op_name}/pallas_call" scheduling_name="pallas_call.{n}"}}, backend_config={{debug = false, '
            f'grid_x = {rows} : i32, grid_y = 1 : i32, ir = "ML\\EFR{fn}{rows}", name = "{fn}", num_warps = 4 : i32}}')


def test_a_pallas_kernel_shared_by_identical_layers_is_split_between_them():
    """XLA:GPU names a Pallas kernel after its function, one kernel for identical calls, and
    kernels of one function that differ f, f__1, ... in order of first appearance (as the
    GPT-2 and BERT-base traces on an H100 show). kernel_groups maps each such name to its
    calls, so the n-th run in a call lands in the n-th call's layer; the cuBLAS GEMMs between
    them take the next kernel's layer. Without the groups no Pallas run finds a layer."""
    lines = ["ENTRY %main.1 (x.1: bf16[1024,768]) -> bf16[512,768] {",
             _pallas_line(1, "_ln_kernel", 1024, "layer_0/attn_norm"),    # its own kernel
             _pallas_line(2, "_ln_kernel", 512, "layer_0/mlp_norm"),      # _ln_kernel__1 ...
             _pallas_line(3, "_attn_kernel", 512, "layer_1/attention_acc"),
             _pallas_line(4, "_ln_kernel", 512, "layer_1/attn_norm"),     # ... the same kernel
             _pallas_line(5, "_ln_kernel", 512, "layer_1/mlp_norm"),      # ... and again
             "}"]
    text = "\n".join(lines)
    scopes, groups = P.hlo_scopes(text), P.kernel_groups(text)
    assert groups["_ln_kernel"] == ["pallas_call.1"]
    assert groups["_ln_kernel__1"] == ["pallas_call.2", "pallas_call.4", "pallas_call.5"]
    assert groups["_attn_kernel"] == ["pallas_call.3"] and "_attn_kernel__1" not in groups
    gemm = "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT"
    call = [("_ln_kernel", 0.001, ""), (gemm, 0.004, ""), ("_ln_kernel__1", 0.002, ""),
            ("_attn_kernel", 0.003, ""), (gemm, 0.005, ""), ("_ln_kernel__1", 0.002, ""),
            (gemm, 0.006, ""), ("_ln_kernel__1", 0.002, "")]
    table, repeated = P.per_layer(call * 2, scopes, iters=2, groups=groups)
    assert table["0"]["out+ln"] == {"us": 1.0, "kernels": 1.0}
    assert table["0"]["ffn+ln"] == {"us": 2.0, "kernels": 1.0}
    assert table["0"]["gemm"] == {"us": 4.0, "kernels": 1.0}  # before layer 0's second norm
    assert table["1"]["attention+acc"] == {"us": 3.0, "kernels": 1.0}
    assert table["1"]["out+ln"] == {"us": 2.0, "kernels": 1.0} and table["1"]["ffn+ln"] == {"us": 2.0, "kernels": 1.0}
    assert table["1"]["gemm"] == {"us": 11.0, "kernels": 2.0}
    assert repeated == {}
    table, _ = P.per_layer(call * 2, scopes, iters=2)  # without the groups: no layer for them
    assert "1" not in table and "0" not in table


def test_layer_table_prints_layers_in_order_and_the_repeat_warning(capsys):
    """print_layers: one row per layer (encoder layers by number, then decoder rows, then
    outside), each summing its parts; the repeated kernels as a warning line, not a row."""
    cell = lambda us, n: {"us": us, "kernels": n}  # noqa: E731
    r = {"per_layer": {"-": {"other": cell(1.0, 1)}, "dec0": {"gemm": cell(4.0, 2)},
                       "10": {"gemm": cell(2.0, 1)}, "2": {"gemm": cell(3.0, 1), "select": cell(1.5, 1)}},
         "repeated_kernels": {"fusion_7": 12.0, "fusion_9": 24.0}}
    P.print_layers(r)
    lines = capsys.readouterr().out.splitlines()
    rows = [ln.split()[0] for ln in lines[1:-1] if ln.strip() and ln.split()[0] in ("2", "10", "dec0", "-")]
    assert rows == ["2", "10", "dec0", "-"]
    row2 = next(ln for ln in lines if ln.split()[0] == "2").split()
    assert row2[1:3] == ["4", "2.0"]  # 4.5 us rounded, 2 kernels
    assert "2 kernel(s) ran more times a call" in lines[-1] and "(36 launches)" in lines[-1]
    P.print_layers({"per_layer": r["per_layer"]})
    assert "more times a call" not in capsys.readouterr().out


def test_call_gaps_puts_each_idle_time_before_its_kernel():
    # two calls of a (1 us), b (1 us, 2 us after a ends), c (0.5 us, 0.25 us after b ends);
    # the second call starts 3 us after the first call's c ends
    us = 1000  # ns
    call = [(0, "a", 0.001, "op_a"), (3 * us, "b", 0.001, "op_b"), (4.25 * us, "c", 0.0005, "op_c")]
    start2 = 4.75 * us + 3 * us
    events = call + [(t + start2, n, ms, op) for t, n, ms, op in call]
    g = P.call_gaps(events, iters=2, top=2)
    assert g["boundary_gap_us"] == pytest.approx(3.0)
    assert g["gaps_in_call_us"] == pytest.approx(2.25)
    assert g["by_size"]["2-5"] == {"count": 1, "us": pytest.approx(2.0)}
    assert g["by_size"]["0-0.5"] == {"count": 1, "us": pytest.approx(0.25)}
    assert g["by_size"]["1-2"]["count"] == 0 and g["overlap_us"] == 0.0
    assert g["span_us"] == pytest.approx((start2 + 4.75 * us) / us / 2)
    first, second = g["largest"]
    assert (first["pos"], first["before"], first["kernel"], first["op_before"]) == (0, "(previous call)", "a", "")
    assert (second["pos"], second["before"], second["kernel"], second["op"]) == (1, "a", "b", "op_b")
    assert second["gap_us"] == pytest.approx(2.0) and second["kernel_us"] == pytest.approx(1.0)
    # a kernel that overlaps the previous one (another stream) counts as overlap, not idle time
    late = [(t, n, ms, op) if n != "c" else (2.5 * us + (t - 4.25 * us), n, ms, op) for t, n, ms, op in events]
    assert P.call_gaps(late, iters=2)["overlap_us"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="not one sequence a call"):
        P.call_gaps(events[:-1], iters=2)
