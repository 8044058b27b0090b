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
decay ratio r in (0, 1]. With ``prune_every`` k > 1 only layers 1, 1 + k, 1 + 2k, ... drop
rows (to that same formula) and the layers between keep every row that enters them: fewer
layers pay for ranking, selection and gathers, at the same analytic cost (docs/benchmarks.md;
its accuracy cost: docs/results.md). The bucketed speedup is a non-increasing step function of r;
bisection finds the step where it crosses s and the closer of its two sides is returned,
so the analytic speedup differs from s only by what bucketing allows (at most half a step).

``bucket_up`` rounds up to a multiple of ``bucket`` (8 by default; 128 suits TPUs), and to
the next power of two below ``bucket``, so short inputs still reach one row (the CLS row of
a classifier) in the last layers: 3 -> 4, 5 -> 8, 9 -> 16 with bucket 8; 100 -> 104.

Each model family owns its cost model (``accjax.models.cost_model(config, head)``); this
module knows cost models only.

One policy from a requested speedup to what runs (``plan``), used by every caller: a speedup
is a finite number >= 1 (else ``SpeedupError``); above what the length permits it is clamped
to that maximum and the plan says so (``clamped_from``); a schedule that keeps every row is
the dense program (``schedule is None``).

Example (BERT-base, N = 128, s = 2.0, bucket 8, floor 1), ``cm = models.cost_model(cfg)``:
``plan(cm, 128, 2.0).schedule`` -> 12 non-increasing keep-lengths whose analytic speedup
(``.analytic``) is within a few percent of 2.0; ``plan(cm, 128, 1)`` is dense (``None``);
``plan(cm, 32, 99)`` runs 32's maximum, ``.clamped_from == 99``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence


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


def bucket_up(n: float, bucket: int = 8) -> int:
    """Rounds a row count up: to a multiple of ``bucket``, or below it to a power of two."""
    n = max(1, math.ceil(n - 1e-9))
    if n >= bucket:
        return bucket * math.ceil(n / bucket)
    return 1 << (n - 1).bit_length()


def _bucketed(seq_len: int, num_layers: int, r: float, bucket: int, floor: int,
              prefix: tuple[int, ...] = (), every: int = 1) -> tuple[int, ...]:
    # the layers after ``prefix`` decay from its last keep-length (from seq_len without one);
    # only every ``every``-th of them drops rows, the others keep what enters them
    start, keep = (prefix[-1] if prefix else seq_len), list(prefix)
    for l in range(1, num_layers - len(prefix) + 1):
        if (l - 1) % every == 0:
            cur = min(start, bucket_up(max(floor, start * r ** l), bucket))
        keep.append(cur)
    return tuple(keep)


def analytic_speedup(cm: CostModel, seq_len: int, schedule: Sequence[int]) -> float:
    """cost(dense) / cost(schedule) under the cost model of this module's docstring."""
    schedule = check(schedule, cm.num_layers, seq_len)
    return cm.total(seq_len, (seq_len,) * cm.num_layers) / cm.total(seq_len, schedule)


def max_speedup(cm: CostModel, seq_len: int, *, bucket: int = 8, floor: int = 1) -> float:
    """The largest analytic speedup a schedule can reach at this length: every layer keeps
    ``bucket_up(floor)`` rows (the first layer still attends over all N)."""
    k = min(seq_len, bucket_up(floor, bucket))
    return analytic_speedup(cm, seq_len, (k,) * cm.num_layers)


class SpeedupError(ValueError):
    """A speedup outside what the model and sequence length permit."""


def schedule_for_speedup(
    cm: CostModel, seq_len: int, speedup: float, *, bucket: int = 8, floor: int = 1, prune_every: int = 1
) -> tuple[int, ...]:
    """Per-layer keep-lengths whose analytic speedup is closest to ``speedup`` (the solver;
    callers that turn a user's speedup into a program use ``plan``).

    Raises:
      SpeedupError if ``speedup`` < 1 or above ``max_speedup`` (the message gives the range).
    """
    _check_number(speedup)
    return _solve(cm, int(seq_len), float(speedup), int(bucket), int(floor), check_every(prune_every))


def check_every(prune_every) -> int:
    """``prune_every`` as an int >= 1 (1: every layer may drop rows)."""
    if isinstance(prune_every, bool) or not isinstance(prune_every, int) or prune_every < 1:
        raise ValueError(f"prune_every must be an int >= 1 (1 = every layer drops rows), got {prune_every!r}")
    return prune_every


def check_strides(prune_every) -> tuple[int, ...]:
    """One stride or several (``eval.offline_tune``, ``eval.bench``, ``eval.lm`` time each
    level at each) as a sorted tuple, each checked (``check_every``) and given once."""
    every = [prune_every] if isinstance(prune_every, int) else list(prune_every)
    if not every:
        raise ValueError("prune_every: no stride given")
    return tuple(sorted({check_every(k) for k in every}))


def check_floors(floor) -> tuple[int, ...]:
    """One smallest keep-length or several (``eval.offline_tune`` and ``eval.bench`` time each
    level at each) as a sorted tuple, each an int >= 1, each once."""
    floors = [floor] if isinstance(floor, int) else list(floor)
    if not floors or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in floors):
        raise ValueError(f"floor must be an int >= 1 or a list of them, got {floor!r}")
    return tuple(sorted(set(floors)))


def _check_number(speedup) -> None:
    # below 1 and above the maximum: the solver's message states the permitted range
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not math.isfinite(speedup):
        raise SpeedupError(f"speedup must be a finite number >= 1 (1 = the dense model), got {speedup!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What runs at one padded length for a requested speedup.

    ``keep``: the keep-length of every layer (all ``length`` when dense); ``schedule``: the
    same, or None for the dense program; ``analytic``: its FLOP speedup; ``clamped_from``:
    the requested speedup when the length permits less (then ``analytic`` is the maximum);
    ``searched``: the keep-lengths were searched for the task (``accjax.search``), not decayed.
    """

    length: int
    keep: tuple[int, ...]
    analytic: float
    clamped_from: float | None = None
    searched: bool = False

    @property
    def dense(self) -> bool:
        return all(k >= self.length for k in self.keep)

    @property
    def schedule(self) -> tuple[int, ...] | None:
        return None if self.dense else self.keep


def plan(cm: CostModel, length: int, speedup: float, *, bucket: int = 8, floor: int = 1,
         clamp: bool = True, searched: Mapping[tuple[float, int], Sequence[int]] | None = None,
         prune_every: int = 1) -> Plan:
    """The one policy from a speedup to a program (see the module docstring).

    ``clamp=False`` refuses a speedup above the length's maximum (``SpeedupError`` stating
    the permitted range) instead of running the maximum: for a sweep at ONE length, where a
    clamped row would only repeat the maximum's. ``searched``: (speedup, length) -> the
    keep-lengths an offline-tuning search chose for the task; such a pair runs them at k = 1
    (a searched schedule sets every layer's keep-length, which a stride would fix).
    ``prune_every``: k > 1 drops rows only in layers 1, 1 + k, ... (the module docstring).
    """
    _check_number(speedup)
    every = check_every(prune_every)
    if searched and every == 1 and (float(speedup), int(length)) in searched:
        return dataclasses.replace(explicit(cm, length, searched[float(speedup), int(length)]), searched=True)
    if not clamp:
        _solve(cm, int(length), float(speedup), int(bucket), int(floor), every)  # raises outside the range
    return _plan(cm, int(length), float(speedup), int(bucket), int(floor), every)


@functools.lru_cache(maxsize=4096)
def _plan(cm: CostModel, length: int, speedup: float, bucket: int, floor: int, every: int = 1) -> Plan:
    top = max_speedup(cm, length, bucket=bucket, floor=floor)
    clamped = speedup if speedup > top * (1 + 1e-9) else None
    keep = _solve(cm, length, min(speedup, top), bucket, floor, every)
    return Plan(length, keep, 1.0 if all(k >= length for k in keep) else analytic_speedup(cm, length, keep),
                clamped)


def explicit(cm: CostModel, length: int, schedule: Sequence[int]) -> Plan:
    """A plan for a schedule given as keep-lengths (validated)."""
    keep = check(schedule, cm.num_layers, length)
    return Plan(length, keep, analytic_speedup(cm, length, keep))


@functools.lru_cache(maxsize=4096)
def _solve(cm: CostModel, seq_len: int, speedup: float, bucket: int, floor: int,
           every: int = 1) -> tuple[int, ...]:
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
    return _bisect(cm, seq_len, speedup, bucket, floor, (), every)


def decay_after(cm: CostModel, seq_len: int, speedup: float, prefix: Sequence[int], *,
                bucket: int = 8, floor: int = 1) -> tuple[int, ...] | None:
    """Keep-lengths that start with ``prefix`` (the first layers' keep-lengths, e.g. all
    ``seq_len`` rows for k layers) and then decay by one ratio solved for ``speedup`` as
    ``plan`` does; None when no ratio reaches it within that prefix.

    Example (MiniLM-L6, N = 64): ``decay_after(cm, 64, 2, (64,))`` keeps all rows in layer 1
    and decays faster in layers 2..6 than ``plan(cm, 64, 2).keep`` does."""
    prefix = check(prefix, len(prefix), seq_len) if prefix else ()
    if len(prefix) >= cm.num_layers:
        return None
    lo = analytic_speedup(cm, seq_len, _bucketed(seq_len, cm.num_layers, 1.0, bucket, floor, prefix))
    hi = analytic_speedup(cm, seq_len, _bucketed(seq_len, cm.num_layers, 0.0, bucket, floor, prefix))
    if not lo <= speedup <= hi * (1 + 1e-9):
        return None
    return _bisect(cm, seq_len, float(speedup), int(bucket), int(floor), tuple(prefix))


def _bisect(cm: CostModel, seq_len: int, speedup: float, bucket: int, floor: int,
            prefix: tuple[int, ...], every: int = 1) -> tuple[int, ...]:
    L = cm.num_layers

    def s(r):
        return analytic_speedup(cm, seq_len, _bucketed(seq_len, L, r, bucket, floor, prefix, every))

    lo, hi = 0.0, 1.0  # s(lo) = top >= speedup >= s(hi) (1 without a prefix)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if s(mid) >= speedup else (lo, mid)
    r = lo if abs(s(lo) - speedup) <= abs(s(hi) - speedup) else hi  # lo: at or above the target
    return _bucketed(seq_len, L, r, bucket, floor, prefix, every)


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
