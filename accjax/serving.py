"""Serving exported programs with no accjax model code: ``load_exported(OUT_DIR)``.

``python -m accjax.export`` writes the folder (its docstring says what is inside); this
module reads it with nothing but jax, numpy, safetensors and tokenizers: no Flax module, no
``accjax.models``, ``convert``, ``evaluation`` or ``inference`` is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from accjax.hub import sha256_of
from accjax.programs import pad_rows

FORMAT = "accjax-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_FILE = "params.safetensors"
PROGRAMS_DIR = "programs"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class ExportError(ValueError):
    """User-facing export/load error: one line that says what to do."""


# ================================================================================ serving
class ExportedModel:
    """Exported programs + parameters + tokenizer; runs with no accjax model code.

    Attributes:
      manifest: the parsed ``manifest.json``.
      calls: (batch size, length, speedup) of every program run so far, in order.
    """

    def __init__(self, folder: Path, manifest: dict):
        import jax

        self.folder, self.manifest = folder, manifest
        self.input_names = tuple(i["name"] for i in manifest["inputs"])
        self.speedups = tuple(float(s) for s in manifest["speedups"])
        self.batch_sizes = tuple(sorted(int(b) for b in manifest["batch_sizes"]))
        self.lengths = tuple(sorted(int(t) for t in manifest["lengths"]))
        # (batch size, length, speedup) -> its program's entry (a manifest lacking one is refused)
        self.programs = {(p["batch_size"], p["length"], float(p["speedup"])):
                         {"schedule": tuple(p["schedule"]), "file": p["file"], "sha256": p["sha256"]}
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
        fn = self._loaded.get(p["file"])
        if fn is None:
            import jax
            from jax import export as jexport

            path = self.folder / p["file"]
            _verify(path, p["sha256"])
            fn = self._loaded[p["file"]] = jax.jit(jexport.deserialize(bytearray(path.read_bytes())).call)
        return fn

    def _speedup(self, speedup: float) -> float:
        for s in self.speedups:
            if abs(s - float(speedup)) <= 1e-9 * max(1.0, s):
                return s
        raise ExportError(f"speedup {speedup:g} was not exported; {self.folder} has "
                          f"{', '.join(f'{s:g}' for s in self.speedups)} (re-export with --speedups)")

    def length_for(self, n: int) -> int:
        if (t := next((t for t in self.lengths if n <= t), None)) is not None:
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
            args = [pad_rows(full[k][start:start + b], b, length, fill=int(k == "attention_mask"))
                    for k in self.input_names]
            if self.params is not None:
                args = [self.params] + args
            self.calls.append((b, length, s))
            outs.append(np.asarray(fn(*args))[: min(b, n - start)])
        return np.concatenate(outs)


def _verify(path: Path, sha256: str) -> None:
    if not path.exists():
        raise ExportError(f"{path} is missing; copy the whole exported folder")
    got = sha256_of(path)
    if got != sha256:
        raise ExportError(f"{path.name}: sha256 {got[:12]}... does not match the manifest's "
                          f"{sha256[:12]}...; the folder is damaged: copy or export it again")


def check_manifest(manifest: dict, folder: Path | str = "") -> None:
    """Refuses a manifest this accjax/jax cannot run, with one line that says what to do."""
    from jax import export as jexport
    import jax

    import accjax

    fmt, ver = manifest.get("format"), manifest.get("format_version")
    if fmt != FORMAT:
        raise ExportError(f"{folder}/{MANIFEST} is not an accjax export (format {fmt!r}); pass a "
                          "folder written by python -m accjax.export")
    if ver != FORMAT_VERSION:
        raise ExportError(
            f"{folder} was exported in format version {ver} (accjax {manifest.get('accjax_version')}); "
            f"this accjax {accjax.__version__} reads version {FORMAT_VERSION}: export the run again "
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


