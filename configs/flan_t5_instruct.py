r"""Flan-T5 instruction fine-tuning on local JSONL, with encoder elimination.

Launch (from the repository root; Flan-T5 weights are not bundled here: pass a local HF folder
or a hub id when online):

    python -m train.finetune --config configs/flan_t5_instruct.py \
        --config.model=/path/to/flan-t5-small \
        --config.train_file=train.jsonl --config.dev_file=dev.jsonl [--config.labels=positive,negative]
    python -m train.finetune --config configs/flan_t5_instruct.py:tiny --config.model=DIR \
        --config.train_file=... --config.dev_file=...      # seconds on a CPU (tests)

Data: one JSON object a line, ``{"instruction": ..., "input": ..., "target": ...}``
(``accjax.prompting``). The loss is the target's token cross-entropy given the prompt.
Dev evaluation uses ``prompting.evaluate``: with ``labels`` (comma-separated label words) the
accuracy of label-likelihood classification, else exact match and token F1 of greedy
generations. Elimination runs in the encoder only (DESIGN.md); the default trains elastic over
1x..3x so the run can be served at any speedup in that range.

Argument words: ``dense`` | ``elastic`` (default) and ``tiny`` (small batches and lengths,
1 epoch; the model and files still come from the flags).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    words = {w.strip() for w in (arg or "").split(",") if w.strip()}
    unknown = words - {"dense", "fixed", "elastic", "tiny"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use dense|fixed|elastic[,tiny]")
    mode = next((w for w in ("dense", "fixed", "elastic") if w in words), "elastic")
    tiny = "tiny" in words

    c = ml_collections.ConfigDict()
    c.objective = "seq2seq"  # text-to-text: the T5 'lm' head and the seq2seq loss
    c.model = "google/flan-t5-small"  # convert.load spec: local HF folder, hub id, accjax folder
    c.model_overrides = ml_collections.ConfigDict()  # model config fields to change (e.g. dropout)
    c.tokenizer = ""  # tokenizer folder; '' = the model's folder
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and optimizer state stay float32)
    c.train_file = ""  # JSONL {"instruction", "input", "target"} to train on
    c.dev_file = ""  # JSONL evaluated at every epoch end
    c.test_file = ""  # optional JSONL evaluated once with the best model
    c.labels = ""  # comma-separated label words: classification by label likelihood; '' = generation
    c.max_examples = 0  # keep the first n examples of every file; 0 = all
    c.source_length = 256  # prompt tokens (longer prompts are truncated, EOS kept)
    c.target_length = 32  # target tokens (and the generation limit at evaluation)
    c.batch_size = 16  # GLOBAL batch
    c.eval_batch_size = 16  # evaluation batch
    c.epochs = 3  # passes over the train file
    c.seed = 0  # data order, dropout keys, elastic level draws
    c.dropout = True  # dropout on in training (the model's rate)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4  # peak learning rate (T5 fine-tunes well at 1e-4 .. 1e-3)
    c.optim.weight_decay = 0.01  # AdamW decoupled decay; not on biases and RMSNorm scales
    c.optim.warmup_ratio = 0.06  # linear warmup fraction, then linear decay to 0
    c.optim.clip = 1.0  # global gradient-norm clipping; <= 0 = none
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon

    c.elimination = ml_collections.ConfigDict()
    c.elimination.mode = mode  # 'dense' | 'fixed' | 'elastic' (encoder elimination)
    c.elimination.speedup = 2.0  # fixed mode: the training speedup
    c.elimination.speedup_range = (1.0, 3.0)  # elastic mode: the range drawn from ...
    c.elimination.levels = 5  # ... quantised to this many levels
    c.elimination.acc_variant = "plain"  # ACC form ranking the rows
    c.elimination.bucket = 8  # keep-lengths rounded up to multiples of this
    c.elimination.floor = 1  # no layer keeps fewer rows

    c.eval = ml_collections.ConfigDict()
    c.eval.speedups = (1.0, 2.0, 3.0)  # dev evaluation at each epoch end, at each speedup
    c.eval.select_speedup = 1.0  # best model by the dev metric at this speedup ...
    c.eval.select_mean = mode == "elastic"  # ... or by its mean over eval.speedups

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 = all devices left
    c.mesh.fsdp = 1  # parameter-sharding axis size
    c.logical_axis_rules = [("batch", ("data", "fsdp"))]  # (logical axis, mesh axes)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # resume checkpoints every n steps (and at every epoch end)
    c.checkpoint.keep = 2  # newest resume checkpoints kept

    c.run_dir = f"runs/flan_t5_instruct_{mode}"  # run folder
    c.log_every_steps = 20  # metrics.jsonl / TensorBoard / progress-bar interval
    c.progress = True  # tqdm progress bar

    c.debug = ml_collections.ConfigDict()
    c.debug.max_steps = 0  # stop after n steps (0 = the full run); the lr schedule still spans all epochs
    c.debug.step_delay_s = 0.0  # sleep after every step (tests)

    if tiny:
        c.source_length = 32
        c.target_length = 4
        c.batch_size = 8
        c.eval_batch_size = 8
        c.epochs = 1
        c.optim.lr = 3e-3
        c.optim.warmup_ratio = 0.0
        c.elimination.levels = 2
        c.eval.speedups = (1.0, 2.0)
        c.checkpoint.every_steps = 0
        c.log_every_steps = 2
        c.run_dir = f"runs/flan_t5_tiny_{mode}"
    return c
