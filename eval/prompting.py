"""Prompting evaluation of a T5 / Flan-T5 checkpoint at several speedups, zero- and few-shot.

    python -m eval.prompting --model /path/to/flan-t5-base --data sst2.jsonl \
        --labels positive,negative --speedup 1,2,3 --shots 0,3 --json prompting.json
    python -m eval.prompting --model /path/to/flan-t5-base --data qa.jsonl --max_new_tokens 16

``--model`` (alias ``--checkpoint``) is a local HF folder (config.json, model.safetensors,
tokenizer.json; e.g. a downloaded ``google/flan-t5-base``) or an accjax folder. ``--data`` is
JSONL with ``{"instruction", "input", "target"}`` per line. With ``--labels`` each example is
classified by the likelihood of each label word (accuracy); without, the model generates
greedily and is scored by exact match and token F1. Prompt layout, exemplar choice and
metrics: ``accjax.prompting``. Prints one row per (shots, speedup); ``--json`` also writes
every prediction.
"""

from __future__ import annotations

import argparse
import sys


def _floats(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--speedup takes numbers separated by commas, got {s!r}") from None
    if not out:
        raise ValueError("--speedup is empty")
    bad = [x for x in out if not x >= 1]
    if bad:
        raise ValueError(f"speedup must be >= 1 (1 is the dense model), got {bad}")
    return out


def _ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--shots takes integers separated by commas, got {s!r}") from None
    if not out or any(k < 0 for k in out):
        raise ValueError(f"--shots must be integers >= 0, got {s!r}")
    return out


def run(args) -> dict:
    from accjax import benchmark, convert, prompting, seq2seq, tokenization

    speedups, shots = _floats(args.speedup), _ints(args.shots)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    if labels is not None and len(labels) < 2:
        raise ValueError("--labels needs at least two label words")
    examples = prompting.load_jsonl(args.data)
    if args.limit:
        examples = examples[:args.limit]
    pool = prompting.load_jsonl(args.exemplars) if args.exemplars else None
    ld = convert.load(args.model, "lm", dtype=args.dtype)
    if ld.family.name != "t5":
        raise ValueError(f"{args.model} is a {ld.family.name} model; prompting evaluation needs T5")
    tok = tokenization.Tokenizer.from_folder(ld.folder, max_length=args.max_length)
    pred = seq2seq.Seq2SeqPredictor.from_loaded(ld, batch_size=args.batch_size, param_dtype=args.dtype,
                                                 acc_variant=args.acc_variant)
    print(f"# {args.model}: {len(examples)} examples, "
          f"{'classification over ' + ','.join(labels) if labels else 'generation'}, "
          f"{benchmark.machine()['device']}")
    print(f"{'shots':>5} {'speedup':>7} {'analytic':>8} " +
          ("accuracy" if labels else "   EM     F1") + "  dropped truncated      s")

    def log(r):
        metric = (f"{r['accuracy']:8.4f}" if labels else f"{r['exact_match']:.4f} {r['token_f1']:.4f}")
        print(f"{r['shots']:>5} {r['speedup']:>7.2f} {r['analytic_speedup']:>8.2f} {metric}"
              f"  {r['shots_dropped']:>7} {r['truncated']:>9} {r['seconds']:6.1f}", flush=True)

    result = prompting.evaluate(pred, tok, examples, speedups=speedups, shots=shots, labels=labels,
                                pool=pool, max_new_tokens=args.max_new_tokens,
                                max_length=args.max_length, seed=args.seed, log=log)
    result.update(model=str(args.model), data=str(args.data), machine=benchmark.machine())
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.prompting", description=__doc__.splitlines()[0])
    ap.add_argument("--model", "--checkpoint", dest="model", required=True,
                    help="local HF T5 folder (e.g. a downloaded google/flan-t5-base) or accjax folder")
    ap.add_argument("--data", required=True, help='JSONL: {"instruction", "input", "target"} per line')
    ap.add_argument("--speedup", default="1", help="comma list of speedups >= 1, e.g. 1,2,3")
    ap.add_argument("--shots", default="0", help="comma list of exemplar counts, e.g. 0,3")
    ap.add_argument("--labels", default=None, help="label words, e.g. positive,negative (classification)")
    ap.add_argument("--exemplars", default=None, help="JSONL exemplar pool (default: the data, leave-one-out)")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--max_length", type=int, default=512, help="prompt tokens (longest length bucket)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--acc_variant", default="plain")
    ap.add_argument("--limit", type=int, default=0, help="evaluate only the first N examples")
    ap.add_argument("--seed", type=int, default=0, help="exemplar choice")
    ap.add_argument("--json", default=None, help="write rows, predictions and the machine here")
    args = ap.parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        from accjax import benchmark

        benchmark.write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
