"""Synthetic instruction data: Magpie and Instruction Pre-Training (``tools/synthesize.py``).

* ``templates``: chat templates (by name or file) and their encoding with special tokens.
* ``parsing``: pure functions over model output (stop strings, ``<QUE>``/``<ANS>`` pairs, de-dup keys).
* ``output``: resumable JSONL output and progress lines.
* ``generator``: the text-generation seam (a model-backed one, or any callable in tests).
* ``magpie`` / ``instruction_pretraining``: the two methods.
"""

from megatron_lite.synthesis.generator import SamplingOptions, TextGenerator, model_text_generator
from megatron_lite.synthesis.instruction_pretraining import IPTOptions, run_instruction_pretraining
from megatron_lite.synthesis.magpie import MagpieOptions, run_magpie
from megatron_lite.synthesis.parsing import cut_at_stops, normalize_text, parse_qa_pairs
from megatron_lite.synthesis.templates import ChatTemplate, encode_with_specials, load_template

__all__ = [
    "ChatTemplate",
    "IPTOptions",
    "MagpieOptions",
    "SamplingOptions",
    "TextGenerator",
    "cut_at_stops",
    "encode_with_specials",
    "load_template",
    "model_text_generator",
    "normalize_text",
    "parse_qa_pairs",
    "run_instruction_pretraining",
    "run_magpie",
]
