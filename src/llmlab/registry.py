"""The one list of swappable parts: each module registers itself under its kind and name, the
config validates names against it, the model builds from it. Adding a rung's part is one
`@register(...)` next to its class; nothing else lists the names."""
from __future__ import annotations

from typing import Any, Callable

# kind -> {name: builder}: the ModelConfig fields that pick parts (attention, position, norm, mlp)
# and the Runtime's attention implementations ("attention_impl"). Filled when llmlab.model is
# imported (`import llmlab` does that first), so this module imports nothing of llmlab and imports
# flow one way.
REGISTRY: dict[str, dict[str, Any]] = {"attention": {}, "attention_impl": {}, "position": {}, "norm": {}, "mlp": {}}


def register(kind: str, *names: str) -> Callable[[Any], Any]:
    """Decorator: file `obj` under each of `names` for the config field `kind`."""
    def deco(obj: Any) -> Any:
        for name in names:
            REGISTRY[kind][name] = obj
        return obj
    return deco


def names(kind: str) -> tuple[str, ...]:
    return tuple(REGISTRY[kind])


def lookup(kind: str, name: str) -> Any:
    return REGISTRY[kind][name]
