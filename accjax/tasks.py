"""Task descriptions: what to read, which label set, which split selects, which metric counts.

A ``Task`` is a frozen value; ``accjax.data.load_task`` reads its examples and
``accjax.metrics.compute`` scores predictions with its official metrics::

    task = get_task("mrpc")                  # GLUE, rt_polarity, ...
    task = get_task("csv:train=a.csv,dev=b.csv,text=sentence,label=label")   # your own files

Built in: GLUE (``GLUE_TASKS``; label ids and names follow the hub's ``nyu-mll/glue``),
``rt_polarity`` (recipe in ``accjax.data``); and your own CSV / TSV / JSONL files
(``Task.from_files`` or a spec string, ``parse_spec``).

Split names follow ``datasets``: ``train``, ``validation``, ``test``; MNLI has
``validation_matched`` / ``validation_mismatched`` (and the two test splits). The FIRST dev
split is the one model selection uses (MNLI: matched).

Metric names as ``accjax.metrics.METRICS``; the primary metric follows the BERT paper's GLUE
table: F1 for MRPC and QQP, Spearman for STS-B, MCC for CoLA, accuracy elsewhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from accjax import guards


@guards.user_error
class UnknownTaskError(KeyError):
    """A task name that is neither built in nor a file spec."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class TsvFile:
    """One file of the standard GLUE TSV layout: the split it holds, its name in the task's
    folder, and the columns of text, text_pair and label (None: absent), named by the header
    line when ``header``, else 0-based positions."""

    split: str
    filename: str
    text: str | int
    text_pair: str | int | None
    label: str | int | None
    header: bool = True


@dataclasses.dataclass(frozen=True)
class Task:
    """A fine-tuning / evaluation task.

    Attributes:
      name: short name (``mrpc``, ``rt_polarity``, or a name for your own files).
      text, text_pair, label: field names (``datasets`` columns / your files' columns);
        ``text_pair`` None for single-text tasks.
      num_labels: number of classes; 1 = regression; None = classification whose label set
        is read from the train file on load (your own files; ``load_task`` returns the
        resolved task).
      label_names: class names, index = label id (empty for regression).
      train_split, dev_splits, test_splits: split names; ``dev_splits[0]`` selects models.
      metrics: official metric names, in reporting order.
      primary_metric: the one model selection maximises.
      source: ``glue`` | ``rt_polarity`` | ``files``.
      hub_id, hub_config: ``datasets.load_dataset(hub_id, hub_config)`` (GLUE).
      hub_revision: the dataset commit / tag to load (``get_task('sst2@REV')``); None = latest.
      tsv_folder, tsv_files: the standard GLUE TSV layout under ``--data_dir``.
      files: your own files, as ``(split, path)`` pairs.
      file_format: ``csv`` | ``tsv`` | ``jsonl`` for ``files``.
    """

    name: str
    text: str
    text_pair: str | None
    label: str
    num_labels: int | None
    label_names: tuple[str, ...] = ()
    train_split: str = "train"
    dev_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    metrics: tuple[str, ...] = ("accuracy",)
    primary_metric: str = "accuracy"
    source: str = "glue"
    hub_id: str | None = None
    hub_config: str | None = None
    hub_revision: str | None = None
    tsv_folder: str | None = None
    tsv_files: tuple[TsvFile, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    file_format: str | None = None

    def __post_init__(self):
        if self.primary_metric not in self.metrics:
            raise ValueError(f"primary metric {self.primary_metric!r} is not one of {self.metrics}")
        if self.num_labels is not None and self.num_labels > 1 and self.label_names and \
                len(self.label_names) != self.num_labels:
            raise ValueError(f"{len(self.label_names)} label names for {self.num_labels} labels")

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def splits(self) -> tuple[str, ...]:
        """All split names: train, dev splits, test splits."""
        return (self.train_split, *self.dev_splits, *self.test_splits)

    @property
    def dev_split(self) -> str:
        """The dev split model selection uses."""
        return self.dev_splits[0]

    @property
    def label_to_id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.label_names)}

    @property
    def spec(self) -> str:
        """A string ``get_task`` turns back into this task (store it with a checkpoint)."""
        if self.source != "files":
            return self.name + (f"@{self.hub_revision}" if self.hub_revision else "")
        parts = [f"{split if split != 'validation' else 'dev'}={path}" for split, path in self.files]
        parts += [f"text={self.text}", f"label={self.label}"]
        if self.text_pair:
            parts.append(f"text_pair={self.text_pair}")
        if self.is_regression:
            parts.append("regression=true")
        parts.append(f"name={self.name}")
        return f"{self.file_format}:" + ",".join(parts)

    @classmethod
    def from_files(
        cls,
        train: str | Path,
        dev: str | Path,
        test: str | Path | None = None,
        *,
        text: str = "text",
        text_pair: str | None = None,
        label: str = "label",
        regression: bool = False,
        name: str | None = None,
        format: str | None = None,
    ) -> "Task":
        """Your own data: local CSV / TSV / JSONL files (``format``; default from the train
        file's extension) with named columns ``text``, ``text_pair`` (None for single texts)
        and ``label``; ``regression``: a numeric target (Pearson/Spearman); ``name`` defaults
        to the train file's folder name.

        CSV is read with standard quoting, TSV as GLUE does (no quoting: a quote character is
        text), JSONL as one JSON object a line; CSV and TSV need a header line. A
        classification label set is read from the train file on load (sorted: numerically
        when every label is a number); a dev/test label outside it is an error. A test file
        may lack the label column (unlabelled).
        """
        paths = [("train", train), ("validation", dev)] + ([("test", test)] if test else [])
        fmt = (format or _format_of(train)).lower()
        if fmt not in FILE_FORMATS:
            raise ValueError(f"unknown file format {fmt!r}; use one of {', '.join(FILE_FORMATS)}")
        if not text or not label:
            raise ValueError("name the text and label columns (text=..., label=...)")
        files = tuple((s, str(Path(p).expanduser())) for s, p in paths)
        return cls(
            name=name or Path(files[0][1]).resolve().parent.name or "files",
            text=text, text_pair=text_pair or None, label=label,
            num_labels=1 if regression else None,
            dev_splits=("validation",), test_splits=("test",) if test else (),
            metrics=("pearson", "spearman") if regression else ("accuracy",),
            primary_metric="spearman" if regression else "accuracy",
            source="files", files=files, file_format=fmt,
        )


FILE_FORMATS = ("csv", "tsv", "jsonl")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
SPEC_HELP = ("csv:train=train.csv,dev=dev.csv,text=sentence,label=label "
             "(also tsv:/jsonl:; optional keys text_pair=, test=, regression=true, name=)")


def _format_of(path: str | Path) -> str:
    for s in reversed(Path(path).suffixes):
        if s.lower() in _EXTENSIONS:
            return _EXTENSIONS[s.lower()]
    raise ValueError(f"cannot tell the format of {Path(path)} from its extension; pass format='csv', "
                     "'tsv' or 'jsonl'")


def parse_spec(spec: str) -> Task:
    """``'csv:train=a.csv,dev=b.csv,text=sentence,label=label'`` -> ``Task.from_files(...)``.

    Keys: train, dev, test (paths); text, text_pair, label (columns); regression
    (true/false); name. The prefix (csv / tsv / jsonl) is the file format. Paths may not
    contain ',' (use ``Task.from_files`` for those).
    """
    fmt, _, rest = spec.partition(":")
    fmt = fmt.strip().lower()
    if fmt not in FILE_FORMATS or not rest:
        raise ValueError(f"not a file spec: {spec!r}; expected {SPEC_HELP}")
    kw: dict[str, str] = {}
    for part in rest.split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        key = {"validation": "dev"}.get(key.strip(), key.strip())
        if not eq or not value.strip():
            raise ValueError(f"{spec!r}: {part!r} is not key=value; expected {SPEC_HELP}")
        if key not in {"train", "dev", "test", "text", "text_pair", "label", "regression", "name"}:
            raise ValueError(f"{spec!r}: unknown key {key!r}; expected {SPEC_HELP}")
        kw[key] = value.strip()
    for need in ("train", "dev", "text", "label"):
        if need not in kw:
            raise ValueError(f"{spec!r} has no {need}=...; expected {SPEC_HELP}")
    regression = kw.pop("regression", "false").lower()
    if regression not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError(f"{spec!r}: regression={regression!r} is not true/false")
    return Task.from_files(kw.pop("train"), kw.pop("dev"), kw.pop("test", None),
                           regression=regression in {"true", "1", "yes"}, format=fmt, **kw)


# ----------------------------------------------------------------------------------- GLUE
def _glue(name: str, folder: str, text: str, text_pair: str | None, label_names: tuple[str, ...],
          metrics: tuple[str, ...], primary: str, tsv_files: tuple[TsvFile, ...],
          dev_splits=("validation",), test_splits=("test",)) -> Task:
    return Task(
        name=name, text=text, text_pair=text_pair, label="label",
        num_labels=len(label_names) or 1, label_names=label_names,
        dev_splits=dev_splits, test_splits=test_splits, metrics=metrics, primary_metric=primary,
        source="glue", hub_id="nyu-mll/glue", hub_config=name, tsv_folder=folder,
        tsv_files=tsv_files,
    )


def _pair_files(s1: str, s2: str | None, label: str) -> tuple[TsvFile, ...]:
    """Headered train/dev/test files (test unlabelled), the common GLUE layout."""
    return (TsvFile("train", "train.tsv", s1, s2, label),
            TsvFile("validation", "dev.tsv", s1, s2, label),
            TsvFile("test", "test.tsv", s1, s2, None))


# The GLUE TSV columns (from the GLUE distribution, as its download script writes them):
#   CoLA    train/dev: NO header; source, label, original judgement, sentence. test: index, sentence
#   SST-2   sentence, label                            test: index, sentence
#   MRPC    Quality, #1 ID, #2 ID, #1 String, #2 String  test: index, #1 ID, #2 ID, #1 String, #2 String
#   QQP     id, qid1, qid2, question1, question2, is_duplicate   test: id, question1, question2
#   STS-B   index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score
#   MNLI    index, promptID, pairID, genre, 4 parse columns, sentence1, sentence2, label1[..5], gold_label
#           dev_matched.tsv / dev_mismatched.tsv, test_matched.tsv / test_mismatched.tsv
#   QNLI    index, question, sentence, label   (entailment / not_entailment)
#   RTE     index, sentence1, sentence2, label (entailment / not_entailment)
#   WNLI    index, sentence1, sentence2, label (0 / 1)
GLUE_TASKS: dict[str, Task] = {
    "cola": _glue("cola", "CoLA", "sentence", None, ("unacceptable", "acceptable"), ("mcc",), "mcc", (
        TsvFile("train", "train.tsv", 3, None, 1, header=False),
        TsvFile("validation", "dev.tsv", 3, None, 1, header=False),
        TsvFile("test", "test.tsv", "sentence", None, None))),
    "sst2": _glue("sst2", "SST-2", "sentence", None, ("negative", "positive"), ("accuracy",),
                  "accuracy", _pair_files("sentence", None, "label")),
    "mrpc": _glue("mrpc", "MRPC", "sentence1", "sentence2", ("not_equivalent", "equivalent"),
                  ("accuracy", "f1"), "f1", _pair_files("#1 String", "#2 String", "Quality")),
    "qqp": _glue("qqp", "QQP", "question1", "question2", ("not_duplicate", "duplicate"),
                 ("accuracy", "f1"), "f1", _pair_files("question1", "question2", "is_duplicate")),
    "stsb": _glue("stsb", "STS-B", "sentence1", "sentence2", (), ("pearson", "spearman"),
                  "spearman", _pair_files("sentence1", "sentence2", "score")),
    "mnli": _glue("mnli", "MNLI", "premise", "hypothesis", ("entailment", "neutral", "contradiction"),
                  ("accuracy",), "accuracy", (
                      TsvFile("train", "train.tsv", "sentence1", "sentence2", "gold_label"),
                      TsvFile("validation_matched", "dev_matched.tsv", "sentence1", "sentence2", "gold_label"),
                      TsvFile("validation_mismatched", "dev_mismatched.tsv", "sentence1", "sentence2", "gold_label"),
                      TsvFile("test_matched", "test_matched.tsv", "sentence1", "sentence2", None),
                      TsvFile("test_mismatched", "test_mismatched.tsv", "sentence1", "sentence2", None)),
                  dev_splits=("validation_matched", "validation_mismatched"),
                  test_splits=("test_matched", "test_mismatched")),
    "qnli": _glue("qnli", "QNLI", "question", "sentence", ("entailment", "not_entailment"),
                  ("accuracy",), "accuracy", _pair_files("question", "sentence", "label")),
    "rte": _glue("rte", "RTE", "sentence1", "sentence2", ("entailment", "not_entailment"),
                 ("accuracy",), "accuracy", _pair_files("sentence1", "sentence2", "label")),
    "wnli": _glue("wnli", "WNLI", "sentence1", "sentence2", ("not_entailment", "entailment"),
                  ("accuracy",), "accuracy", _pair_files("sentence1", "sentence2", "label")),
}

RT_POLARITY = Task(name="rt_polarity", text="text", text_pair=None, label="label", num_labels=2,
                   label_names=("rotten", "fresh"), source="rt_polarity")  # metric: accuracy

TASKS: dict[str, Task] = {**GLUE_TASKS, "rt_polarity": RT_POLARITY}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "rt-polarity": "rt_polarity", "rtpolarity": "rt_polarity"}


def get_task(name: str | Task) -> Task:
    """A task by name (``mrpc``, ``rt_polarity``, ...), a file spec, or a Task itself.

    Raises:
      UnknownTaskError (a KeyError) naming the known tasks and how to pass your own files.
    """
    if isinstance(name, Task):
        return name
    key = str(name).strip()
    if key.split(":", 1)[0].lower() in FILE_FORMATS and ":" in key:
        return parse_spec(key)
    key, at, revision = key.partition("@")  # 'sst2@REV': the hub dataset pinned to a revision
    low = key.strip().lower().removeprefix("glue/")
    low = _ALIASES.get(low, low)
    if low in TASKS:
        if not at:
            return TASKS[low]
        if TASKS[low].hub_id is None or not revision.strip():
            raise UnknownTaskError(f"{name!r}: only a hub task takes a revision, as NAME@REVISION")
        return dataclasses.replace(TASKS[low], hub_revision=revision.strip())
    raise UnknownTaskError(
        f"unknown task {name!r}; known tasks: {', '.join(TASKS)}. For your own data pass a file "
        f"spec, e.g. {SPEC_HELP}, or accjax.tasks.Task.from_files(train=..., dev=..., text=..., "
        "label=...)")
