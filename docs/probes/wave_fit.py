"""Probe (issue 17, no device): BERT-base programs' times against FLOPs, GEMM tile waves and the
attention kernel's padding.

Reads the forty-second session's H100 rows (``docs/data/issue17_h100_session71.json``: every
program's keep-lengths and its pipelined time as a fraction of its process's dense time) and
fits, per shape, by least squares

    time / dense time  ~  a + b * G + c * (cutting layers)

where G is the layers' GEMM cost relative to dense under one of two models:
- ``flops``: M x N x K summed over each layer's four projections (what the analytic speedup counts);
- ``waves tm x tn``: each GEMM runs ceil(M / tm) x ceil(N / tn) tiles in waves of 132 (the
  H100's SMs), and a wave costs as much as a full one: waves x tm x tn x K.
M is the batch times the rows a layer projects (q/k/v: the rows in; the attention output and
the feed-forward: the rows kept). The attention itself is the fit's third term: the exact
query-key pairs, or (with FLOPs) the pairs as the Pallas kernel pads them
(``acc_pallas.attention_blocks``). A model that explains the times better leaves a smaller
residual. Found (docs/benchmarks.md, forty-second session): the padded attention explains them
best at both shapes; waves of large tiles worse than FLOPs.

    python docs/probes/wave_fit.py

Not part of the package.
"""
import json
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
D, F, SMS = 768, 3072, 132
TILES = [(64, 128), (128, 64), (128, 128), (128, 192), (128, 256), (256, 128), (192, 192), (256, 256)]


def gemms(b: int, n: int, keep) -> list[tuple[int, int, int]]:
    """(M, N, K) of every projection in the program."""
    out, n_in = [], n
    for n_out in keep:
        n_out = min(n_out, n_in)
        out += [(b * n_in, 3 * D, D), (b * n_out, D, D), (b * n_out, F, D), (b * n_out, D, F)]
        n_in = n_out
    return out


def cost(g, tile=None) -> float:
    if tile is None:
        return float(sum(m * nn * k for m, nn, k in g))
    tm, tn = tile
    return float(sum(math.ceil(math.ceil(m / tm) * math.ceil(nn / tn) / SMS) * tm * tn * k for m, nn, k in g))


def attention(b: int, n: int, keep, padded: bool = False) -> float:
    """Query-key pairs of every layer's attention; ``padded``: as the Pallas kernel pads them
    (``acc_pallas.attention_blocks``: a cutting layer with column sums, the others without;
    under ``xla_attention_below`` = 64 keys XLA's attention, unpadded)."""
    from accjax.kernels import acc_pallas

    total, n_in = 0.0, n
    for n_out in keep:
        n_out = min(n_out, n_in)
        if padded and n_in >= 64:
            _, _, tp, sp = acc_pallas.attention_blocks(n_in, n_in, columns=n_out < n_in)
            total += b * tp * sp
        else:
            total += b * n_in * n_in
        n_in = n_out
    return total


def main() -> None:
    data = json.loads((ROOT / "docs/data/issue17_h100_session71.json").read_text())
    by_shape: dict[str, list] = {}
    for proc in data["processes"]:
        for r in proc["rows"]:
            if r["speedup"] != 1.0:
                by_shape.setdefault(r["shape"], []).append(r)
    for shape, rows in by_shape.items():
        b, n = (int(v) for v in shape.split("x"))
        y = np.array([1.0 / r["measured_pipelined"] for r in rows])  # time / dense time
        cuts = np.array([sum(1 for i, k in enumerate(r["schedule"]) if k < ([n] + r["schedule"])[i])
                         for r in rows], float)
        print(f"{shape}: {len(rows)} programs; residual RMS of time / dense time (and the fitted b)")
        results = []
        for tile, padded in [(None, False), (None, True), *((t, False) for t in TILES)]:
            att = np.array([attention(b, n, r["schedule"], padded) / attention(b, n, [n] * 12, padded) for r in rows])
            dense = cost(gemms(b, n, [n] * 12), tile)
            g = np.array([cost(gemms(b, n, r["schedule"]), tile) / dense for r in rows])
            x = np.stack([np.ones_like(g), g, att, cuts], 1)
            coef, *_ = np.linalg.lstsq(x, y, rcond=None)
            rms = float(np.sqrt(np.mean((x @ coef - y) ** 2)))
            name = (("flops" + (", attention padded" if padded else "")) if tile is None
                    else f"waves {tile[0]}x{tile[1]}")
            results.append((rms, name, coef))
        for rms, name, coef in sorted(results, key=lambda t: t[0]):
            print(f"  {name:>26}: {rms:.4f}   (a {coef[0]:+.3f}, b {coef[1]:.3f}, attention {coef[2]:+.3f}, "
                  f"per cut {coef[3]:+.4f})")


if __name__ == "__main__":
    main()
