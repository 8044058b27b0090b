"""Timing helpers and the table of ``eval.bench``, ``eval.lm``, ``eval.scaling``, ``eval.glue``.

Never imports ``datasets`` (the GPU image has none). Times are medians over repeated calls
of an ahead-of-time compiled program, inputs rotated over three buffers, after warm-up.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from accjax import programs, runfolder


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"jax": jax.__version__, "backend": jax.default_backend(), "device": device_kind(),
            "device_count": jax.device_count(), "python": platform.python_version(),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "host": platform.node()}
    if info["backend"] == "gpu":
        from accjax.kernels import acc_pallas

        info["acc_pallas_kernel"] = acc_pallas.available()
        info["acc_fused_kernel"] = acc_pallas.available(fused=True)
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def power_capped_us(text: str | None = None) -> float | None:
    """Microseconds the first NVIDIA GPU has spent with its clocks lowered by its software
    power cap since the driver loaded (``nvidia-smi -q -d PERFORMANCE``, "SW Power Capping"
    under "Clocks Event Reasons Counters"); None without nvidia-smi or that counter. Two reads
    around a timing say whether the GPU ran at its power cap (the program after a heavy one
    then starts at lowered clocks: ``programs.SETTLE_MS``). ``text``: parse this instead."""
    if text is None:
        try:
            text = subprocess.run(["nvidia-smi", "-q", "-d", "PERFORMANCE"], capture_output=True,
                                  text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    counters = False
    for line in text.splitlines():
        if "Counters" in line:
            counters = True
        elif counters and "SW Power Capping" in line:
            try:
                return float(line.split(":", 1)[1].split()[0])
            except (IndexError, ValueError):
                return None
    return None


def device_kind() -> str:
    """The first device's model name (e.g. 'NVIDIA H200', 'cpu')."""
    dev = jax.devices()[0]
    return getattr(dev, "device_kind", str(dev))


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time_torch_model(model, config, *, batch_size: int, length: int, dtype: str = "float32",
                      iters: int = 30, warmup: int = 5, compile: bool = False, seed: int = 0,
                      extra=None) -> dict[str, Any]:
    """Median ms of ``model(input_ids, attention_mask, **extra)`` on the GPU when there is one
    (``compile``: wrapped in ``torch.compile``); inputs rotated over three random batches.
    ``median_ms`` each call synchronised, ``pipelined_ms`` with 20 calls in flight."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = model.eval().to(device=device, dtype=tdt)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(1, config.vocab_size, (batch_size, length), generator=g).to(device)
               for _ in range(3)]
    mask = torch.ones(batch_size, length, dtype=torch.long, device=device)
    extra = {k: v.to(device) for k, v in (extra or {}).items()}
    fn = torch.compile(model) if compile else model
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t_compile = time.perf_counter()
    with torch.inference_mode():
        for i in range(warmup):
            fn(input_ids=batches[i % 3], attention_mask=mask, **extra)
        sync()
        t_compile = time.perf_counter() - t_compile
        times = []
        for i in range(iters):
            sync()
            t0 = time.perf_counter()
            fn(input_ids=batches[i % 3], attention_mask=mask, **extra)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        pipelined = []  # calls in flight, one wait (as eval.bench's pipelined figure)
        for _ in range(programs.pipelined_rounds(iters)):
            t0 = time.perf_counter()
            for i in range(programs.PIPELINE_DEPTH):
                fn(input_ids=batches[i % 3], attention_mask=mask, **extra)
            sync()
            pipelined.append((time.perf_counter() - t0) * 1e3 / programs.PIPELINE_DEPTH)
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)),
            "pipelined_ms": float(np.median(pipelined)), "warmup_s": t_compile}


def _load_into(model, sd, allowed_missing=("position_ids",)):
    import torch

    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))
                                                 for k, v in sd.items()}, strict=False)
    bad = [m for m in missing if not any(a in m for a in allowed_missing)]
    if unexpected or bad:
        raise RuntimeError(f"HF model does not take these weights: missing {bad}, unexpected {unexpected}")


def time_torch(config, params, **kw) -> dict[str, Any]:
    """Median ms of the HF PyTorch BERT classifier with the same config and weights (SDPA
    attention); ``kw`` as ``_time_torch_model``."""
    import transformers

    from accjax import convert
    from accjax.models import get_family

    fam = get_family(config.family)
    hf_cfg = transformers.BertConfig(**config.to_hf())
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.BertForSequenceClassification(hf_cfg)
    _load_into(model, convert.to_state_dict(fam, config, params, "sequence_classification"))
    return _time_torch_model(model, config, **kw)


def hf_t5_model(config, params):
    """HF ``T5ForConditionalGeneration`` (fp32, CPU) holding our config and weights, built the
    way a user would load it: ``convert.save_hf`` to a folder, then ``from_pretrained`` (which
    honours an untied LM head; constructing from a config dict does not in transformers 5)."""
    import tempfile

    import transformers

    from accjax import convert
    from accjax.models import get_family

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hf"  # also the "source" folder: no tokenizer files to copy
        loaded = convert.Loaded(family=get_family(config.family), config=config, head="lm",
                                params=params, folder=out, report=convert.LoadReport())
        convert.save_hf(loaded, out)
        return transformers.T5ForConditionalGeneration.from_pretrained(out).eval()


def time_torch_t5_first_token(config, params, **kw) -> dict[str, Any]:
    """Median ms of HF ``T5ForConditionalGeneration`` doing what ``eval.bench`` times of a T5:
    the encoder over ``length`` tokens and one decoder step from the start token (logits for
    the first generated token), with the same config and weights (HF's default attention)."""
    import torch

    start = torch.full((kw["batch_size"], 1), config.decoder_start_token_id, dtype=torch.long)
    return _time_torch_model(hf_t5_model(config, params), config, extra={"decoder_input_ids": start}, **kw)


def joined(r: dict) -> str:
    """A row's keep-lengths per layer: '16,8,4'."""
    return ",".join(map(str, r["schedule"]))


def table(rows: list[dict], cols, *, markdown: bool = False) -> str:
    """The one text (or Markdown) table of the benchmark programs (eval.bench, eval.lm,
    eval.scaling). cols: (key, header, a format spec or a function of the row); a missing
    key shows '-'; the last column is left unpadded."""
    head = [h for _, h, _ in cols]
    body = [[f(r) if callable(f) else format(r[k], f) if k in r else "-" for k, _, f in cols] for r in rows]
    if markdown:
        return "\n".join("| " + " | ".join(x) + " |" for x in [head, ["---"] * len(head), *body])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs[:-1], widths)) + "  " + xs[-1]
    return "\n".join([line(head), "-" * (sum(widths) + 2 * len(widths) - 2)] + [line(x) for x in body])


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically (``runfolder.replace_text``)."""
    runfolder.replace_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def json_default(x):
    """``json.dumps``' ``default`` for every record accjax writes: numpy scalars, numpy and jax
    arrays, tuples."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
