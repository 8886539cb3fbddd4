"""Per-layer attention windows (model.layer_types, e.g. Gemma 2's alternating local/global layers).

The installed transformers has no Mistral-family model with per-layer windows and no biases
(MistralConfig has no layer_types), so the reference is the single-window model, layer by layer:
each layer of the mixed model, fed the same input, must give exactly what the same layer gives
in a model whose only window is that layer's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from megatron_lite.config import ConfigError
from megatron_lite.models import build_model
from megatron_lite.models.common import attention_backends

PATTERN = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
WINDOW, SEQ = 4, 16


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
@pytest.mark.parametrize("packed", [False, True])
def test_each_layer_equals_the_single_window_model(arch, packed):
    cfg = tiny_model_config(arch, num_layers=4, sliding_window=WINDOW, layer_types=PATTERN, init_std=0.2)
    mixed = build_model(cfg, seed=3).eval()
    assert [layer.window for layer in mixed.layers.values()] == [WINDOW, None, WINDOW, None]
    single = {}
    for window in (WINDOW, None):
        one = tiny_model_config(arch, num_layers=4, sliding_window=window, init_std=0.2)
        single[window] = build_model(one, seed=None).eval()
        single[window].load_state_dict(mixed.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(SEQ).repeat(2, 1)
    kw = {}
    if packed:  # two documents per row: positions restart, windows apply within documents
        pos = torch.cat([torch.arange(10), torch.arange(6)]).repeat(2, 1)
        kw = dict(cu_seqlens=torch.tensor([0, 10, 16, 26, 32], dtype=torch.int32), max_seqlen=10)
    seen = {}
    hooks = [
        layer.register_forward_hook(lambda m, args, out, k=k: seen.__setitem__(k, (args[0], out)))
        for k, layer in mixed.layers.items()
    ]
    with torch.no_grad():
        mixed(tokens, pos, **kw)
        for k, layer in mixed.layers.items():
            h_in, h_out = seen[k]
            ref = single[layer.window](h_in, pos, layers=[k], pre_process=False, post_process=False, **kw)
            assert torch.equal(h_out, ref), f"layer {k}"
            other = single[None if layer.window else WINDOW]
            wrong = other(h_in, pos, layers=[k], pre_process=False, post_process=False, **kw)
            assert (wrong - h_out).abs().max() > 1e-4, f"layer {k}: the window makes no difference here"
    for hook in hooks:
        hook.remove()


def test_masks_built_once_per_distinct_window(monkeypatch):
    cfg = tiny_model_config(num_layers=4, sliding_window=WINDOW, layer_types=PATTERN)
    model = build_model(cfg, seed=0)
    built = []
    real = attention_backends._build_mask
    monkeypatch.setattr(
        attention_backends,
        "_build_mask",
        lambda backend, cu, b, s, window, device: (
            built.append(window) or real(backend, cu, b, s, window, device)
        ),
    )
    cu = torch.tensor([0, 10, 16], dtype=torch.int32)
    pos = torch.cat([torch.arange(10), torch.arange(6)]).unsqueeze(0)
    model(torch.randint(0, cfg.vocab_size, (1, SEQ)), pos, cu_seqlens=cu, max_seqlen=10)
    assert sorted(built, key=str) == sorted([WINDOW, None], key=str)  # 4 layers, 2 windows, 2 masks


def test_bad_layer_types():
    with pytest.raises(ConfigError, match="model.layer_types has 3 entries"):
        tiny_model_config(num_layers=2, sliding_window=4, layer_types=PATTERN[:3])
    with pytest.raises(ConfigError, match="model.layer_types entry"):
        tiny_model_config(num_layers=2, sliding_window=4, layer_types=["sliding_attention", "local"])
    with pytest.raises(ConfigError, match="model.sliding_window is null"):
        tiny_model_config(num_layers=2, layer_types=["sliding_attention", "full_attention"])
