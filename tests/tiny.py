"""Shared tiny-model command-line overrides for trainer tests (fast on 2 CPU cores)."""

# A 2-layer Mistral with GQA (4 query heads, 2 KV heads), vocabulary 256, positions up to 64.
TINY_MODEL = [
    "--model.vocab_size",
    "256",
    "--model.hidden_size",
    "64",
    "--model.intermediate_size",
    "128",
    "--model.num_layers",
    "2",
    "--model.num_attention_heads",
    "4",
    "--model.num_kv_heads",
    "2",
    "--model.max_position_embeddings",
    "64",
]
