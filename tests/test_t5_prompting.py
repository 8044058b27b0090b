"""Prompts, data, metrics, label-likelihood scoring and the eval.prompting CLI on a tiny T5."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from accjax import convert, models, prompting, seq2seq, tokenization
from accjax import schedule as S
from accjax.prompting import Example
from tests.t5_helpers import make_hf_t5, make_tokenizer

SENT = [
    ("the movie was good", "positive"), ("the film was awful", "negative"),
    ("really liked this movie", "positive"), ("hated the plot", "negative"),
    ("great acting and fun", "positive"), ("boring and bad", "negative"),
    ("loved it very much", "positive"), ("not good at all", "negative"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder, hf = make_hf_t5(tmp_path_factory.mktemp("tiny") / "m", seed=2)
    make_tokenizer(folder)
    return folder, hf


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sent.jsonl"
    with open(path, "w") as f:
        for text, label in SENT:
            f.write(json.dumps({"instruction": "review sentiment", "input": text, "target": label}) + "\n")
    return path


# ----------------------------------------------------------------------- prompts, data
def test_prompt_layout_zero_and_few_shot():
    ex = Example("what color", "the sky", "blue")
    shots = [Example("what color", "grass", "green"), Example("what color", "", "red")]
    assert prompting.build_prompt(ex) == "what color\n\nthe sky\nAnswer:"
    assert prompting.build_prompt(ex, shots) == (
        "what color\n\ngrass\nAnswer: green\n\nAnswer: red\n\nthe sky\nAnswer:")
    assert prompting.build_prompt(Example("", "", "x")) == "Answer:"


def test_exemplars_leave_the_example_out_and_are_reproducible():
    for i in range(6):
        idx = prompting.choose_exemplars(6, i, 3, seed=0)
        assert len(set(idx)) == 3 and i not in idx and all(0 <= j < 6 for j in idx)
        assert idx == prompting.choose_exemplars(6, i, 3, seed=0)
    assert any(prompting.choose_exemplars(6, i, 3, seed=0) != prompting.choose_exemplars(6, i, 3, seed=1)
               for i in range(6))
    with pytest.raises(prompting.PromptDataError, match="needs 6 examples"):
        prompting.choose_exemplars(5, 0, 5, seed=0)


def test_jsonl_loader_names_problems(tmp_path, data_file):
    assert len(prompting.load_jsonl(data_file)) == len(SENT)
    cases = {
        "empty.jsonl": ("\n\n", "holds no examples"),
        "bad.jsonl": ('{"target": "a"}\n{"target": oops}\n', r"bad.jsonl:2: not valid JSON"),
        "nt.jsonl": ('{"input": "x"}\n', r"nt.jsonl:1: missing or empty 'target'"),
        "list.jsonl": ('["a"]\n', r"list.jsonl:1: expected a JSON object"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(prompting.PromptDataError, match=msg):
            prompting.load_jsonl(tmp_path / name)
    with pytest.raises(prompting.PromptDataError, match="does not exist"):
        prompting.load_jsonl(tmp_path / "none.jsonl")


def test_exact_match_and_token_f1():
    assert prompting.exact_match("The Cat!", "cat") == 1.0
    assert prompting.exact_match("a dog", "cat") == 0.0
    assert prompting.token_f1("blue sky", "the sky is blue") == pytest.approx(0.8)  # P 1, R 2/3
    assert prompting.token_f1("red", "blue") == 0.0 and prompting.token_f1("", "") == 1.0


def test_long_prompts_drop_exemplars_first(model_dir):
    tok = tokenization.Tokenizer.from_folder(model_dir[0])
    exs = [Example("review sentiment", " ".join(["good"] * 6), "positive") for _ in range(4)]
    ids, stats = prompting.encode_prompts(tok, exs, shots=2, max_length=20)
    assert all(len(x) <= 20 for x in ids) and stats["shots_dropped"] > 0 and stats["truncated"] == 0
    ids, stats = prompting.encode_prompts(tok, exs, shots=0, max_length=5)
    assert stats["truncated"] == 4 and all(len(x) == 5 and x[-1] == 1 for x in ids)  # EOS kept


# ---------------------------------------------------------------------------- scoring
def _hf_loglik(hf, prompt_ids, target_ids):
    with torch.no_grad():
        loss = hf(input_ids=torch.tensor([prompt_ids]), labels=torch.tensor([[int(t) for t in target_ids]])).loss.item()
    return -loss * len(target_ids)


def test_label_scores_equal_direct_likelihoods(model_dir):
    folder, hf = model_dir
    ld = convert.load(folder, "lm")
    tok = tokenization.Tokenizer.from_folder(folder)
    exs = [Example("review sentiment", t, y) for t, y in SENT[:5]]
    ids, _ = prompting.encode_prompts(tok, exs, shots=1)
    cand, cmask = prompting.label_candidates(tok, ["positive", "negative", "neutral"])
    assert cand.shape == (3, 2) and np.all(cand[:, 1] == 1)  # word + EOS
    arr = np.zeros((5, max(map(len, ids))), np.int32)
    mask = np.zeros_like(arr)
    for i, x in enumerate(ids):
        arr[i, :len(x)], mask[i, :len(x)] = x, 1
    pred = seq2seq.Seq2SeqPredictor.from_loaded(ld, batch_size=4, length_buckets=(32,))
    got = pred.score({"input_ids": arr, "attention_mask": mask}, cand, cmask, speedup=1.0)
    ref = np.array([[_hf_loglik(hf, x, list(c[m > 0])) for c, m in zip(cand, cmask)] for x in ids])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # With elimination: the same as a direct forward of the eliminating model.
    sch = pred.schedule(32, 1.5)
    assert sch[-1] < 32
    got = pred.score({"input_ids": arr, "attention_mask": mask}, cand, cmask, speedup=1.5)
    padded = np.pad(arr, ((0, 0), (0, 32 - arr.shape[1])))
    pmask = np.pad(mask, ((0, 0), (0, 32 - mask.shape[1])))
    fwd = jax.jit(functools.partial(ld.module.apply, schedule=sch))
    for c in range(3):
        lab = np.tile(cand[c], (5, 1))
        dec = np.concatenate([np.zeros((5, 1), np.int32), lab[:, :-1]], axis=1)
        logits = np.asarray(fwd({"params": ld.params}, padded, pmask, dec).logits, np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        direct = np.take_along_axis(logp, lab[..., None], -1)[..., 0].sum(-1)
        np.testing.assert_allclose(got[:, c], direct, atol=1e-4)


def test_text_to_text_batch_and_loss_gradient(model_dir):
    folder, hf = model_dir
    ld = convert.load(folder, "lm")
    tok = tokenization.Tokenizer.from_folder(folder)
    exs = [Example("review sentiment", t, y) for t, y in SENT[:3]]
    batch = prompting.text_to_text_batch(tok, exs, source_length=16, target_length=4, batch_size=4)
    assert batch["input_ids"].shape == (4, 16) and batch["labels"].shape == (4, 4)
    assert list(batch["labels"][0]) == [tok.token_to_id("positive"), 1, -100, -100]
    assert np.all(batch["labels"][3] == -100)  # filler row counts nothing
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(batch["input_ids"][:3]).long(),
                 attention_mask=torch.tensor(batch["attention_mask"][:3]).long(),
                 labels=torch.tensor(batch["labels"][:3]).long()).loss.item()
    loss_fn = seq2seq.make_loss_fn(ld.module, schedule=S.schedule_for_speedup(models.cost_model(ld.config), 16, 1.5))
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(ld.params, batch)
    assert float(metrics["target_tokens"]) == 6 and np.isfinite(float(loss))
    assert abs(float(loss) - ref) < 0.5  # eliminated, so close to but not equal to dense
    g = np.asarray(grads["encoder"]["layer_1"]["mlp"]["wo"]["kernel"])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0  # gradients flow through kept rows
    dense_loss, _ = jax.jit(seq2seq.make_loss_fn(ld.module))(ld.params, batch)
    assert abs(float(dense_loss) - ref) <= 1e-5


# -------------------------------------------------------------------------------- CLI
def test_cli_classification_and_generation(model_dir, data_file, tmp_path, capsys):
    from eval import prompting as cli

    folder, _ = model_dir
    out = tmp_path / "r.json"
    rc = cli.main(["--model", str(folder), "--data", str(data_file), "--labels", "positive,negative",
                   "--speedup", "1,1.5", "--shots", "0,1", "--batch_size", "4", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["task"] == "classification" and res["n"] == len(SENT)
    assert [(r["shots"], r["speedup"]) for r in res["rows"]] == [(0, 1.0), (0, 1.5), (1, 1.0), (1, 1.5)]
    for r in res["rows"]:
        preds = res["predictions"][f"{r['shots']}-shot@{r['speedup']:g}"]
        assert r["accuracy"] == np.mean([p == y for p, (_, y) in zip(preds, SENT)])
    assert res["rows"][0]["analytic_speedup"] == 1.0 and 1.2 < res["rows"][1]["analytic_speedup"] < 1.8
    assert "accuracy" in capsys.readouterr().out

    out2 = tmp_path / "g.json"
    rc = cli.main(["--checkpoint", str(folder), "--data", str(data_file), "--speedup", "1",
                   "--max_new_tokens", "3", "--limit", "3", "--json", str(out2)])
    assert rc == 0
    res = json.loads(out2.read_text())
    assert res["task"] == "generation" and len(res["predictions"]["0-shot@1"]) == 3
    assert 0.0 <= res["rows"][0]["token_f1"] <= 1.0 and "exact_match" in res["rows"][0]


def test_cli_bad_input_is_a_clear_error(model_dir, data_file, tmp_path, capsys):
    from eval import prompting as cli

    folder, _ = model_dir
    (tmp_path / "empty.jsonl").write_text("")
    for argv, msg in [
        (["--model", str(folder), "--data", str(data_file), "--speedup", "0.5"], "is below 1 (1 = the dense model)"),
        (["--model", str(folder), "--data", str(tmp_path / "empty.jsonl")], "holds no examples"),
        (["--model", str(folder), "--data", str(data_file), "--labels", "positive,maybe"],
         "is not one of the labels"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err
    # A missing model folder, as a user runs it: one line, no traceback.
    nofolder = tmp_path / "no-such-model"
    proc = subprocess.run([sys.executable, "-m", "eval.prompting", "--model", str(nofolder), "--data",
                           str(data_file)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"model folder {nofolder} does not exist" in proc.stderr
    # A folder without a tokenizer says so.
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "tokenizer.json").unlink()
    assert cli.main(["--model", str(bare), "--data", str(data_file)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
