"""Prompting a decoder (tiny random Llama): label-likelihood scoring on pruned caches, chat
templates, the eval.prompting and eval.lm CLIs for Llama, and their input errors."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from accjax import convert, prompting, tokenization
from eval import prompting as prompting_cli
from tests.gpt2_testlib import make_tokenizer
from tests.llama_testlib import make_hf_llama

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama with a tiny byte-level BPE tokenizer, a chat template and a JSONL task."""
    root = tmp_path_factory.mktemp("prompt")
    folder = root / "model"
    tok = make_tokenizer(folder)
    make_hf_llama(folder, vocab_size=tok.get_vocab_size(), eos_token_id=0, bos_token_id=0,
                  max_position_embeddings=256)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT}))
    data = root / "sst.jsonl"
    rows = [{"instruction": "Sentiment?", "input": t, "target": lab} for t, lab in
            [("a fine film", "positive"), ("dull and slow", "negative"), ("to be or not", "positive"),
             ("the slings and arrows", "negative"), ("a sea of troubles", "negative")]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, data


def test_chat_messages_and_render():
    ex = prompting.Example("Sentiment?", "a fine film", "positive")
    shots = [prompting.Example("Sentiment?", "dull", "negative")]
    text = prompting.render_chat(CHAT, prompting.chat_messages(ex, shots))
    assert text == ("<|user|>Sentiment?\n\ndull\n<|assistant|>negative\n"
                    "<|user|>Sentiment?\n\na fine film\n<|assistant|>")
    with pytest.raises(prompting.PromptDataError, match="chat template failed: nope"):
        prompting.render_chat("{{ raise_exception('nope') }}", [])


def test_scores_are_the_full_forward_log_likelihood(tiny):
    folder, _ = tiny
    ld = convert.load(folder, "lm")
    tok = tokenization.Tokenizer.from_folder(folder)
    pred = prompting.DecoderPredictor.from_loaded(ld, batch_size=2, length_buckets=(16, 32))
    ids = tok.encode(["To be, or not to be", "The slings and arrows of outrageous", "Or"],
                     add_special_tokens=False).ids
    t = max(map(len, ids))
    arr = np.zeros((3, t), np.int32)
    mask = np.zeros((3, t), np.int32)
    for i, x in enumerate(ids):
        arr[i, :len(x)], mask[i, :len(x)] = x, 1
    cids, cmask = prompting.label_candidates(tok, ["question", "fortune"], **pred.label_encoding)
    assert cmask.sum(1).max() > 1  # a multi-token candidate, so the cached extend is used
    got = pred.score({"input_ids": arr, "attention_mask": mask}, cids, cmask, speedup=1.0)
    assert got.shape == (3, 2)
    fwd = jax.jit(lambda p, x: ld.module.apply({"params": p}, x).logits)
    for i, x in enumerate(ids):
        for j in range(2):
            c = [int(v) for v, m in zip(cids[j], cmask[j]) if m]
            logp = jax.nn.log_softmax(np.asarray(fwd(ld.params, np.array([x + c])))[0], -1)
            want = sum(float(logp[len(x) - 1 + k, c[k]]) for k in range(len(c)))
            assert abs(got[i, j] - want) <= 1e-4, (i, j, got[i, j], want)
    pruned = pred.score({"input_ids": arr, "attention_mask": mask}, cids, cmask, speedup=2.0)
    assert np.abs(pruned - got).max() > 1e-4


def test_prompting_cli_on_a_llama(tiny, tmp_path, capsys):
    folder, data = tiny
    out = tmp_path / "p.json"
    rc = prompting_cli.main(["--model", str(folder), "--data", str(data), "--labels", "positive,negative",
                             "--speedup", "1,2", "--shots", "0,1", "--prompt", "chat", "--generate",
                             "--batch_size", "4", "--length_buckets", "64", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert [(r["shots"], r["speedup"]) for r in res["rows"]] == [(0, 1.0), (0, 2.0), (1, 1.0), (1, 2.0)]
    assert all(0 <= r["accuracy"] <= 1 for r in res["rows"])
    assert res["rows"][1]["analytic_speedup"] > 1.5 and res["prompt"] == "chat"
    gen = res["generation"]["rows"]
    assert len(gen) == 4 and all(0 <= r["exact_match"] <= 1 for r in gen)
    assert len(res["generation"]["predictions"]["0-shot@2"]) == 5


def test_prompting_cli_errors(tiny, tmp_path, capsys):
    folder, data = tiny
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in folder.iterdir():
        if f.name != "tokenizer_config.json":
            (plain / f.name).write_bytes(f.read_bytes())
    cases = [
        (["--model", str(plain), "--data", str(data), "--labels", "positive,negative", "--prompt", "chat"],
         "has no chat template"),
        (["--model", str(folder), "--data", str(data), "--task", "rt_polarity"], "exactly one of --data"),
        (["--model", str(folder), "--data", str(data), "--generate"], "--generate scores the label words"),
        (["--model", str(folder), "--data", str(data), "--labels", "positive,negative",
          "--speedup", "1,0.5"], "is below 1 (1 = the dense model)"),
    ]
    for argv, msg in cases:
        rc = prompting_cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, (argv, err)


def test_lm_bench_on_llama_imports_no_datasets(tiny, tmp_path):
    """The GPU benchmark path (eval.lm --bench, random weights): runs on a Llama, times dense
    and each speedup in one run, and never imports datasets or ml_collections."""
    folder, _ = tiny
    out = tmp_path / "b.json"
    code = ("import sys; from eval import lm; rc = lm.main(['--bench', '--model', sys.argv[1], "
            "'--context', '64', '--batch', '2', '--speedups', '2,3', '--iters', '1', '--json', sys.argv[2]]); "
            "bad = [m for m in ('datasets', 'ml_collections') if m in sys.modules]; "
            "print('IMPORTED', bad); sys.exit(rc or bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IMPORTED []" in proc.stdout
    res = json.loads(out.read_text())
    assert [r["speedup"] for r in res["rows"]] == [1.0, 2.0, 3.0]
    assert all(r["ttft_ms"] > 0 for r in res["rows"])
