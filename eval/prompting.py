"""Prompting evaluation of a T5 / Flan-T5 or decoder checkpoint at several speedups, zero- and few-shot.

    python -m eval.prompting --model /path/to/flan-t5-base --data sst2.jsonl \
        --labels positive,negative --speedup 1,2,3 --shots 0,3 --json prompting.json
    python -m eval.prompting --model /path/to/flan-t5-base --data qa.jsonl --max_new_tokens 16

With ``--labels`` each example is classified by the likelihood of each label word
(accuracy); without, the model generates greedily (exact match and token F1). Prompt layout,
exemplar choice and metrics: ``accjax.prompting``. Prints one row per (shots, speedup);
``--json`` also writes every prediction. Decoders (GPT-2, Llama; e.g. the built-in real
``smollm2-135m``) prefill the prompt with elimination and score each label word on the
pruned KV caches; ``--prompt chat`` applies the model's chat template (exemplars become
earlier turns)::

    python -m eval.prompting --model smollm2-135m --task rt_polarity --limit 200 \
        --labels positive,negative --speedup 1,1.5,2,3,4 --shots 0,3 --prompt chat \
        --generate --reference hf --json smollm2_rt_chat.json
"""

from __future__ import annotations

if __name__ == "__main__":  # malloc with huge pages for XLA's CPU buffers: restarts once
    from accjax import host_memory

    host_memory.ensure()

import argparse
import sys

from eval import cli
from eval.lm import DECODERS


def hf_reference(folder, tok, examples, *, shots, pool, seed, max_length, render, labels,
                 label_encoding, generate_tokens: int) -> list[dict]:
    """transformers' fp32 dense results on the same prompts: label-likelihood accuracy and,
    with ``generate_tokens``, greedy exact match (one prompt at a time, no padding)."""
    import numpy as np
    import torch

    from accjax import prompting
    from eval import lm as lm_cli

    model = lm_cli.hf_model(folder)
    gold = [labels.index(e.target) for e in examples]
    cands = tok.encode([label_encoding["prefix"] + w for w in labels], add_special_tokens=False).ids
    rows = []
    for k in shots:
        ids, _ = prompting.encode_prompts(tok, examples, shots=k, pool=pool, seed=seed,
                                          max_length=max_length, render=render)
        correct, em = 0, 0
        for i, p in enumerate(ids):
            scores = []
            for c in cands:
                x = torch.tensor([p + c])
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=x).logits[0, len(p) - 1:-1].double(), -1)
                scores.append(float(logp.gather(-1, torch.tensor(c)[:, None]).sum()))
            correct += int(np.argmax(scores) == gold[i])
            if generate_tokens:
                with torch.no_grad():
                    out = model.generate(torch.tensor([p]), max_new_tokens=generate_tokens,
                                         do_sample=False, pad_token_id=model.config.eos_token_id)
                text = tok.decode(out[0, len(p):].tolist())
                em += prompting.exact_match((text.strip().splitlines() or [""])[0], examples[i].target)
        row = {"shots": k, "accuracy": correct / len(ids), "n": len(ids)}
        if generate_tokens:
            row["exact_match"] = em / len(ids)
        rows.append(row)
        print(f"# transformers fp32 dense, {k}-shot: accuracy {row['accuracy']:.4f}"
              + (f", exact match {row['exact_match']:.4f}" if generate_tokens else ""), flush=True)
    return rows


def run(args) -> dict:
    from accjax import benchmark, convert, prompting, seq2seq, tokenization

    speedups, shots = cli.speedups(args.speedup, "--speedup"), cli.ints(args.shots, "--shots")
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    if labels is not None and len(labels) < 2:
        raise ValueError("--labels needs at least two label words")
    if (args.data is None) == (args.task is None):
        raise ValueError("give exactly one of --data FILE.jsonl or --task rt_polarity")
    if args.generate and not labels:
        raise ValueError("--generate scores the label words by exact match: give --labels too")
    if args.task:
        examples = prompting.rt_polarity_examples("validation", args.limit or None)
        pool = (prompting.load_jsonl(args.exemplars) if args.exemplars
                else prompting.rt_polarity_examples("train", 2000))
    else:
        examples = prompting.load_jsonl(args.data)[:args.limit or None]
        pool = prompting.load_jsonl(args.exemplars) if args.exemplars else None
    ld = convert.load(args.model, "lm", dtype=args.dtype)
    tok = tokenization.Tokenizer.from_folder(ld.folder, max_length=args.max_length)
    if ld.family.name == "t5":
        if args.prompt == "chat" or args.reference:
            raise ValueError("--prompt chat and --reference are for decoders; T5 prompts are plain")
        pred = seq2seq.Seq2SeqPredictor.from_loaded(ld, batch_size=args.batch_size, param_dtype=args.dtype,
                                                     acc_variant=args.acc_variant)
    elif ld.family.name in DECODERS:
        pred = prompting.DecoderPredictor.from_loaded(
            ld, chat_template=tok.chat_template if args.prompt == "chat" else None,
            batch_size=args.batch_size, param_dtype=args.dtype, acc_variant=args.acc_variant,
            length_buckets=cli.ints(args.length_buckets, "--length_buckets", low=1))
        if args.prompt == "chat" and tok.chat_template is None:
            raise ValueError(f"{args.model} has no chat template; use --prompt plain")
    else:
        raise ValueError(f"{args.model} is a {ld.family.name} model; prompting evaluation needs T5 "
                         f"or a decoder ({', '.join(DECODERS)})")
    print(f"# {args.model}: {len(examples)} examples, "
          f"{'classification over ' + ','.join(labels) if labels else 'generation'}, "
          f"prompt {args.prompt}, {benchmark.machine()['device']}")
    print(f"{'shots':>5} {'speedup':>7} {'analytic':>8} " +
          ("accuracy" if labels else "   EM     F1") + "  dropped truncated      s")

    def log(r):
        metric = (f"{r['accuracy']:8.4f}" if "accuracy" in r else f"{r['exact_match']:.4f} {r['token_f1']:.4f}")
        print(f"{r['shots']:>5} {r['speedup']:>7.2f} {r['analytic_speedup']:>8.2f} {metric}"
              f"  {r['shots_dropped']:>7} {r['truncated']:>9} {r['seconds']:6.1f}", flush=True)

    kw = dict(speedups=speedups, shots=shots, pool=pool, max_new_tokens=args.max_new_tokens,
              max_length=args.max_length, seed=args.seed, log=log)
    result = prompting.evaluate(pred, tok, examples, labels=labels, **kw)
    if args.generate:
        print("# free generation (greedy), exact match of the label word:")
        result["generation"] = prompting.evaluate(pred, tok, examples, labels=None, **kw)
    if args.reference == "hf":
        result["hf_reference"] = hf_reference(
            ld.folder, tok, examples, shots=shots, pool=pool, seed=args.seed,
            max_length=min(args.max_length, pred.length_buckets[-1]),
            render=getattr(pred, "render", None), labels=labels,
            label_encoding=pred.label_encoding, generate_tokens=args.max_new_tokens if args.generate else 0)
    result.update(model=str(args.model), data=str(args.data or args.task), prompt=args.prompt,
                  machine=benchmark.machine())
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.prompting", description=__doc__.splitlines()[0])
    ap.add_argument("--model", "--checkpoint", dest="model", required=True,
                    help="local HF T5 / GPT-2 / Llama folder, .gguf file, smollm2-135m, or accjax folder")
    ap.add_argument("--data", default=None, help='JSONL: {"instruction", "input", "target"} per line')
    ap.add_argument("--task", default=None, choices=["rt_polarity"],
                    help="instead of --data: rt_polarity dev (exemplars from its train split)")
    ap.add_argument("--prompt", default="plain", choices=["plain", "chat"],
                    help="decoders: the 'Answer:' layout or the model's chat template")
    ap.add_argument("--generate", action="store_true",
                    help="with --labels: also generate greedily and score exact match of the label word")
    ap.add_argument("--reference", default=None, choices=["hf"],
                    help="decoders: also transformers' fp32 dense result on the same prompts")
    ap.add_argument("--speedup", default="1", help="comma list of speedups >= 1, e.g. 1,2,3")
    ap.add_argument("--shots", default="0", help="comma list of exemplar counts, e.g. 0,3")
    ap.add_argument("--labels", default=None, help="label words, e.g. positive,negative (classification)")
    ap.add_argument("--exemplars", default=None, help="JSONL exemplar pool (default: the data, leave-one-out)")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="default 32 (T5), 6 with --generate")
    ap.add_argument("--max_length", type=int, default=512, help="prompt tokens (longest length bucket)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--length_buckets", default="64,128,256,512,1024",
                    help="decoders: prompt lengths compiled for (fewer buckets, fewer compilations)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--acc_variant", default="plain")
    ap.add_argument("--limit", type=int, default=0, help="evaluate only the first N examples")
    ap.add_argument("--seed", type=int, default=0, help="exemplar choice")
    ap.add_argument("--json", default=None, help="write rows, predictions and the machine here")
    args = ap.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 6 if args.generate else 32
    return cli.run(lambda: run(args), json_path=args.json, errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
