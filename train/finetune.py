"""Fine-tuning entry point: a config file in, a run folder out.

    python -m train.finetune --config configs/rt_minilm.py
    python -m train.finetune --config configs/rt_minilm.py:elastic --config.optim.lr=3e-5
    python -m train.finetune --config configs/glue_bert_base.py:sst2 --config.data_dir=/data/glue
    python -m train.finetune --config configs/rt_minilm.py:elastic --seeds 0,1,2   # mean +- std

A key the config does not have is an error (the config is locked). Restarting with the same
config and run_dir resumes from the latest checkpoint. Multi-host: set
JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID in every process's
environment (or run where jax detects the cluster itself) and start the same command on every
host; see accjax/sharding.py.
"""

from __future__ import annotations

if __name__ == "__main__":  # malloc with huge pages for XLA's CPU buffers: restarts once
    from accjax import host_memory

    host_memory.ensure()

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file, optionally with ':arg' (see configs/)", lock_config=True)
flags.mark_flags_as_required(["config"])
_SEEDS = flags.DEFINE_string("seeds", None, "comma list: one run per seed in RUN_DIR/seed{N}, then their "
                             "mean and standard deviation in RUN_DIR/seeds.md (and .json)")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with an unknown or repeated ``--config.*`` key reported in one line
    (exit 2)."""
    keys = [a[2:].split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:  # ml_collections would join a repeated tuple's values: (1, 4.8) twice -> (1, 4.8, 1, 4.8)
        print(f"error: --{twice[0]} is given {keys.count(twice[0])} times; pass each --config.* override once",
              file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections' locked config: no such key
        detail = e
        while isinstance(detail, BaseException) and detail.args:
            detail = detail.args[0]
        detail = " ".join(str(detail).split())
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        print(f"error: the config has no key {detail} (overrides given: {', '.join(overrides)})",
              file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:  # a value of the wrong type, a missing --config, a bad ':arg'
        text = str(e)
        if "Traceback" in text:  # ml_collections wraps the config file's own error with its trace
            text = f"--config: {text.strip().splitlines()[-1].partition(': ')[2]}"
        print(f"error: {' '.join(text.split())}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax", "orbax.checkpoint", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # ml_collections loads a missing or broken config file only when it is first read
        _CONFIG.value.get("objective")
    except OSError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        print(f"error: --config: {detail}; pass a config file, e.g. --config configs/rt_minilm.py",
              file=sys.stderr)
        sys.exit(2)
    from accjax import sharding

    sharding.maybe_initialize_distributed()
    from accjax import guards, loop

    # Bad input: one line, exit 2 (checked before the long work); divergence: one line, exit 1.
    if _SEEDS.value:
        from eval import cli

        seeds = guards.exit_on_user_error(lambda: cli.ints(_SEEDS.value, "--seeds", low=0))
        guards.exit_on_user_error(lambda: loop.fit_seeds(_CONFIG.value, seeds))
    else:
        guards.exit_on_user_error(lambda: loop.fit(_CONFIG.value))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
