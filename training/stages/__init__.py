"""The stages of a training run, in the order ``loop.train`` calls them:

setup (device, precision, accelerator: ``RunContext``) -> data (dataset, buckets, latent and text caches:
``Data``) -> base (the base model: ``BaseModel`` protocol) -> trainable (adapters, optimizer, schedule:
``Trainable``) -> steps (the optimizer steps: ``LoopResult``) -> export (the LoRA file, checkpoints, states).
Each stage takes values and returns a small dataclass; the objective of a step is in ``training/loss.py``.
"""
