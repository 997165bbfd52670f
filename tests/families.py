"""Tiny random-initialised models of every supported family, shared by the tests (no hub access)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
_DECODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# model_type -> (config kwargs, expected (blocks, mlp_out, final_norm, lm_head, weight_transposed), key_size).
# The expected paths are written out by hand as the independent reference for detection.
FAMILIES = {
    "llama": (_DECODER, ("model.layers", "mlp.down_proj", "model.norm", "lm_head", False), 48),
    "qwen2": (_DECODER, ("model.layers", "mlp.down_proj", "model.norm", "lm_head", False), 48),
    "qwen3": ({**_DECODER, "head_dim": 8}, ("model.layers", "mlp.down_proj", "model.norm", "lm_head", False), 48),
    "mistral": (_DECODER, ("model.layers", "mlp.down_proj", "model.norm", "lm_head", False), 48),
    # head_dim*heads = 64 = intermediate_size: o_proj has W_out's shape, only its parent name tells them apart.
    "gemma": (
        {**_DECODER, "intermediate_size": 64, "head_dim": 16},
        ("model.layers", "mlp.down_proj", "model.norm", "lm_head", False),
        64,
    ),
    # Random logits are ~0.3, far below the default cap of 30; a small cap makes the soft cap visible.
    "gemma2": (
        {**_DECODER, "intermediate_size": 64, "head_dim": 16, "final_logit_softcapping": 0.2},
        ("model.layers", "mlp.down_proj", "model.norm", "lm_head", False),
        64,
    ),
    # Gemma-3: sliding-window layers and a norm on the MLP output before the residual add. The
    # window is wider than the test prompts, as Gemma-3-270M's 512 tokens are wider than edit
    # prompts (test_targets covers a narrower one).
    "gemma3_text": (
        {**_DECODER, "intermediate_size": 64, "head_dim": 16, "sliding_window": 64},
        ("model.layers", "mlp.down_proj", "model.norm", "lm_head", False),
        64,
    ),
    # OLMo-2 normalises the attention and MLP outputs (no input norms at all).
    "olmo2": (_DECODER, ("model.layers", "mlp.down_proj", "model.norm", "lm_head", False), 48),
    "phi3": ({**_DECODER, "pad_token_id": 0}, ("model.layers", "mlp.down_proj", "model.norm", "lm_head", False), 48),
    "gpt2": (
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
        ("transformer.h", "mlp.c_proj", "transformer.ln_f", "lm_head", True),
        128,  # n_inner=None: 4 * hidden
    ),
    "gptj": (
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=0, eos_token_id=0),
        ("transformer.h", "mlp.fc_out", "transformer.ln_f", "lm_head", False),
        128,
    ),
    # transformers 5 calls the GPT-NeoX head "lm_head" (formerly "embed_out").
    "gpt_neox": (
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4),
        ("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "lm_head", False),
        48,
    ),
}

# The norm each block applies to its MLP output before the residual add (residual.py), by family.
MLP_OUT_NORM = {"gemma2": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm", "olmo2": "post_feedforward_layernorm"}


def build_family(model_type: str, vocab_size: int = VOCAB, **overrides) -> nn.Module:
    """A tiny random model of `model_type` with FAMILIES' config (plus `overrides`), eval mode."""
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**FAMILIES[model_type][0], **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()
