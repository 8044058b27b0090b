"""Task descriptions: GLUE's official metrics and splits, names, file specs."""

from __future__ import annotations

import pytest

from accjax import tasks
from accjax.tasks import Task, get_task


@pytest.mark.parametrize("name,metrics,primary,num_labels", [
    ("cola", ("mcc",), "mcc", 2),
    ("sst2", ("accuracy",), "accuracy", 2),
    ("mrpc", ("accuracy", "f1"), "f1", 2),
    ("qqp", ("accuracy", "f1"), "f1", 2),
    ("stsb", ("pearson", "spearman"), "spearman", 1),
    ("mnli", ("accuracy",), "accuracy", 3),
    ("qnli", ("accuracy",), "accuracy", 2),
    ("rte", ("accuracy",), "accuracy", 2),
    ("wnli", ("accuracy",), "accuracy", 2),
    ("rt_polarity", ("accuracy",), "accuracy", 2),
])
def test_official_metrics_and_labels(name, metrics, primary, num_labels):
    t = get_task(name)
    assert t.metrics == metrics and t.primary_metric == primary
    assert t.num_labels == num_labels and t.is_regression == (num_labels == 1)
    assert len(t.label_names) == (0 if num_labels == 1 else num_labels)
    if t.source == "glue":
        assert t.hub_id == "nyu-mll/glue" and t.hub_config == name
        # every split has exactly one TSV file, and every TSV file belongs to a split
        assert sorted(f.split for f in t.tsv_files) == sorted(t.splits)


def test_mnli_has_two_dev_splits_matched_first():
    t = get_task("mnli")
    assert t.dev_splits == ("validation_matched", "validation_mismatched")
    assert t.dev_split == "validation_matched"
    files = {f.split: f.filename for f in t.tsv_files}
    assert files["validation_matched"] == "dev_matched.tsv"
    assert files["validation_mismatched"] == "dev_mismatched.tsv"
    assert t.label_names == ("entailment", "neutral", "contradiction")  # nyu-mll/glue ids


def test_pair_tasks_name_their_second_text():
    singles = {n for n, t in tasks.TASKS.items() if t.text_pair is None}
    assert singles == {"cola", "sst2", "rt_polarity"}


def test_cola_train_and_dev_are_headerless():
    files = {f.split: f for f in get_task("cola").tsv_files}
    assert not files["train"].header and not files["validation"].header and files["test"].header
    assert (files["train"].text, files["train"].label) == (3, 1)


@pytest.mark.parametrize("alias,name", [("SST-2", "sst2"), ("STS-B", "stsb"), ("glue/CoLA", "cola"),
                                        ("rt-polarity", "rt_polarity"), ("MNLI", "mnli")])
def test_aliases(alias, name):
    assert get_task(alias) is tasks.TASKS[name]


def test_unknown_task_names_the_known_ones_and_how_to_bring_files():
    with pytest.raises(tasks.UnknownTaskError) as e:
        get_task("imdb")
    msg = str(e.value)
    assert "'imdb'" in msg and "rt_polarity" in msg and "cola" in msg and "mnli" in msg
    assert "csv:train=" in msg and "Task.from_files" in msg
    assert isinstance(e.value, KeyError)


def test_from_files_and_spec_round_trip(tmp_path):
    t = Task.from_files(tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv",
                        text="s1", text_pair="s2", label="y", name="mine")
    assert t.source == "files" and t.file_format == "csv" and t.num_labels is None
    assert t.splits == ("train", "validation", "test")
    assert dict(t.files)["validation"] == str(tmp_path / "b.csv")
    assert get_task(t.spec) == t
    r = get_task(f"jsonl:train={tmp_path}/a.jsonl,dev={tmp_path}/b.jsonl,text=x,label=y,regression=true")
    assert r.is_regression and r.metrics == ("pearson", "spearman") and r.test_splits == ()
    assert get_task(r.spec) == r
    assert Task.from_files("x/train.tsv", "x/dev.tsv").file_format == "tsv"


@pytest.mark.parametrize("spec,match", [
    ("csv:dev=b.csv,text=t,label=l", "no train="),
    ("csv:train=a.csv,dev=b.csv,label=l", "no text="),
    ("csv:train=a.csv,dev=b.csv,text=t,label=l,colour=red", "unknown key 'colour'"),
    ("csv:train=a.csv,dev=b.csv,text=t,label=l,regression=maybe", "not true/false"),
    ("csv:train=a.csv,dev,text=t,label=l", "not key=value"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        get_task(spec)


def test_unknown_extension_asks_for_a_format():
    with pytest.raises(ValueError, match="format="):
        Task.from_files("a.parquet", "b.parquet")
    assert Task.from_files("a.txt", "b.txt", format="tsv").file_format == "tsv"


def test_primary_metric_must_be_official():
    with pytest.raises(ValueError, match="primary metric"):
        Task(name="x", text="t", text_pair=None, label="l", num_labels=2,
             metrics=("accuracy",), primary_metric="f1")
