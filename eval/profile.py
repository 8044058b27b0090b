"""Where does the time go? Kernel-level breakdown of compiled predictor programs.

    python -m eval.profile --model bert-base-uncased --shapes 128x128 --dtype bfloat16 \
        --speedups 1,4.8 --json prof.json
    python -m eval.profile --model flan-t5-base --shapes 16x512 --speedups 1,2   # T5: encoder + first token
    python -m eval.profile --model gpt2 --shapes 8x1024 --speedups 1,3.72 --prefill  # + KV caches

    python -m eval.profile --kernels --shapes 128x128,32x512,128x24   # one layer's attention/ACC paths

For each speedup: wall and device-busy time per call (kernel durations of a
``jax.profiler`` trace) and the idle gap between them, split by where the GPU idled
(``call_gaps``: before each call, and before which kernels inside it), kernels grouped by kind (``KINDS``),
the top kernels, XLA's FLOP and byte counts, and a per-layer table: rows in/out, the
analytic floor (``layer_costs``) and measured kernel time by part (``per_layer``). The JSON
keeps one call's kernel sequence. A program for performance work, not a test.
"""

from __future__ import annotations

if __name__ == "__main__":  # malloc with huge pages for XLA's CPU buffers: restarts once
    from accjax import host_memory

    host_memory.ensure()

import argparse
import collections
import glob
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from accjax import acc as acc_lib
from accjax import benchmark, guards, inference, lm, models, seq2seq
from eval import bench

KINDS = [
    ("attention(cudnn)", re.compile(r"cudnn|fmha|flash|sdpa|fprop", re.I)),
    ("gemm", re.compile(r"gemm|cublas|nvjet|sm90_xmma|cutlass|matmul|dot|triton_gemm", re.I)),
    ("topk/sort", re.compile(r"sort|topk|top_k|radix|cub", re.I)),
    ("gather", re.compile(r"gather|take|dynamic.slice", re.I)),
    ("reduce", re.compile(r"reduce|reduction", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
    ("fusion", re.compile(r"fusion|loop|input_", re.I)),
]


def kind_of(name: str) -> str:
    for k, pat in KINDS:
        if pat.search(name):
            return k
    return "other"


# The HLO instruction a kernel event belongs to: the first of these stats present.
_HLO_OP_STATS = ("hlo_op", "long_name", "tf_op")


def _event_hlo_op(e) -> str:
    try:
        stats = dict(e.stats)
    except Exception:  # this jax's ProfileData exposes no stats
        return ""
    for key in _HLO_OP_STATS:
        if stats.get(key):
            return str(stats[key]).lstrip("%").split(" ")[0]
    return ""


def device_events(trace_dir: str, with_start: bool = False):
    """[(kernel name, ms, HLO op stat)] of every kernel on the GPU's streams, in time order;
    ``with_start``: [(start ns, kernel name, ms, HLO op stat)] (where the gaps between kernels lie)."""
    from jax.profiler import ProfileData

    files = glob.glob(trace_dir + "/**/*.xplane.pb", recursive=True)
    pd = ProfileData.from_file(files[0])
    events = []
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        if not device_events.shown:
            print("   trace lines:", [l.name for l in plane.lines])
            device_events.shown = True
        for line in plane.lines:
            # kernel executions live on stream lines; skip the derived "XLA Ops"/"Steps" lines
            # (a stream's line may list its activity kinds: "Stream #14(MemcpyD2H,Compute,Memset)")
            name = line.name.lower()
            if "stream" not in name or ("memcpy" in name and "compute" not in name):
                continue
            for e in line.events:
                if len(device_events.samples) < 6:
                    try:
                        device_events.samples.append({"name": e.name[:80],
                                                      "stats": {k: str(v)[:120] for k, v in e.stats}})
                    except Exception as err:
                        device_events.samples.append({"name": e.name[:80], "stats_error": repr(err)})
                events.append((e.start_ns, e.name, e.duration_ns / 1e6, _event_hlo_op(e)))
    events.sort(key=lambda x: x[0])  # execution order (per_layer attributes by neighbours)
    return events if with_start else [x[1:] for x in events]


device_events.samples = []  # a few raw events (their stats), written to the JSON for checking


# Where a kernel belongs inside a layer, from the named scopes in its HLO op_name (the first
# that matches): the scopes set in ``accjax.acc`` and the layer's module names.
PARTS = [
    ("attention+acc", re.compile(r"/attention_acc/")),
    ("acc", re.compile(r"/acc_score/")),
    ("select", re.compile(r"/select/|/select_gather/")),
    ("gather", re.compile(r"/gather_rows/")),
    ("attention", re.compile(r"/attention/")),
    ("qkv", re.compile(r"/qkv/|BTD,DNH->BTNH")),
    ("out+ln", re.compile(r"/attn_out/|/attn_norm/")),
    ("ffn+ln", re.compile(r"/mlp_in/|/mlp_out/|/mlp_norm/|/erf|/gelu|/mul")),
]
_LAYER = re.compile(r"/layer_(\d+)[./]")  # "layer_3/..." or a method's "layer_3.encoder_kv/..."
# A decoder stack beside an encoder (T5: "decoder/layer_3/", "decoder.step/layer_3/"): its
# layers are rows of their own ("dec3"), not the encoder layer of the same number.
_DECODER_LAYER = re.compile(r"/decoder[^/]*/layer_(\d+)[./]")


_DEF = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = ")
_HEAD = re.compile(r"\s*(?:ENTRY\s+)?%?([\w.\-]+) [(].*[{]\s*$")
_TRITON_CALL = 'custom_call_target="__gpu$xla.gpu.triton"'  # a Pallas kernel's custom call
_METADATA = re.compile(r",? (?:metadata|frontend_attributes)=\{[^}]*\}")  # differs between identical ops


def hlo_scopes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the op_name (named-scope path) that produced it, from an optimised
    HLO module's text. A fusion without its own op_name takes one from its computation that
    names a layer."""
    own, calls, comp_names = {}, {}, collections.defaultdict(list)
    comp = None
    for line in hlo_text.splitlines():
        m = _DEF.match(line)
        if not m:
            h = _HEAD.match(line)
            if h:
                comp = h.group(1)
            continue
        name = m.group(1)
        op = re.search(r'op_name="([^"]*)"', line)
        if op:
            own[name] = op.group(1)
            if comp is not None:
                comp_names[comp].append(op.group(1))
        c = re.search(r"calls=%?([\w.\-]+)", line)
        if c:
            calls[name] = c.group(1)
    out = dict(own)
    for name, c in calls.items():
        inner = comp_names.get(c, [])
        if name not in out or not _LAYER.search(out[name]):
            named = [o for o in inner if _LAYER.search(o)]
            if named:
                out[name] = named[-1]
    return out


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> its lines (the header first), in the module's order."""
    comps, cur = {}, None
    for line in hlo_text.splitlines():
        h = _HEAD.match(line)
        if h:
            cur = h.group(1)
            comps[cur] = [line]
        elif cur is not None and line.strip() == "}":
            cur = None
        elif cur is not None:
            comps[cur].append(line)
    return comps


def _fingerprint(lines: list[str]) -> str:
    """A computation's text with its own name, its values' names and metadata taken out: two
    fusions of equal fingerprints compute the same thing on the same shapes."""
    names = re.findall(r"([\w.\-]+): ", lines[0]) + [m.group(1) for m in map(_DEF.match, lines[1:]) if m]
    token = {n: f"v{i}" for i, n in enumerate(dict.fromkeys(names))}
    text = "\n".join([lines[0].split(" (", 1)[-1], *lines[1:]])
    text = _METADATA.sub("", text)
    return re.sub(r"[\w.\-]+", lambda m: token.get(m.group(0), m.group(0)), text)


def kernel_groups(hlo_text: str) -> dict[str, list[str]]:
    """Which HLO instructions one kernel of a trace runs for, in the module's (schedule)
    order: the n-th run of that kernel in a call is the n-th of them.

    - Fusion instruction -> every fusion of the same kind and an identical computation. XLA:GPU
      builds one kernel for such fusions, named after the first, so a trace names only that
      one. Fusions alone in their kind are left out.
    - Pallas (Triton) kernel name as a trace shows it -> every custom call of that kernel.
      XLA names such a kernel after its function (``name`` in the call's backend config) and
      builds one kernel for identical calls (same config, shapes and layouts); kernels of one
      function that differ are named ``f``, ``f__1``, ``f__2``, ... in the order they first
      appear (checked against GPT-2's and BERT-base's traces on an H100)."""
    comps = _computations(hlo_text)
    groups, pallas = collections.defaultdict(list), collections.defaultdict(list)
    for lines in comps.values():
        for line in lines[1:]:
            m, c = _DEF.match(line), re.search(r"calls=%?([\w.\-]+)", line)
            if m and c and " fusion(" in line and c.group(1) in comps:
                kind = re.search(r"kind=(\w+)", line)
                groups[(kind.group(1) if kind else "", _fingerprint(comps[c.group(1)]))].append(m.group(1))
            elif m and _TRITON_CALL in line:
                fn = re.search(r'\bname = "([^"]*)"', line)
                body = re.sub(r"custom-call\([^)]*\)", "custom-call()", line[m.end():], count=1)
                body = _METADATA.sub("", body)
                pallas[(fn.group(1) if fn else m.group(1), body)].append(m.group(1))
    out = {n: g for g in groups.values() if len(g) > 1 for n in g}
    seen = collections.Counter()
    for (fn, _), g in pallas.items():  # insertion order: first appearance
        out[fn + (f"__{seen[fn]}" if seen[fn] else "")] = g
        seen[fn] += 1
    return out


def layer_and_part(op_name: str) -> tuple[int | str | None, str]:
    """(layer, part) of an HLO op_name: the layer an int, a decoder stack's beside an
    encoder ``"dec<k>"``, None outside layers."""
    d = _DECODER_LAYER.search(op_name)
    m = d or _LAYER.search(op_name)
    if m is None:
        return None, "outside layers"
    layer = f"dec{d.group(1)}" if d else int(m.group(1))
    for part, pat in PARTS:
        if pat.search(op_name):
            return layer, part
    return layer, "other"


def _kernel_key(name: str) -> str:
    """XLA names a fusion's kernel after the HLO instruction, '.' and '-' turned into '_'."""
    return re.sub(r"[.\-]", "_", name)


def per_layer(events, scopes: dict[str, str], iters: int,
              groups: dict[str, list[str]] | None = None) -> tuple[dict, dict]:
    """Kernel time (us per call) and kernel count per layer and part, and the kernels that ran
    more than once a call under one name.

    A kernel is matched to its HLO instruction by name (fusions and Triton GEMMs carry it;
    with XLA's command buffers the trace's hlo_op stat names only the buffer). Library
    kernels (cuBLAS, cuDNN) carry no instruction name: they are counted as 'gemm' or
    'attention' in the layer of the next kernel that has one (their epilogue or consumer, in
    a layer's fixed kernel order). Pallas kernels are named by their kernel function.

    XLA:GPU builds one kernel for identical fusions, named after the first, and under
    command buffers the trace names no instruction. Where the trace's instruction (third
    field) is one of ``scopes`` it is used instead of the kernel name. Otherwise, with
    ``groups`` (``kernel_groups``), the n-th run of such a kernel in a call is taken as the
    n-th of its identical fusions (or of a Pallas kernel's identical calls), so identical
    layers keep rows of their own. A kernel matched by a name that runs more times a call
    than it has instructions is returned beside the
    table (name: runs a call): its repeats land in its first instance's layer, and the table
    says so.

    Returns:
      ({layer: {part: {"us", "kernels"}}}, {kernel name: runs a call}).
    """
    keyed = {_kernel_key(k): v for k, v in scopes.items()}
    shared = {_kernel_key(k): [_kernel_key(m) for m in g] for k, g in (groups or {}).items()}
    per_call = max(1, len(events) // max(1, iters))
    tags, by_name, runs = [], collections.Counter(), collections.Counter()
    for i, (name, _, hlo_op) in enumerate(events):
        if i % per_call == 0:
            runs.clear()  # a new call: its kernels' runs counted afresh
        base = re.sub(r"__\d+$", "", name)
        op = keyed.get(_kernel_key(hlo_op)) if hlo_op else None
        if op is None:
            key = _kernel_key(name)
            same = shared.get(key, [key])
            run, runs[key] = runs[key], runs[key] + 1
            # a fusion's group is named after its first; a Pallas kernel's after its function
            spread = (same[0] == key or key not in keyed) and run < len(same)
            op = keyed.get(same[run] if spread else key)
            by_name[name] += op is not None
        if op is not None:
            layer, part = layer_and_part(op)
            tags.append((layer, part) if layer is not None else (None, "outside layers"))
        elif base == "_attn_kernel":
            tags.append((None, "attention+acc"))  # the layer comes from the next kernel
        elif base in ("_kernel", "_lse_kernel"):
            tags.append((None, "acc"))
        elif base in ("_keep_rows_kernel", "_threshold_kernel"):  # kernels.keep_rows: selection, gathers
            tags.append((None, "select"))
        elif kind_of(name) == "gemm":
            tags.append((None, "gemm"))
        elif kind_of(name) == "attention(cudnn)":
            tags.append((None, "attention"))
        else:
            tags.append(None)
    following = None
    for i in range(len(tags) - 1, -1, -1):  # inherit from the next attributed kernel
        t = tags[i]
        if t is not None and t[0] is not None:
            following = t
        elif t is not None:  # a library or Pallas kernel: its own part, the next one's layer
            tags[i] = (following[0] if following else None, t[1])
        else:
            tags[i] = following if following else (None, "unattributed")
    table = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0.0]))
    for (name, ms, _), (layer, part) in zip(events, tags):
        cell = table["-" if layer is None else str(layer)][part]
        cell[0] += ms * 1e3 / iters
        cell[1] += 1 / iters
    out = {layer: {part: {"us": us, "kernels": n} for part, (us, n) in parts.items()}
           for layer, parts in table.items()}
    return out, {name: n / iters for name, n in sorted(by_name.items())
                 if n > iters * len(shared.get(_kernel_key(name), [name]))}


def layer_costs(cfg, b: int, n: int, schedule, *, acc: str = "fused") -> list[dict]:
    """Per BERT-family layer: rows in/out, FLOPs and the fewest bytes a layer of today's kernel
    split must move (weights once; the layer input, q/k/v, context, FFN hidden and the layer
    output each written once and read once; bf16), and the floor time at the H200's measured
    790 TFLOP/s and 4.3 TB/s. ``acc`` 'fused' adds the two-pass kernel's second QK^T when a
    layer has more than 128 keys; 'lse' always adds one QK^T (the second-pass kernel)."""
    d, f, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    out, t = [], n
    for i, k in enumerate(schedule):
        k = min(k, t)
        flops = 2 * b * t * 3 * d * d + 4 * b * t * t * d + 2 * b * k * d * d + 4 * b * k * d * f
        if k < t and (acc == "lse" or (acc == "fused" and t > 128)):
            flops += 2 * b * t * t * d  # QK^T again for the column sums
        weights = (4 * d * d + 2 * d * f) * 2
        acts = 2 * 2 * b * (t * d + 3 * t * d + t * d + k * f + k * d)
        bytes_ = weights + acts
        floor_us = max(flops / 790e12, bytes_ / 4.3e12) * 1e6
        out.append({"layer": i, "rows_in": t, "rows_out": k, "gflop": flops / 1e9,
                    "mbytes": bytes_ / 1e6, "floor_us": floor_us, "heads": heads})
        t = k
    return out


def print_layers(r: dict) -> None:
    """One line per layer: rows, analytic floor, measured kernel time and its split."""
    costs = {c["layer"]: c for c in r.get("layer_costs", [])}
    layers, repeated = r.get("per_layer", {}), r.get("repeated_kernels", {})
    parts = ["gemm", "qkv", "attention", "attention+acc", "acc", "select", "gather", "out+ln", "ffn+ln",
             "other"]
    print("   layer  in  out  GFLOP  floor_us   us  kernels | " + " ".join(f"{p:>9}" for p in parts))
    keys = set(layers) | {str(i) for i in costs}
    for key in sorted(keys, key=lambda x: (x == "-", x.startswith("dec"),
                                           int(x.removeprefix("dec")) if x != "-" else 0)):
        cells = layers.get(key, {})
        us = sum(c["us"] for c in cells.values())
        nk = sum(c["kernels"] for c in cells.values())
        c = costs.get(int(key)) if key.isdigit() else None
        head = (f"   {key:>5} {c['rows_in']:>3} {c['rows_out']:>4} {c['gflop']:>6.1f} {c['floor_us']:>9.1f}"
                if c else f"   {key:>5} {'':>3} {'':>4} {'':>6} {'':>9}")
        print(head + f" {us:>5.0f} {nk:>8.1f} | "
              + " ".join(f"{cells[p]['us'] if p in cells else 0:>9.1f}" for p in parts))
    if repeated:
        print(f"   {len(repeated)} kernel(s) ran more times a call under one name than they have "
              f"identical instructions: those repeats are counted in the first instance's layer, so "
              f"layers merge there ({sum(repeated.values()):.0f} launches)")


device_events.shown = False


GAP_BINS_US = ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 5.0), (5.0, float("inf")))


def call_gaps(events, iters: int, top: int = 25) -> dict:
    """Where a traced run of ``iters`` identical calls left the GPU idle between kernels: for each
    position in a call's kernel sequence, the idle time before that kernel (its start minus the
    previous kernel's end; negative where streams overlap), averaged over the calls after the
    first. Position 0's gap is the wait between calls (a call not enqueued in time, a graph's
    launch); the others are the program's own (a memset before a library kernel, a graph
    boundary).

    Args:
      events: [(start ns, kernel name, ms, HLO op)] in time order (``device_events(...,
        with_start=True)``), ``iters`` >= 2 calls of the same kernels.
    Returns:
      {"span_us" (first start to last end, per call), "boundary_gap_us", "gaps_in_call_us",
      "overlap_us", "by_size": {"lo-hi" (us): {"count", "us"}}, "largest": the ``top`` largest
      gaps [{"pos", "gap_us", "spread_us" (over calls), "kernel", "op", "before", "op_before",
      "kernel_us"}]}. Example: two calls of kernels a and b (1 us each), b starting 2 us after a
      ends, the second call's a 3 us after the first call's b: boundary 3.0, in the call 2.0,
      by_size["2-5"] == {"count": 1, "us": 2.0}, span 5.5.
    """
    n = len(events) // iters
    if iters < 2 or n == 0 or n * iters != len(events):
        raise ValueError(f"{len(events)} kernels over {iters} calls: not one sequence a call")
    start = np.array([e[0] for e in events], np.float64) / 1e3  # us
    dur = np.array([e[2] for e in events], np.float64) * 1e3
    end = start + dur
    gap = np.zeros(len(events))
    gap[1:] = start[1:] - end[:-1]
    per_pos = gap.reshape(iters, n)[1:]  # the first call's first gap is the trace's start
    mean = per_pos.mean(axis=0)
    idle = np.maximum(mean, 0.0)
    inner = idle[1:]
    bins = {}
    for lo, hi in GAP_BINS_US:
        sel = (inner >= lo) & (inner < hi)
        bins[f"{lo:g}-{hi:g}"] = {"count": int(sel.sum()), "us": float(inner[sel].sum())}
    kernel_us = dur.reshape(iters, n).mean(axis=0)
    name = lambda i: events[i][1][:60]  # noqa: E731
    largest = [{"pos": int(i), "gap_us": round(float(mean[i]), 2), "spread_us": round(float(per_pos[:, i].std()), 2),
                "kernel": name(i), "op": events[i][3], "before": name(i - 1) if i else "(previous call)",
                "op_before": events[i - 1][3] if i else "", "kernel_us": round(float(kernel_us[i]), 2)}
               for i in sorted(range(n), key=lambda i: -idle[i])[:top]]
    return {"span_us": float((end[-1] - start[0]) / iters), "boundary_gap_us": float(idle[0]),
            "gaps_in_call_us": float(inner.sum()), "overlap_us": float(-np.minimum(mean, 0.0).sum()),
            "by_size": bins, "largest": largest}


def profile_call(call, iters=20) -> dict:
    """Wall ms per call, device kernels per call (grouped), and where the GPU idled between them
    (``call_gaps``), for a no-argument ``call`` returning device arrays (a compiled program
    applied to inputs already on the device)."""
    for _ in range(3):
        jax.block_until_ready(call())
    t0 = time.perf_counter()
    for _ in range(iters):
        out = call()
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t0) * 1e3 / iters
    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    for _ in range(iters):
        out = call()
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    timed = device_events(d, with_start=True)
    gaps = call_gaps(timed, iters) if iters > 1 and timed and len(timed) % iters == 0 else None
    ev = [e[1:] for e in timed]
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for name, ms, _ in ev:
        by_name[name][0] += ms / iters
        by_name[name][1] += 1
    by_kind = collections.defaultdict(float)
    for name, (ms, _) in by_name.items():
        by_kind[kind_of(name)] += ms
    busy = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "wall_ms": wall, "busy_ms": busy, "gap_ms": wall - busy,
        "kernels_per_call": sum(c for _, c in by_name.values()) / iters,
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": [{"name": k[:120], "ms": v[0], "count": v[1] / iters} for k, v in top],
        "gaps": gaps, "events": ev, "iters": iters,
    }


def print_gaps(g: dict | None, largest: int = 5) -> None:
    """``call_gaps``' summary in two lines and its ``largest`` gaps."""
    if not g:
        return
    print(f"   idle: {g['gaps_in_call_us']:.0f} us in a call (by size, count / us: "
          + ", ".join(f"{k} {v['count']} / {v['us']:.0f}" for k, v in g["by_size"].items())
          + f"), {g['boundary_gap_us']:.1f} us before each call; traced span {g['span_us']:.0f} us")
    for x in g["largest"][:largest]:
        print(f"   {x['gap_us']:6.2f} us before #{x['pos']:<3} {x['kernel'][:44]:<44} after {x['before'][:40]}")


def _attribute(r: dict, prog) -> dict:
    """Adds the per-layer split of ``r``'s kernel events (from ``profile_call``)."""
    ev = r.pop("events")
    per_call = len(ev) // max(1, r["iters"])
    r["events_one_call"] = [(name, round(ms * 1e3, 2)) for name, ms, _ in ev[:per_call]]
    try:
        text = prog.as_text()
        r["per_layer"], r["repeated_kernels"] = per_layer(ev, hlo_scopes(text), r["iters"], kernel_groups(text))
    except Exception as e:  # a profile without the split is still worth having
        r["per_layer_error"] = f"{type(e).__name__}: {e}"
    return r


def _xla_cost(prog) -> dict:
    cost = prog.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"xla_flops": float(cost.get("flops", 0)) if cost else 0.0,
            "xla_bytes": float(cost.get("bytes accessed", 0)) if cost else 0.0}


def profile_program(pred, b, n, s, iters=20):
    """A BERT-family ``inference.Predictor`` program, a ``seq2seq.Seq2SeqPredictor``
    encoder + first-token program, or a decoder's prefill (``lm.LMEvaluator``: the pruned KV
    caches built, as ``eval.lm --bench`` times it), at speedup ``s``."""
    prefill, t5 = isinstance(pred, lm.LMEvaluator), isinstance(pred, seq2seq.Seq2SeqPredictor)
    plan = pred.plan(s) if prefill else pred.plan(n, s)
    if prefill:
        ids = np.random.default_rng(0).integers(2, pred.config.vocab_size, (b, n)).astype(np.int32)
        prog, inputs = pred.prefill_program(plan.keep), (jax.device_put(ids),)
    else:
        prog, inputs = bench.program_inputs(pred, b, n, plan, t5)
    costs = {} if t5 else {"layer_costs": layer_costs(pred.config, b, n, plan.keep)}
    r = _attribute(profile_call(lambda: prog(pred.params, *inputs), iters), prog)
    return {"speedup": s, "schedule": list(plan.keep), "analytic": plan.analytic, **costs, **r,
            **_xla_cost(prog), "hlo": prog.as_text}


def _pipelined_ms(fn, *args, calls: int = 20, repeats: int = 7) -> float:
    """Median over ``repeats`` of (``calls`` enqueued back to back, one sync) / calls: the
    device time of a small jitted function without the per-call host round trip."""
    f = jax.jit(fn)
    for _ in range(3):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return float(np.median(times))


def kernel_table(shapes, heads: int = 12, head_dim: int = 64, dtype="bfloat16") -> list[dict]:
    """Attention + ACC paths and row selection timed in isolation (BERT-base heads, all rows
    real): what each layer's attention and scoring cost at each row count."""
    import jax.numpy as jnp

    from accjax import acc, attention
    from accjax.kernels import acc_pallas

    rows = []
    rng = np.random.default_rng(0)
    scale = head_dim ** -0.5
    for b, t in shapes:
        q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, head_dim)), dtype) for _ in range(3))
        mask = jnp.ones((b, t), bool)
        protect = jnp.zeros((b, t), bool).at[:, 0].set(True)

        def path(acc_impl, attention_impl="cudnn"):
            def f(q, k, v):
                return acc.attend_and_score(q, k, v, mask, scale=scale, score=True, protect=protect,
                                            attention_impl=attention_impl, acc_impl=acc_impl)[:2]
            return f

        variants = {
            "cudnn attention only": lambda q, k, v: attention.fused_attention(
                q, k, v, mask, scale=scale, implementation="cudnn"),
            "cudnn + pallas ACC (second pass)": path("pallas"),
            "cudnn + lse ACC in XLA": path("lse"),
            "fused attention+ACC kernel": path("fused"),
            "XLA attention, ACC from probs": path("probs", "xla"),
        }
        for name, fn in variants.items():
            try:
                ms = _pipelined_ms(fn, q, k, v)
                rows.append({"shape": f"{b}x{t}", "what": name, "us": ms * 1e3})
            except Exception as e:
                rows.append({"shape": f"{b}x{t}", "what": name, "error": f"{type(e).__name__}: {e}"[:200]})
        scores = jnp.asarray(rng.standard_normal((b, t)), jnp.float32)
        keep = max(1, int(t * 0.7))
        for method in ("top_k", "rank", "kernel"):  # 'kernel' falls back to XLA where it cannot run
            ms = _pipelined_ms(lambda s_: acc.select_rows(s_, keep, method=method), scores)
            rows.append({"shape": f"{b}x{t}", "what": f"select {keep} by {method}", "us": ms * 1e3})
        for r in rows:
            if r["shape"] == f"{b}x{t}":
                print(f"   {r['shape']:>8} {r['what']:<36} "
                      + (f"{r['us']:8.1f} us" if "us" in r else r["error"]))
    print("   fused kernel available:", acc_pallas.available(fused=True))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.profile")
    ap.add_argument("--model", default="bert-base-uncased")
    ap.add_argument("--shapes", default="128x128")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--speedups", default="1,4.8")
    ap.add_argument("--attention_impl", default="auto")
    ap.add_argument("--acc_variant", default="plain")
    ap.add_argument("--hidden_act", default=None, help="override the activation (timing only)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--dump_hlo", default=None, help="write each program's optimised HLO here")
    ap.add_argument("--select", default="auto", choices=acc_lib.SELECT_METHODS,
                    help="how kept rows are chosen (acc.select_rows)")
    ap.add_argument("--prefill", action="store_true",
                    help="decoders (GPT-2, Llama): profile the prefill that builds the KV caches")
    ap.add_argument("--kernels", action="store_true",
                    help="time attention/ACC paths and selection in isolation at each BxT instead")
    ap.add_argument("--prune_every", type=int, default=1,
                    help="k > 1: only layers 1, 1 + k, ... drop rows (schedule.plan)")
    ap.add_argument("--floor", type=int, default=1, help="smallest keep-length a layer may have")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    acc_lib.SELECT_METHOD = args.select
    # bad input: one line, exit 2, before anything compiles
    guards.exit_on_user_error(lambda: [guards.positive_int(v, f) for v, f in (
        (args.iters, "--iters"), (args.prune_every, "--prune_every"), (args.floor, "--floor"))])
    shapes, sets = guards.exit_on_user_error(lambda: (bench.parse_shapes(args.shapes), bench.parse_sets(args.set)))
    if args.kernels:
        rows = kernel_table(shapes, dtype=args.dtype)
        if args.json:
            benchmark.write_json(args.json, {"machine": benchmark.machine(), "kernels": rows})
        return 0
    t5 = bench.is_t5(args.model)  # encoder + first token, as eval.bench times a T5
    lm_head = t5 or args.prefill  # T5 (encoder + first token) and decoder prefills
    cfg, params = bench.build(args.model, args.dtype, args.attention_impl,
                              overrides=sets, t5=lm_head)
    if args.hidden_act and not t5:
        cfg = cfg.replace(hidden_act=args.hidden_act)
    module = models.get_family(cfg.family).module(cfg, "lm" if lm_head else "sequence_classification")
    results = []
    record = {"machine": benchmark.machine(), "args": vars(args)} if args.json else {}
    for b, n in shapes:
        shape = f"{b}x{n}"
        if args.prefill:
            pred = lm.LMEvaluator(module, params, cfg, batch_size=b, context=n, continuation=0,
                                  param_dtype=args.dtype, acc_variant=args.acc_variant,
                                  floor=args.floor, prune_every=args.prune_every)
        else:
            pred = (seq2seq.Seq2SeqPredictor if t5 else inference.Predictor)(
                module, params, cfg, batch_size=b, length_buckets=(n,), param_dtype=args.dtype,
                acc_variant=args.acc_variant, floor=args.floor, prune_every=args.prune_every)
        for s in [float(x) for x in args.speedups.split(",")]:
            r = profile_program(pred, b, n, s, args.iters)
            hlo = r.pop("hlo")
            if args.dump_hlo:
                Path(args.dump_hlo).mkdir(parents=True, exist_ok=True)
                (Path(args.dump_hlo) / f"{shape}_s{s:g}.hlo.txt").write_text(hlo())
            r["shape"] = shape
            results.append(r)
            print(f"\n== {shape} speedup {s:g} (analytic {r['analytic']:.2f}) {args.acc_variant} "
                  f"{args.attention_impl} act={getattr(cfg, 'hidden_act', '-')}: wall {r['wall_ms']:.3f} ms, "
                  f"busy {r['busy_ms']:.3f} ms, gap {r['gap_ms']:.3f} ms, "
                  f"{r['kernels_per_call']:.0f} kernels/call, XLA {r['xla_flops']/1e12:.3f} TFLOP "
                  f"{r['xla_bytes']/1e9:.2f} GB")
            print("   by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in r["by_kind_ms"].items()))
            print_gaps(r["gaps"])
            for t in r["top"][:12]:
                print(f"   {t['ms']:8.3f} ms x{t['count']:<4.0f} {t['name']}")
            if "per_layer" in r:
                print_layers(r)
            else:
                print("   per-layer split unavailable:", r.get("per_layer_error"))
            if args.json:  # after every program: a run cut short (a timeout, a fault) keeps what it profiled
                benchmark.write_json(args.json, {**record, "event_samples": device_events.samples,
                                                 "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
