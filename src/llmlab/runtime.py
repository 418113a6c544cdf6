"""How a model runs, apart from what its weights are.

`ModelConfig` holds what shapes the weights (it is saved with them). `Runtime` holds how they are
run: the attention implementation (`manual`: mask + softmax written out; `sdpa`: torch's fused
attention; `flash_mla`: SDPA, and MLA's cached steps through the fused paged-latent kernel), the
cache kind generation uses (`none`: recompute the window every token; `dense`: one preallocated
buffer per row; `paged`: a shared pool of fixed-size blocks), whether the one-token decode step is
compiled, and the dtype. The same weights run under any runtime: `flash_mla` is `rope_mla`'s weights
with another runtime. A preset is a model config plus runtime defaults (llmlab.presets), a checkpoint
saves the runtime it was trained with as the default it loads with, and `load()`, `generate()`, the
CLI and compare take one to override it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from llmlab.errors import LlmlabError
from llmlab.validate import check_fields

CACHE_KINDS = ("none", "dense", "paged")
DTYPES = ("float32", "bfloat16", "float16")
# ModelConfig fields of checkpoints written before the split, and what they became
LEGACY_FIELDS = ("attn_backend", "use_cache")


@dataclass(frozen=True)
class Runtime:
    attention: str = "sdpa"  # a registered attention implementation (llmlab.registry "attention_impl")
    cache: str = "dense"  # none | dense | paged
    compile: bool = False  # torch.compile the one-token decode step
    dtype: Optional[str] = None  # None: the weights' own dtype
    block_size: int = 64  # tokens per block of a paged cache

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, config=None) -> None:
        """Values of the right type and range; with a ModelConfig, also that they fit its attention kind."""
        from llmlab.registry import lookup, names

        check_fields(Runtime, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "runtime")
        impls = names("attention_impl")
        if self.attention not in impls:
            raise LlmlabError(f"unknown attention implementation {self.attention!r}; choose one of: {', '.join(impls)}")
        if self.cache not in CACHE_KINDS:
            raise LlmlabError(f"unknown cache kind {self.cache!r}; choose one of: {', '.join(CACHE_KINDS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise LlmlabError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise LlmlabError(f"the paged cache's block_size must be a power of two, got {self.block_size}")
        impl = lookup("attention_impl", self.attention)
        if impl.needs_cache and self.uses_cache and self.cache != impl.needs_cache:
            raise LlmlabError(f"attention {self.attention!r} decodes from a {impl.needs_cache} cache; "
                              f"this runtime asks for cache={self.cache!r}")
        if self.cache == "paged" and self.block_size < impl.min_block_size:
            raise LlmlabError(f"attention {self.attention!r} reads paged blocks of at least {impl.min_block_size} "
                              f"tokens; block_size {self.block_size} is too small")
        if config is not None and impl.kinds and config.attention not in impl.kinds:
            raise LlmlabError(f"attention {self.attention!r} is an implementation of attention "
                              f"{' / '.join(impl.kinds)} (e.g. preset rope_mla); this model has {config.attention!r}")
        if self.compile and self.cache == "none":
            raise LlmlabError("compile=True compiles the cached decode step; it cannot be combined with "
                              "cache='none' (use_cache=False, --no-cache)")

    @property
    def uses_cache(self) -> bool:
        return self.cache != "none"

    def changed(self, **changes: Any) -> "Runtime":
        """replace() as a user means it: asking to compile a runtime that recomputes (basic, flash)
        asks for the cached step, so it caches (dense) unless a cache kind is given too."""
        if changes.get("compile") and "cache" not in changes and not self.uses_cache:
            changes["cache"] = "dense"
        return self.replace(**changes)

    def replace(self, **changes: Any) -> "Runtime":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise LlmlabError(f"unknown runtime setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Runtime":
        if not isinstance(d, dict):
            raise LlmlabError(f"runtime settings must be a table, got {type(d).__name__}")
        return cls().replace(**d)


def legacy_runtime(values: dict[str, Any]) -> dict[str, Any]:
    """Runtime settings from the fields checkpoints (and callers) used before the split:
    attn_backend -> attention (flash_mla also meant a paged cache), use_cache -> cache."""
    out: dict[str, Any] = {}
    if "attn_backend" in values:
        out["attention"] = values["attn_backend"]
        if values["attn_backend"] == "flash_mla":
            out["cache"] = "paged"
    if "use_cache" in values and not values["use_cache"]:
        out["cache"] = "none"
    return out


def split_legacy(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model fields, runtime fields) of a dict that may hold the pre-split names."""
    return {k: v for k, v in values.items() if k not in LEGACY_FIELDS}, legacy_runtime(values)
