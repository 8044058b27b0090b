r"""Serving without the model code: ``jax.export`` programs of a fine-tuned classifier.

    python -m accjax.export RUN_DIR OUT_DIR --speedups 1,2,4.8 --batch_sizes 1,32 --lengths 32,64
    python -m accjax.export RUN_DIR OUT_DIR ... --platforms cpu,cuda   # one program, both platforms

``accjax.serving.load_exported(OUT_DIR).predict(texts, speedup=4.8)`` runs them with only
jax, numpy, safetensors and tokenizers (README: "Serving exported programs"). OUT_DIR holds::

    manifest.json                 what is inside (below); read first, checked for compatibility
    params.safetensors            the parameters, once, flat ('bert/layer_0/qkv/kernel' keys)
    programs/b32_t64_x4.8.jaxexp  one serialized jax.export.Exported per (batch, length, schedule)
    tokenizer.json, vocab.txt...  the run's tokenizer files

Each program computes ``logits = f(params, input_ids, attention_mask[, token_type_ids])`` on
int32 [batch, length] inputs, with the keep-lengths of its speedup (``accjax.schedule``,
the run's bucket and floor, clamped to the length's maximum as ``eval.glue`` does) fixed in
it. Two speedups whose bucketed schedules coincide share one program file.

Parameters are an argument, not baked in (``--embed_params`` bakes them in, for comparison):
baked in, every program carries its own copy of every weight as a StableHLO constant, so the
folder, each program's read and deserialization, and resident memory grow with the number of
programs; as an argument the weights are read once and shared, and a program is only code
(figures: docs/benchmarks.md, "Exported programs"). ``manifest.json`` carries
``format_version``: a reader refuses another version, a jax that cannot read the programs'
serialization version and a machine of another platform, each in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from accjax.hub import sha256_of
from accjax.serving import (FORMAT, FORMAT_VERSION, INPUT_NAMES, MANIFEST, PARAMS_FILE, PLATFORMS,  # noqa: F401  (re-exported)
                            PROGRAMS_DIR, ExportedModel, ExportError, load_exported)

def _parse_platforms(text: str | Sequence[str]) -> tuple[str, ...]:
    out = []
    for item in text.split(",") if isinstance(text, str) else text:
        p = {"gpu": "cuda"}.get(str(item).strip().lower(), str(item).strip().lower())
        if p not in PLATFORMS:
            raise ExportError(f"platform {item.strip()!r} is unknown; choose from {','.join(PLATFORMS)}")
        out += [p] if p not in out else []
    if not out:
        raise ExportError("no platform given; write e.g. --platforms cpu or --platforms cpu,cuda")
    return tuple(out)


def check_paths(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """RUN_DIR must exist; OUT_DIR must be neither RUN_DIR, inside it nor above it, and empty
    unless ``overwrite`` (then it must hold an earlier export: nothing else is ever deleted)."""
    run, out = Path(run_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if not run.is_dir():
        raise ExportError(f"run folder {run_dir} does not exist; pass a folder written by train.finetune")
    if out == run or run in out.parents:
        raise ExportError(f"OUT_DIR {out_dir} is the run folder or inside it; the exporter never "
                          "writes into RUN_DIR: choose a folder outside it")
    if out in run.parents:
        raise ExportError(f"OUT_DIR {out_dir} contains the run folder {run_dir}; choose a folder "
                          "outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT_DIR {out_dir} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"OUT_DIR {out_dir} is not empty; pass --overwrite to replace an "
                          "earlier export, or choose an empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise ExportError(f"OUT_DIR {out_dir} holds files but no {MANIFEST}; --overwrite only "
                          "replaces an earlier export: choose an empty folder")
    return run, out


def _program_name(batch_size: int, length: int, speedup: float) -> str:
    return f"b{batch_size}_t{length}_x{speedup:g}.jaxexp"


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    speedups: Sequence[float] = (1.0,),
    batch_sizes: Sequence[int] = (1, 32),
    lengths: Sequence[int] | None = None,
    platforms: Sequence[str] = ("cpu",),
    embed_params: bool = False,
    overwrite: bool = False,
    log=None,
) -> dict:
    """Writes the programs, parameters, tokenizer and manifest (returned) of a classifier run
    folder (only read) to ``out_dir``: one program per batch size, length (default: the run's
    buckets) and speedup (clamped per length like ``eval.glue``), for every ``jax.export``
    platform in one; ``embed_params``: see the module docstring."""
    from accjax import evaluation

    run_path, out = check_paths(run_dir, out_dir, overwrite=overwrite)
    try:
        speedups = sorted({float(s) for s in speedups})
    except (TypeError, ValueError):
        speedups = [None]
    if not speedups or not all(s is not None and math.isfinite(s) and s >= 1 for s in speedups):
        raise ExportError("speedups must be finite numbers >= 1 (1 = the dense model)")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    platforms = _parse_platforms(platforms)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ExportError("batch sizes must be whole numbers >= 1")
    try:
        run = evaluation.RunModel.load(run_path)
    except evaluation.EvalError as e:
        raise ExportError(str(e)) from None
    cfg = run.loaded.config
    top = getattr(cfg, "max_position_embeddings", None) or max(run.buckets)
    lengths = sorted({int(t) for t in (lengths or run.buckets)})
    too_long = [t for t in lengths if t > top]
    if not lengths or min(lengths) < 1 or too_long:
        raise ExportError(f"--lengths {','.join(map(str, too_long or lengths))}: lengths must be "
                          f"between 1 and the model's maximum of {top} tokens")
    log = log or (lambda msg: None)

    import jax
    import jax.numpy as jnp
    import jaxlib
    from jax import export as jexport

    import accjax
    from accjax import convert, models
    from accjax import schedule as sched_lib

    host = jexport.default_export_platform()
    if tuple(platforms) != (host,):
        # Programs for another platform must not carry this host's fused kernels (cuDNN, Pallas
        # on GPU): plain XLA attention and ACC from the probabilities lower everywhere.
        cfg = dataclasses.replace(cfg, attention_impl="xla", acc_impl="probs")
    module = run.loaded.family.module(cfg, run.loaded.head)
    names = tuple(n for n in INPUT_NAMES if n in _family_inputs(run.loaded))
    flat = {k: np.asarray(v, np.float32) for k, v in convert.flatten(run.loaded.params).items()}

    def make_forward(schedule: tuple[int, ...], length: int):
        dense = all(k >= length for k in schedule)

        def forward(params_flat, *inputs):  # inputs: int32 [B, T] each, in ``names`` order
            batch = dict(zip(names, inputs))
            out = module.apply({"params": convert.unflatten(params_flat)}, **batch,
                               schedule=None if dense else schedule, acc_variant=run.acc_variant)
            return out.logits  # [B, C] float32

        if not embed_params:
            return forward
        consts = {k: jnp.asarray(v) for k, v in flat.items()}
        return lambda *inputs: forward(consts, *inputs)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside OUT_DIR and renamed into place: a failed export leaves no half folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (tmp / PROGRAMS_DIR).mkdir()
        params_entry: dict[str, Any] = {"embedded": embed_params}
        if not embed_params:
            from safetensors.numpy import save_file

            save_file(flat, str(tmp / PARAMS_FILE))
            params_entry.update(file=PARAMS_FILE, sha256=sha256_of(tmp / PARAMS_FILE),
                                tensors=len(flat), bytes=int(sum(v.nbytes for v in flat.values())))
        param_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
        programs, files, serialization = [], {}, None
        for t in lengths:
            for s in speedups:
                plan = sched_lib.plan(models.cost_model(cfg), t, s, bucket=run.bucket, floor=run.floor,
                                      prune_every=run.prune_every)  # the run's stride
                sch, analytic, clamped = plan.keep, plan.analytic, plan.clamped_from is not None
                for b in batch_sizes:
                    key = (b, t, sch)
                    if key not in files:  # speedups with one bucketed schedule share a program
                        spec = jax.ShapeDtypeStruct((b, t), jnp.int32)
                        args = ([] if embed_params else [param_specs]) + [spec] * len(names)
                        exp = jexport.export(jax.jit(make_forward(sch, t)), platforms=platforms)(*args)
                        serialization = exp.calling_convention_version
                        name = _program_name(b, t, s)
                        (tmp / PROGRAMS_DIR / name).write_bytes(exp.serialize())
                        files[key] = name
                        log(f"exported {name}: keep {','.join(map(str, sch))}")
                    path = tmp / PROGRAMS_DIR / files[key]
                    programs.append({
                        "file": f"{PROGRAMS_DIR}/{files[key]}", "sha256": sha256_of(path),
                        "bytes": path.stat().st_size, "batch_size": b, "length": t, "speedup": s,
                        "schedule": list(sch), "analytic_speedup": round(float(analytic), 4),
                        "clamped": bool(clamped)})
        convert.copy_tokenizer_files(run_path, tmp)
        tok_files = sorted(n for n in convert.TOKENIZER_FILES if (tmp / n).exists())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "accjax_version": accjax.__version__, "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__, "serialization_version": serialization,
            "platforms": list(platforms),
            "family": run.loaded.family.name, "head": run.loaded.head,
            "num_labels": int(getattr(cfg, "num_labels", 0)),
            "output": {"name": "logits", "dtype": "float32", "shape": ["batch", int(cfg.num_labels)]},
            "inputs": [{"name": n, "dtype": "int32", "shape": ["batch", "length"]} for n in names],
            "params": params_entry,
            "tokenizer": {"files": tok_files, "max_length": min(run.max_length, max(lengths)),
                          "pad_id": int(run.tokenizer.pad_id)},
            "acc_variant": run.acc_variant, "bucket": run.bucket, "floor": run.floor,
            "speedups": speedups, "batch_sizes": batch_sizes, "lengths": lengths,
            "programs": programs,
            "source_run": str(run_path), "source_task": run.task_spec,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)  # check_paths allowed only an earlier export here
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _family_inputs(loaded) -> tuple[str, ...]:
    """The inputs this family's modules take (GPT-2 has no token types)."""
    fam = loaded.family
    return tuple(fam.dummy_inputs(loaded.config, 1, 8)) if fam.dummy_inputs else ("input_ids",)


# ==================================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m accjax.export",
        description="Export a fine-tuned classifier run as jax.export programs (one per batch "
                    "size, length and speedup) that serve without accjax's model code.")
    ap.add_argument("run_dir", help="run folder written by train.finetune (only read)")
    ap.add_argument("out_dir", help="output folder (empty, outside RUN_DIR)")
    ap.add_argument("--speedups", default="1", help="comma-separated speedups >= 1 (default 1)")
    ap.add_argument("--batch_sizes", default="1,32", help="comma-separated batch sizes (default 1,32)")
    ap.add_argument("--lengths", default="", help="comma-separated padded lengths (default: the run's buckets)")
    ap.add_argument("--platforms", default="cpu", help="cpu (default), or e.g. cpu,cuda")
    ap.add_argument("--embed_params", action="store_true",
                    help="bake the parameters into every program (larger, slower to load)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    args = ap.parse_args(argv)
    try:
        from eval import cli

        speedups = cli.speedups(args.speedups, "--speedups")
        batch_sizes = cli.ints(args.batch_sizes, "--batch_sizes", low=1)
        lengths = cli.ints(args.lengths, "--lengths", low=1) if args.lengths.strip() else None
        platforms = _parse_platforms(args.platforms)
        check_paths(args.run_dir, args.out_dir, overwrite=args.overwrite)
        manifest = export_run(args.run_dir, args.out_dir, speedups=speedups, batch_sizes=batch_sizes,
                              lengths=lengths, platforms=platforms, embed_params=args.embed_params,
                              overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    except ValueError as e:  # ExportError, EvalError, cli.UsageError
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = {p["file"] for p in manifest["programs"]}
    print(f"wrote {len(files)} programs for {len(manifest['programs'])} (batch, length, speedup) "
          f"keys to {args.out_dir} ({', '.join(manifest['platforms'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
