"""LoRA adapters on llmlab's own linear layers, through Hugging Face `peft` (Hu et al. 2021).

A targeted nn.Linear y = W x + b becomes y = W x + b + (alpha / r) · B A x, with A (r, in) and
B (out, r); B starts at zero, so the adapted model starts as the base model exactly. peft does the
work (`inject_adapter_in_model` wraps each targeted layer in place: its weight moves to
`NAME.base_layer.weight`, the adapters are `NAME.lora_A.default.weight` and `NAME.lora_B.default.weight`)
and marks only the adapters trainable. A layer costs r·(in + out) trainable parameters.

Which layers: `attention` (every linear inside each block's attention), `all-linear` (every linear
inside the blocks: attention, dense MLPs, MoE shared experts; never the head or the embedding, as
peft's own "all-linear"), or comma-separated names matched against the end of the layers' names
(`qkv,mlp.fc`). MoE routed experts are stacked (E, ., .) parameters, not nn.Linear, and are not adapted.

The model carries its `LoraSettings` as `model.lora` (like `model.runtime`), so checkpoints save
them in config.json (`"lora"`) beside base + adapter weights in model.safetensors, and loading
rebuilds the same layers. `merge()` folds the adapters into the base weights (peft's merge) and
gives back a plain Transformer. `peft` is imported only when adapters are made or merged.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn as nn

from llmlab.errors import LlmlabError, one_line

TARGET_KINDS = ("attention", "all-linear")
ADAPTER = "default"  # peft's adapter name; part of the saved tensor names


def _peft():
    try:
        import peft
    except ImportError:
        raise LlmlabError("LoRA needs the `peft` package: pip install -e '.[finetune]'") from None
    return peft


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    targets: str  # as asked: attention | all-linear | comma-separated names
    modules: tuple[str, ...]  # the linear layers that resolved to (full module names)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"modules": list(self.modules)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "LoraSettings":
        """The `lora` section of a config.json, each value of its type, or one line."""
        ok = (isinstance(d, dict) and isinstance(d.get("rank"), int) and not isinstance(d.get("rank"), bool)
              and d["rank"] >= 1 and isinstance(d.get("alpha"), (int, float)) and not isinstance(d.get("alpha"), bool)
              and math.isfinite(d["alpha"]) and d["alpha"] > 0 and isinstance(d.get("targets"), str)
              and isinstance(d.get("modules"), list) and d["modules"]
              and all(isinstance(m, str) and m for m in d["modules"]))
        if not ok:
            raise LlmlabError(f"{where} has a corrupt 'lora' section (rank, alpha, targets, modules); restore it "
                              "or retrain")
        return cls(d["rank"], float(d["alpha"]), d["targets"], tuple(d["modules"]))


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the blocks of a plain (not yet adapted) model, by full name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")}


def resolve_modules(model: nn.Module, targets: str) -> tuple[str, ...]:
    """The full names of the layers `targets` names (see the module docstring), in model order."""
    layers = block_linears(model)
    spec = str(targets).strip()
    if spec == "attention":
        return tuple(n for n in layers if ".attn." in n)
    if spec == "all-linear":
        return tuple(layers)
    # the names of the layers within a block: blocks.3.mlp.shared.fc -> mlp.shared.fc
    suffixes = list(dict.fromkeys(n.split(".", 2)[2] for n in layers))
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    if not wanted:
        raise LlmlabError(f"--lora-targets is empty; choose {' or '.join(TARGET_KINDS)} or names among: "
                          f"{', '.join(suffixes)}")
    chosen = []
    for w in wanted:
        hits = [n for n in layers if n == w or n.endswith("." + w)]
        if not hits:
            raise LlmlabError(f"--lora-targets {w!r} names no linear layer inside this model's blocks; choose "
                              f"{' or '.join(TARGET_KINDS)} or names among: {', '.join(suffixes)}")
        chosen += hits
    return tuple(n for n in layers if n in set(chosen))


def settings_for(model: nn.Module, rank: int, alpha: Optional[float], targets: str) -> LoraSettings:
    """LoraSettings for a plain model (a meta-device build will do), checked: at least one layer,
    and a rank no larger than any targeted layer's smaller side (past it B·A has no more rank to
    give, and the adapter has more parameters than the layer)."""
    modules = resolve_modules(model, targets)
    if not modules:
        raise LlmlabError(f"--lora-targets {targets} selects no layer of this model")
    layers = block_linears(model)
    for name in modules:
        width = min(layers[name].in_features, layers[name].out_features)
        if rank > width:
            raise LlmlabError(f"--lora-rank {rank} is past the width of {name} ({layers[name].in_features} in, "
                              f"{layers[name].out_features} out): the rank must be at most {width}")
    return LoraSettings(rank, float(2 * rank if alpha is None else alpha), str(targets), modules)


def inject(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Adapters on `settings.modules` of `model` (in place; A drawn from torch's RNG, B zero);
    everything else frozen. Returns the model, which carries `settings` as `model.lora`."""
    peft = _peft()
    layers = block_linears(model)
    missing = [m for m in settings.modules if m not in layers]
    if missing:
        raise LlmlabError(f"LoRA layer {missing[0]} is not a linear layer of this model; the checkpoint's 'lora' "
                          "section does not belong to its model config")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.modules),
                             lora_dropout=0.0, bias="none")
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.lora = settings
    return model


def adapted(model: nn.Module) -> Optional[LoraSettings]:
    return getattr(model, "lora", None)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (peft's merge: W += (alpha/r)·B A) and put the plain
    nn.Linear back: the result is an ordinary Transformer, every parameter trainable again."""
    if adapted(model) is None:
        return model
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            try:
                module.merge(safe_merge=True)  # refuses adapters that would make the weight NaN/inf
            except ValueError as e:
                raise LlmlabError(f"cannot merge the LoRA adapter of {name} ({one_line(e)})") from None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    model.lora = None
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
