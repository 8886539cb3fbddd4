"""The model registry (issue 11): one ModelSpec per family, one sharding table per family.

* every family, in several layouts (tp, ep, etp, pipeline stages, tied or not), has every
  parameter covered by exactly one rule of its table, and its shards reassemble;
* the plans ``parallelize`` applies are derived from the tables (and equal the hand-written
  plans they replaced);
* layering: ``parallel/``, ``pipeline/`` and ``ops/`` import nothing from ``models/``, and
  nothing outside ``models/`` compares ``arch`` or names a family.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.models import build_model
from megatron_lite.models.registry import all_specs, get_spec, names
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.sharding import matching_rules, shard_tensor, unshard_tensors
from megatron_lite.parallel.styles import (
    AttentionHeads,
    ColumnParallel,
    ExpertParallelMoE,
    RowParallel,
    SequenceParallelNorm,
    VocabEmbedding,
    VocabHead,
    plan_from_table,
)

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_lite"


def tiny(arch: str, **kw) -> ModelConfig:
    return tiny_model_config(arch, vocab_size=100, hidden_size=16, intermediate_size=32, head_dim=4, **kw)


# (tp, ep, etp, pp): dense families take ep = 1.
LAYOUTS = [(2, 1, None, 2), (4, 1, None, 1), (2, 2, 1, 2), (2, 2, None, 1)]


@pytest.mark.parametrize("arch", names())
@pytest.mark.parametrize("tied", [False, True])
def test_every_parameter_has_exactly_one_rule_in_every_layout(arch, tied):
    cfg = tiny(arch, tie_embeddings=tied)
    table = get_spec(arch).sharding
    used = set()
    for tp, ep, etp, pp in LAYOUTS:
        if ep > 1 and not cfg.is_moe:
            continue
        dims = ParallelDims.build(8, tp=tp, pp=pp, ep=ep, etp=etp)
        per_stage = cfg.num_layers // pp
        for stage in range(pp):
            layer_ids = range(stage * per_stage, (stage + 1) * per_stage)
            model = build_model(cfg, "cpu", seed=1, layer_ids=layer_ids, pre_process=stage == 0,
                                post_process=stage == pp - 1)  # fmt: skip
            stage_ranks = [r for r in range(dims.world_size) if dims.coords(r).pp == stage]
            for name, param in model.named_parameters():
                rules = matching_rules(name, table)
                assert len(rules) == 1, f"{arch} {name}: rules {rules}"
                used.add(rules[0])
                shards = {r: shard_tensor(param.detach(), name, cfg, dims.coords(r)) for r in stage_ranks}
                back = unshard_tensors(shards, name, cfg, dims, check_replicas=True)
                assert torch.equal(back, param), f"{arch} {name} tp={tp} ep={ep} etp={etp}"
    unused = set(table) - used - {r for r in table if r.layout == "vocab_output" and tied}
    assert not unused, f"{arch}: rules matching no parameter {unused}"


def test_plans_are_derived_from_the_tables():
    """The derived plans equal the hand-written ones they replaced (same modules, styles, order)."""
    dense = {
        "tok_embeddings": VocabEmbedding,
        "layers.*.attention_norm": SequenceParallelNorm,
        "layers.*.attention": AttentionHeads,
        "layers.*.attention.wqkv": ColumnParallel,
        "layers.*.attention.wo": RowParallel,
        "layers.*.ffn_norm": SequenceParallelNorm,
        "layers.*.feed_forward.w13": ColumnParallel,
        "layers.*.feed_forward.w2": RowParallel,
        "norm": SequenceParallelNorm,
        "": VocabHead,
    }
    moe = {k: v for k, v in dense.items() if not k.startswith("layers.*.feed_forward.")}
    moe["layers.*.feed_forward"] = ExpertParallelMoE
    for arch, want in (("mistral", dense), ("llama", dense), ("mixtral", moe)):
        plan = plan_from_table(get_spec(arch).sharding)
        assert set(plan) == set(want), arch
        assert {k: type(v) for k, v in plan.items()} == want, arch
        assert list(plan)[-1] == "", arch  # the root (tied output needs the swapped embedding) last


def test_spec_contents_and_unknown_arch():
    for spec in all_specs():
        ad = spec.adapter()
        assert ad.ARCHITECTURE.endswith("ForCausalLM") and ad.KEY_RULES and ad.CONFIG_KEYS
        cfg = tiny(spec.name)
        assert spec.flops_params(cfg) > spec.layer_params(cfg, True) * cfg.num_layers
        assert cfg.family() is spec and cfg.is_moe == spec.is_moe
    with pytest.raises(ConfigError, match=r"model.arch \('gpt2'\) must be one of mistral, mixtral, llama"):
        tiny("gpt2")


def _python_files(*parts: str):
    for part in parts:
        yield from sorted((PACKAGE / part).rglob("*.py"))


def test_parallel_pipeline_ops_import_nothing_from_models():
    """Lazy imports inside functions count too."""
    bad = []
    for path in _python_files("parallel", "pipeline", "ops"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            bad += [
                f"{path.relative_to(PACKAGE)}:{node.lineno} {m}"
                for m in mods
                if m.startswith("megatron_lite.models")
            ]
    assert not bad, bad


def test_no_family_branches_outside_models():
    """No ``arch ==`` chains and no family-name literals outside models/ (config's default arch aside)."""
    families, bad = set(names()), []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "models":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and "arch" in ast.unparse(node.left).split(".")[-1:]:
                bad.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
            # Chat templates (synthesis/) are named after instruct formats, not model families: a
            # "mistral"-format template serves any family, so their names are not branches.
            if isinstance(node, ast.Constant) and node.value in families and rel.parts[0] != "synthesis":
                bad.append(f"{rel}:{node.lineno} {node.value!r}")
    assert bad == [f"config.py:{_default_arch_line()} 'mistral'"], bad


def _default_arch_line() -> int:
    for n, line in enumerate((PACKAGE / "config.py").read_text().splitlines(), 1):
        if line.strip().startswith("arch: str ="):
            return n
    raise AssertionError("ModelConfig.arch not found")


def test_seams_for_what_comes_next():
    """Attention's kernel call is its own submodule; the styles' layer classes come from one place;
    ParallelDims has a cp degree (context parallelism itself: tests/test_context_parallel*.py)."""
    from megatron_lite.models.common.attention import AttentionCore
    from megatron_lite.parallel.layers import ColumnParallelLinear
    from megatron_lite.parallel.styles import LinearLayers, ParallelState

    model = build_model(tiny("mistral"), "meta")
    assert all(isinstance(layer.attention.core, AttentionCore) for layer in model.layers.values())
    assert not list(model.layers["0"].attention.core.parameters())
    assert LinearLayers().column is ColumnParallelLinear
    assert ParallelState(None, None, None).linears == LinearLayers()
    assert ParallelDims.build(4, tp=2, cp=1).dp == 2
    assert ParallelDims.build(4, tp=2, cp=2).cp == 2
