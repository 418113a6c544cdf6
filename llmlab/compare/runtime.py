"""How a model runs, asked in one place: compare (and `bench decode`'s cache table) read a model's
cache kind only through cache_kind(), switch MLA's one-token step only through set_absorbed(),
record a run's settings through recorded_config() and rebuild a model from them through build().
When the runtime options (attention implementation, cache kind) move out of ModelConfig, these
functions are what changes: the rest of compare sees one flat dict of fields, `attn_backend` and
`use_cache` among them."""
from __future__ import annotations

NONE, DENSE, PAGED = "none", "dense", "paged"
PATHS = {NONE: "recompute", DENSE: "cache", PAGED: "paged kernel"}  # what a report calls each decode path


def cache_kind(model) -> str:
    """'none' (generation recomputes the window every token), 'dense' (a preallocated KV or latent
    cache) or 'paged' (a paged latent cache read by the fused decode kernel)."""
    if not model.config.use_cache:
        return NONE
    return PAGED if getattr(model.blocks[0].attn, "paged", False) else DENSE


def set_absorbed(model, absorbed: bool) -> bool:
    """MLA's one-token step with weight absorption (True: attends over the cached latents) or by
    decompressing every cached latent into keys and values (False). Returns whether the model has
    MLA layers (False: nothing to switch)."""
    layers = [b.attn for b in model.blocks if hasattr(b.attn, "absorb")]
    for attn in layers:
        attn.absorb = absorbed
    return bool(layers)


def recorded_config(model) -> dict:
    """What results.json records of a model: its config's fields and how it runs, in one dict."""
    return model.config.to_dict()


def build(config: dict):
    """A model (random weights) of a recorded config."""
    from llmlab.config import ModelConfig
    from llmlab.model import Transformer

    return Transformer(ModelConfig.from_dict(dict(config)))
