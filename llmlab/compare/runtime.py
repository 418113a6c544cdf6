"""How a model runs, asked in one place: compare (and `bench decode`'s cache table) read a model's
cache kind only through cache_kind() / decode_path(), switch MLA's one-token step only through
set_absorbed(), record a run's settings through recorded_config() and rebuild a model from them
through build(). The rest of compare sees one flat dict: the ModelConfig's fields and the
Runtime's (llmlab.runtime) as `runtime_<field>`."""
from __future__ import annotations

NONE, DENSE, PAGED = "none", "dense", "paged"
RUNTIME_PREFIX = "runtime_"


def cache_kind(model) -> str:
    """'none' (generation recomputes the window every token), 'dense' (a preallocated KV or latent
    cache per row) or 'paged' (a pool of fixed-size blocks)."""
    return model.runtime.cache


def decode_path(model) -> str:
    """What a report calls the path a model's generation takes by default."""
    rt = model.runtime
    if rt.attention == "flash_mla":
        return "paged kernel"  # MLA's cached steps through the fused paged-latent kernel
    return {NONE: "recompute", DENSE: "cache", PAGED: "paged cache"}[rt.cache]


def set_absorbed(model, absorbed: bool) -> bool:
    """MLA's one-token step with weight absorption (True: attends over the cached latents) or by
    decompressing every cached latent into keys and values (False). Returns whether the model has
    MLA layers (False: nothing to switch)."""
    layers = [b.attn for b in model.blocks if hasattr(b.attn, "absorb")]
    for attn in layers:
        attn.absorb = absorbed
    return bool(layers)


def recorded_config(model) -> dict:
    """What results.json records of a model: its config's fields and its runtime's, in one dict."""
    return model.config.to_dict() | {RUNTIME_PREFIX + k: v for k, v in model.runtime.to_dict().items()}


def runtime_fields() -> tuple[str, ...]:
    """The recorded names of the runtime's fields (how the same weights run, not what they compute)."""
    import dataclasses

    from llmlab.runtime import Runtime

    return tuple(RUNTIME_PREFIX + f.name for f in dataclasses.fields(Runtime))


def build(config: dict):
    """A model (random weights) of a recorded config, running as recorded."""
    from llmlab.config import ModelConfig
    from llmlab.model import Transformer
    from llmlab.runtime import Runtime

    model = {k: v for k, v in config.items() if not k.startswith(RUNTIME_PREFIX)}
    runtime = {k[len(RUNTIME_PREFIX):]: v for k, v in config.items() if k.startswith(RUNTIME_PREFIX)}
    return Transformer(ModelConfig.from_dict(model), Runtime.from_dict(runtime))


def preset_recorded(preset: str, **sizes) -> dict:
    """recorded_config() of a preset at these sizes, without building it."""
    from llmlab.presets import preset_config, preset_runtime

    return preset_config(preset, **sizes).to_dict() | {RUNTIME_PREFIX + k: v
                                                       for k, v in preset_runtime(preset).to_dict().items()}
