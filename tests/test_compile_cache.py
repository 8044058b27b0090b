"""accjax.compile_cache: a second process hits the persistent cache; the switch writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from accjax import compile_cache
from tests.train_helpers import REPO

# Compiles one small jitted function in a fresh process and prints jax's cache event counts.
PROBE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from jax import monitoring
    from accjax import compile_cache

    counts = {}
    monitoring.register_event_listener(
        lambda name, **kw: counts.__setitem__(name, counts.get(name, 0) + 1))
    off = len(sys.argv) > 1 and sys.argv[1] == "off"
    folder = compile_cache.enable(enabled=False) if off else compile_cache.enable()
    if not off:
        assert compile_cache.enable() == folder  # idempotent: same folder, no error

    @jax.jit
    def f(x):
        return jnp.tanh(x @ x.T).sum(0) * 3.0 + 1.0

    f(jnp.ones((8, 8))).block_until_ready()
    if len(sys.argv) > 1 and sys.argv[1] == "on-off":  # switched off later in the process
        assert compile_cache.enable(enabled=False) is None and compile_cache.active() is None

        def g(x):
            return jnp.cos(x) * 5.0

        jax.jit(g)(jnp.ones((3,))).block_until_ready()
    print(json.dumps({"folder": str(folder) if folder else None,
                      "hits": counts.get("/jax/compilation_cache/cache_hits", 0),
                      "misses": counts.get("/jax/compilation_cache/cache_misses", 0)}))
""")


def _probe(cache_root, *args, env_extra=None):
    env = dict(os.environ, ACCJAX_CACHE=str(cache_root), JAX_PLATFORMS="cpu")
    env.pop(compile_cache.ENV_SWITCH, None)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_second_process_hits_the_cache(tmp_path):
    first = _probe(tmp_path)
    assert first["folder"].startswith(str(tmp_path / "xla"))
    assert first["hits"] == 0 and first["misses"] >= 1
    written = _entries(tmp_path / "xla")
    assert written  # the CPU program was stored despite compiling in milliseconds
    second = _probe(tmp_path)
    assert second["folder"] == first["folder"]
    assert second["hits"] >= 1 and second["misses"] == 0


def test_switched_off_writes_nothing(tmp_path):
    by_env = _probe(tmp_path / "env", env_extra={compile_cache.ENV_SWITCH: "0"})
    assert by_env["folder"] is None and by_env["hits"] == 0
    by_arg = _probe(tmp_path / "arg", "off")
    assert by_arg["folder"] is None and by_arg["hits"] == 0
    for root in (tmp_path / "env", tmp_path / "arg"):
        assert not (root / "xla").exists() or not _entries(root / "xla")


def test_env_switch_values(monkeypatch):
    for value, on in (("0", False), ("off", False), ("False", False), ("1", True), ("", True)):
        monkeypatch.setenv(compile_cache.ENV_SWITCH, value)
        assert compile_cache.env_enabled() is on
    monkeypatch.delenv(compile_cache.ENV_SWITCH)
    assert compile_cache.env_enabled() is True


def test_enable_without_a_folder_keeps_the_one_set_up(tmp_path, shared_compile_cache):
    """A training run's ``enable()`` keeps the folder its caller chose (here the test
    session's); a folder given moves the cache there."""
    assert compile_cache.enable() == shared_compile_cache == compile_cache.active()
    other = compile_cache.enable(tmp_path / "other")
    assert other == (tmp_path / "other").resolve() != shared_compile_cache
    assert compile_cache.enable() == other == compile_cache.active()
    assert compile_cache.enable(enabled=False) is None and compile_cache.active() is None


def test_switching_off_in_process_stops_writing(tmp_path):
    res = _probe(tmp_path, "on-off")
    names = _entries(tmp_path / "xla")
    assert any(n.startswith("jit_f-") for n in names)  # written while on
    assert not any(n.startswith("jit_g-") for n in names)  # nothing once off
    assert res["misses"] >= 1


def test_second_run_of_a_training_config_compiles_nothing(tmp_path):
    """Two processes train the same tiny config (into two run folders) with the cache on: the
    second builds every program (train steps, evaluation, init) from the cache, no XLA
    backend compile, and it records when its first step finished."""
    from tests.train_helpers import finetune_cmd, sentiment_task, subprocess_env

    task = sentiment_task(tmp_path / "data", n_train=32, n_dev=16)
    summaries = []
    for name in ("first", "second"):
        run = tmp_path / name
        cmd = finetune_cmd("tiny,elastic", {"task": task, "run_dir": str(run), "progress": False,
                                           "max_examples": 0, "length_buckets": "(32,)", "max_length": 32,
                                           "elimination.levels": 2, "eval.speedups": "(1.0,)",
                                           "eval.select_mean": False})
        out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(1, ACCJAX_COMPILE_CACHE="1"),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "compiled 2 train programs" in out.stdout  # one length bucket x two levels, ahead
        summaries.append(json.loads((run / "summary.json").read_text()))
    first, second = summaries
    assert first["train_programs"] == second["train_programs"] == 2
    # every train program was built before the step bar started: its ETA never saw a compile
    assert first["train_programs_compiled_during_steps"] == 0 and first["compile_seconds"] > 0
    assert first["compilation"]["cache_hits"] + first["compilation"]["cache_misses"] >= 2
    assert second["compilation"]["cache_misses"] == 0, second["compilation"]  # no XLA compile
    assert second["compilation"]["cache_hits"] >= 2
    assert 0 < second["time_to_first_step"]


def test_programs_compile_with_the_backend_options(monkeypatch):
    """Every ProgramCache program is compiled with ``compiler_options()``: on GPUs XLA's Triton
    GEMMs off (unless ACCJAX_TRITON_GEMM=1), on the CPU nothing."""
    import jax

    from accjax import programs

    assert programs.compiler_options() == {}  # this machine: CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert programs.compiler_options() == {"xla_gpu_enable_triton_gemm": False}

    seen = []

    class Lowered:
        def compile(self, options=None):
            seen.append(options)
            return lambda: len(seen)

    cache = programs.ProgramCache()
    cache.get("a", Lowered)
    cache.compile_all([("b", Lowered), ("a", Lowered)])  # "a" exists: compiled once
    assert seen == [{"xla_gpu_enable_triton_gemm": False}] * 2
    # an inference program whose GEMMs have few rows on average keeps XLA's Triton GEMMs
    assert programs.compiler_options(rows=programs.TRITON_GEMM_MAX_ROWS) == {}
    assert programs.compiler_options(rows=128) == {"xla_gpu_enable_triton_gemm": False}
    # 64 rows: cuBLAS for a forward pass (its GELU in the epilogue), Triton for decoding steps
    assert programs.compiler_options(rows=64.0) == {"xla_gpu_enable_triton_gemm": False}
    assert programs.compiler_options(rows=programs.DecodingRows(64)) == {}
    assert programs.compiler_options(rows=programs.DecodingRows(128)) == {"xla_gpu_enable_triton_gemm": False}
    monkeypatch.setenv("ACCJAX_TRITON_GEMM", "1")
    assert programs.compiler_options() == {}


def test_a_predictor_gives_its_programs_average_gemm_rows(monkeypatch):
    """``inference.Predictor`` compiles each 16-bit program with its GEMMs' average rows
    (batch x length / analytic speedup), which ``compiler_options`` reads; float32 programs
    with none (they keep cuBLAS)."""
    from accjax import inference, models, programs
    from eval.bench import build

    # what each program would be compiled with; the lowered program stands in for the compiled one
    seen = []
    monkeypatch.setattr(programs, "compile_lowered", lambda low, rows=None: seen.append(rows) or low)
    for dtype in ("bfloat16", "float32"):
        cfg, params = build("bert-base-uncased", dtype, "auto", overrides=dict(
            num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=50))
        module = models.get_family(cfg.family).module(cfg, "sequence_classification")
        pred = inference.Predictor(module, params, cfg, batch_size=2, length_buckets=(16,), param_dtype=dtype)
        dense, fast = pred.plan(16, 1.0), pred.plan(16, 3.0)
        pred.program(2, dense)
        pred.program(2, fast)
    assert seen == [32.0, 32 / fast.analytic, None, None] and fast.analytic > 2


def test_a_generator_gives_its_programs_their_decoding_rows(monkeypatch):
    """``generate.Generator`` compiles a 16-bit generation program with its decoding steps' rows
    (the batch), so it keeps XLA's Triton GEMMs up to ``TRITON_GEMM_MAX_ROWS`` sequences; a
    program that decodes nothing past the prefill with the prefill's rows; float32: none."""
    import jax

    from accjax import generate, models, programs

    # what each program would be compiled with; the lowered program stands in for the compiled one
    seen = []
    monkeypatch.setattr(programs, "compile_lowered", lambda low, rows=None: seen.append(rows) or low)
    for dtype in ("bfloat16", "float32"):
        cfg = models.preset("gpt2", dtype=dtype, num_layers=2, hidden_size=32, num_heads=2,
                            intermediate_size=64, vocab_size=64, max_position_embeddings=64)
        module = models.get_family(cfg.family).module(cfg, "lm")
        gen = generate.Generator(module, models.init_params(cfg, "lm", 0), cfg, param_dtype=dtype)
        fast = gen.plan(16, 2.0)
        gen.program(2, gen.plan(16, 1.0), 5, True, 0, None, 0)
        gen.program(2, fast, 1, True, 0, None, 0)
    assert fast.analytic > 1.5
    assert seen == [2.0, 2 * 16 / fast.analytic, None, None]
    from accjax import seq2seq
    from accjax.models import t5 as t5_lib
    from eval.bench import TINY_T5

    seen.clear()
    for dtype in ("bfloat16", "float32"):  # a T5's generation programs: the same rule
        cfg = t5_lib.T5Config(**TINY_T5, dtype=dtype)
        pred = seq2seq.Seq2SeqPredictor(models.get_family("t5").module(cfg, "lm"), models.init_params(cfg, "lm", 0),
                                        cfg, batch_size=2, param_dtype=dtype)
        t5_fast = pred.plan(16, 2.0)
        pred.generate_program(2, pred.plan(16, 1.0), max_new_tokens=5)
        pred.generate_program(2, t5_fast, max_new_tokens=1)
    assert t5_fast.analytic > 1.5
    assert seen == [2.0, 2 * 16 / t5_fast.analytic, None, None]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert isinstance(generate.decoding_rows(64, fast, 33), programs.DecodingRows)
    assert programs.compiler_options(rows=generate.decoding_rows(64, fast, 33)) == {}  # XLA's Triton GEMMs
    assert programs.compiler_options(rows=generate.decoding_rows(128, fast, 33)) == {"xla_gpu_enable_triton_gemm": False}
