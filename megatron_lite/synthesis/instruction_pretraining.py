"""Instruction Pre-Training (Cheng et al. 2024): a synthesizer model reads a raw text and writes
instruction-response pairs about it, ``<QUE> q <ANS> a </END>`` repeated. Output records are
``{"id", "text", "instruction_pairs": [{"prompt", "response"}, ...]}``, which
``tools/preprocess_data.py --instruction-augmented`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from megatron_lite.synthesis.blocks import block_seed, first_block
from megatron_lite.synthesis.generator import TextGenerator
from megatron_lite.synthesis.output import JsonlWriter, Progress, read_resumable, stderr_log
from megatron_lite.synthesis.parsing import END, parse_qa_pairs
from megatron_lite.synthesis.templates import encode_with_specials

# The released synthesizer's prompt: BOS, then the raw text in <CON> tags and a blank line.
SYNTHESIZER_PROMPT = "<s> <CON> {text} </CON>\n\n"


@dataclass
class IPTOptions:
    """What to read and produce.

    Attributes:
        input: JSONL corpus, one raw text per line under ``text_key``.
        output: JSONL path (appended to on resume).
        text_key: field holding the raw text.
        limit: process at most this many input records (counted from the file's start).
        batch_size: texts generated together (one block).
        seed: base seed of every block.
        prompt_template: synthesizer prompt with a ``{text}`` field.
        max_prompt_tokens: texts whose prompt is longer are skipped (``None``: no bound).
        log_interval_s: seconds between progress lines.
    """

    input: str
    output: str
    text_key: str = "text"
    limit: int | None = None
    batch_size: int = 8
    seed: int = 0
    prompt_template: str = SYNTHESIZER_PROMPT
    max_prompt_tokens: int | None = None
    log_interval_s: float = 10.0

    def validate(self) -> None:
        """Raise ValueError naming the bad flag."""
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if "{text}" not in self.prompt_template:
            raise ValueError("the synthesizer prompt template needs a {text} field")


def iter_texts(path: str, key: str) -> Iterator[tuple[int, str, str | None, str]]:
    """``(index, where, text or None, problem)`` per non-blank line of a JSONL corpus."""
    index = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except ValueError as e:
                yield index, where, None, f"not JSON ({e})"
            else:
                text = record.get(key) if isinstance(record, dict) else None
                if isinstance(text, str) and text.strip():
                    yield index, where, text, ""
                else:
                    yield index, where, None, f"no non-empty string field '{key}'"
            index += 1


def _blocks(opts: IPTOptions, start_block: int):
    """Lists of input items, one per block, from ``start_block`` on (up to ``limit`` items)."""
    batch: list = []
    for item in iter_texts(opts.input, opts.text_key):
        if opts.limit is not None and item[0] >= opts.limit:
            break
        if item[0] // opts.batch_size < start_block:
            continue
        batch.append(item)
        if len(batch) == opts.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prompt(item, tokenizer, opts: IPTOptions, progress: Progress, count: bool) -> list[int] | None:
    """Synthesizer prompt ids of one input item, or None (counted if ``count``) when it is skipped."""
    index, where, text, problem = item
    if text is None:
        if count:
            progress.skip("bad input", f"record {index} ({where}): {problem}")
        return None
    # replace(), not format(): other braces in a user's template stay literal
    prompt = encode_with_specials(tokenizer, opts.prompt_template.replace("{text}", text))
    if opts.max_prompt_tokens is not None and len(prompt) > opts.max_prompt_tokens:
        if count:
            progress.skip(
                "too long",
                f"record {index} ({where}): prompt of {len(prompt)} tokens > {opts.max_prompt_tokens}",
            )
        return None
    return prompt


def _handle(item, output: str, progress: Progress, writer: JsonlWriter) -> None:
    """Parse one model output and write its record, or count why it was skipped."""
    (index, where, text, _), raw = item, output
    parsed = parse_qa_pairs(raw)
    if not parsed.pairs:
        tail = "; output ended inside a pair" if parsed.unterminated else ""
        progress.skip(
            "malformed",
            f"record {index} ({where}): no well-formed <QUE> ... <ANS> ... {END} pair in the model output "
            f"({parsed.bad_segments} bad segment(s){tail}): {raw[:80]!r}",
        )
        return
    writer.write({"id": index, "text": text, "instruction_pairs": parsed.pairs})
    progress.wrote()


def run_instruction_pretraining(
    generate: TextGenerator, tokenizer, opts: IPTOptions, log: Callable[[str], None] = stderr_log
) -> Progress:
    """Synthesize instruction-response pairs for every text of ``opts.input``.

    Args:
        generate: the text generator (``model_text_generator`` or a test's fake).
        tokenizer: encodes the synthesizer prompts.
        opts: input, output, limits.
        log: receives progress, resume and skip lines.

    Returns:
        The final counts.
    """
    opts.validate()
    done = read_resumable(opts.output, log)
    last_id = done[-1]["id"] if done else None
    progress = Progress("instruction-pretraining", log, opts.log_interval_s, done=len(done))
    if done:
        log(
            f"instruction-pretraining: resuming after input record {last_id} "
            f"({len(done)} records in {opts.output})"
        )
    start = first_block(last_id, opts.batch_size)
    writer = JsonlWriter(opts.output)
    try:
        for items in _blocks(opts, start):
            todo, prompts = [], []
            for item in items:
                prompt = _prompt(item, tokenizer, opts, progress, count=last_id is None or item[0] > last_id)
                if prompt is not None:
                    todo.append(item)
                    prompts.append(prompt)
            # the whole block is generated (also items before the resume point) so seeds line up
            block = items[0][0] // opts.batch_size
            outputs = generate(prompts, block_seed(opts.seed, block), []) if prompts else []
            for item, raw in zip(todo, outputs):
                if last_id is None or item[0] > last_id:
                    _handle(item, raw, progress, writer)
    finally:
        writer.close()
    progress.maybe_report(force=True)
    return progress
