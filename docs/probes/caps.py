"""Probe (issues 15 and 17): what the time that does not shrink with the rows caps each open
cell at, from saved ``eval.profile`` / ``eval.bench`` JSON (no device needed).

For a level of analytic speedup A, a program whose time is a part F that runs whatever the
level keeps plus a part that scales exactly with the FLOPs takes at least

    T_A >= (T_dense - F) / A + F,

so no schedule reaches more than T_dense / T_A. This prints that bound for

* Flan-T5 encoder + first token: F = the first decoder step after its cross-K/V projection
  (the kernels at 16 rows), less its cross-attention (which reads the kept encoder rows),
  from the 4x profile;
* GPT-2 prefill: a fit t(r) = a + b r of each layer's time against the rows it keeps, from the
  dense and the 3.72x profiles' layers that do not cut; F = 12 a plus the embeddings and head,
  and the wall clock's gaps as measured;
* BERT-base 4.8x: what the tail layers would save with their GEMMs at the dense program's
  efficiency.

    python docs/probes/caps.py [docs/data/issue17_h100_session69.json]
"""
import json
import sys

import numpy as np

PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 with fp32 accumulation

path = sys.argv[1] if len(sys.argv) > 1 else "docs/data/issue17_h100_session69.json"
data = json.load(open(path))


def layer_us(result):
    """{layer name: device us} of one ``eval.profile`` result."""
    return {k: sum(c["us"] for c in v.values()) for k, v in result["per_layer"].items()}


def cap(t_dense, fixed, analytic, gaps=0.0):
    """(least wall ms, speedup, fraction of analytic) with ``fixed`` ms not shrinking."""
    t = (t_dense - fixed) / analytic + fixed + gaps
    return t, t_dense / t, t_dense / t / analytic


# Flan-T5-base 16 x 512: dense (same process as the 4x rows, call 4) and the 4x profile (call 11)
t5_dense = next(r["pipelined_ms"] for r in data["call4_t5.json"]["rows"] if r["speedup"] == 1.0)
t5 = data["call11_profile_t5.json"]["results"][0]
events = t5["events_one_call"]
kv = max(range(len(events)), key=lambda i: events[i][1] if i > len(events) // 3 else -1)  # the cross-K/V GEMM
decoder_ms = sum(us for _, us in events[kv + 1:]) / 1e3
cross_ms = sum(v.get("attention", {}).get("us", 0.0) for k, v in t5["per_layer"].items() if k.startswith("dec")) / 1e3
fixed_ms = decoder_ms - cross_ms
encoder_ms = sum(us for _, us in events[:kv + 1]) / 1e3
t, s, f = cap(t5_dense, fixed_ms, t5["analytic"])
print(f"Flan-T5 16x512 4x: dense {t5_dense:.3f} ms, level {t5['wall_ms']:.3f} wall / {t5['busy_ms']:.3f} busy, "
      f"analytic {t5['analytic']:.3f}")
need = t5_dense / (0.8 * t5["analytic"])
print(f"  first decoder step after the cross-K/V GEMM ({events[kv][1]:.0f} us): {decoder_ms * 1e3:.0f} us in "
      f"{len(events) - kv - 1} kernels, of which cross-attention {cross_ms * 1e3:.0f} us: fixed {fixed_ms * 1e3:.0f} us")
print(f"  cap: {t:.3f} ms, {s:.2f}x, {f:.3f} of analytic; 0.8 needs {need:.3f} ms, so the rest must fit in "
      f"{need - fixed_ms:.3f} ms against {(t5_dense - fixed_ms) / t5['analytic']:.3f} exact")
print(f"  the rest as measured: encoder + cross-K/V {encoder_ms:.3f} busy, cross-attention {cross_ms:.3f}, gaps "
      f"{t5['wall_ms'] - t5['busy_ms']:.3f}: {encoder_ms + cross_ms + t5['wall_ms'] - t5['busy_ms']:.3f} ms")

# GPT-2 8 x 1024 prefill: dense and 3.72x profiles (calls 1 and 11)
dense, = [r for r in data["call1_prof_gpt2.json"]["results"] if r["speedup"] == 1.0]
lvl = data["call11_profile_gpt2.json"]["results"][0]
sched, us = lvl["schedule"], layer_us(lvl)
d_us = layer_us(dense)
rows, times = [1024.0], [float(np.median([d_us[str(i)] for i in range(1, 12)]))]
n_in = 1024
for i, keep in enumerate(sched):
    if keep == n_in and i > 0:  # a layer that does not cut
        rows.append(keep)
        times.append(us[str(i)])
    n_in = keep
b, a = np.polyfit(rows, times, 1)
resid = np.array(times) - (a + b * np.array(rows))
outside = (us.get("-", 0.0) + lvl["per_layer"]["0"].get("outside layers", {}).get("us", 0.0)) / 1e3
gaps = lvl["wall_ms"] - lvl["busy_ms"]
print(f"GPT-2 8x1024: dense {dense['wall_ms']:.3f} wall / {dense['busy_ms']:.3f} busy; layer fit t(r) = {a:.1f} us + "
      f"{b:.3f} us x r (residuals {resid.min():+.1f} to {resid.max():+.1f}); embeddings + head {outside * 1e3:.0f} us, "
      f"gaps {gaps * 1e3:.0f} us")
layer_dense = times[0]
for level in (2.0, 3.0, 3.72):
    busy = (12 * a + (layer_dense - a) * 12 / level) / 1e3 + outside
    t = busy + gaps
    print(f"  {level}x: at least {t:.3f} ms -> {dense['wall_ms'] / t:.2f}x, {dense['wall_ms'] / t / level:.3f} of analytic")

# BERT-base 128 x 128 4.8x (call 8: dense and 4.8x in one profile)
bd, b48 = data["call8_profile128.json"]["results"]
layer_gemm = lambda r, i: r["per_layer"][str(i)]["gemm"]["us"]
dense_gemm = float(np.median([layer_gemm(bd, i) for i in range(1, 12)]))
flops_row = 2 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)  # one row through BERT-base's four GEMMs
dense_eff = 128 * 128 * flops_row / (dense_gemm * 1e-6) / 1e12 / PEAK_TFLOPS
tail = [i for i, keep in enumerate(b48["schedule"]) if i > 0 and keep == b48["schedule"][i - 1]
        and keep == min(b48["schedule"])]
tail_gemm = float(np.median([layer_gemm(b48, i) for i in tail]))
tail_rows = 128 * min(b48["schedule"])
tail_eff = tail_rows * flops_row / (tail_gemm * 1e-6) / 1e12 / PEAK_TFLOPS
saved = len(tail) * tail_gemm * (1 - tail_eff / dense_eff) / 1e3
t = b48["wall_ms"] - saved
print(f"BERT-base 128x128 4.8x: dense {bd['wall_ms']:.3f} ms (GEMMs {dense_eff:.0%} of peak), level "
      f"{b48['wall_ms']:.3f} ms, analytic {b48['analytic']:.3f}; {len(tail)} tail layers of {tail_rows} rows, GEMMs "
      f"{tail_gemm:.1f} us ({tail_eff:.0%}); at the dense efficiency {saved * 1e3:.0f} us less: "
      f"{bd['wall_ms'] / t / b48['analytic']:.3f} of analytic (0.85 needs {bd['wall_ms'] / (0.85 * b48['analytic']):.3f} ms)")
