"""Magpie (Xu et al. 2024): an aligned model, given only its chat template's pre-query prefix,
writes a user query; the same model then answers it. Output records are
``{"id", "prompt", "response"}``, which ``tools/preprocess_data.py --instruction`` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_lite.synthesis.blocks import block_seed, first_block
from megatron_lite.synthesis.generator import TextGenerator, finished
from megatron_lite.synthesis.output import JsonlWriter, Progress, read_resumable, stderr_log
from megatron_lite.synthesis.parsing import cut_at_stops, normalize_text
from megatron_lite.synthesis.templates import ChatTemplate, encode_with_specials


@dataclass
class MagpieOptions:
    """What to produce.

    Attributes:
        output: JSONL path (appended to on resume).
        limit: records to have in ``output`` when done.
        batch_size: attempts generated together (one block).
        seed: base seed of every block.
        min_instruction_chars / max_instruction_chars / min_response_chars / max_response_chars:
            length filters on the stripped texts (``None``: no bound).
        max_attempts: give up after this many attempts in total (default ``20 * limit``).
        keep_unfinished: keep instructions/responses that hit ``max_new_tokens`` before their
            stop (by default they are cut mid-sentence, so they are skipped).
        log_interval_s: seconds between progress lines.
    """

    output: str
    limit: int
    batch_size: int = 8
    seed: int = 0
    min_instruction_chars: int = 1
    max_instruction_chars: int | None = None
    min_response_chars: int = 1
    max_response_chars: int | None = None
    max_attempts: int | None = None
    keep_unfinished: bool = False
    log_interval_s: float = 10.0

    def validate(self) -> None:
        """Raise ValueError naming the bad flag."""
        if self.limit < 1:
            raise ValueError(f"--limit must be >= 1 for magpie (records to write), got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def _reason(text: str, done: bool, low: int | None, high: int | None, what: str) -> str | None:
    """Why a stripped ``text`` is dropped (None: kept); ``done``: it ended at a stop."""
    if not text:
        return f"empty {what}"
    if not done:
        return f"unfinished {what}"
    if low is not None and len(text) < low:
        return f"{what} too short"
    if high is not None and len(text) > high:
        return f"{what} too long"
    return None


def _instructions(block, texts, template, opts, seen, progress, last_id):
    """Kept (attempt id, instruction) of one block, in attempt order; counts the rest as skipped."""
    kept, pending = [], set()
    for k, raw in enumerate(texts):
        attempt = block * opts.batch_size + k
        count = last_id is None or attempt > last_id  # items before the resume point were counted
        text = cut_at_stops(raw, template.instruction_stops())[0].strip()
        ended = opts.keep_unfinished or finished(raw, template.instruction_stops())
        reason = _reason(text, ended, opts.min_instruction_chars, opts.max_instruction_chars, "instruction")
        key = normalize_text(text)
        if reason is None and (key in seen or key in pending):
            reason = "duplicate instruction"
        if reason is not None:
            if count:  # an empty query is malformed model output: say so on its own line
                detail = f"attempt {attempt}: model wrote no query: {raw[:80]!r}" if not text else None
                progress.skip(reason, detail)
            continue
        pending.add(key)
        kept.append((attempt, text))
    return kept


def run_magpie(
    generate: TextGenerator,
    tokenizer,
    template: ChatTemplate,
    opts: MagpieOptions,
    log: Callable[[str], None] = stderr_log,
) -> Progress:
    """Sample instruction/response records until ``opts.output`` holds ``opts.limit`` of them.

    Args:
        generate: the text generator (``model_text_generator`` or a test's fake).
        tokenizer: encodes the template and instructions.
        template: the chat format the model was aligned with.
        opts: output, counts, filters.
        log: receives progress and resume lines.

    Returns:
        The final counts.
    """
    opts.validate()
    done = read_resumable(opts.output, log)
    last_id = done[-1]["id"] if done else None
    seen = {normalize_text(r["prompt"]): r["id"] for r in done}
    progress = Progress("magpie", log, opts.log_interval_s, done=len(done))
    if done:
        log(f"magpie: resuming after {len(done)} records (last id {last_id}) in {opts.output}")
    max_attempts = opts.max_attempts or 20 * opts.limit
    query_prompt = encode_with_specials(tokenizer, template.query_prompt())
    block = first_block(last_id, opts.batch_size)
    # the resumed block is recomputed whole, so it must not see its own earlier records as duplicates
    seen = {k: i for k, i in seen.items() if i < block * opts.batch_size}
    writer = JsonlWriter(opts.output)
    try:
        while len(done) + progress.written < opts.limit and block * opts.batch_size < max_attempts:
            texts = generate(
                [query_prompt] * opts.batch_size,
                block_seed(opts.seed, block, 0),
                template.instruction_stops(),
            )
            kept = _instructions(block, texts, template, opts, seen, progress, last_id)
            prompts = [encode_with_specials(tokenizer, template.response_prompt(q)) for _, q in kept]
            answers = (
                generate(prompts, block_seed(opts.seed, block, 1), template.response_stops()) if kept else []
            )
            for (attempt, question), raw in zip(kept, answers):
                answer = cut_at_stops(raw, template.response_stops())[0].strip()
                ended = opts.keep_unfinished or finished(raw, template.response_stops())
                reason = _reason(answer, ended, opts.min_response_chars, opts.max_response_chars, "response")
                if last_id is not None and attempt <= last_id:
                    if reason is None:
                        seen[normalize_text(question)] = attempt
                    continue
                if reason is not None:
                    progress.skip(reason)
                    continue
                if len(done) + progress.written >= opts.limit:
                    break
                writer.write({"id": attempt, "prompt": question, "response": answer})
                seen[normalize_text(question)] = attempt
                progress.wrote()
            block += 1
    finally:
        writer.close()
    if len(done) + progress.written < opts.limit:
        log(
            f"magpie: stopped after {max_attempts} attempts with "
            f"{len(done) + progress.written} of {opts.limit} records"
        )
    progress.maybe_report(force=True)
    return progress
