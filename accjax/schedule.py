"""Keep-length schedules: from one speedup number to how many rows each layer keeps.

Cost model (matmul FLOPs per sequence). A layer with ``n_in`` rows entering and ``n_out``
kept, model width d, attention width a (= N*H, d for BERT/GPT-2), feed-forward width f and
m feed-forward matrices (2 for BERT/GPT-2, 3 for gated T5 v1.1)::

    layer(n_in, n_out) = 6 n_in d a       query/key/value projections (all rows)
                       + 4 n_in^2 a       scores QK^T and context PV (all rows; a causal
                                          model counts only the n_in (n_in + 1) / 2
                                          visible pairs, which is what a flash kernel does)
                       + 2 n_out a d      attention output projection (kept rows)
                       + 2 m n_out d f    feed-forward (kept rows)

    cost(schedule) = embed(N) + sum_l layer(n_{l-1}, n_l) + head,   n_0 = N (the input)
    analytic speedup = cost(dense) / cost(schedule),  dense: n_l = N for every l

``embed`` counts the embedding sum and LayerNorm (about 8 d FLOPs a token, no matmul);
``head`` the pooler and classifier (2 d^2 + 2 d C) or whatever the family's head costs.
``tail_per_row`` (default 0) is work done per row that survives the last layer, e.g. T5's
decoder projecting the kept encoder rows to cross-attention keys and values:
``cost += tail_per_row * n_L``.

Schedule from a speedup s: ``keep[l] = bucket_up(max(floor, N * r**l))`` for l = 1..L, one
decay ratio r in (0, 1]. The bucketed speedup is a non-increasing step function of r;
bisection finds the step where it crosses s and the closer of its two sides is returned,
so the analytic speedup differs from s only by what bucketing allows (at most half a step).

``bucket_up`` rounds up to a multiple of ``bucket`` (8 by default; 128 suits TPUs), and to
the next power of two below ``bucket``, so short inputs still reach one row (the CLS row of
a classifier) in the last layers: 3 -> 4, 5 -> 8, 9 -> 16 with bucket 8; 100 -> 104.

Example (BERT-base, N = 128, s = 2.0, bucket 8, floor 1):
``schedule_for_speedup(cfg, 128, 2.0)`` -> 12 non-increasing keep-lengths whose analytic
speedup is within a few percent of 2.0; ``analytic_speedup(cfg, 128, that)`` says exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class CostModel:
    num_layers: int
    d: int  # model width
    f: int  # feed-forward width
    a: int | None = None  # attention width N*H (None: = d)
    ffn_mats: int = 2  # 2: up/down; 3: gated (wi_0, wi_1, wo)
    head: float = 0.0  # per-sequence head FLOPs
    embed_per_token: float = 0.0  # per-token embedding FLOPs
    tail_per_row: float = 0.0  # FLOPs per row surviving the last layer (T5: cross-attn K/V)
    causal: bool = False  # decoders: a query sees only keys at or before it (half the pairs)

    def layer(self, n_in: int, n_out: int) -> float:
        a = self.a or self.d
        pairs = n_in * (n_in + 1) / 2 if self.causal else n_in * n_in  # query-key pairs
        return (6 * n_in * self.d * a + 4 * pairs * a
                + 2 * n_out * a * self.d + 2 * self.ffn_mats * n_out * self.d * self.f)

    def total(self, seq_len: int, schedule: Sequence[int]) -> float:
        cost = self.embed_per_token * seq_len + self.head
        n_in = seq_len
        for n_out in schedule:
            n_out = min(n_out, n_in)
            cost += self.layer(n_in, n_out)
            n_in = n_out
        return cost + self.tail_per_row * n_in


def cost_model(config: Any) -> CostModel:
    """The family's cost model for ``config`` (BERT built in; others via their Family)."""
    from accjax import models

    fam = models.get_family(config.family)
    if getattr(fam, "cost_model", None) is not None:
        return fam.cost_model(config)
    d = config.hidden_size
    return CostModel(
        num_layers=config.num_layers, d=d, f=config.intermediate_size,
        head=2 * d * d + 2 * d * max(1, getattr(config, "num_labels", 1)),
        embed_per_token=8 * d,
    )


def bucket_up(n: float, bucket: int = 8) -> int:
    """Rounds a row count up: to a multiple of ``bucket``, or below it to a power of two."""
    n = max(1, math.ceil(n - 1e-9))
    if n >= bucket:
        return bucket * math.ceil(n / bucket)
    return 1 << (n - 1).bit_length()


def dense_schedule(config: Any, seq_len: int) -> tuple[int, ...]:
    return (seq_len,) * config.num_layers


def _bucketed(seq_len: int, num_layers: int, r: float, bucket: int, floor: int) -> tuple[int, ...]:
    keep = []
    for l in range(1, num_layers + 1):
        k = min(seq_len, bucket_up(max(floor, seq_len * r ** l), bucket))
        keep.append(k)
    return tuple(keep)


def analytic_speedup(config_or_cost: Any, seq_len: int, schedule: Sequence[int]) -> float:
    """cost(dense) / cost(schedule) under the cost model of this module's docstring."""
    cm = config_or_cost if isinstance(config_or_cost, CostModel) else cost_model(config_or_cost)
    schedule = check(schedule, cm.num_layers, seq_len)
    return cm.total(seq_len, (seq_len,) * cm.num_layers) / cm.total(seq_len, schedule)


def max_speedup(config_or_cost: Any, seq_len: int, *, bucket: int = 8, floor: int = 1) -> float:
    """The largest analytic speedup a schedule can reach at this length: every layer keeps
    ``bucket_up(floor)`` rows (the first layer still attends over all N)."""
    cm = config_or_cost if isinstance(config_or_cost, CostModel) else cost_model(config_or_cost)
    k = min(seq_len, bucket_up(floor, bucket))
    return analytic_speedup(cm, seq_len, (k,) * cm.num_layers)


class SpeedupError(ValueError):
    """A speedup outside what the model and sequence length permit."""


def schedule_for_speedup(
    config_or_cost: Any, seq_len: int, speedup: float, *, bucket: int = 8, floor: int = 1
) -> tuple[int, ...]:
    """Per-layer keep-lengths whose analytic speedup is closest to ``speedup``.

    Raises:
      SpeedupError if ``speedup`` < 1 or above ``max_speedup`` (the message gives the range).
    """
    cm = config_or_cost if isinstance(config_or_cost, CostModel) else cost_model(config_or_cost)
    if not isinstance(speedup, (int, float)) or math.isnan(speedup):
        raise SpeedupError(f"speedup must be a number >= 1, got {speedup!r}")
    return _solve(cm, int(seq_len), float(speedup), int(bucket), int(floor))


@functools.lru_cache(maxsize=4096)
def _solve(cm: CostModel, seq_len: int, speedup: float, bucket: int, floor: int) -> tuple[int, ...]:
    """The bisection behind ``schedule_for_speedup``; cached because a serving loop asks for
    the same (length, speedup) on every call and one solve costs ~1 ms of host time."""
    L = cm.num_layers
    top = max_speedup(cm, seq_len, bucket=bucket, floor=floor)
    if speedup < 1 or speedup > top * (1 + 1e-9):
        raise SpeedupError(
            f"speedup {speedup:g} is outside the permitted range [1, {top:.2f}] for "
            f"sequence length {seq_len} ({L} layers, bucket {bucket}, floor {floor}); "
            "1 is the dense model")
    if speedup == 1:
        return (seq_len,) * L

    def s(r):
        return analytic_speedup(cm, seq_len, _bucketed(seq_len, L, r, bucket, floor))

    lo, hi = 0.0, 1.0  # s(lo) = top >= speedup >= 1 = s(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if s(mid) >= speedup:
            lo = mid
        else:
            hi = mid
    a = _bucketed(seq_len, L, lo, bucket, floor)  # speedup >= target
    b = _bucketed(seq_len, L, hi, bucket, floor)  # speedup < target
    sa, sb = s(lo), s(hi)
    return a if abs(sa - speedup) <= abs(sb - speedup) else b


def check(schedule: Sequence[int], num_layers: int, seq_len: int) -> tuple[int, ...]:
    """Validates an explicit schedule: L positive ints, non-increasing, at most ``seq_len``."""
    schedule = tuple(schedule)
    if len(schedule) != num_layers:
        raise ValueError(f"schedule has {len(schedule)} keep-lengths, the model has {num_layers} layers")
    if not all(isinstance(k, int) and 1 <= k <= seq_len for k in schedule):
        raise ValueError(f"keep-lengths must be ints in [1, {seq_len}], got {schedule}")
    if any(b > a for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"keep-lengths must be non-increasing over layers, got {schedule}")
    return schedule
