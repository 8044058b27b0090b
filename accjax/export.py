r"""Serving without the model code: ``jax.export`` programs of a fine-tuned classifier.

Export (needs accjax's model code, once)::

    python -m accjax.export RUN_DIR OUT_DIR --speedups 1,2,4.8 --batch_sizes 1,32 --lengths 32,64
    python -m accjax.export RUN_DIR OUT_DIR ... --platforms cpu,cuda   # one program, both platforms

Serve (needs only jax, numpy, safetensors and tokenizers; no Flax module is built)::

    from accjax.export import load_exported
    model = load_exported(OUT_DIR)
    logits = model.predict(["a gripping film", "dull"], speedup=4.8)    # [2, C] numpy
    logits = model.predict({"input_ids": ids, "attention_mask": mask}, speedup=1)

OUT_DIR holds::

    manifest.json                 what is inside (below); read first, checked for compatibility
    params.safetensors            the parameters, once, flat ('bert/layer_0/qkv/kernel' keys)
    programs/b32_t64_x4.8.jaxexp  one serialized jax.export.Exported per (batch, length, schedule)
    tokenizer.json, vocab.txt...  the run's tokenizer files

Each program computes ``logits = f(params, input_ids, attention_mask[, token_type_ids])`` on
int32 [batch, length] inputs, with the keep-lengths of its speedup (``accjax.schedule``,
the run's bucket and floor, clamped to the length's maximum as ``eval.glue`` does) fixed in
it. Two speedups whose bucketed schedules coincide share one program file.

``predict`` pads inputs to the smallest exported length that holds their longest example,
and runs them in chunks of the largest exported batch size; the rest goes to the smallest
exported batch size that holds it, padded with one-token filler rows (dropped from the output).
Rows never interact, so padding and chunking do not change any example's logits.

Parameters as an argument, not baked in (``--embed_params`` bakes them in, for comparison).
Measured on this project's 2-core CPU machine (shared, load average 8-12: wall times are
noisy, CPU seconds less so), MiniLM-L6 shapes with random weights (22.7 M params, 91 MB fp32),
speedups 1,2,4.8 x batch sizes 1,32 x lengths 32,64 = 12 programs, jax 0.10.2, no compile cache:

    params                            argument (default)      baked in (--embed_params)
    OUT_DIR size                      92 MB                   1091 MB
    export (wall)                     13 s                    46 s
    open (manifest + params)          0.35 s                  0.02 s
    read + check + deserialize        0.004-0.04 s            0.42-0.55 s       per program
    first call (compile), CPU         3.4-3.7 s               4.0-4.4 s         per program
    all 12 programs ready: wall, CPU  65 s, 28 s              100 s, 44 s
    peak memory, all 12 loaded        0.7 GB                  3.3 GB
    one call, 32 x 64 at 4.8x         290-420 ms              250-345 ms        (same, noise)

Baked in, every program carries its own copy of every weight as a StableHLO constant: the
folder grows with the number of programs, each program costs a 91 MB read, hash and
deserialization, and each loaded module and compiled executable holds its own copy of the
weights (3.3 GB resident for 12 programs).
As an argument the weights are read once (safetensors) and shared by every program; a
program is 60-90 KB of code. Run time is the same within this machine's noise. With ``accjax.compile_cache.enable()`` a second
process's first call drops from 9-10 s to 1.3 s (wall; the compiled program comes from disk).

Compatibility: ``manifest.json`` carries ``format_version``; a reader refuses another version,
a jax that cannot deserialize the programs' serialization version, and a machine whose
platform the programs were not exported for, each with one line that says what to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

FORMAT = "accjax-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_FILE = "params.safetensors"
PROGRAMS_DIR = "programs"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
_SEP = "/"  # flat parameter keys: 'bert/layer_0/qkv/kernel'


class ExportError(ValueError):
    """User-facing export/load error: one line that says what to do."""


# =============================================================================== exporting
def _parse_ints(text: str, what: str) -> list[int]:
    out = []
    for item in str(text).split(","):
        s = item.strip()
        try:
            v = int(s)
        except ValueError:
            raise ExportError(f"--{what} {s!r} is not a whole number; write e.g. --{what} 1,32") from None
        if v < 1:
            raise ExportError(f"--{what} {v} must be at least 1")
        out.append(v)
    return sorted(set(out))


def _parse_platforms(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        p = str(item).strip().lower()
        if p == "gpu":
            p = "cuda"
        if p not in PLATFORMS:
            raise ExportError(f"platform {item.strip()!r} is unknown; choose from {','.join(PLATFORMS)}")
        if p not in out:
            out.append(p)
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
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"OUT_DIR {out_dir} is not empty; pass --overwrite to replace an "
                              "earlier export, or choose an empty folder")
        if not (out / MANIFEST).exists():
            raise ExportError(f"OUT_DIR {out_dir} holds files but no {MANIFEST}; --overwrite only "
                              "replaces an earlier export: choose an empty folder")
    return run, out


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + _SEP))
        else:
            flat[key] = np.ascontiguousarray(np.asarray(v))
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split(_SEP)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    """Writes the programs, parameters, tokenizer and manifest of a run folder to ``out_dir``.

    Args:
      run_dir: a classifier run folder (``accjax.evaluation.RunModel.load``); only read.
      speedups: speedups to export (>= 1; 1 = dense); clamped per length like ``eval.glue``.
      batch_sizes, lengths: program shapes; lengths default to the run's length buckets.
      platforms: ``jax.export`` platforms; more than one gives one multi-platform program.
      embed_params: bake the parameters into every program as constants (see the docstring).

    Returns:
      the manifest (also written as ``manifest.json``).
    """
    from accjax import evaluation

    run_path, out = check_paths(run_dir, out_dir, overwrite=overwrite)
    try:
        speedups = sorted(set(evaluation.parse_speedups(list(speedups))))
    except evaluation.EvalError as e:
        raise ExportError(str(e)) from None
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
    from jax import export as jexport

    import accjax
    from accjax import convert

    host = jexport.default_export_platform()
    if tuple(platforms) != (host,):
        # Programs for another platform must not carry this host's fused kernels (cuDNN, Pallas
        # on GPU): plain XLA attention and ACC from the probabilities lower everywhere.
        cfg = dataclasses.replace(cfg, attention_impl="xla", acc_impl="probs")
    module = run.loaded.family.module(cfg, run.loaded.head)
    names = tuple(n for n in INPUT_NAMES if n in _family_inputs(run.loaded))
    flat = {k: np.asarray(v, np.float32) for k, v in _flatten(run.loaded.params).items()}

    def make_forward(schedule: tuple[int, ...], length: int):
        dense = all(k >= length for k in schedule)

        def forward(params_flat, *inputs):  # inputs: int32 [B, T] each, in ``names`` order
            batch = dict(zip(names, inputs))
            out = module.apply({"params": _unflatten(params_flat)}, **batch,
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
            params_entry.update(file=PARAMS_FILE, sha256=_sha256(tmp / PARAMS_FILE),
                                tensors=len(flat), bytes=int(sum(v.nbytes for v in flat.values())))
        param_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
        programs, files = [], {}
        serialization = None
        for t in lengths:
            for s in speedups:
                sch, analytic, clamped = evaluation._schedule(cfg, t, s, run.bucket, run.floor)
                sch = tuple(int(k) for k in sch)
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
                        "file": f"{PROGRAMS_DIR}/{files[key]}", "sha256": _sha256(path),
                        "bytes": path.stat().st_size, "batch_size": b, "length": t, "speedup": s,
                        "schedule": list(sch), "analytic_speedup": round(float(analytic), 4),
                        "clamped": bool(clamped)})
        convert.copy_tokenizer_files(run_path, tmp)
        tok_files = sorted(n for n in convert.TOKENIZER_FILES if (tmp / n).exists())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "accjax_version": accjax.__version__, "jax_version": jax.__version__,
            "jaxlib_version": _jaxlib_version(), "serialization_version": serialization,
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


def _jaxlib_version() -> str:
    import jaxlib

    return jaxlib.__version__


# ================================================================================ serving
@dataclasses.dataclass(frozen=True)
class Program:
    batch_size: int
    length: int
    speedup: float
    schedule: tuple[int, ...]
    file: str
    sha256: str


class ExportedModel:
    """Exported programs + parameters + tokenizer; runs with no accjax model code.

    Attributes:
      manifest: the parsed ``manifest.json``.
      calls: (batch size, length, speedup) of every program run so far, in order.
    """

    def __init__(self, folder: Path, manifest: dict):
        import jax

        self.folder = folder
        self.manifest = manifest
        self.input_names = tuple(i["name"] for i in manifest["inputs"])
        self.speedups = tuple(float(s) for s in manifest["speedups"])
        self.batch_sizes = tuple(sorted(int(b) for b in manifest["batch_sizes"]))
        self.lengths = tuple(sorted(int(t) for t in manifest["lengths"]))
        self.programs = {(p["batch_size"], p["length"], float(p["speedup"])):
                         Program(p["batch_size"], p["length"], float(p["speedup"]),
                                 tuple(p["schedule"]), p["file"], p["sha256"])
                         for p in manifest["programs"]}
        self._loaded: dict[str, Any] = {}  # file -> jitted call of its Exported
        self.calls: list[tuple[int, int, float]] = []
        pe = manifest["params"]
        self.params = None
        if not pe["embedded"]:
            from safetensors.numpy import load_file

            path = folder / pe["file"]
            _verify(path, pe["sha256"])
            self.params = jax.device_put(load_file(str(path)))
        self._tokenizer = None

    # ----------------------------------------------------------------------- programs
    def program(self, batch_size: int, length: int, speedup: float):
        """The deserialized program for this key, as a jitted callable (loaded once)."""
        p = self.programs[(batch_size, length, speedup)]
        fn = self._loaded.get(p.file)
        if fn is None:
            import jax
            from jax import export as jexport

            path = self.folder / p.file
            _verify(path, p.sha256)
            exp = jexport.deserialize(bytearray(path.read_bytes()))
            fn = self._loaded[p.file] = jax.jit(exp.call)
        return fn

    def _speedup(self, speedup: float) -> float:
        for s in self.speedups:
            if abs(s - float(speedup)) <= 1e-9 * max(1.0, s):
                return s
        raise ExportError(f"speedup {speedup:g} was not exported; {self.folder} has "
                          f"{', '.join(f'{s:g}' for s in self.speedups)} (re-export with --speedups)")

    def length_for(self, n: int) -> int:
        for t in self.lengths:
            if n <= t:
                return t
        raise ExportError(f"input of {n} tokens is longer than the largest exported length "
                          f"{self.lengths[-1]}; truncate it or re-export with a longer --lengths")

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """[(start, batch size)]: full chunks of the largest exported batch, then the rest in
        the smallest exported batch that holds it."""
        big = self.batch_sizes[-1]
        out = [(i, big) for i in range(0, n - n % big, big)]
        rest = n % big
        if rest:
            out.append((n - rest, next(b for b in self.batch_sizes if b >= rest)))
        return out

    # ------------------------------------------------------------------------ running
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from accjax.tokenization import Tokenizer

            tok = self.manifest["tokenizer"]
            self._tokenizer = Tokenizer.from_folder(self.folder, max_length=tok["max_length"])
        return self._tokenizer

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Texts -> an unpadded-width batch of int32 [n, longest] arrays (truncated to the
        manifest's max_length, as the run's data pipeline does)."""
        from accjax import tokenization

        enc = self.tokenizer.encode(texts, pairs, max_length=self.manifest["tokenizer"]["max_length"])
        longest = max(1, int(enc.lengths.max()))
        return tokenization.pad(enc, longest, self.manifest["tokenizer"]["pad_id"])

    def predict(self, inputs, speedup: float = 1.0, *, pairs: Sequence[str] | None = None) -> np.ndarray:
        """Logits for texts (str or list of str, optional ``pairs``) or a batch dict of [n, t]
        arrays (input_ids; attention_mask and token_type_ids optional) -> float32 [n, C]."""
        s = self._speedup(speedup)
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, Mapping):
            batch = inputs
        else:
            texts = list(inputs)
            if not texts or not all(isinstance(x, str) for x in texts):
                raise ExportError("predict takes a text, a non-empty list of texts, or a batch dict "
                                  "with input_ids")
            batch = self.encode(texts, pairs)
        if "input_ids" not in batch:
            raise ExportError("the batch has no input_ids")
        ids = np.asarray(batch["input_ids"])
        if ids.ndim != 2 or ids.shape[0] == 0:
            raise ExportError(f"input_ids must be a non-empty [n, t] array, got shape {ids.shape}")
        n, t = ids.shape
        full = {"input_ids": ids,
                "attention_mask": np.asarray(batch.get("attention_mask", np.ones_like(ids))),
                "token_type_ids": np.asarray(batch.get("token_type_ids", np.zeros_like(ids)))}
        mask = full["attention_mask"]
        length = self.length_for(int(mask.sum(1).max()))
        if t > length and mask[:, length:].any():  # only trailing all-padding columns may go
            raise ExportError(f"the attention mask has tokens after column {length}; right-pad inputs")
        outs = []
        for start, b in self.chunks(n):
            fn = self.program(b, length, s)
            args = [_fit(full[k][start:start + b], b, length, filler=(k == "attention_mask"))
                    for k in self.input_names]
            if self.params is not None:
                args = [self.params] + args
            self.calls.append((b, length, s))
            outs.append(np.asarray(fn(*args))[: min(b, n - start)])
        return np.concatenate(outs)


def _fit(a: np.ndarray, rows: int, length: int, *, filler: bool) -> np.ndarray:
    """[b, t] -> int32 [rows, length]: right-padded / cropped to ``length``; rows beyond b are
    filler (a one-token mask row, so no example is all padding)."""
    out = np.zeros((rows, length), np.int32)
    b, t = a.shape
    t = min(t, length)
    out[:b, :t] = a[:, :t]
    if filler and b < rows:
        out[b:, 0] = 1
    return out


def _verify(path: Path, sha256: str) -> None:
    if not path.exists():
        raise ExportError(f"{path} is missing; copy the whole exported folder")
    got = _sha256(path)
    if got != sha256:
        raise ExportError(f"{path.name}: sha256 {got[:12]}... does not match the manifest's "
                          f"{sha256[:12]}...; the folder is damaged: copy or export it again")


def check_manifest(manifest: dict, folder: Path | str = "") -> None:
    """Refuses a manifest this accjax/jax cannot run, with one line that says what to do."""
    from jax import export as jexport
    import jax

    fmt, ver = manifest.get("format"), manifest.get("format_version")
    if fmt != FORMAT:
        raise ExportError(f"{folder}/{MANIFEST} is not an accjax export (format {fmt!r}); pass a "
                          "folder written by python -m accjax.export")
    if ver != FORMAT_VERSION:
        raise ExportError(
            f"{folder} was exported in format version {ver} (accjax {manifest.get('accjax_version')}); "
            f"this accjax {_accjax_version()} reads version {FORMAT_VERSION}: export the run again "
            "with this accjax (python -m accjax.export RUN_DIR OUT_DIR ...)")
    sv = manifest.get("serialization_version")
    lo = jexport.minimum_supported_calling_convention_version
    hi = jexport.maximum_supported_calling_convention_version
    if not isinstance(sv, int) or not lo <= sv <= hi:
        raise ExportError(
            f"{folder}'s programs use jax.export serialization version {sv} (jax "
            f"{manifest.get('jax_version')}); jax {jax.__version__} reads {lo}-{hi}: export "
            f"again with this jax, or install jax=={manifest.get('jax_version')}")
    here = jexport.default_export_platform()
    if here not in manifest.get("platforms", []):
        raise ExportError(
            f"{folder} was exported for {','.join(manifest.get('platforms', []))}, this machine "
            f"runs {here}: export again with --platforms {','.join(manifest.get('platforms', []) + [here])}")


def _accjax_version() -> str:
    import accjax

    return accjax.__version__


def load_exported(folder: str | os.PathLike) -> ExportedModel:
    """An exported folder -> ``ExportedModel``; refuses an incompatible manifest (ExportError)."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not path.exists():
        raise ExportError(f"{folder} has no {MANIFEST}; pass a folder written by python -m accjax.export")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e.msg}); export the run again") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path} is not an accjax manifest; export the run again")
    check_manifest(manifest, folder)
    try:
        return ExportedModel(folder, manifest)
    except KeyError as e:
        raise ExportError(f"{path} lacks the field {e.args[0]!r}; export the run again") from None


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
        from accjax import evaluation

        speedups = evaluation.parse_speedups(args.speedups)
        batch_sizes = _parse_ints(args.batch_sizes, "batch_sizes")
        lengths = _parse_ints(args.lengths, "lengths") if args.lengths.strip() else None
        platforms = _parse_platforms(args.platforms)
        check_paths(args.run_dir, args.out_dir, overwrite=args.overwrite)
        manifest = export_run(args.run_dir, args.out_dir, speedups=speedups, batch_sizes=batch_sizes,
                              lengths=lengths, platforms=platforms, embed_params=args.embed_params,
                              overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    except (ExportError, evaluation.EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = {p["file"] for p in manifest["programs"]}
    print(f"wrote {len(files)} programs for {len(manifest['programs'])} (batch, length, speedup) "
          f"keys to {args.out_dir} ({', '.join(manifest['platforms'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
