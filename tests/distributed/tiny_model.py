"""The tiny LLaMA the multi-rank workers and the HF tests train (``zero_worker.py``,
``fsdp_worker.py``, ``hf_common.py``, ``tests/test_lightning.py``): 2 attention heads, by default
vocab 64 and an MLP width 5/3 of the hidden size, seeded so every rank and the one-process
reference build the same weights."""
import torch
import transformers


def tiny_llama(layers=2, hidden=24, seq=8, vocab=64, intermediate=None):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                                      intermediate_size=intermediate or hidden * 5 // 3,
                                      num_hidden_layers=layers, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=seq)
    return transformers.LlamaForCausalLM(config)
