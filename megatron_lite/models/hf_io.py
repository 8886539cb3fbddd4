"""Hugging Face checkpoints (config.json + safetensors) <-> canonical ``Transformer``.

The name/shape mapping is data in each family's ``hf_adapter.py`` (named by its ``ModelSpec``);
this module only interprets it. ``hf_state_to_canonical`` and ``canonical_to_hf`` are the two
reusable iterators (checkpoint conversion with resharding builds on them); ``load_hf`` /
``save_hf`` add the files.

Every problem with the input is one ``HFCheckpointError`` line naming the file, the tensor and the
shapes involved.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.models import registry
from megatron_lite.models.hf_files import (  # noqa: F401 - re-exported: the HF file layout lives there
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    SINGLE_FILE,
    HFCheckpointError,
    SafetensorsReader,
    is_hf_dir,
    move_into_place,
    write_safetensors,
)

_INT_FIELDS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_attention_heads",
    "top_k",
    "num_kv_heads",
    "head_dim",
    "max_position_embeddings",
    "sliding_window",
    "num_experts",
}


def adapter_for(arch: str) -> ModuleType:
    """The key-map module of family ``arch`` (its ``ModelSpec.hf_adapter``)."""
    if arch not in registry.names():
        known = ", ".join(registry.names())
        raise HFCheckpointError(f"no Hugging Face adapter for model arch {arch!r} (known: {known})")
    return registry.get_spec(arch).adapter()


def shape_symbols(cfg: ModelConfig) -> dict[str, int]:
    """Sizes of the shape symbols used by the adapters' key rules."""
    cfg.validate()
    return {
        "v": cfg.vocab_size,
        "h": cfg.hidden_size,
        "f": cfg.intermediate_size,
        "q": cfg.num_attention_heads * cfg.head_dim,
        "kv": cfg.num_kv_heads * cfg.head_dim,
        "E": cfg.num_experts,
    }


# ---------------------------------------------------------------- config.json <-> ModelConfig


def hf_config_to_model_config(hf: Mapping, where: str = CONFIG_FILE) -> ModelConfig:
    """Translate a parsed HF ``config.json`` into a validated ``ModelConfig``.

    Absent keys take the installed-transformers defaults of that architecture (e.g. Mistral's
    ``sliding_window`` 4096, Mixtral's ``rope_theta`` 1e6).
    """
    archs = hf.get("architectures") or []
    name = archs[0] if isinstance(archs, list) and archs else None
    arch = registry.arch_for_hf(name, hf.get("model_type"))
    if arch is None:
        shown = name or hf.get("model_type")
        supported = ", ".join(registry.hf_architectures())
        raise HFCheckpointError(f"{where}: unsupported architecture {shown!r} (supported: {supported})")
    ad = adapter_for(arch)

    def get(key):
        return hf[key] if key in hf else ad.HF_DEFAULTS.get(key)

    if get("hidden_act") not in (None, "silu"):
        raise HFCheckpointError(f"{where}: hidden_act {get('hidden_act')!r} is not supported (only silu)")
    kwargs = {}
    for key, field in ad.CONFIG_KEYS:
        value = kwargs[field] = get(key)
        wrong_int = field in _INT_FIELDS and value is not None and type(value) is not int
        if wrong_int or (field == "tie_embeddings" and type(value) is not bool):
            kind = "an integer" if wrong_int else "a bool"
            raise HFCheckpointError(f"{where}: {key} ({value!r}) must be {kind}")
    if kwargs["num_kv_heads"] is None:
        kwargs["num_kv_heads"] = kwargs["num_attention_heads"]
    if hasattr(ad, "rope_from_hf"):  # the family reads its own RoPE keys (e.g. Llama 3 scaling)
        kwargs.update(ad.rope_from_hf(hf, where))
    else:
        kwargs["rope_theta"] = _rope_theta(hf, ad, where)
    try:
        cfg = ModelConfig(arch=arch, **kwargs)
        cfg.validate()
    except (ValueError, TypeError) as e:
        raise HFCheckpointError(f"{where}: {e}") from None
    return cfg


def _rope_theta(hf: Mapping, ad: ModuleType, where: str) -> float:
    """``rope_theta`` from transformers-5 ``rope_parameters`` or the classic top-level key."""
    params = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or params.get("rope_type", "default") != "default":
        scaling = hf.get("rope_scaling") or params
        raise HFCheckpointError(f"{where}: rope scaling ({scaling}) is not supported")
    theta = params.get("rope_theta", hf.get("rope_theta", ad.HF_DEFAULTS["rope_theta"]))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise HFCheckpointError(f"{where}: rope_theta ({theta!r}) must be a positive number")
    return float(theta)


def model_config_to_hf_config(cfg: ModelConfig, dtype: torch.dtype, base: Mapping | None = None) -> dict:
    """The ``config.json`` dict for ``cfg`` (readable by transformers 4.x and 5.x).

    Args:
        cfg: the model.
        dtype: dtype of the weights on disk.
        base: the source checkpoint's ``config.json`` (token ids, generation defaults, ...): kept,
            with the architecture keys overwritten by ``cfg``'s.
    """
    cfg.validate()
    ad = adapter_for(cfg.arch)
    out = dict(base or {})
    out.update({"architectures": [ad.ARCHITECTURE], "model_type": ad.MODEL_TYPE})
    out.update({key: getattr(cfg, field) for key, field in ad.CONFIG_KEYS})
    if hasattr(ad, "rope_to_hf"):
        out.update(ad.rope_to_hf(cfg))
    else:
        out["rope_theta"] = float(cfg.rope_theta)
        out["rope_parameters"] = {"rope_theta": float(cfg.rope_theta), "rope_type": "default"}
    out.update(ad.HF_EXTRA)
    out["dtype"] = str(dtype).removeprefix("torch.")
    if "torch_dtype" in out:  # transformers 4.x name of the same key
        out["torch_dtype"] = out["dtype"]
    return out


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """Read and translate ``<path>/config.json``."""
    file = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise HFCheckpointError(f"{path}: not a directory")
    if not file.is_file():
        raise HFCheckpointError(f"{file}: missing (not a Hugging Face checkpoint directory?)")
    try:
        hf = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFCheckpointError(f"{file}: malformed JSON ({e})") from None
    if not isinstance(hf, dict):
        raise HFCheckpointError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    return hf_config_to_model_config(hf, where=str(file))


# ---------------------------------------------------------------- the key map, interpreted


def _instances(cfg: ModelConfig, layer_ids: Iterable[int] | None = None):
    """(rule, layer index or None) for every canonical parameter, in file order."""
    rules = [r for r in adapter_for(cfg.arch).KEY_RULES if not (r.untied_only and cfg.tie_embeddings)]
    first_layer_rule = next(n for n, r in enumerate(rules) if r.per_layer)
    layers = range(cfg.num_layers) if layer_ids is None else layer_ids
    pre = [(r, None) for r in rules[:first_layer_rule] if not r.per_layer]
    post = [(r, None) for r in rules[first_layer_rule:] if not r.per_layer]
    per_layer = [(r, i) for i in layers for r in rules if r.per_layer]
    return pre + per_layer + post


def _part_names(rule, i: int | None, num_experts: int) -> list[list[str]]:
    """HF names of the rule's parts, one list per expert (a single list when not per expert)."""
    experts = range(num_experts) if rule.per_expert else [None]
    return [[pattern.format(i=i, e=e) for pattern, _ in rule.hf] for e in experts]


def _canonical_shape(rule, syms: dict[str, int]) -> tuple[int, ...]:
    shapes = [tuple(syms[s] for s in symbols) for _, symbols in rule.hf]
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])
    return (syms["E"], *shape) if rule.per_expert else shape


def canonical_names(cfg: ModelConfig, layer_ids: Iterable[int] | None = None) -> list[str]:
    """Canonical parameter names of the whole model (or of ``layer_ids``' layers plus the rest)."""
    return [rule.canonical.format(i=i) for rule, i in _instances(cfg, layer_ids)]


def hf_names(cfg: ModelConfig) -> set[str]:
    """Every on-disk HF tensor name the whole model is made of."""
    groups = (g for rule, i in _instances(cfg) for g in _part_names(rule, i, cfg.num_experts))
    return {name for group in groups for name in group}


def hf_tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``(hf_name, shape)`` of every on-disk tensor, in the order ``canonical_to_hf`` yields them."""
    syms = shape_symbols(cfg)
    meta = {
        rule.canonical.format(i=i): torch.empty(_canonical_shape(rule, syms), device="meta")
        for rule, i in _instances(cfg)
    }
    return [(name, tuple(t.shape)) for name, t in canonical_to_hf(meta, cfg)]


def hf_state_to_canonical(
    hf_tensors_getter: Callable[[str], torch.Tensor],
    cfg: ModelConfig,
    names: Iterable[str] | None = None,
    where: Callable[[str], str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(canonical_name, tensor)`` built from HF tensors, one parameter at a time.

    Args:
        hf_tensors_getter: returns the HF tensor of a name; raises ``KeyError`` when absent.
        cfg: model config (shapes are checked against it).
        names: only these canonical names (default: the whole model).
        where: names the file a tensor lives in, for error messages.
    """
    syms = shape_symbols(cfg)
    wanted = None if names is None else set(names)
    for rule, i in _instances(cfg):
        name = rule.canonical.format(i=i)
        if wanted is not None and name not in wanted:
            continue
        groups = []
        for group in _part_names(rule, i, cfg.num_experts):
            parts = [
                _get_checked(hf_tensors_getter, n, tuple(syms[s] for s in symbols), where)
                for n, (_, symbols) in zip(group, rule.hf)
            ]
            groups.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=0))
        yield name, torch.stack(groups) if rule.per_expert else groups[0]


def _get_checked(getter, name: str, shape: tuple[int, ...], where) -> torch.Tensor:
    location = where(name) if where is not None else "checkpoint"
    try:
        tensor = getter(name)
    except KeyError:
        raise HFCheckpointError(f"{location}: missing tensor {name} (expected shape {list(shape)})") from None
    if tuple(tensor.shape) != shape:
        raise HFCheckpointError(
            f"{location}: tensor {name} has shape {list(tensor.shape)} but config.json implies {list(shape)}"
        )
    return tensor


def canonical_to_hf(
    state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, strict: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for the canonical ``state_dict`` (tensors are views; copy to keep).

    Args:
        state_dict: canonical, unsharded tensors.
        cfg: model config.
        strict: every parameter of the whole model must be present and no unknown key may be;
            otherwise absent ones (another pipeline stage's) are skipped.
    """
    syms = shape_symbols(cfg)
    instances = _instances(cfg)
    if strict:
        known = {rule.canonical.format(i=i) for rule, i in instances}
        unknown = sorted(set(state_dict) - known)
        if unknown:
            raise HFCheckpointError(f"state dict has {len(unknown)} unknown parameter(s), e.g. {unknown[0]}")
    for rule, i in instances:
        name = rule.canonical.format(i=i)
        if name not in state_dict:
            if strict:
                raise HFCheckpointError(f"state dict is missing {name} (save_hf needs the whole model)")
            continue
        tensor, expected = state_dict[name], _canonical_shape(rule, syms)
        if tuple(tensor.shape) != expected:
            raise HFCheckpointError(
                f"parameter {name} has shape {list(tensor.shape)} but the config implies "
                f"{list(expected)} (gather tensor/expert-parallel shards first)"
            )
        groups = tensor.unbind(0) if rule.per_expert else [tensor]
        rows = [syms[symbols[0]] for _, symbols in rule.hf]
        for group, hf_group in zip(groups, _part_names(rule, i, cfg.num_experts)):
            yield from zip(hf_group, group.split(rows, dim=0))


def _check_no_unexpected(reader: SafetensorsReader, cfg: ModelConfig) -> None:
    ad = adapter_for(cfg.arch)
    expected = hf_names(cfg)
    for name in reader.keys():
        if name in expected or name.endswith(ad.IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # some tied checkpoints store the (identical) head anyway
        raise HFCheckpointError(
            f"{reader.where(name)}: unexpected tensor {name} "
            f"(not part of a {ad.ARCHITECTURE} with this config.json)"
        )


# ---------------------------------------------------------------- load / save


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Read a Hugging Face MistralForCausalLM / MixtralForCausalLM directory into a ``Transformer``.

    Tensors are read one at a time (memory-mapped) and copied into a model built without init.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or sharded + index).
        dtype: parameter dtype of the returned model.
        device: where the model lives.

    Returns:
        The model (train mode, as ``build_model`` returns it).

    Raises:
        HFCheckpointError: one line naming the file, tensor and shapes when the input is bad.
    """
    from megatron_lite.models import build_model

    cfg = read_hf_config(path)
    with SafetensorsReader(path) as reader:
        _check_no_unexpected(reader, cfg)
        model = build_model(cfg, device=device, dtype=dtype, seed=None)
        params = dict(model.named_parameters())
        loaded = set()
        with torch.no_grad():
            for name, tensor in hf_state_to_canonical(reader, cfg, where=reader.where):
                params[name].copy_(tensor)
                loaded.add(name)
    if set(params) != loaded:  # the key map and the model disagree: a bug here, not bad input
        raise RuntimeError(f"HF key map does not cover parameters {sorted(set(params) - loaded)}")
    return model


def save_hf(
    model,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    **extras,
) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory that transformers loads.

    Args:
        model: a whole, unparallelized ``Transformer``.
        path: target directory (must not exist, be empty, or ``overwrite`` must be set).
        dtype: dtype on disk (default: the model's).
        max_shard_bytes: shard size limit; above it, ``model-0000k-of-0000n.safetensors`` + index.
        overwrite: replace a non-empty existing ``path``.
        **extras: ``hf_config`` / ``extra_files`` of ``write_hf_checkpoint``.
    """
    cfg = model.cfg
    if not (model.pre_process and model.post_process and len(model.layers) == cfg.num_layers):
        raise HFCheckpointError(
            "save_hf needs the whole model (all layers, embedding and head), not one pipeline stage"
        )
    state = {k: v.detach() for k, v in model.state_dict().items()}
    known = set(canonical_names(cfg))
    unknown = sorted(set(state) - known)
    if unknown:
        raise HFCheckpointError(f"state dict has {len(unknown)} unknown parameter(s), e.g. {unknown[0]}")
    dtype = dtype or next(model.parameters()).dtype
    write_hf_checkpoint(state.__getitem__, cfg, path, dtype, max_shard_bytes, overwrite, **extras)


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output path that is a file, or a non-empty directory unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HFCheckpointError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise HFCheckpointError(f"{path}: exists and is not empty (use --overwrite to replace it)")
    return path


def write_hf_checkpoint(
    get: Callable[[str], torch.Tensor],
    cfg: ModelConfig,
    path: str | os.PathLike,
    dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    hf_config: Mapping | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> None:
    """Write an HF checkpoint, asking ``get`` for one canonical tensor at a time.

    The safetensors files are streamed (``write_safetensors``): memory holds one canonical tensor,
    never the model. Everything is written into a temporary sibling directory, then renamed into
    place (an ``overwrite``-n directory is replaced as a whole).

    Args:
        get: canonical name -> full tensor (read lazily from the source).
        cfg: the model.
        path: target directory.
        dtype: dtype on disk.
        max_shard_bytes: shard size limit.
        overwrite: replace a non-empty existing ``path``.
        hf_config: the source's ``config.json`` to keep (token ids, ...), see
            ``model_config_to_hf_config``.
        extra_files: more files to write beside the weights (``generation_config.json``,
            tokenizer files): file name -> contents.
    """
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = model_config_to_hf_config(cfg, dtype, base=hf_config)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
        tensors = (
            pair for n in canonical_names(cfg) for pair in canonical_to_hf({n: get(n)}, cfg, strict=False)
        )
        write_safetensors(tmp, hf_tensor_specs(cfg), tensors, dtype, max_shard_bytes)
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
