"""Mistral's tensor/sequence-parallel plan: module-name pattern -> parallel style.

Applied in order by ``megatron_lite.parallel.parallelize``; ``*`` matches a layer index.
"""

from __future__ import annotations

from megatron_lite.parallel import styles


def plan() -> dict[str, styles.Style]:
    """Fresh plan for the dense decoder (the root entry comes last: a tied output needs the
    swapped embedding)."""
    return {
        "tok_embeddings": styles.VocabEmbedding(),
        "layers.*.attention_norm": styles.SequenceParallelNorm(),
        "layers.*.attention": styles.AttentionHeads(),
        "layers.*.attention.wqkv": styles.ColumnParallel(),  # fused [Q; K; V], GQA-aware
        "layers.*.attention.wo": styles.RowParallel(),
        "layers.*.ffn_norm": styles.SequenceParallelNorm(),
        "layers.*.feed_forward.w13": styles.ColumnParallel(),  # fused [gate; up]
        "layers.*.feed_forward.w2": styles.RowParallel(),
        "norm": styles.SequenceParallelNorm(),
        "": styles.VocabHead(),
    }


def parallelize_mistral(model, dims, parallel_cfg):
    """``parallelize`` with this plan."""
    from megatron_lite.parallel.parallelize import parallelize

    return parallelize(model, dims, parallel_cfg, plan())
