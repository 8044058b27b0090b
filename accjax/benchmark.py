"""Timing helpers shared by ``eval.bench``, ``eval.glue`` and ``eval.offline_tune``.

Never imports ``datasets`` (the GPU image has none). Times are medians over repeated calls
of an ahead-of-time compiled program, inputs rotated over three buffers, after warm-up.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import jax
import numpy as np


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    dev = jax.devices()[0]
    info = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
    }
    if info["backend"] == "gpu":
        from accjax.kernels import acc_pallas

        info["acc_pallas_kernel"] = acc_pallas.available()
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_torch(config, params, *, batch_size: int, length: int, dtype: str = "float32",
               iters: int = 30, warmup: int = 5, compile: bool = False, seed: int = 0) -> dict[str, Any]:
    """Median ms of the HF PyTorch BERT classifier with the same config and weights.

    Eager uses PyTorch's SDPA attention; ``compile=True`` wraps it in ``torch.compile``.
    """
    import torch
    import transformers

    from accjax import convert
    from accjax.models import get_family

    fam = get_family(config.family)
    hf_cfg = transformers.BertConfig(**config.to_hf())
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.BertForSequenceClassification(hf_cfg)
    sd = convert.to_state_dict(fam, config, params, "sequence_classification")
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32))
                                                 for k, v in sd.items()}, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = model.eval().to(device=device, dtype=tdt)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(1, config.vocab_size, (batch_size, length), generator=g).to(device)
               for _ in range(3)]
    mask = torch.ones(batch_size, length, dtype=torch.long, device=device)
    fn = model
    if compile:
        fn = torch.compile(model)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t_compile = time.perf_counter()
    with torch.inference_mode():
        for i in range(warmup):
            fn(input_ids=batches[i % 3], attention_mask=mask)
        sync()
        t_compile = time.perf_counter() - t_compile
        times = []
        for i in range(iters):
            sync()
            t0 = time.perf_counter()
            fn(input_ids=batches[i % 3], attention_mask=mask)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)),
            "warmup_s": t_compile}


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=_default)
        f.write("\n")


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))
