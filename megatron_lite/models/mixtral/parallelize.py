"""Mixtral's plan: Mistral's attention/embedding plan plus expert-parallel MoE layers."""

from __future__ import annotations

from megatron_lite.models.mistral.parallelize import plan as mistral_plan
from megatron_lite.parallel import styles


def plan() -> dict[str, styles.Style]:
    """Fresh plan for the sparse decoder."""
    base = mistral_plan()
    out: dict[str, styles.Style] = {}
    for key, style in base.items():
        if key.startswith("layers.*.feed_forward."):
            continue  # no dense MLP in Mixtral
        out[key] = style
        if key == "layers.*.ffn_norm":
            out["layers.*.feed_forward"] = styles.ExpertParallelMoE()
    return out


def parallelize_mixtral(model, dims, parallel_cfg):
    """``parallelize`` with this plan."""
    from megatron_lite.parallel.parallelize import parallelize

    return parallelize(model, dims, parallel_cfg, plan())
