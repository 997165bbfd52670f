"""Llama-shaped models with random weights, for timing at scales whose weights are not here.

Shared by the benchmarks' GPU paths; `tiny` runs the same code on a CPU in seconds.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=2),
}
LLAMA3_VOCAB = 128256


def random_llama(shape: str, device: str, dtype: torch.dtype, vocab_size: int = LLAMA3_VOCAB) -> PreTrainedModel:
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: 8B random weights on a CPU take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
