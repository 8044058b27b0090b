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
generations. Elimination runs in the encoder only (``accjax.models.t5``); the default trains elastic over
1x..3x so the run can be served at any speedup in that range.

Argument words: ``dense`` | ``elastic`` (default) and ``tiny`` (small batches and lengths,
1 epoch; the model and files still come from the flags).
"""

import ml_collections

from accjax.experiment import base_config, config_words


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    words, mode = config_words(arg, ("tiny",), modes=("dense", "fixed", "elastic"), default_mode="elastic")
    c = base_config("seq2seq", mode)  # text-to-text: the T5 'lm' head and the seq2seq loss
    c.model = "google/flan-t5-small"
    c.train_file = ""  # JSONL {"instruction", "input", "target"} to train on
    c.dev_file = ""  # JSONL evaluated at every epoch end
    c.test_file = ""  # optional JSONL evaluated once with the best model
    c.labels = ""  # comma-separated label words: classification by label likelihood; '' = generation
    c.source_length = 256  # prompt tokens (longer prompts are truncated, EOS kept)
    c.target_length = 32  # target tokens (and the generation limit at evaluation)
    c.update(batch_size=16, eval_batch_size=16, log_every_steps=20, run_dir=f"runs/flan_t5_instruct_{mode}")
    c.optim.update(lr=3e-4, warmup_ratio=0.06)  # T5 fine-tunes well at lr 1e-4 .. 1e-3
    c.elimination.update(speedup_range=(1.0, 3.0), levels=5)  # encoder elimination
    c.eval.speedups = (1.0, 2.0, 3.0)
    c.checkpoint.every_steps = 500

    if "tiny" in words:
        c.update(source_length=32, target_length=4, batch_size=8, eval_batch_size=8, epochs=1,
                 log_every_steps=2, run_dir=f"runs/flan_t5_tiny_{mode}")
        c.optim.update(lr=3e-3, warmup_ratio=0.0)
        c.elimination.levels = 2
        c.eval.speedups = (1.0, 2.0)
        c.checkpoint.every_steps = 0
    return c
