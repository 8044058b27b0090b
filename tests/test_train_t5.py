"""Text-to-text fine-tuning of a tiny random T5 through the same trainer (elastic encoder elimination)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from accjax import convert, loop, prompting, seq2seq, tokenization
from tests.t5_helpers import make_hf_t5, make_tokenizer
from tests.train_helpers import load_config_file

# Tiny training runs: the same programs in many tests, compiled once per session.
pytestmark = pytest.mark.usefixtures("shared_compile_cache")

SENT = [("the movie was good", "positive"), ("the film was awful", "negative"),
        ("really liked this movie", "positive"), ("hated the plot", "negative"),
        ("great acting and fun", "positive"), ("boring and bad", "negative"),
        ("loved it very much", "positive"), ("not good at all", "negative")]


@pytest.mark.slow
def test_t5_instruction_tuning_learns_and_the_run_folder_reloads(tmp_path):
    folder, _ = make_hf_t5(tmp_path / "t5", seed=1)
    make_tokenizer(folder)
    for name, rows in (("train", SENT * 3), ("dev", SENT)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for text, label in rows:
                f.write(json.dumps({"instruction": "review sentiment", "input": text, "target": label}) + "\n")
    c = load_config_file("flan_t5_instruct", "tiny")
    c.model = str(folder)
    c.train_file, c.dev_file = str(tmp_path / "train.jsonl"), str(tmp_path / "dev.jsonl")
    c.labels = "positive,negative"
    c.epochs = 3
    c.run_dir = str(tmp_path / "run")
    c.progress = False
    assert c.elimination.mode == "elastic"
    result = loop.fit(c)

    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 4 and np.mean(losses[-2:]) < 0.6 * np.mean(losses[:2]), losses
    assert {r.get("train_speedup_mean") for r in records if "loss" in r} - {None, 1.0}  # rows were dropped

    # the run folder alone: model, config and tokenizer -> the recorded dev accuracy
    ld = convert.load(result.run_dir, "lm")
    assert json.loads((result.run_dir / "accjax.json").read_text())["task"]["labels"] == ["positive", "negative"]
    tok = tokenization.Tokenizer.from_folder(result.run_dir)
    pred = seq2seq.Seq2SeqPredictor.from_loaded(ld, batch_size=c.eval_batch_size)
    dev = prompting.load_jsonl(tmp_path / "dev.jsonl")
    res = prompting.evaluate(pred, tok, dev, speedups=[1.0, 2.0], labels=["positive", "negative"],
                             max_new_tokens=c.target_length, max_length=c.source_length)
    recorded = {r["speedup"]: r["accuracy"] for r in result.best["rows"]}
    for row in res["rows"]:
        assert 100 * row["accuracy"] == pytest.approx(recorded[row["speedup"]])
