"""Model presets for ``slimopt-pretrain``: LLaMA shapes from the GaLore paper plus two CPU-sized
ones.

Each preset gives ``transformers.LlamaConfig`` keyword arguments (without the vocabulary, which
comes from the tokenizer) and default training settings. ``tiny`` (1.3M parameters at vocab 2048)
trains on 2 CPU cores in a few minutes, ``small`` (4.2M) in several minutes a run per core; the
others are the GaLore paper's shapes (App. C) with its batch of 512 x 256 tokens.
"""
from __future__ import annotations

PRESETS = {
    # name: (model shape, training defaults)
    "tiny": (dict(hidden_size=128, intermediate_size=352, num_attention_heads=4,
                  num_hidden_layers=4),
             dict(seq_len=128, batch_size=16, steps=200, lr=3e-3, warmup=20, rank=32,
                  update_interval=50, eval_every=100, vocab_size=2048, max_chars=4_000_000)),
    # between tiny and 60m for a CPU: 4.2M parameters at vocab 2048 (3.2M in the blocks), about
    # 3.7x tiny's time per step: ~5 min for the default 200 steps on one core (AdamW)
    "small": (dict(hidden_size=256, intermediate_size=688, num_attention_heads=4,
                   num_hidden_layers=4),
              dict(seq_len=128, batch_size=16, steps=200, lr=3e-3, warmup=20, rank=64,
                   update_interval=50, eval_every=100, vocab_size=2048, max_chars=4_000_000)),
    "60m": (dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                 num_hidden_layers=8),
            dict(seq_len=256, batch_size=512, steps=10_000, lr=1e-2, warmup=1_000, rank=128,
                 update_interval=200, eval_every=1_000, vocab_size=32_000, max_chars=2_000_000_000)),
    "130m": (dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                  num_hidden_layers=12),
             dict(seq_len=256, batch_size=512, steps=20_000, lr=1e-2, warmup=2_000, rank=256,
                  update_interval=200, eval_every=1_000, vocab_size=32_000, max_chars=2_000_000_000)),
    "350m": (dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16,
                  num_hidden_layers=24),
             dict(seq_len=256, batch_size=512, steps=60_000, lr=1e-2, warmup=6_000, rank=256,
                  update_interval=200, eval_every=2_000, vocab_size=32_000, max_chars=2_000_000_000)),
    "1b": (dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32,
                num_hidden_layers=24),
           dict(seq_len=256, batch_size=512, steps=100_000, lr=1e-2, warmup=10_000, rank=512,
                update_interval=200, eval_every=5_000, vocab_size=32_000, max_chars=2_000_000_000)),
    "7b": (dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_hidden_layers=32),
           dict(seq_len=256, batch_size=512, steps=150_000, lr=1e-2, warmup=15_000, rank=1024,
                update_interval=200, eval_every=5_000, vocab_size=32_000, max_chars=2_000_000_000)),
}


def llama_config(preset: str, vocab_size: int, seq_len: int):
    """The ``transformers.LlamaConfig`` of ``preset`` for a tokenizer of ``vocab_size``."""
    import transformers
    shape, _ = PRESETS[preset]
    return transformers.LlamaConfig(vocab_size=vocab_size, max_position_embeddings=seq_len,
                                    num_key_value_heads=shape["num_attention_heads"],
                                    tie_word_embeddings=False, **shape)
