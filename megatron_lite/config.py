"""Typed configuration tree: one dataclass per section, each validated up front.

Every error names the offending field and value and is raised before any process
group or tensor exists (DESIGN.md principle 8).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Tokenizer families ``data.tokenizers.build_tokenizer`` knows (Megatron's names).
TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "MistralTokenizer", "Llama2Tokenizer")


# Per-layer attention kinds of ``model.layer_types`` (Hugging Face's names).
LAYER_TYPES = ("sliding_attention", "full_attention")


class ConfigError(ValueError):
    """A configuration value is unknown, malformed or inconsistent."""


@dataclass
class ModelConfig:
    """Architecture of a decoder of one registered family (``megatron_lite/models/registry.py``).

    Attributes:
        arch: the model family: mistral (dense), mixtral (mixture of experts) or llama (dense).
        vocab_size: vocabulary size (the tokenizer's may be smaller).
        hidden_size: width of the residual stream.
        intermediate_size: feed-forward width (of each expert for mixtral).
        num_layers: transformer layers.
        num_attention_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer than query heads).
        head_dim: width of one head; None means hidden_size / num_attention_heads.
        max_position_embeddings: longest sequence the positions (RoPE) are meant for.
        rope_theta: RoPE base.
        rope_scaling: RoPE frequency scaling: None, or llama3 (llama only).
        rope_scaling_factor: llama3 scaling: how much the long wavelengths are slowed down.
        rope_low_freq_factor: llama3 scaling: wavelengths above original / this are scaled in full.
        rope_high_freq_factor: llama3 scaling: wavelengths below original / this are kept.
        rope_original_max_position_embeddings: llama3 scaling: the pretraining context length.
        rms_norm_eps: RMSNorm epsilon.
        sliding_window: attention window in tokens; None attends to the whole sequence.
        layer_types: per layer, sliding_attention (uses sliding_window) or full_attention, e.g.
            Gemma 2's alternating local/global layers; None: every layer uses sliding_window.
        tie_embeddings: the output layer shares the embedding's weights.
        init_std: standard deviation of the random initial weights.
        num_experts: experts per MoE layer (mixtral only).
        top_k: experts each token is routed to (mixtral only).
        aux_loss_coeff: weight of the load-balancing loss (mixtral only).
        z_loss_coeff: weight of the router z-loss (mixtral only).
    """

    arch: str = "mistral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_attention_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: str | None = None
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Mixtral only.
    num_experts: int = 8
    top_k: int = 2
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.001

    def validate(self) -> None:
        """Check the architecture is self-consistent; resolve ``head_dim``."""
        spec = self.family()  # raises ConfigError naming the registered families
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_attention_heads",
            "num_kv_heads",
            "max_position_embeddings",
        ):
            _positive(f"model.{name}", getattr(self, name))
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"model.num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model.hidden_size ({self.hidden_size}) is not divisible by "
                    f"model.num_attention_heads ({self.num_attention_heads}); set model.head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive("model.head_dim", self.head_dim)
        if self.sliding_window is not None:
            _positive("model.sliding_window", self.sliding_window)
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(
                    f"model.layer_types has {len(self.layer_types)} entries; model.num_layers is "
                    f"{self.num_layers}"
                )
            for kind in self.layer_types:
                _one_of("model.layer_types entry", kind, LAYER_TYPES)
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError(
                    "model.layer_types has sliding_attention layers but model.sliding_window is null"
                )
        if self.rope_scaling is not None:
            if not spec.rope_scaling:
                raise ConfigError(
                    f"model.rope_scaling ({self.rope_scaling!r}) is not supported by model.arch {self.arch}"
                )
            _one_of(f"model.rope_scaling (for model.arch {self.arch})", self.rope_scaling, spec.rope_scaling)
            for name in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                         "rope_original_max_position_embeddings"):  # fmt: skip
                _positive(f"model.{name}", getattr(self, name))
            if self.rope_high_freq_factor <= self.rope_low_freq_factor:
                raise ConfigError(
                    f"model.rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed "
                    f"model.rope_low_freq_factor ({self.rope_low_freq_factor})"
                )
        if spec.validate is not None:
            spec.validate(self)

    def layer_window(self, layer: int) -> int | None:
        """Attention window of global layer ``layer`` (None: the whole sequence)."""
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    def family(self):
        """This model's ``ModelSpec`` (``megatron_lite.models.registry``): builder, sharding table,
        HF adapter, init rule and FLOPs formula. Raises ``ConfigError`` for an unknown ``arch``."""
        from megatron_lite.models.registry import get_spec

        return get_spec(self.arch)

    @property
    def is_moe(self) -> bool:
        """Whether the feed-forward layers are mixtures of experts."""
        return self.family().is_moe


@dataclass
class ParallelConfig:
    """Degrees of parallelism; data parallel is whatever of the world is left.

    Attributes:
        tensor: tensor-parallel size (splits attention heads and FFN columns).
        pipeline: pipeline-parallel size (splits the layers into stages).
        virtual_pipeline: model chunks per pipeline stage (interleaved schedules).
        expert: expert-parallel size (splits the experts of MoE layers).
        expert_tensor: tensor-parallel size inside experts; None means parallel.tensor.
        context: context-parallel size (cp): every sequence split over cp ranks, two load-balanced
            chunks each; attention all-gathers K/V over them.
        sequence_parallel: keep norm and residual activations split along the sequence over tensor ranks.
        schedule: pipeline schedule: gpipe, 1f1b, interleaved or breadth-first.
        moe_dispatcher: how tokens reach their experts: alltoall or allgather.
        num_layers_in_first_stage: layers on pipeline stage 0; None splits evenly.
        num_layers_in_last_stage: layers on the last pipeline stage; None splits evenly.
        distributed_optimizer: shard the AdamW states over data-parallel ranks (ZeRO-1).
        overlap_grad_reduce: reduce gradient buckets during the last microbatch's backward.
        grad_bucket_mb: size of a data-parallel gradient bucket in MB.
        grad_reduce_dtype: dtype of the data-parallel gradient reduction: fp32 or bf16 (bf16 runs).
        overlap_param_gather: all-gather bf16 parameters bucket by bucket during the next forward.
        data_parallel_sharding: what the distributed optimizer shards over dp: optimizer (ZeRO-1),
            gradients (ZeRO-2: only the reduced gradient shard outlives the step's reduction) or
            parameters (ZeRO-3: weights too, gathered per pipeline chunk; ``parallel.zero``).
    """

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1
    expert: int = 1
    expert_tensor: int | None = None  # None: same as tensor
    context: int = 1
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    moe_dispatcher: str = "alltoall"
    num_layers_in_first_stage: int | None = None
    num_layers_in_last_stage: int | None = None
    # Data parallelism (parallel/grad_buffer.py, training/distributed_optimizer.py): ZeRO-1 sharding
    # of the AdamW states over dp (reduce-scatter grads, all-gather params), the DP reduction of
    # gradient buckets launched during the last microbatch's backward, and the bucket size (160 MB
    # = Megatron's 40M fp32 elements).
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    grad_bucket_mb: float = 160.0
    # Mixed precision (training/runtime.py): dtype of the data-parallel gradient reduction (fp32
    # main grads are reduced as they are, or as a bf16 copy: half the bytes), and Megatron's
    # overlap of the distributed optimizer's parameter all-gather with the next forward.
    grad_reduce_dtype: str = "fp32"
    overlap_param_gather: bool = False
    # ZeRO stages 2/3 on the same buffers (parallel/zero.py); needs distributed_optimizer true.
    data_parallel_sharding: str = "optimizer"

    def validate(self) -> None:
        """Check each degree on its own; layout-vs-world checks live in ``validate_layout``."""
        for name in ("tensor", "pipeline", "virtual_pipeline", "expert", "context"):
            _positive(f"parallel.{name}", getattr(self, name))
        for name in ("distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"parallel.{name} ({getattr(self, name)!r}) must be true or false")
        _positive("parallel.grad_bucket_mb", self.grad_bucket_mb)
        _one_of("parallel.grad_reduce_dtype", self.grad_reduce_dtype, ("fp32", "bf16"))
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ConfigError(
                "parallel.overlap_param_gather needs parallel.distributed_optimizer true (it overlaps "
                "the distributed optimizer's parameter all-gather)"
            )
        _check_sharding(self)
        if self.expert_tensor is not None:
            _positive("parallel.expert_tensor", self.expert_tensor)
        from megatron_lite.pipeline.schedules import SCHEDULES  # the names come from the registry

        _one_of("parallel.schedule", self.schedule, tuple(SCHEDULES))
        _one_of("parallel.moe_dispatcher", self.moe_dispatcher, ("alltoall", "allgather"))
        if self.virtual_pipeline > 1 and self.pipeline == 1:
            raise ConfigError(
                f"parallel.virtual_pipeline ({self.virtual_pipeline}) > 1 needs parallel.pipeline > 1"
            )
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1")


@dataclass
class DataConfig:
    """Where tokens come from and how samples are cut.

    Attributes:
        path: dataset prefix, or weight prefix pairs for a blend (files .bin/.idx).
        split: train,valid,test weights of the documents.
        seq_length: tokens per sample.
        tokenizer_type: SentencePieceTokenizer, HuggingFaceTokenizer, MistralTokenizer or Llama2Tokenizer.
        tokenizer_model: tokenizer file (or "bundled": Mistral's, from mistral-common).
        reset_position_ids: positions restart after each end-of-document token.
        reset_attention_mask: no attention across end-of-document tokens.
        eod_mask_loss: no loss on end-of-document tokens.
        cache_dir: where dataset index files are cached; None: beside the data.
        mock: random tokens and no files (benchmarks, smoke tests).
    """

    path: list[str] = field(default_factory=list)  # [prefix] or [w1, prefix1, w2, prefix2, ...]
    split: str = "969,30,1"
    seq_length: int = 2048
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: str | None = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    cache_dir: str | None = None
    mock: bool = False  # random tokens, no files: for benchmarks and smoke tests

    def validate(self) -> None:
        """Check sample shape and that a real run names its data."""
        _positive("data.seq_length", self.seq_length)
        parts = self.split.split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"data.split ({self.split!r}) must be comma-separated numbers") from None
        if len(weights) > 3 or sum(weights) <= 0 or min(weights) < 0:
            raise ConfigError(f"data.split ({self.split!r}) needs 1-3 non-negative weights summing above 0")
        _one_of("data.tokenizer_type", self.tokenizer_type, TOKENIZER_TYPES)
        if not self.mock and not self.path:
            raise ConfigError("data.path is empty: give a dataset prefix or set data.mock true")


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup then cosine/linear/constant decay.

    Attributes:
        lr: peak learning rate.
        min_lr: learning rate at the end of the decay.
        weight_decay: AdamW weight decay (not applied to norms and biases).
        beta1: Adam first-moment coefficient.
        beta2: Adam second-moment coefficient.
        eps: Adam epsilon.
        clip_grad: clip the global gradient norm to this (0 disables).
        lr_warmup_iters: iterations of linear warmup.
        lr_decay_iters: iterations of decay; None means training.train_iters.
        lr_decay_style: cosine, linear or constant.
    """

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: training.train_iters
    lr_decay_style: str = "cosine"

    def validate(self) -> None:
        """Check rates and schedule names."""
        _positive("optimizer.lr", self.lr)
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optimizer.min_lr ({self.min_lr}) must be in [0, optimizer.lr ({self.lr})]")
        if self.lr_warmup_iters < 0:
            raise ConfigError(f"optimizer.lr_warmup_iters ({self.lr_warmup_iters}) must be >= 0")
        if self.clip_grad < 0:
            raise ConfigError(f"optimizer.clip_grad ({self.clip_grad}) must be >= 0 (0 disables)")
        _one_of("optimizer.lr_decay_style", self.lr_decay_style, ("cosine", "linear", "constant"))


@dataclass
class TrainingConfig:
    """Batch sizes, length of the run, precision, checkpointing.

    Attributes:
        micro_batch_size: samples per microbatch on one data-parallel rank.
        global_batch_size: samples per iteration; None means micro_batch_size * data-parallel size.
        train_iters: iterations to train.
        seed: random seed (weights, data order).
        precision: auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16.
        device: auto, cpu or cuda.
        attention_backend: auto, flash, flex or sdpa.
        recompute: activation recomputation: none, full or selective.
        compile: torch.compile each transformer block.
        save: checkpoint directory to write; None saves nothing.
        save_interval: iterations between checkpoints (and one at the end).
        load: checkpoint directory to resume from.
        keep_last_checkpoints: delete all but the newest N iter_* directories after each save.
        ema_decay: keep an fp32 exponential moving average of the weights with this decay, in [0, 1);
            None or 0 keeps none (``training/ema.py``); saved with the checkpoints.
        initial_load: weights to start from when load holds no checkpoint: HF directory or checkpoint.
        eval_interval: iterations between validation runs; None never evaluates.
        eval_iters: iterations per validation run.
        exit_interval: save and stop after iterations divisible by it.
        exit_signal_handler: on SIGTERM finish the iteration, save and exit (status 3: requeue).
        dist_timeout_minutes: process-group timeout; a frozen or dead rank ends the run after it.
        max_consecutive_skips: fp16 only: this many skipped (overflowing) steps in a row stop the run.
        objective: pretrain (every token), sft (tokens of the data's loss masks; the data must
            store them) or dpo (preference pairs, ``training/objectives.py``).
        dpo_beta: DPO's beta: the strength of the implicit KL penalty towards the reference model.
    """

    micro_batch_size: int = 1
    global_batch_size: int | None = None  # None: micro_batch_size * data-parallel size
    train_iters: int = 100
    seed: int = 1234
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"
    attention_backend: str = "auto"
    recompute: str = "none"
    compile: bool = False  # torch.compile each transformer block (fuses norms, RoPE, SwiGLU pointwise ops)
    save: str | None = None
    save_interval: int | None = None
    load: str | None = None
    keep_last_checkpoints: int | None = None  # delete older iter_* directories after each save
    # EMA of the weights (ema = decay * ema + (1 - decay) * fp32 main param after each applied step),
    # saved with checkpoints; convert_checkpoint.py --weights ema exports it. None or 0: off.
    ema_decay: float | None = None
    # weights to start from when training.load holds no checkpoint (continued pretraining): a
    # Hugging Face directory or a training checkpoint of any (tp, pp, ep) layout
    initial_load: str | None = None
    eval_interval: int | None = None
    eval_iters: int = 10
    exit_interval: int | None = None  # save (if training.save) and stop after iterations divisible by it
    # On SIGTERM (SLURM preemption/time limit, torchrun shutdown): finish the iteration, save (if
    # training.save) and exit with status 0, so a requeued job resumes where this one stopped.
    exit_signal_handler: bool = True
    # Process-group timeout (Megatron's --distributed-timeout-minutes): a collective that waits
    # longer (a frozen or dead rank) raises on the other ranks, which then exit with one line.
    dist_timeout_minutes: float = 10.0
    # fp16 only: stop after this many consecutive skipped (overflowing) steps; bf16/fp32 stop on the
    # first non-finite loss or gradient norm.
    max_consecutive_skips: int = 20
    # pretrain | sft | dpo (issue 15): the loss of training/objectives.py. Under dpo the batch sizes
    # count preference pairs (two sequences each), as TRL's and NeMo's do.
    objective: str = "pretrain"
    dpo_beta: float = 0.1

    def validate(self) -> None:
        """Check sizes and names."""
        _one_of("training.objective", self.objective, ("pretrain", "sft", "dpo"))
        _positive("training.dpo_beta", self.dpo_beta)
        _positive("training.micro_batch_size", self.micro_batch_size)
        _positive("training.train_iters", self.train_iters)
        if self.global_batch_size is not None:
            _positive("training.global_batch_size", self.global_batch_size)
        _one_of("training.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _one_of("training.device", self.device, ("auto", "cpu", "cuda"))
        from megatron_lite.models.common.attention_backends import SELECTABLE_BACKENDS

        _one_of("training.attention_backend", self.attention_backend, SELECTABLE_BACKENDS)
        _one_of("training.recompute", self.recompute, ("none", "full", "selective"))
        _positive("training.dist_timeout_minutes", self.dist_timeout_minutes)
        _positive("training.max_consecutive_skips", self.max_consecutive_skips)
        for name in ("save_interval", "eval_interval", "exit_interval", "keep_last_checkpoints"):
            if getattr(self, name) is not None:
                _positive(f"training.{name}", getattr(self, name))
        decay = self.ema_decay
        if decay is not None and (
            not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 <= decay < 1.0
        ):
            raise ConfigError(f"training.ema_decay ({decay!r}) must be a number in [0, 1) (0 or null: off)")


@dataclass
class LoggingConfig:
    """Where and how often progress is reported.

    Attributes:
        log_interval: iterations between log lines (the last iteration is always logged).
        run_dir: directory for the resolved config, TensorBoard events and logs.
        tensorboard: write TensorBoard events (needs the tensorboard package).
        wandb_project: Weights & Biases project; None disables it.
        peak_tflops: per-device peak TFLOP/s for MFU; None looks the GPU up in a table.
    """

    log_interval: int = 10
    run_dir: str = "runs/default"
    tensorboard: bool = False
    wandb_project: str | None = None
    peak_tflops: float | None = None  # per-device peak for MFU; None: table by GPU name (n/a on CPU)

    def validate(self) -> None:
        """Check the interval and the peak."""
        _positive("logging.log_interval", self.log_interval)
        if self.peak_tflops is not None:
            _positive("logging.peak_tflops", self.peak_tflops)


@dataclass
class Config:
    """The whole run: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> Config:
        """Validate every section and the checks that span sections; returns self."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        stage = self.parallel.data_parallel_sharding
        if stage != "optimizer" and self.model.tie_embeddings and self.parallel.pipeline > 1:
            raise ConfigError(
                f"parallel.data_parallel_sharding {stage} cannot serve model.tie_embeddings with "
                "parallel.pipeline > 1 (the tied copies' gradient all-reduce needs the full gradient)"
            )
        if self.data.seq_length > self.model.max_position_embeddings:
            raise ConfigError(
                f"data.seq_length ({self.data.seq_length}) exceeds "
                f"model.max_position_embeddings ({self.model.max_position_embeddings})"
            )
        if self.training.objective != "pretrain" and self.data.mock:
            raise ConfigError(
                f"training.objective {self.training.objective} needs data with loss masks, but data.mock "
                "is true (random tokens have none)"
            )
        if self.training.objective == "dpo" and self.parallel.context > 1:
            raise ConfigError("training.objective dpo does not support parallel.context > 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, suitable for YAML."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_sharding(par: ParallelConfig) -> None:
    """``parallel.data_parallel_sharding``: a known stage, and options that can serve it."""
    stage = par.data_parallel_sharding
    _one_of("parallel.data_parallel_sharding", stage, ("optimizer", "gradients", "parameters"))
    if stage != "optimizer" and not par.distributed_optimizer:
        raise ConfigError(
            f"parallel.data_parallel_sharding {stage} needs parallel.distributed_optimizer true"
        )
    if stage == "parameters" and par.pipeline == 1:
        raise ConfigError(
            "parallel.data_parallel_sharding parameters needs parallel.pipeline > 1 (the pipeline "
            "executor gathers each chunk's weights; one stage would hold them all anyway)"
        )
    if stage == "parameters" and par.overlap_param_gather:
        raise ConfigError(
            "parallel.data_parallel_sharding parameters replaces parallel.overlap_param_gather (the "
            "executor prefetches the next chunk's gather): set overlap_param_gather false"
        )


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} ({value!r}) must be a positive number")


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} ({value!r}) must be one of {', '.join(choices)}")


# Loading (YAML, overrides, Megatron flags) lives in config_load.py, which imports this module;
# ``from megatron_lite.config import load_config`` keeps working through this lazy lookup.
_LOADERS = ("config_from_dict", "load_config", "main_argv_to_config")


def __getattr__(name: str):
    if name in _LOADERS:
        from megatron_lite import config_load

        return getattr(config_load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
