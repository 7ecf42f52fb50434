import os

import pytest
import torch

os.environ.setdefault("EDGECOMPRESS_NO_PROGRESS", "1")


@pytest.fixture
def tiny_llama():
    """A seeded 2-layer Llama with tied embeddings (hidden 64, GQA 4/2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()
