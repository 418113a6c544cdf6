"""The decode benchmark's model: small enough that batch-1 decode is dominated by per-token
overhead, which is exactly what a KV cache and a lean decode loop are about."""
SHAPES = ("gpt2", "llama", "deepseek")
N_LAYER, N_EMBD, N_HEAD, VOCAB = 4, 256, 8, 512
LLAMA_KV_HEADS, LLAMA_FFN = 2, 688
# DeepSeek-V2 shape (MLA): latent d_c, rope d_r, per-head nope and value widths
MLA_SIZES = dict(kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
DECODE_STEPS = 64  # cached decode steps timed per context length
UNCACHED_STEPS = 4  # full-recompute steps timed per context length (each costs a whole forward)
