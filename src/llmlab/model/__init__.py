"""The generic decoder and its swappable parts."""
from llmlab.model.cache import CacheStep, CachedTensor, DenseCache
from llmlab.model.paged_cache import PagedCache
from llmlab.model.transformer import Block, Transformer

GPT = Transformer  # the nanoGPT name

__all__ = ["Transformer", "GPT", "Block", "DenseCache", "PagedCache", "CacheStep", "CachedTensor"]
