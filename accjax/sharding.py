"""Meshes, logical-to-mesh rules, and moving host data onto (possibly many) hosts' devices.

Parameters carry logical axis names (``accjax.models.common``: ``vocab``, ``embed``, ``mlp``,
``heads``, ...); batches carry ``batch`` on their leading axis. Only a config maps those names
to the two mesh axes, ``data`` and ``fsdp``::

    mesh = make_mesh(data=-1, fsdp=1)                  # all devices data-parallel
    rules = DP_RULES                                   # batch -> ('data', 'fsdp'), params replicated
    rules = FSDP_RULES                                 # ... and 'embed' split over 'fsdp'

A logical name without a rule is replicated. The batch is split over BOTH mesh axes, so every
device sees B / (data * fsdp) rows whichever rules hold. Under FSDP the parameters, their
gradients as the update sees them and the Adam moments are stored split over 'fsdp'; the
train step all-gathers the parameters for the forward and backward pass and reduce-scatters
the gradients (ZeRO-3 style, ``train.Trainer._gathered``), so activations stay batch-sharded.

Multi-host (``maybe_initialize_distributed``): every process builds the same GLOBAL numpy
batch and hands over only the rows its devices hold (``to_global``); parameters start as the
same numpy arrays on every process and are placed with ``put``. The run folder must be on a
filesystem every process sees (orbax writes one checkpoint together; process 0 writes logs
and the exported model, which every process reads back at the end).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from accjax.guards import UserError  # bad mesh / batch settings: one line, exit 2

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH = "batch"  # logical name of the leading axis of every batch array

# Data-parallel: the batch is split over every device, parameters are replicated.
DP_RULES: tuple[tuple[str, Any], ...] = ((BATCH, ("data", "fsdp")),)
# FSDP: parameters (and the optimizer moments with them) split their model dimension over
# 'fsdp'; 'embed' is on every kernel and table of the BERT / T5 families.
FSDP_RULES: tuple[tuple[str, Any], ...] = ((BATCH, ("data", "fsdp")), ("embed", "fsdp"))


# ------------------------------------------------------------------- kernels under GSPMD
_BATCH_PARTITIONED: dict[Any, Any] = {}


def batch_partitioned(key: Any, fn, args: Sequence[Any], batched: Sequence[bool],
                      axes: Sequence[int] | None = None):
    """``fn(*args)`` as an op the SPMD partitioner splits along the leading (batch) axis.

    A Pallas kernel is an opaque custom call to XLA's partitioner: in a program whose inputs
    are sharded over several devices it would all-gather them and run the whole batch on
    every device. Every kernel of ``accjax.kernels`` is independent per example, so this runs
    it on each device's rows: ``batched[i]`` says whether ``args[i]``'s axis 0 is the batch
    (split as the first batched argument's is, every other axis whole; ``axes[i]``, when
    given, names another axis as ``args[i]``'s batch), else the argument is replicated (None
    arguments stay Python constants); every result is batched along its axis 0. Only in a
    process that sees more than one device: with one, ``fn`` is called as it is (the
    programs measured in docs/benchmarks.md). ``key`` names ``fn`` with its static arguments
    (the wrapped op is built once per key, present arguments and ranks)."""
    if jax.device_count() == 1:
        return fn(*args)
    from jax.experimental.custom_partitioning import custom_partitioning

    present = [i for i, a in enumerate(args) if a is not None]
    operands = [args[i] for i in present]
    flags = [bool(batched[i]) for i in present]
    where = [axes[i] if axes is not None else 0 for i in present]
    cache_key = (key, tuple(present), tuple(len(a.shape) for a in operands), tuple(flags), tuple(where))
    op = _BATCH_PARTITIONED.get(cache_key)
    if op is None:
        n_args = len(args)

        def call(*ops):  # the None arguments stay None
            full = [None] * n_args
            for i, a in zip(present, ops):
                full[i] = a
            return fn(*full)

        lead = flags.index(True)

        def first_axis(shape):  # how the first batched operand splits its batch axis
            sh, ax = shape.sharding, where[lead]
            return tuple(sh.spec)[ax] if isinstance(sh, NamedSharding) and len(sh.spec) > ax else None

        def sharded(mesh, first, rank, batch, ax=0):
            return NamedSharding(mesh, P(*([None] * ax), first, *([None] * (rank - 1 - ax))) if batch else P())

        def results(mesh, first, result_shape):
            outs = [sharded(mesh, first, len(r.shape), True) for r in jax.tree.leaves(result_shape)]
            return tuple(outs) if isinstance(result_shape, (tuple, list)) else outs[0]

        def infer(mesh, arg_shapes, result_shape):
            return results(mesh, first_axis(arg_shapes[lead]), result_shape)

        def partition(mesh, arg_shapes, result_shape):
            first = first_axis(arg_shapes[lead])
            ins = tuple(sharded(mesh, first, len(a.shape), b, ax) for a, b, ax in zip(arg_shapes, flags, where))
            return mesh, call, results(mesh, first, result_shape), ins

        names = iter(range(1 << 30))

        def factors(rank, batch, ax=0):
            names_ = [f"x{next(names)}" for _ in range(rank - batch)]
            return " ".join(names_[:ax] + ["b"] + names_[ax:] if batch else names_)

        out_ranks = [len(r.shape) for r in jax.tree.leaves(jax.eval_shape(call, *operands))]
        rule = (", ".join(factors(len(a.shape), b, ax) for a, b, ax in zip(operands, flags, where)) + " -> "
                + ", ".join(factors(r, True) for r in out_ranks))
        op = custom_partitioning(call)
        op.def_partition(infer_sharding_from_operands=infer, partition=partition, sharding_rule=rule)
        _BATCH_PARTITIONED[cache_key] = op
    return op(*operands)


# ----------------------------------------------------------------------------- processes
def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """Starts ``jax.distributed`` when a coordinator address is given or in
    ``JAX_COORDINATOR_ADDRESS`` (``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` or jax's cluster
    detection give the rest); returns whether it did. CPU collectives go through gloo."""
    addr = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not addr:
        return False
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(addr, num_processes=num_processes, process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Process 0 writes logs, metrics and exports."""
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------- mesh
def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over ``devices`` (default: all, every process's); one axis size may
    be -1 (the devices the other leaves); sizes that do not use every device are a UserError."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, fsdp = int(data), int(fsdp)
    if data == -1 and fsdp == -1:
        raise UserError("at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        data = n // max(fsdp, 1)
    if fsdp == -1:
        fsdp = n // max(data, 1)
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise UserError(f"mesh data={data} x fsdp={fsdp} does not use the {n} devices "
                         "(set one of them to -1 to take the rest)")
    # Process-major order (jax.devices() lists each process's devices together), so each
    # process's devices hold a contiguous block of batch rows.
    return Mesh(np.array(devices, dtype=object).reshape(data, fsdp), MESH_AXES)


def normalize_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Config rules (lists from ml_collections / JSON) -> flax's tuple form, checked.

    Each rule is (logical name, mesh axis | tuple of mesh axes | None).
    """
    out = []
    for r in rules:
        if len(r) != 2 or not isinstance(r[0], str):
            raise UserError(f"a logical axis rule is (logical name, mesh axes), got {r!r}")
        name, axes = r
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
        else:
            bad = [axes] if axes is not None and axes not in MESH_AXES else []
        if bad:
            raise UserError(f"rule {r!r} names mesh axis {bad[0]!r}; the mesh axes are {MESH_AXES}")
        out.append((name, axes))
    if not any(n == BATCH for n, _ in out):
        raise UserError(f"the logical axis rules must map {BATCH!r} (the batch axis), got {out}")
    return tuple(out)


# ----------------------------------------------------------------------------- shardings
def logical_specs(abstract_variables: Any) -> Any:
    """Logical PartitionSpecs of (boxed) variables, e.g. ``jax.eval_shape(module.init, ...)``."""
    return nn.get_partition_spec(abstract_variables)


def mesh_shardings(logical: Any, mesh: Mesh, rules) -> Any:
    """A tree of logical PartitionSpecs -> NamedShardings on ``mesh`` under ``rules``."""
    return nn.logical_to_mesh_sharding(logical, mesh, normalize_rules(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """The sharding of a [B, ...] batch array of ``ndim`` dimensions."""
    spec = nn.logical_to_mesh_axes((BATCH,) + (None,) * (ndim - 1), normalize_rules(rules))
    return NamedSharding(mesh, spec)


def batch_shardings(batch: dict[str, Any], mesh: Mesh, rules) -> dict[str, NamedSharding]:
    return {k: batch_sharding(mesh, rules, np.ndim(v) if not hasattr(v, "shape") else len(v.shape))
            for k, v in batch.items()}


def check_batch_size(global_batch: int, mesh: Mesh, rules, what: str = "batch_size") -> None:
    """The batch must split evenly over the devices its axis is sharded over."""
    spec = batch_sharding(mesh, rules, 1).spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if global_batch % ways:
        raise UserError(f"{what} {global_batch} does not split over {ways} devices "
                         f"(mesh {dict(mesh.shape)}); use a multiple of {ways}")


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """The contiguous block [lo, hi) of batch rows this process's devices hold."""
    idx = sharding.addressable_devices_indices_map(tuple(global_shape))
    rows = [sl[0] if sl else slice(None) for sl in idx.values()]  # each device's batch-axis slice
    starts = [s.start or 0 for s in rows]
    stops = [global_shape[0] if s.stop is None else s.stop for s in rows]
    lo, hi = min(starts), max(stops)
    covered = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)})
    if covered != hi - lo:  # a mesh whose device order breaks the process-major layout
        raise ValueError("this process's devices do not hold a contiguous block of batch rows")
    return lo, hi


def to_global(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """A GLOBAL host batch (the same on every process) -> global jax arrays.

    Each process passes on only the rows its devices hold
    (``jax.make_array_from_process_local_data``); on one process that is all of them.
    """
    out = {}
    for k, v in batch.items():
        lo, hi = process_rows(shardings[k], np.shape(v))
        out[k] = jax.make_array_from_process_local_data(shardings[k], np.asarray(v)[lo:hi], np.shape(v))
    return out


def put(tree: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) -> arrays laid out as ``shardings`` say."""
    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def to_host(tree: Any) -> Any:
    """Device arrays -> numpy on every process (gathers shards other processes hold)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)
