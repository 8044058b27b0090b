r"""BERT-base fine-tuned on one GLUE task (chosen after ':'), dense or with elimination.

Launch (from the repository root; BERT-base weights and GLUE data are not bundled: point
``--config.model`` at a local HF folder and ``--config.data_dir`` at the GLUE TSV folders, or
leave them for the hub when online):

    python -m train.finetune --config configs/glue_bert_base.py:sst2 \
        --config.model=/path/to/bert-base-uncased --config.data_dir=/path/to/glue
    python -m train.finetune --config configs/glue_bert_base.py:mnli,elastic --config.model=...
    python -m train.finetune --config configs/glue_bert_base.py:qqp,elastic,fsdp   # FSDP over all devices
    python -m train.finetune --config configs/glue_bert_base.py:sst2,tiny --config.data_dir=...

Argument words: the task (cola sst2 mrpc qqp stsb mnli qnli rte wnli), ``dense`` (default) |
``fixed`` | ``elastic``, ``fsdp`` (parameters sharded over a 'fsdp' axis of all devices
instead of data parallelism) and ``tiny`` (a 2-layer, 32-wide random BERT with the
MiniLM/BERT uncased tokenizer on 128 examples per split: seconds on a CPU).

Hyperparameters follow the BERT paper's GLUE recipe: batch 32, max length 128, AdamW lr 2e-5,
weight decay 0.01, 10% warmup then linear decay, 3 epochs; the elastic range reaches the
4.8x the method reports for BERT-base.
"""

import ml_collections

from accjax.experiment import base_config, config_words
from accjax.tasks import GLUE_TASKS

GLUE = tuple(GLUE_TASKS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tasks = [w.strip() for w in (arg or "").lower().split(",") if w.strip() in GLUE]
    if len(tasks) != 1:
        raise ValueError(f"config argument {arg!r}: name one GLUE task ({', '.join(GLUE)}) plus any of "
                         "dense|fixed|elastic, fsdp, tiny")
    task = tasks[0]
    words, mode = config_words(arg, GLUE + ("fsdp", "tiny"))
    fsdp, tiny = "fsdp" in words, "tiny" in words

    c = base_config("classification", mode)
    c.model = "bert-base-uncased"
    c.task = task  # the GLUE task
    c.data_dir = ""  # folder in the GLUE TSV layout (DIR/SST-2/train.tsv ...); '' = the hub (nyu-mll/glue)
    c.max_length = 128  # tokens per example (pairs truncated longest-first; counted and reported)
    c.length_buckets = (32, 64, 128, 256, 512)  # padded lengths; one compiled program per bucket and schedule
    c.update(eval_batch_size=128, log_every_steps=50, run_dir=f"runs/glue_bert_base_{task}_{mode}")
    c.optim.lr = 2e-5
    c.elimination.update(speedup_range=(1.0, 4.8), levels=9)  # reaches the 4.8x reported for BERT-base
    c.eval.speedups = (1.0, 2.0, 3.0, 4.0, 4.8)
    c.mesh.update(data=1 if fsdp else -1, fsdp=-1 if fsdp else 1)
    c.logical_axis_rules = [("batch", ("data", "fsdp"))] + ([("embed", "fsdp")] if fsdp else [])
    c.checkpoint.every_steps = 1000

    if tiny:
        c.model = "preset:bert-base-uncased"
        c.model_overrides = ml_collections.ConfigDict(dict(
            hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=128))
        c.tokenizer = "minilm-l6"  # the same uncased WordPiece vocabulary (30522) as bert-base-uncased
        c.update(max_examples=128, max_length=64, batch_size=16, eval_batch_size=32, epochs=1,
                 log_every_steps=2, run_dir=f"runs/glue_tiny_{task}_{mode}")
        c.optim.lr = 1e-3
        c.elimination.levels = 3
        c.eval.speedups = (1.0, 2.0)
        c.checkpoint.every_steps = 4
    return c
