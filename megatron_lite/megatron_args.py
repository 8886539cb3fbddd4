"""Megatron-LM ``pretrain_gpt.py`` argument names, mapped onto the config in one table.

``python -m megatron_lite.pretrain`` accepts a Megatron launch line unchanged but for the entry
point: ``translate`` turns every Megatron flag into ``--section.field value`` overrides (our own
overrides and ``--config`` pass through untouched; ours are the ones with a dot). A Megatron flag
not in ``FLAGS`` raises ``ConfigError`` naming it: nothing is silently ignored. Flags that only
restate what megatron_lite always does (RMSNorm, RoPE, SwiGLU, no biases, no dropout, ...) or are
performance switches without an equivalent here are accepted with a printed note (as is
``--sequence-parallel`` without tensor parallelism, which Megatron-LM turns off too).

Meanings follow Megatron-LM's ``megatron/training/arguments.py``, including two defaults that
differ from ours: Megatron ties the output layer to the embedding unless
``--untie-embeddings-and-output-weights`` (applied when the line defines the model with
``--num-layers``), and uses one KV head per attention head unless ``--group-query-attention``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from megatron_lite.config import ConfigError


@dataclass(frozen=True)
class Flag:
    """One Megatron flag.

    Attributes:
        name: the Megatron flag, e.g. ``--tensor-model-parallel-size``.
        target: the config field it sets (``section.field``), or None for the accepted no-ops.
        takes: how many values follow it: 0 (a switch), 1, or -1 (all up to the next ``--``).
        value: for a switch, the value it sets; for a no-op taking a value, the one value accepted.
        meaning: one line, shown by ``--help``.
    """

    name: str
    target: str | None
    takes: int = 1
    value: str | None = None
    meaning: str = ""


def _f(name, target, meaning, takes=1, value=None) -> Flag:
    return Flag(name, target, takes, value, meaning)


FLAGS: tuple[Flag, ...] = (
    # parallelism
    _f("--tensor-model-parallel-size", "parallel.tensor", "tensor-parallel size"),
    _f("--pipeline-model-parallel-size", "parallel.pipeline", "pipeline-parallel size"),
    _f("--num-virtual-stages-per-pipeline-rank", "parallel.virtual_pipeline", "model chunks per stage"),
    _f(
        "--num-layers-per-virtual-pipeline-stage",
        "parallel.virtual_pipeline",
        "layers per model chunk (virtual_pipeline = layers / (pipeline * this))",
    ),
    _f("--context-parallel-size", "parallel.context", "context-parallel size (sequence split over ranks)"),
    _f("--expert-model-parallel-size", "parallel.expert", "expert-parallel size"),
    _f("--expert-tensor-parallel-size", "parallel.expert_tensor", "tensor-parallel size inside experts"),
    _f("--decoder-first-pipeline-num-layers", "parallel.num_layers_in_first_stage", "layers on stage 0"),
    _f("--decoder-last-pipeline-num-layers", "parallel.num_layers_in_last_stage", "layers on the last stage"),
    _f("--sequence-parallel", "parallel.sequence_parallel", "sequence parallelism", 0, "true"),
    _f("--use-distributed-optimizer", "parallel.distributed_optimizer", "ZeRO-1 optimizer", 0, "true"),
    _f(
        "--data-parallel-sharding-strategy",
        "parallel.data_parallel_sharding",
        "no_shard|optim|optim_grads|optim_grads_params: ZeRO stage (0/1 | 1 | 2 | 3) over dp",
    ),
    _f("--overlap-grad-reduce", "parallel.overlap_grad_reduce", "overlap DP grad reduction", 0, "true"),
    _f("--overlap-param-gather", "parallel.overlap_param_gather", "overlap param all-gather", 0, "true"),
    _f("--grad-reduce-in-bf16", "parallel.grad_reduce_dtype", "reduce DP gradients in bf16", 0, "bf16"),
    _f("--distributed-timeout-minutes", "training.dist_timeout_minutes", "process-group timeout"),
    _f("--moe-token-dispatcher-type", "parallel.moe_dispatcher", "alltoall or allgather"),
    # model
    _f("--num-layers", "model.num_layers", "transformer layers"),
    _f("--hidden-size", "model.hidden_size", "hidden size"),
    _f("--ffn-hidden-size", "model.intermediate_size", "feed-forward (per expert) size"),
    _f("--num-attention-heads", "model.num_attention_heads", "attention heads"),
    _f("--num-query-groups", "model.num_kv_heads", "KV heads (with --group-query-attention)"),
    _f("--kv-channels", "model.head_dim", "head dimension"),
    _f("--max-position-embeddings", "model.max_position_embeddings", "longest position"),
    _f("--rotary-base", "model.rope_theta", "RoPE base"),
    _f("--norm-epsilon", "model.rms_norm_eps", "RMSNorm epsilon"),
    _f("--init-method-std", "model.init_std", "init standard deviation"),
    _f("--vocab-size", "model.vocab_size", "vocabulary size"),
    _f("--window-size", "model.sliding_window", "sliding window: (left, 0) or left"),
    _f("--untie-embeddings-and-output-weights", "model.tie_embeddings", "separate output layer", 0, "false"),
    _f("--num-experts", "model.num_experts", "experts per MoE layer (makes the model a Mixtral)"),
    _f("--moe-router-topk", "model.top_k", "experts per token"),
    _f("--moe-aux-loss-coeff", "model.aux_loss_coeff", "load-balancing loss weight"),
    _f("--moe-z-loss-coeff", "model.z_loss_coeff", "router z-loss weight"),
    # data
    _f("--data-path", "data.path", "prefix, or weight prefix pairs", -1),
    _f("--split", "data.split", "train,valid,test weights"),
    _f("--seq-length", "data.seq_length", "tokens per sample"),
    _f("--tokenizer-type", "data.tokenizer_type", "tokenizer family"),
    _f("--tokenizer-model", "data.tokenizer_model", "tokenizer file"),
    _f("--mock-data", "data.mock", "random tokens, no files", 0, "true"),
    _f("--data-cache-path", "data.cache_dir", "index cache directory"),
    _f("--reset-position-ids", "data.reset_position_ids", "positions restart after EOD", 0, "true"),
    _f("--reset-attention-mask", "data.reset_attention_mask", "no attention across EOD", 0, "true"),
    _f("--eod-mask-loss", "data.eod_mask_loss", "no loss on EOD tokens", 0, "true"),
    # optimizer
    _f("--lr", "optimizer.lr", "peak learning rate"),
    _f("--min-lr", "optimizer.min_lr", "final learning rate"),
    _f("--lr-decay-style", "optimizer.lr_decay_style", "cosine, linear or constant"),
    _f("--lr-warmup-iters", "optimizer.lr_warmup_iters", "warmup iterations"),
    _f("--lr-decay-iters", "optimizer.lr_decay_iters", "decay iterations"),
    _f("--weight-decay", "optimizer.weight_decay", "AdamW weight decay"),
    _f("--adam-beta1", "optimizer.beta1", "Adam beta1"),
    _f("--adam-beta2", "optimizer.beta2", "Adam beta2"),
    _f("--adam-eps", "optimizer.eps", "Adam epsilon"),
    _f("--clip-grad", "optimizer.clip_grad", "gradient-norm clip"),
    # training
    _f("--micro-batch-size", "training.micro_batch_size", "samples per microbatch"),
    _f("--global-batch-size", "training.global_batch_size", "samples per iteration"),
    _f("--train-iters", "training.train_iters", "iterations"),
    _f("--seed", "training.seed", "random seed"),
    _f("--bf16", "training.precision", "bf16 mixed precision", 0, "bf16"),
    _f("--fp16", "training.precision", "fp16 mixed precision", 0, "fp16"),
    _f("--recompute-granularity", "training.recompute", "full or selective"),
    _f("--use-flash-attn", "training.attention_backend", "flash attention", 0, "flash"),
    _f("--save", "training.save", "checkpoint directory to write"),
    _f("--load", "training.load", "checkpoint directory to resume from"),
    _f("--save-interval", "training.save_interval", "iterations between checkpoints"),
    _f("--eval-interval", "training.eval_interval", "iterations between evaluations"),
    _f("--eval-iters", "training.eval_iters", "iterations per evaluation"),
    _f("--exit-interval", "training.exit_interval", "save and stop every N iterations"),
    _f("--exit-signal-handler", "training.exit_signal_handler", "save and exit on SIGTERM", 0, "true"),
    # logging
    _f("--log-interval", "logging.log_interval", "iterations between log lines"),
    _f("--tensorboard-dir", "logging.run_dir", "run directory; TensorBoard events in its tensorboard/"),
    _f("--wandb-project", "logging.wandb_project", "Weights & Biases project"),
    # what megatron_lite always does, or performance switches without an equivalent: noted
    _f("--use-mcore-models", None, "always", 0),
    _f("--disable-bias-linear", None, "never biases", 0),
    _f("--swiglu", None, "always SwiGLU", 0),
    _f("--group-query-attention", None, "KV heads from --num-query-groups", 0),
    _f("--no-position-embedding", None, "RoPE only", 0),
    _f("--no-masked-softmax-fusion", None, "no such kernel", 0),
    _f("--no-gradient-accumulation-fusion", None, "no such kernel", 0),
    _f("--no-bias-swiglu-fusion", None, "no such kernel", 0),
    _f("--no-rope-fusion", None, "no such kernel", 0),
    _f("--moe-grouped-gemm", None, "grouped GEMM used where torch has one", 0),
    _f("--normalization", None, "RMSNorm only", 1, "RMSNorm"),
    _f("--position-embedding-type", None, "rope only", 1, "rope"),
    _f("--attention-dropout", None, "no dropout", 1, "0.0"),
    _f("--hidden-dropout", None, "no dropout", 1, "0.0"),
    _f("--moe-router-load-balancing-type", None, "aux_loss only", 1, "aux_loss"),
    _f("--transformer-impl", None, "plain PyTorch layers", 1, None),
    _f("--distributed-backend", None, "NCCL on GPU, gloo on CPU", 1, None),
    _f("--wandb-exp-name", None, "run named after logging.run_dir", 1, None),
    _f("--use-megatron-fsdp", None, "sharding from --data-parallel-sharding-strategy", 0),
    _f("--use-custom-fsdp", None, "sharding from --data-parallel-sharding-strategy", 0),
    _f("--no-load-optim", None, "only without --load", 0),
    _f("--no-load-rng", None, "only without --load", 0),
)
BY_NAME = {f.name: f for f in FLAGS}
_MODEL_DEFINING = "--num-layers"  # a line with it defines the model the Megatron way


def is_megatron_flag(token: str) -> bool:
    """Megatron flags are ``--words-with-dashes``; ours are ``--section.field`` (or ``--config``)."""
    return token.startswith("--") and "." not in token.split("=", 1)[0] and token != "--config"


def _split(argv: list[str]) -> list[tuple[str, list[str]]]:
    """``[(flag, values)]``; ``--flag=value`` counts as the flag and one value."""
    out, i = [], 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        values = [inline] if eq else []
        i += 1
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        out.append((flag, values))
    return out


def _window(value: str) -> str:
    """Megatron's ``(left, right)`` window (or ``left``) -> our left window; right must be 0."""
    parts = [p for p in re.split(r"[(),\s]+", value) if p]
    if len(parts) == 2 and parts[1] != "0":
        raise ConfigError(f"--window-size {value}: only causal windows (right side 0) are supported")
    return parts[0] if parts else value


def translate(argv: list[str]) -> list[str]:
    """Rewrite Megatron flags in ``argv`` as ``--section.field value`` overrides.

    Raises:
        ConfigError: an unsupported Megatron flag, or a value megatron_lite cannot honour.
    """
    pairs = _split(argv)
    megatron = {flag: values for flag, values in pairs if is_megatron_flag(flag)}
    if not megatron:
        return list(argv)
    out, notes = [], []
    for flag, values in pairs:
        if not is_megatron_flag(flag):
            out += [flag, *values]
            continue
        spec = BY_NAME.get(flag)
        if spec is None:
            raise ConfigError(
                f"unsupported argument {flag}: neither a Megatron-LM flag megatron_lite supports nor a "
                "--section.field override (--help lists both)"
            )
        if spec.takes == 0 and values:
            raise ConfigError(f"{flag} takes no value, got {' '.join(values)}")
        if spec.takes == 1 and len(values) != 1:
            raise ConfigError(f"{flag} needs one value")
        if spec.takes == -1 and not values:
            raise ConfigError(f"{flag} needs at least one value")
        if flag == "--sequence-parallel" and megatron.get("--tensor-model-parallel-size", ["1"])[0] == "1":
            notes.append(flag)  # Megatron-LM turns it off without tensor parallelism; so do we
            continue
        if spec.target is None:
            if spec.value is not None and float_or(values[0]) != float_or(spec.value):
                raise ConfigError(f"{flag} {values[0]}: megatron_lite supports only {spec.value}")
            if flag in ("--no-load-optim", "--no-load-rng") and "--load" in megatron:
                raise ConfigError(f"{flag} with --load is not supported (resuming loads everything)")
            notes.append(flag)
            continue
        out += _override(flag, spec, values, megatron)
    if "--num-experts" in megatron:  # Megatron's MoE GPT: the registered mixture-of-experts family
        from megatron_lite.models.registry import all_specs

        out += ["--model.arch", next(spec.name for spec in all_specs() if spec.is_moe)]
    if "--num-attention-heads" in megatron and "--group-query-attention" not in megatron:
        out += ["--model.num_kv_heads", megatron["--num-attention-heads"][0]]  # Megatron: MHA
    elif "--group-query-attention" in megatron and "--num-query-groups" not in megatron:
        out += ["--model.num_kv_heads", "1"]  # Megatron's default number of query groups
    if _MODEL_DEFINING in megatron and "--untie-embeddings-and-output-weights" not in megatron:
        out += ["--model.tie_embeddings", "true"]  # Megatron ties unless told otherwise
    if notes:
        print(f"note: accepted without effect (megatron_lite always works this way): {' '.join(notes)}",
              file=sys.stderr)  # fmt: skip
    return out


def float_or(text: str):
    """``text`` as a float when it is a number (so ``0`` matches ``0.0``), else as is."""
    try:
        return float(text)
    except ValueError:
        return text


def _override(flag: str, spec: Flag, values: list[str], megatron: dict[str, list[str]]) -> list[str]:
    """The ``--section.field value...`` tokens of one translated Megatron flag."""
    if spec.takes == 0:
        return [f"--{spec.target}", spec.value]
    if spec.takes == -1:
        return [f"--{spec.target}", *values]
    value = values[0]
    if flag == "--num-layers-per-virtual-pipeline-stage":
        if _MODEL_DEFINING not in megatron:
            raise ConfigError(f"{flag} needs --num-layers on the same line")
        layers = int(megatron[_MODEL_DEFINING][0])
        pp = int(megatron.get("--pipeline-model-parallel-size", ["1"])[0])
        per = int(value)
        if per <= 0 or layers % (pp * per):
            raise ConfigError(
                f"{flag} {per}: --num-layers {layers} is not divisible by pipeline {pp} x {per}"
            )
        value = str(layers // (pp * per))
    elif flag == "--window-size":
        value = _window(value)
    elif flag == "--data-parallel-sharding-strategy":
        return _sharding_strategy(flag, value)
    elif flag == "--tensorboard-dir":
        return ["--logging.tensorboard", "true", f"--{spec.target}", value]
    elif flag == "--recompute-granularity" and value not in ("full", "selective"):
        raise ConfigError(f"{flag} {value}: must be full or selective")
    return [f"--{spec.target}", value]


# Megatron-FSDP's strategies -> parallel.data_parallel_sharding (what is sharded over dp)
_SHARDING = {"optim": "optimizer", "optim_grads": "gradients", "optim_grads_params": "parameters"}


def _sharding_strategy(flag: str, value: str) -> list[str]:
    """``--data-parallel-sharding-strategy``: a sharding stage, with the distributed optimizer it needs.

    ``no_shard`` leaves the optimizer as ``--use-distributed-optimizer`` says (Megatron shards the
    optimizer states with that flag whatever the strategy); the others shard at least them.
    """
    if value == "no_shard":
        return ["--parallel.data_parallel_sharding", "optimizer"]
    if value not in _SHARDING:
        raise ConfigError(f"{flag} {value}: must be one of no_shard, {', '.join(_SHARDING)}")
    return ["--parallel.distributed_optimizer", "true", "--parallel.data_parallel_sharding", _SHARDING[value]]
