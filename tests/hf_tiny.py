"""A tiny random Hugging Face Mistral/Mixtral saved to disk: the reference for generation tests."""

import torch
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM


def save_tiny_hf_model(arch: str, window, path, vocab_size: int, seed: int = 0):
    """Build, save to ``path`` and return a 2-layer HF model with GQA.

    No EOS token, so greedy decoding runs to ``max_new_tokens``; weights are drawn with a large
    std so the logits are peaked and greedy decoding has no near-ties to trip over.
    """
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        attn_implementation="eager",
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**kw))
    else:
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    model.eval().save_pretrained(path)
    return model
