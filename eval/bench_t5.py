"""``python -m eval.bench_t5``: ``eval.bench`` timing T5 to its first token, with T5 defaults."""
if __name__ == "__main__":  # malloc with huge pages for XLA's CPU buffers: restarts once
    from accjax import host_memory

    host_memory.ensure()

import sys

from eval import bench


def main(argv=None) -> int:
    return bench.main(["--family", "t5", "--model", "flan-t5-base", "--shapes", "16x512", "--dtype", "bfloat16",
                       "--speedups", "1.5,2,3,4", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
