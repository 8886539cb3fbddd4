"""What an exported Hugging Face directory needs besides the weights: config, generation, tokenizer.

``export_extras`` decides what to write: when the run started from a Hugging Face checkpoint (the
"origin": ``training.initial_load`` of the run, or the directory a converted checkpoint came
from, kept in ``iter_*/hf_source/``), its ``config.json`` (token ids and everything else),
``generation_config.json`` and tokenizer files are kept; otherwise they are made from the run's
tokenizer (``data.tokenizer_type`` / ``data.tokenizer_model``): a SentencePiece model becomes
``tokenizer.model`` plus a ``tokenizer.json`` built from it (``AutoTokenizer`` reads it without
the ``protobuf`` package a conversion of ``tokenizer.model`` alone would need), an HF tokenizer's
``tokenizer.json`` is copied.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from megatron_lite.config import Config
from megatron_lite.models.hf_files import CONFIG_FILE, INDEX_FILE

GENERATION_FILE = "generation_config.json"
HF_SOURCE_DIR = "hf_source"  # inside a converted checkpoint's iter_* directory
_SIDE_FILE_MAX_BYTES = 64 * 2**20
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def side_files(hf_dir: str | Path) -> dict[str, bytes]:
    """The small non-weight files of an HF directory (config, generation config, tokenizer)."""
    out = {}
    for path in sorted(Path(hf_dir).iterdir()):
        if not path.is_file() or path.name.endswith(".safetensors") or path.name == INDEX_FILE:
            continue
        if path.name.startswith(".") or path.stat().st_size > _SIDE_FILE_MAX_BYTES:
            continue
        out[path.name] = path.read_bytes()
    return out


def _sentencepiece_files(model_file: str, bos: str, eos: str, unk: str, add_bos: bool) -> dict[str, bytes]:
    """``tokenizer.model``, and ``tokenizer.json`` + ``tokenizer_config.json`` built from it
    (adding BOS to each text as the run's tokenizer did)."""
    files = {"tokenizer.model": Path(model_file).read_bytes()}
    try:
        import sentencepiece
        from transformers import LlamaTokenizer
        from transformers.convert_slow_tokenizer import generate_merges
    except ImportError:  # transformers missing: the SentencePiece model alone is still useful
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": bos, "eos_token": eos, "unk_token": unk}
        config["add_bos_token"] = add_bos
        files["tokenizer_config.json"] = json.dumps(config, indent=2).encode()
        return files
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)}  # SentencePiece's merge priority
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab, scores),
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        add_bos_token=add_bos,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files.update({p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()})
    return files


def tokenizer_export(cfg: Config) -> tuple[dict[str, int | None], dict[str, bytes]]:
    """Special token ids and tokenizer files of the run's tokenizer ({} and {} when unknown)."""
    from megatron_lite.data.tokenizers import build_tokenizer

    data = cfg.data
    bundled = data.tokenizer_type in ("MistralTokenizer", "Llama2Tokenizer")
    if data.tokenizer_model is None and not bundled:
        return {}, {}
    try:
        tok = build_tokenizer(data.tokenizer_type, data.tokenizer_model)
    except (OSError, ValueError, ImportError):
        return {}, {}
    ids = {
        "bos_token_id": tok.bos,
        "eos_token_id": tok.eod,
        "pad_token_id": tok.pad if tok.pad != tok.eod else None,
    }
    if data.tokenizer_type == "HuggingFaceTokenizer":
        folder = Path(tok.model_file).parent
        files = {n: (folder / n).read_bytes() for n in _TOKENIZER_FILES if (folder / n).is_file()}
        files.setdefault("tokenizer.json", Path(tok.model_file).read_bytes())
        return ids, files
    piece = tok._sp.id_to_piece  # noqa: SLF001 - the piece names of the special ids
    unk = piece(tok._sp.unk_id())  # noqa: SLF001
    bos = piece(tok.bos) if tok.bos is not None and tok.bos >= 0 else "<s>"
    return ids, _sentencepiece_files(tok.model_file, bos, piece(tok.eod), unk, tok.add_bos)


def find_origin(cfg: Config, it_dir: str | Path | None, hops: int = 4) -> Path | None:
    """The HF directory a training checkpoint's weights came from, or None.

    Looked for in the checkpoint's ``hf_source/`` (written by conversion from HF), then in the
    run's ``training.initial_load`` (an HF directory, or a checkpoint to look into in turn).
    """
    from megatron_lite.models.hf_files import is_hf_dir

    if it_dir is not None and (Path(it_dir) / HF_SOURCE_DIR / CONFIG_FILE).is_file():
        return Path(it_dir) / HF_SOURCE_DIR
    start = cfg.training.initial_load
    if not start or hops == 0 or not Path(start).is_dir():
        return None
    if is_hf_dir(start):
        return Path(start)
    from megatron_lite.training.checkpoint import CheckpointError
    from megatron_lite.training.convert import read_checkpoint_config

    try:
        src_cfg, iteration = read_checkpoint_config(start)
    except CheckpointError:
        return None
    from megatron_lite.training.checkpoint import iteration_dir

    return find_origin(src_cfg, iteration_dir(start, iteration), hops - 1)


def export_extras(cfg: Config, origin: Path | None) -> tuple[dict | None, dict[str, bytes]]:
    """``(config.json to keep or None, extra files)`` for an HF export of a run with config ``cfg``."""
    files = side_files(origin) if origin is not None else {}
    base = json.loads(files.pop(CONFIG_FILE)) if CONFIG_FILE in files else {}
    ids, tokenizer_files = tokenizer_export(cfg)
    if not any(name in files for name in _TOKENIZER_FILES):
        files.update(tokenizer_files)
    for key, value in ids.items():
        base.setdefault(key, value)
    if GENERATION_FILE not in files:
        generation = {k: base.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        generation = {k: v for k, v in generation.items() if v is not None}
        files[GENERATION_FILE] = json.dumps({"_from_model_config": True, **generation}, indent=2).encode()
    return base or None, files


def copy_side_files(hf_dir: str | Path, dest: str | Path) -> None:
    """Keep an HF directory's side files in ``dest`` (a converted checkpoint's ``hf_source/``)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, content in side_files(hf_dir).items():
        (dest / name).write_bytes(content)
