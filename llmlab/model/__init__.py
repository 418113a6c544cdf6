"""The generic decoder and its swappable parts."""
from llmlab.model.cache import InferenceCache, KVCache
from llmlab.model.transformer import Block, Transformer

GPT = Transformer  # the nanoGPT name

__all__ = ["Transformer", "GPT", "Block", "KVCache", "InferenceCache"]
