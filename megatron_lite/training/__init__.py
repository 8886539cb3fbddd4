"""Training: the loop and what it needs.

``runtime`` (checks needing the world size, device, precision, process groups, seeds),
``model_setup`` (build/parallelize the local model, recompute, loss, grad reduce, norm groups),
``data`` (mock/real datasets, resumable per-rank batch streams), ``optimizer`` (AdamW, clipping,
fp16 loss scaling), ``lr_schedule``, ``trainer``, ``checkpoint``, ``logging``, ``metrics``,
``setup`` (assembles a ``Trainer`` from a config). The entry point is ``megatron_lite.pretrain``.
"""
