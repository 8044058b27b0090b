"""Hugging Face PyTorch checkpoints <-> accjax Flax parameters.

Conversion is data: each family gives a list of ``Rule`` s, one per Flax parameter, naming
the HF key(s) it comes from and a pair of exact transforms (transposes, reshapes, stacks
only), so HF -> accjax -> HF reproduces every tensor bit for bit. Expected HF shapes are
derived by running each rule's reverse transform on the Flax shape, so a mis-shaped key is
reported in HF terms.

Loading checks every key: missing, unexpected and mis-shaped keys are collected and raised
together in one ``CheckpointError`` naming each of them. Known buffers and the heads of other
tasks (e.g. BERT's pre-training ``cls.*``) are ignored and listed in the report. A task head
that the checkpoint does not carry at all (a classifier on a base checkpoint) is freshly
initialised, as HF does, and listed as such; a head that is only partly there is an error.

Weights: ``model.safetensors`` (also sharded with an index) first; ``pytorch_model.bin`` only
through ``torch.load(weights_only=True)``; a folder (or file) with one ``*.gguf`` and no
config.json is read through ``accjax.gguf_io`` (dequantised, renamed to HF keys).

CLI (SRC: an HF folder, hub id, built-in name or accjax folder)::

    python -m accjax.convert SRC OUT [--head sequence_classification] [--num_labels 2]
    python -m accjax.convert SRC OUT --to-hf        # an accjax folder back to an HF folder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from accjax import guards
from accjax import models as models_lib

ACCJAX_META = "accjax.json"
ACCJAX_PARAMS = "params.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "spiece.model", "added_tokens.json",
)


CheckpointError = guards.CheckpointError  # (defined there: the GGUF reader raises it too)


# ----------------------------------------------------------------------------- transforms
@dataclasses.dataclass(frozen=True)
class Rule:
    """One Flax parameter and the HF tensor(s) it is made of.

    Attributes:
      path: Flax parameter path, e.g. ('layer_0', 'qkv', 'kernel').
      hf: HF keys (relative to the base-model prefix unless ``head``), in the order the
        transforms take and return them.
      to_flax: (hf arrays..., flax_shape) -> flax array.
      to_hf: flax array -> tuple of hf arrays.
      head: belongs to a head (pooler, classifier); initialised fresh when the checkpoint
        has none of that head's keys.
      top: the HF key sits outside the base-model prefix (``classifier.weight``, not
        ``bert.classifier.weight``).
    """

    path: tuple[str, ...]
    hf: tuple[str, ...]
    to_flax: Callable[..., np.ndarray]
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    head: bool = False
    top: bool = False


def copy(path, hf_key, head=False, top=False) -> Rule:
    """Same tensor on both sides (embedding tables, LayerNorm scales, biases)."""
    return Rule(tuple(path), (hf_key,), lambda x, shape: x.reshape(shape), lambda y: (y,), head, top)


def bias(path, hf_key, head=False, top=False) -> Rule:
    """HF [out] <-> Flax bias of shape ``out`` split over axes, e.g. [3, N, H]."""
    return Rule(tuple(path), (hf_key,), lambda x, shape: x.reshape(shape), lambda y: (y.reshape(-1),), head, top)


def linear(path, hf_key, in_axes: int = 1, head=False, top=False) -> Rule:
    """HF ``nn.Linear`` weight [out, in] <-> Flax kernel [in..., out...].

    ``in_axes`` is how many leading Flax axes make up the input dimension (2 for the
    attention output kernel [N, H, D]).
    """
    return Rule(tuple(path), (hf_key,), lambda w, shape: np.ascontiguousarray(w.T).reshape(shape),
                lambda k: (np.ascontiguousarray(k.reshape(math.prod(k.shape[:in_axes]), -1).T),), head, top)


def conv1d(path, hf_key, in_axes: int = 1, head=False, top=False) -> Rule:
    """HF GPT-2 ``Conv1D`` weight, stored [in, out] (already Flax order) <-> Flax kernel."""
    return Rule(tuple(path), (hf_key,), lambda w, shape: w.reshape(shape),
                lambda k: (np.ascontiguousarray(k.reshape(math.prod(k.shape[:in_axes]), -1)),), head, top)


def norm(path, hf_prefix, bias=True) -> list[Rule]:
    """A norm's scale (and bias) <-> HF ``{hf_prefix}.weight`` (and ``.bias``)."""
    return [copy(tuple(path) + ("scale",), f"{hf_prefix}.weight")] + (
        [copy(tuple(path) + ("bias",), f"{hf_prefix}.bias")] if bias else [])


def with_bias(rule: Callable[..., Rule], path, hf_prefix, **kw) -> list[Rule]:
    """``rule`` (linear / conv1d) for the kernel <-> ``{hf_prefix}.weight``, plus its bias."""
    head = {k: v for k, v in kw.items() if k in ("head", "top")}
    return [rule(tuple(path) + ("kernel",), f"{hf_prefix}.weight", **kw),
            bias(tuple(path) + ("bias",), f"{hf_prefix}.bias", **head)]


def stacked_linear(path, hf_keys, axis: int = 1, head=False, top=False) -> Rule:
    """Several HF Linear weights [out, in] stacked into one Flax kernel along ``axis``.

    BERT's query/key/value [D, D] each -> fused kernel [D, 3, N, H] (axis=1): one GEMM.
    """
    def to_flax(*ws_and_shape):
        *ws, shape = ws_and_shape
        part = shape[:axis] + shape[axis + 1:]
        return np.stack([np.ascontiguousarray(w.T).reshape(part) for w in ws], axis=axis)

    def to_hf(k):
        n_in = math.prod(k.shape[:axis])
        return tuple(np.ascontiguousarray(np.take(k, j, axis=axis).reshape(n_in, -1).T)
                     for j in range(k.shape[axis]))

    return Rule(tuple(path), tuple(hf_keys), to_flax, to_hf, head, top)


def stacked_bias(path, hf_keys, axis: int = 0, head=False, top=False) -> Rule:
    """Several HF biases [out] stacked into one Flax bias, e.g. 3 x [D] -> [3, N, H]."""
    def to_flax(*bs_and_shape):
        *bs, shape = bs_and_shape
        part = shape[:axis] + shape[axis + 1:]
        return np.stack([b.reshape(part) for b in bs], axis=axis)

    def to_hf(b):
        return tuple(np.take(b, j, axis=axis).reshape(-1) for j in range(b.shape[axis]))

    return Rule(tuple(path), tuple(hf_keys), to_flax, to_hf, head, top)


# ------------------------------------------------------------------------------ reading
def read_state_dict(folder: str | Path) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint folder as numpy arrays (the module docstring says which
    files are read)."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    pt = folder / "pytorch_model.bin"
    if single.exists():
        return _read_safetensors(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in _read_safetensors(folder / s).items()}
    if pt.exists():
        return _read_torch_bin(pt)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json "
        f"or pytorch_model.bin; the folder holds {present}"
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
            "download or convert it again"
        ) from None
    except TypeError:
        # numpy has no bfloat16: read through the flax framework and upcast.
        with safe_open(str(path), framework="flax") as f:
            return {k: np.asarray(t.astype("float32") if (t := f.get_tensor(k)).dtype.name == "bfloat16" else t)
                    for k in f.keys()}


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install 'accjax[torch]'), "
            "or convert it to model.safetensors first"
        ) from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip archives, disallowed globals
        raise CheckpointError(f"{path} could not be read with torch.load(weights_only=True): {e}") from None
    return {k: _to_numpy(v) for k, v in sd.items()}


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def max_positions(folder: str | Path) -> int | None:
    """The longest sequence a model folder allows, from its config alone (no weights read):
    accjax.json, config.json or a GGUF file's metadata."""
    from accjax import gguf_io

    folder = Path(folder)
    if (folder / ACCJAX_META).exists():
        d = read_meta(folder).get("config") or {}
    elif (g := None if (folder / "config.json").exists() else gguf_io.find(folder)) is not None:
        d = gguf_io.hf_config(gguf_io.metadata(g), g)
    else:
        d = read_hf_config(folder)
    return d.get("max_position_embeddings") or d.get("n_positions")


# --------------------------------------------------------------------------- conversion
@dataclasses.dataclass
class LoadReport:
    ignored: list[str] = dataclasses.field(default_factory=list)  # buffers, other tasks' heads
    initialized: list[str] = dataclasses.field(default_factory=list)  # fresh head params


def _flax_shapes(family: models_lib.Family, config, head: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    import flax.linen as nn
    import jax

    params = nn.meta.unbox(models_lib.abstract_variables(config, head)["params"])
    return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in
            jax.tree_util.tree_flatten_with_path(params)[0]}


def _normalise_keys(family: models_lib.Family, sd: Mapping[str, Any]):
    """Strips the base-model prefix ('bert.'), drops ignorable keys. Returns (sd, ignored)."""
    out, ignored = {}, []
    prefix = family.hf_prefix
    for k, v in sd.items():
        if any(re.fullmatch(pat, k) for pat in family.hf_ignore):
            ignored.append(k)
            continue
        key = k[len(prefix):] if prefix and k.startswith(prefix) else k
        if key in out:
            raise CheckpointError(f"checkpoint holds both {k!r} and its unprefixed twin {key!r}")
        out[key] = v
    return out, ignored


def from_state_dict(
    family: models_lib.Family,
    config,
    state_dict: Mapping[str, Any],
    head: str = "base",
    *,
    seed: int = 0,
    source: str = "state dict",
) -> tuple[dict, LoadReport]:
    """HF state dict (numpy or torch tensors) -> nested Flax params dict of numpy arrays.

    Raises:
      CheckpointError naming every missing, unexpected and mis-shaped key.
    """
    sd = {k: _to_numpy(v) for k, v in state_dict.items()}
    rules = family.rules(config, head)
    sd, ignored = _normalise_keys(family, sd)
    # Top-level keys of the family's other heads (a classifier when loading the base model).
    own = {k for r in rules for k in r.hf}
    for k in {k for h in family.modules if h != head for r in family.rules(config, h) if r.top for k in r.hf}:
        if k not in own and k in sd:
            ignored.append(k)
            del sd[k]
    shapes = _flax_shapes(family, config, head)
    report = LoadReport(ignored=sorted(ignored))

    by_path = {r.path: r for r in rules}
    if set(by_path) != set(shapes):  # a family bug, not a user error
        raise AssertionError(
            f"rules and module disagree: only in rules {sorted(set(by_path) - set(shapes))}, "
            f"only in module {sorted(set(shapes) - set(by_path))}")

    # Head groups (e.g. 'classifier') absent from the checkpoint altogether are initialised.
    heads = [r for r in rules if r.head]
    fresh = {_head_group(r) for r in heads} - {_head_group(r) for r in heads if any(k in sd for k in r.hf)}

    missing, mismatched, params = [], [], {}
    used: set[str] = set()
    rng = np.random.default_rng(seed)
    for r in rules:
        shape = shapes[r.path]
        if r.head and _head_group(r) in fresh:
            params[r.path] = _fresh(r.path, shape, config, rng)
            report.initialized.append("/".join(r.path))
            continue
        absent = [k for k in r.hf if k not in sd]
        if absent:
            missing.extend(_hf_name(family, r, k) for k in absent)
            used.update(k for k in r.hf if k in sd)  # a fused rule's other keys are not unexpected
            continue
        used.update(r.hf)
        bad = [f"{_hf_name(family, r, k)}: checkpoint {tuple(sd[k].shape)}, model expects {tuple(w.shape)}"
               for k, w in zip(r.hf, r.to_hf(np.zeros(shape, np.float32))) if sd[k].shape != w.shape]
        mismatched += bad
        if not bad:
            params[r.path] = np.asarray(r.to_flax(*(sd[k] for k in r.hf), shape), dtype=np.float32)
    unexpected = sorted(k for k in sd if k not in used)
    if missing or unexpected or mismatched:
        found = (("missing", missing, ", "), ("unexpected", unexpected, ", "),
                 ("mis-shaped", mismatched, "; "))
        lines = [f"checkpoint ({source}) does not match {family.name} head {head!r} "
                 f"({_describe(config)}):"]
        lines += [f"  {what} keys ({len(keys)}): " + sep.join(keys) for what, keys, sep in found if keys]
        if mismatched and any("classifier" in m or "score" in m for m in mismatched):
            lines.append("  (a head of another label count: pass the checkpoint's num_labels, "
                         "or load with head='base' and fine-tune a new head)")
        raise CheckpointError("\n".join(lines))
    return unflatten(params), report


def _head_group(r: Rule) -> str:
    return "/".join(r.path[:-1])  # the module a head parameter belongs to, e.g. 'classifier' 


def _hf_name(family, r: Rule, k: str) -> str:
    return k if r.top or not family.hf_prefix else f"[{family.hf_prefix}]{k}"


def _fresh(path, shape, config, rng) -> np.ndarray:
    """HF's `_init_weights`: N(0, initializer_range) kernels, zero biases, unit scales."""
    leaf = path[-1]
    if leaf in ("bias", "scale"):
        return (np.zeros if leaf == "bias" else np.ones)(shape, np.float32)
    std = getattr(config, "initializer_range", 0.02)
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _describe(config) -> str:
    fields = ("num_layers", "hidden_size", "num_heads", "num_labels")
    return ", ".join(f"{f}={getattr(config, f)}" for f in fields if hasattr(config, f))


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def to_state_dict(family: models_lib.Family, config, params: Mapping, head: str = "base") -> dict[str, np.ndarray]:
    """Flax params -> HF state dict (numpy), keyed as the matching HF class saves them."""
    flat = flatten(params)
    out = {}
    prefix = family.hf_prefix if head != "base" else ""
    for r in family.rules(config, head):
        arrays = r.to_hf(np.asarray(flat["/".join(r.path)], dtype=np.float32))
        for k, a in zip(r.hf, arrays):
            out[k if r.top else prefix + k] = np.ascontiguousarray(a)
    return out


def flatten(params: Mapping, sep: str = "/") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(params), sep=sep)


def unflatten(flat: Mapping, sep: str = "/") -> dict:
    """{'a/b': x} or {('a', 'b'): x} -> {'a': {'b': x}}."""
    from flax import traverse_util

    return traverse_util.unflatten_dict({tuple(k.split(sep)) if isinstance(k, str) else tuple(k): v
                                         for k, v in flat.items()})


# ---------------------------------------------------------------------- high-level API
@dataclasses.dataclass
class Loaded:
    """A model ready to run: family, config, head, params (numpy) and where it came from."""

    family: models_lib.Family
    config: Any
    head: str
    params: dict
    folder: Path
    report: LoadReport

    @property
    def module(self):
        return self.family.module(self.config, self.head)


def load(
    spec: str | Path,
    head: str = "base",
    *,
    num_labels: int | None = None,
    seed: int = 0,
    **config_overrides,
) -> Loaded:
    """A model from an HF folder, hub id, built-in name or accjax folder (``hub.resolve``), with
    ``head`` ('base', 'sequence_classification', 'lm'), ``num_labels`` (None: what the
    checkpoint says) and ``config_overrides`` (e.g. ``dtype='bfloat16'``)."""
    from accjax import gguf_io, hub

    folder = hub.resolve(spec)
    if (folder / ACCJAX_META).exists():
        loaded = load_accjax(folder)
        _check_compatible(loaded, head, num_labels)
        if config_overrides:
            loaded.config = dataclasses.replace(loaded.config, **config_overrides)
        return loaded
    sd = None
    gguf_file = None if (folder / "config.json").exists() else gguf_io.find(folder)
    if gguf_file is not None:  # llama.cpp's one-file format: HF config + HF-named tensors
        ck = gguf_io.read(gguf_file)
        hf_cfg, sd, folder = ck.config, ck.state_dict, gguf_file.parent
    else:
        hf_cfg = read_hf_config(folder)
    if hf_cfg.get("model_type") is None:
        raise CheckpointError(f"{folder}/config.json has no model_type")
    family = models_lib.family_for_hf_type(hf_cfg["model_type"])
    labels = {} if num_labels is None else {"num_labels": num_labels}
    config = family.config_cls.from_hf(hf_cfg, **{**config_overrides, **labels})
    if sd is None:
        sd = read_state_dict(folder)
    if family.adapt_checkpoint is not None:
        config, sd = family.adapt_checkpoint(config, sd)
    params, report = from_state_dict(family, config, sd, head, seed=seed, source=str(folder))
    return Loaded(family, config, head, params, folder, report)


def _check_compatible(loaded: Loaded, head: str, num_labels: int | None) -> None:
    if head != loaded.head and head != "base":
        raise CheckpointError(
            f"{loaded.folder} holds a {loaded.family.name} model with head {loaded.head!r}, "
            f"not {head!r}")
    if num_labels is not None and getattr(loaded.config, "num_labels", num_labels) != num_labels:
        raise CheckpointError(
            f"{loaded.folder} has {loaded.config.num_labels} labels, the task needs {num_labels}")
    if head == "base" and loaded.head != "base":
        sub = loaded.family.hf_prefix.rstrip(".")
        loaded.params = loaded.params[sub] if sub in loaded.params else loaded.params
        loaded.head = "base"


def save_accjax(loaded_or_family, config=None, params=None, head="base", out_dir=None, *, tokenizer_from=None, extra=None) -> Path:
    """Writes ``accjax.json`` (family, head, config) + ``params.safetensors`` (+ tokenizer)."""
    from safetensors.numpy import save_file

    if isinstance(loaded_or_family, Loaded):
        ld = loaded_or_family
        family, config, params, head = ld.family, ld.config, ld.params, ld.head
        tokenizer_from = tokenizer_from or ld.folder
    else:
        family = loaded_or_family
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flatten(params).items()}
    save_file(flat, str(out / ACCJAX_PARAMS))
    meta = {"family": family.name, "head": head, "config": dataclasses.asdict(config), **(extra or {})}
    (out / ACCJAX_META).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer_from is not None:
        copy_tokenizer_files(tokenizer_from, out)
    return out


_REPAIR = "re-export it (train.finetune) or convert the model again"


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``accjax.json`` of a model folder as a dict; unreadable JSON is a CheckpointError."""
    path = Path(folder) / ACCJAX_META
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); {_REPAIR}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} holds no JSON object; {_REPAIR}")
    return meta


def load_accjax(folder: str | Path) -> Loaded:
    """An accjax model folder, every field of ``accjax.json`` and every parameter shape checked
    (a damaged file names the field or parameter in a ``CheckpointError``)."""
    folder = Path(folder)
    path, fix = folder / ACCJAX_META, _REPAIR
    meta = read_meta(folder)
    for key, kind in (("family", str), ("head", str), ("config", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} is missing or not a {kind.__name__}; {fix}")
    try:
        family = models_lib.get_family(meta["family"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    config = _config_from_json(family, meta["config"], path, fix)
    params = unflatten(_read_safetensors(folder / ACCJAX_PARAMS))
    try:
        want = _flax_shapes(family, config, meta["head"])
    except Exception as e:  # an unknown head, or values the model cannot be built with
        raise CheckpointError(f"{path}: cannot build a {meta['family']} model with head "
                              f"{meta['head']!r} from its config ({type(e).__name__}: {e}); {fix}") from None
    got = {tuple(k.split("/")): tuple(np.shape(v)) for k, v in flatten(params).items()}
    bad = [("/".join(k), want.get(k), got.get(k)) for k in sorted(set(want) | set(got))
           if want.get(k) != got.get(k)]
    if bad:
        detail = "; ".join(f"{k}: config says {w}, {ACCJAX_PARAMS} has {g}" for k, w, g in bad[:5])
        raise CheckpointError(f"{folder}: {len(bad)} parameter(s) do not match {ACCJAX_META} "
                              f"({detail}); {fix}")
    nonfinite = [k for k, v in flatten(params).items() if not np.isfinite(v).all()]
    if nonfinite:  # a diverged run's weights score like a constant guess, without a word
        raise CheckpointError(f"{folder}: {len(nonfinite)} parameter(s) hold NaN or inf (e.g. "
                              f"{nonfinite[0]}): the model diverged in training; retrain it with a "
                              "lower learning rate")
    return Loaded(family, config, meta["head"], params, folder, LoadReport())


def _config_from_json(family: models_lib.Family, d: dict, path: Path, fix: str):
    """The model config from ``accjax.json``: unknown fields and values of the wrong type are
    named (JSON has no tuples: a list becomes one where the default is a tuple)."""
    fields = {f.name: f for f in dataclasses.fields(family.config_cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise CheckpointError(f"{path}: unknown config field(s) {unknown}; {fix}")
    kw = {}
    for name, value in d.items():
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if default is not None and value is not None:
            ok = (isinstance(value, bool) if isinstance(default, bool)
                  else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
                  else isinstance(value, (int, float)) and not isinstance(value, bool)
                  if isinstance(default, float) else isinstance(value, type(default)))
            if not ok:
                raise CheckpointError(f"{path}: config field {name!r} is {value!r}, expected a "
                                      f"{type(default).__name__}; {fix}")
        kw[name] = value
    try:
        return family.config_cls(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model config ({e}); {fix}") from None


def save_hf(loaded: Loaded, out_dir: str | Path) -> Path:
    """Writes an HF folder (config.json + model.safetensors + tokenizer) from accjax params."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_state_dict(loaded.family, loaded.config, loaded.params, loaded.head),
              str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = loaded.config.to_hf()
    if names := label_names(loaded):  # transformers' pipelines print these instead of LABEL_0, LABEL_1
        cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
        cfg["label2id"] = {n: i for i, n in enumerate(names)}
    if arch := loaded.family.hf_architectures.get(loaded.head):
        cfg["architectures"] = [arch]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    copy_tokenizer_files(loaded.folder, out)
    return out


def label_names(loaded: Loaded) -> tuple[str, ...] | None:
    """The class names of a fine-tuned classifier, from its ``accjax.json``: the recorded
    ``label_names`` (every run records its task's), else those of its built-in task (GLUE,
    rt_polarity). None when unknown or not a classifier with that many labels."""
    n = getattr(loaded.config, "num_labels", None)
    if loaded.head != "sequence_classification" or not n or n < 2:
        return None
    try:
        meta = json.loads((Path(loaded.folder) / ACCJAX_META).read_text())
    except (OSError, ValueError):
        return None
    names = meta.get("label_names")
    if not names and isinstance(meta.get("task"), str) and ":" not in meta["task"]:
        from accjax import tasks

        try:
            names = tasks.get_task(meta["task"]).label_names
        except (KeyError, ValueError):
            names = None
    names = tuple(str(x) for x in names or ())
    return names if len(names) == n and len(set(names)) == n else None


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    if (dst / "tokenizer.json").exists():
        return
    from accjax import gguf_io

    try:  # a GGUF holds its tokenizer in its metadata: written out, the folder loads alone
        tok, path = gguf_io.folder_tokenizer(src), gguf_io.find(src)
    except gguf_io.GGUFError:  # no tokenizer we can build: the folder's own error says what to copy
        return
    if tok is not None:
        tok.save(str(dst / "tokenizer.json"))
        if template := gguf_io.chat_template(gguf_io.metadata(path)):
            (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m accjax.convert",
        description="Convert a Hugging Face checkpoint to accjax params (or back with --to-hf).")
    ap.add_argument("src", help="HF folder, hub id, built-in name (minilm-l6) or accjax folder")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--head", default=None,
                    help="base | sequence_classification | lm (default: base, or the source's head)")
    ap.add_argument("--num_labels", type=int, default=None)
    ap.add_argument("--to-hf", dest="to_hf", action="store_true",
                    help="write an HF folder (config.json + model.safetensors) instead")
    args = ap.parse_args(argv)
    try:
        from accjax import hub, runfolder

        folder = hub.resolve(args.src)
        runfolder.refuse_writing_into_run(args.out, folder)  # a run's metadata is never rewritten
        head = args.head or (read_meta(folder).get("head", "base") if (folder / ACCJAX_META).exists() else "base")
        loaded = load(folder, head, num_labels=args.num_labels)
        out = save_hf(loaded, args.out) if args.to_hf else save_accjax(loaded, out_dir=args.out)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(np.asarray(v).size for v in flatten(loaded.params).values())
    for k in loaded.report.ignored:
        print(f"ignored {k}")
    for k in loaded.report.initialized:
        print(f"initialised fresh {k}")
    print(f"wrote {out} ({loaded.family.name}, head {loaded.head}, {n:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
