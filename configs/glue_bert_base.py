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

GLUE = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    words = [w.strip().lower() for w in (arg or "").split(",") if w.strip()]
    tasks = [w for w in words if w in GLUE]
    unknown = [w for w in words if w not in GLUE + ("dense", "fixed", "elastic", "fsdp", "tiny")]
    if unknown or len(tasks) != 1:
        raise ValueError(f"config argument {arg!r}: name one GLUE task ({', '.join(GLUE)}) plus any of "
                         f"dense|fixed|elastic, fsdp, tiny" + (f"; unknown {unknown}" if unknown else ""))
    task = tasks[0]
    mode = next((w for w in ("elastic", "fixed", "dense") if w in words), "dense")
    fsdp, tiny = "fsdp" in words, "tiny" in words

    c = ml_collections.ConfigDict()
    c.objective = "classification"  # 'classification' (task labels; STS-B: regression) | 'seq2seq'
    c.model = "bert-base-uncased"  # convert.load spec: HF folder, hub id, accjax folder; or 'preset:NAME' (random init)
    c.model_overrides = ml_collections.ConfigDict()  # model config fields to change; add keys in a config file
    c.tokenizer = ""  # folder / spec with tokenizer files; '' = the model's folder
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and optimizer state stay float32)
    c.task = task  # the GLUE task
    c.data_dir = ""  # folder in the GLUE TSV layout (DIR/SST-2/train.tsv ...); '' = the hub (nyu-mll/glue)
    c.max_examples = 0  # keep the first n examples of every split; 0 = all
    c.max_length = 128  # tokens per example (pairs truncated longest-first; counted and reported)
    c.length_buckets = (32, 64, 128, 256, 512)  # padded lengths; one compiled program per bucket and schedule
    c.batch_size = 32  # GLOBAL batch
    c.eval_batch_size = 128  # GLOBAL evaluation batch
    c.epochs = 3  # passes over the train split
    c.seed = 0  # data order, dropout keys, elastic level draws, fresh head init
    c.dropout = True  # dropout on in training (BERT's 0.1)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-5  # peak learning rate
    c.optim.weight_decay = 0.01  # AdamW decoupled decay; not on biases and LayerNorm scales
    c.optim.warmup_ratio = 0.1  # linear warmup fraction, then linear decay to 0
    c.optim.clip = 1.0  # global gradient-norm clipping; <= 0 = none
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon

    c.elimination = ml_collections.ConfigDict()
    c.elimination.mode = mode  # 'dense' | 'fixed' | 'elastic'
    c.elimination.speedup = 2.0  # fixed mode: the training speedup
    c.elimination.speedup_range = (1.0, 4.8)  # elastic mode: the range drawn from ...
    c.elimination.levels = 9  # ... quantised to this many levels (bounds the compiled train programs)
    c.elimination.acc_variant = "plain"  # ACC form ranking the rows (accjax.acc.VARIANTS)
    c.elimination.bucket = 8  # keep-lengths rounded up to multiples of this
    c.elimination.floor = 1  # no layer keeps fewer rows

    c.eval = ml_collections.ConfigDict()
    c.eval.speedups = (1.0, 2.0, 3.0, 4.0, 4.8)  # dev evaluation at each epoch end, at each speedup
    c.eval.select_speedup = 1.0  # best model by the task's primary dev metric at this speedup ...
    c.eval.select_mean = mode == "elastic"  # ... or by its mean over eval.speedups

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1 if fsdp else -1  # data-parallel axis size; -1 = all devices left
    c.mesh.fsdp = -1 if fsdp else 1  # parameter-sharding axis size
    c.logical_axis_rules = [("batch", ("data", "fsdp"))] + ([("embed", "fsdp")] if fsdp else [])  # unnamed = replicated

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # resume checkpoints every n steps (and at every epoch end)
    c.checkpoint.keep = 2  # newest resume checkpoints kept

    c.run_dir = f"runs/glue_bert_base_{task}_{mode}"  # run folder
    c.log_every_steps = 50  # metrics.jsonl / TensorBoard / progress-bar interval
    c.progress = True  # tqdm progress bar

    c.debug = ml_collections.ConfigDict()
    c.debug.max_steps = 0  # stop after n steps (0 = the full run); the lr schedule still spans all epochs
    c.debug.step_delay_s = 0.0  # sleep after every step (tests)

    if tiny:
        c.model = "preset:bert-base-uncased"
        c.model_overrides = ml_collections.ConfigDict(dict(
            hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=128))
        c.tokenizer = "minilm-l6"  # the same uncased WordPiece vocabulary (30522) as bert-base-uncased
        c.max_examples = 128
        c.max_length = 64
        c.batch_size = 16
        c.eval_batch_size = 32
        c.epochs = 1
        c.optim.lr = 1e-3
        c.elimination.levels = 3
        c.eval.speedups = (1.0, 2.0)
        c.checkpoint.every_steps = 4
        c.log_every_steps = 2
        c.run_dir = f"runs/glue_tiny_{task}_{mode}"
    return c
