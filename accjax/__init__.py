"""accjax: latency-adjustable Transformers in JAX/Flax.

A fine-tuned Transformer drops its least important word-vectors layer by layer, ranked by
Attention Context Contribution (ACC); one number, the speedup, sets how many each layer
keeps. See README.md and the module docstrings of ``accjax.acc`` and ``accjax.schedule``.
"""

__version__ = "0.1.0"
