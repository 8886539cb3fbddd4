"""The text-generation seam used by both methods.

A ``TextGenerator`` maps ``(prompts, seed, stops)`` to one completion text per prompt, where
``prompts`` are token-id lists and ``stops`` are strings that end a completion (the completion may
run past them: callers cut at the first one). ``model_text_generator`` backs it with a model;
tests pass any callable with this signature (e.g. one returning hand-written outputs), which is
how the parsing and resume paths are tested without a trained model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

TextGenerator = Callable[[list[list[int]], int, list[str]], list[str]]


class Completion(str):
    """A completion's text that also says whether it ended at an EOS/stop token (``finished``),
    which its text alone cannot show once special tokens are dropped by decoding."""

    finished: bool = False

    def __new__(cls, text: str, finished: bool):
        obj = super().__new__(cls, text)
        obj.finished = finished
        return obj


def finished(raw: str, stops: list[str]) -> bool:
    """Whether a completion ended properly: at an EOS/stop token, or it holds a stop string."""
    return bool(getattr(raw, "finished", False)) or any(s and s in raw for s in stops)


@dataclass
class SamplingOptions:
    """Decoding settings (``temperature`` 0 = greedy)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad flag."""
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must lie in (0, 1], got {self.top_p}")


def _generate_ids(model, prompts, sampling: SamplingOptions, eos_ids, seed, stops, decode):
    """New token ids per prompt, the ragged batch decoded together (``inference.generate_batch``)."""
    from megatron_lite.inference import generate_batch

    return generate_batch(
        model,
        prompts,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        eos_id=list(eos_ids),
        stop_strings=stops or None,
        decode=decode,
        seed=seed,
    )


def model_text_generator(
    model, tokenizer, sampling: SamplingOptions, stop_ids: tuple[int, ...] = ()
) -> TextGenerator:
    """A ``TextGenerator`` that samples from ``model``.

    Generation ends at the tokenizer's EOS; ``stop_ids`` (single-token stops such as Llama 3's
    ``<|eot_id|>``, which decoding would drop) cut the new tokens before they are decoded.
    """
    limit = model.cfg.max_position_embeddings

    def run(prompts: list[list[int]], seed: int, stops: list[str]) -> list[str]:
        for p in prompts:
            if len(p) + sampling.max_new_tokens > limit:
                raise ValueError(
                    f"prompt of {len(p)} tokens + --max-new-tokens {sampling.max_new_tokens} exceeds the "
                    f"model's max_position_embeddings ({limit})"
                )
        eos_ids = [tokenizer.eod, *(i for i in stop_ids if i != tokenizer.eod)]
        new = _generate_ids(model, prompts, sampling, eos_ids, seed, stops, tokenizer.detokenize)
        texts = []
        for ids in new:
            cut = [i for i, t in enumerate(ids) if t in eos_ids]
            texts.append(Completion(tokenizer.detokenize(ids[: cut[0]] if cut else ids), bool(cut)))
        return texts

    return run
