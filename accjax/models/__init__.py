"""Model families: config class, presets, Flax modules per head, and the converter table.

A family is registered by name with the import path of a function returning its ``Family``;
families are imported only when asked for, so loading BERT never imports T5.

Heads (the ``head`` argument everywhere):
  base                     the bare encoder / decoder (HF ``BertModel``, ``GPT2Model``, ...)
  sequence_classification  pooled representation -> [B, C] logits (C = 1: regression)
  lm                       language-model head (decoders and encoder-decoders)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # 'bert', 'gpt2', 't5', 'llama'
    config_cls: type
    hf_model_types: tuple[str, ...]  # config.json "model_type" values it reads
    presets: dict[str, Any]  # preset name -> config
    # head -> module class, named as its transformers counterpart (the HF architecture written)
    modules: dict[str, Callable[[Any], nn.Module]]
    rules: Callable[[Any, str], list]  # (config, head) -> list[convert.Rule]
    hf_prefix: str  # base-model prefix inside task checkpoints ('bert.'); '' if none
    hf_ignore: tuple[str, ...] = ()  # regexes of HF keys that are dropped (buffers, other heads)
    dummy_inputs: Callable[[Any, int, int], dict] | None = None  # (config, B, T) -> model kwargs
    cost_model: Callable[[Any, str], Any] | None = None  # (config, head) -> schedule.CostModel
    # (config, HF state dict) -> (config, state dict), reconciled before conversion when the
    # config.json alone cannot say (T5: is the LM head tied?); None: used as read.
    adapt_checkpoint: Callable[[Any, dict], tuple[Any, dict]] | None = None
    # (config, 'lm' params, multiple) -> (config, params) with the LM head's table padded to a
    # multiple of rows, done once by serving (GPT-2's 50257); None: the table is used as stored.
    pad_vocab: Callable[[Any, Any, int], tuple[Any, Any]] | None = None

    @property
    def hf_architectures(self) -> dict[str, str]:
        return {head: cls.__name__ for head, cls in self.modules.items()}

    def module(self, config, head: str = "base") -> nn.Module:
        try:
            return self.modules[head](config)
        except KeyError:
            raise ValueError(
                f"family {self.name!r} has no head {head!r}; available: {sorted(self.modules)}"
            ) from None


_REGISTRY: dict[str, str] = {
    "bert": "accjax.models.bert_family:family",
    "gpt2": "accjax.models.gpt2_family:family",
    "t5": "accjax.models.t5_family:family",
    "llama": "accjax.models.llama_family:family",
}


def register(name: str, target: str) -> None:
    """Registers ``name`` -> 'module:function' returning a ``Family``."""
    _REGISTRY[name] = target


def families() -> list[str]:
    return sorted(_REGISTRY)


def get_family(name: str) -> Family:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model family {name!r}; known: {families()}")
    mod, fn = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(mod), fn)()


def family_for_hf_type(model_type: str) -> Family:
    """The family that reads HF config.json files of this ``model_type``."""
    for name in families():
        try:
            fam = get_family(name)
        except ImportError:
            continue  # a family whose module is not present in this build
        if model_type in fam.hf_model_types:
            return fam
    raise ValueError(
        f"model_type {model_type!r} is not supported; accjax reads "
        + ", ".join(sorted({t for n in families() for t in _safe_types(n)}))
    )


def _safe_types(name: str) -> tuple[str, ...]:
    try:
        return get_family(name).hf_model_types
    except ImportError:
        return ()


def cost_model(config, head: str = "sequence_classification"):
    """The ``schedule.CostModel`` of ``config``'s family for ``head`` (each family owns its own)."""
    return get_family(config.family).cost_model(config, head)


def abstract_variables(config, head: str = "base"):
    """``jax.eval_shape`` of the module's init: boxed variables with their logical axis names
    (``sharding.logical_specs`` reads them), nothing computed."""
    import jax

    fam = get_family(config.family)
    module = fam.module(config, head)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **fam.dummy_inputs(config, 1, 8)))


def init_params(config, head: str = "base", seed: int = 0):
    """Randomly initialised parameters (numpy, unboxed) of ``config``'s ``head`` module: one
    compiled init (eager init would compile every initialiser op separately)."""
    import jax
    import numpy as np

    fam = get_family(config.family)
    module = fam.module(config, head)
    init = jax.jit(lambda k: nn.meta.unbox(module.init(k, **fam.dummy_inputs(config, 1, 8))["params"]))
    return jax.tree.map(np.asarray, init(jax.random.PRNGKey(seed)))


def preset(name: str, **overrides):
    """A named preset config from any family (e.g. 'bert-base-uncased', 'gpt2')."""
    for fam_name in families():
        try:
            fam = get_family(fam_name)
        except ImportError:
            continue
        if name in fam.presets:
            cfg = fam.presets[name]
            return dataclasses.replace(cfg, **overrides) if overrides else cfg
    known = sorted(p for n in families() for p in _safe_presets(n))
    raise ValueError(f"unknown preset {name!r}; known presets: {known}")


def _safe_presets(name: str):
    try:
        return get_family(name).presets
    except ImportError:
        return {}


def all_presets() -> dict[str, Any]:
    out = {}
    for n in families():
        out.update(_safe_presets(n))
    return out
