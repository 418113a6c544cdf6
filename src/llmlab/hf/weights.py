"""Weights between llmlab and Hugging Face: one table of (our name, HF name(s), transposed?) per
architecture (`rows`), applied both ways by `remap`. See llmlab.hf for the layouts."""
from __future__ import annotations

import torch

from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.hf.deepseek import ARCHS as DEEPSEEK
from llmlab.hf.deepseek import rows as deepseek_rows

Row = tuple[str, tuple[str, ...], bool]


def weight_rows(arch: str, config: ModelConfig) -> list[Row]:
    """(our key, HF keys, transposed) for every tensor of one architecture."""
    n_layer = config.n_layer
    if arch in DEEPSEEK:
        return deepseek_rows(config)
    if arch == "gpt2":
        rows: list[Row] = [("tok_emb.weight", ("transformer.wte.weight",), False),
                           ("pos.weight", ("transformer.wpe.weight",), False)]
        parts = [("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
                 ("norm2", "ln_2", False), ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]
        for i in range(n_layer):
            for ours, theirs, conv1d in parts:
                b, h = f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}"
                rows += [(b + ".weight", (h + ".weight",), conv1d), (b + ".bias", (h + ".bias",), False)]
        return rows + [("norm_f.weight", ("transformer.ln_f.weight",), False),
                       ("norm_f.bias", ("transformer.ln_f.bias",), False),
                       ("lm_head.weight", ("lm_head.weight",), False)]
    rows = [("tok_emb.weight", ("model.embed_tokens.weight",), False)]
    for i in range(n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        att, mlp = h + "self_attn.", h + "mlp."
        for s in ("weight", "bias"):
            rows += [(b + f"attn.qkv.{s}", tuple(att + f"{p}_proj.{s}" for p in "qkv"), False),
                     (b + f"attn.proj.{s}", (att + f"o_proj.{s}",), False),
                     (b + f"mlp.fc.{s}", (mlp + f"gate_proj.{s}", mlp + f"up_proj.{s}"), False),
                     (b + f"mlp.proj.{s}", (mlp + f"down_proj.{s}",), False)]
        rows += [(b + "norm1.weight", (h + "input_layernorm.weight",), False),
                 (b + "norm2.weight", (h + "post_attention_layernorm.weight",), False)]
    return rows + [("norm_f.weight", ("model.norm.weight",), False), ("lm_head.weight", ("lm_head.weight",), False)]


def remap(src: dict[str, torch.Tensor], rows: list[Row], target: dict[str, torch.Size],
           to_hf: bool) -> dict[str, torch.Tensor]:
    """Rename `src` (ours if to_hf, else HF's) into the keys/shapes of `target`."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, theirs, transposed in rows:
        src_keys, dst_keys = ((ours,), theirs) if to_hf else (theirs, (ours,))
        parts = [src.get(k) for k in src_keys]
        used.update(k for k in src_keys if k in src)
        dst = [k for k in dst_keys if k in target]
        if not dst:  # no such tensor on the target side: fine only if it carries nothing
            if any(p is not None and p.any() for p in parts):
                raise LlmlabError(f"weight {src_keys[0]} is non-zero but the target model has no place for it")
            continue
        if len(dst) != len(dst_keys):
            raise LlmlabError(f"target model has only some of {', '.join(dst_keys)}")
        if all(p is None for p in parts) and ours.endswith(".bias"):  # absent bias = zero bias
            for k in dst:
                out[k] = torch.zeros(target[k])
            continue
        if any(p is None for p in parts):
            raise LlmlabError(f"weight {src_keys[parts.index(None)]} is missing from the source model")
        w = torch.cat(parts, dim=0)
        if transposed:
            w = w.t()
        pieces = w.split([target[k][0] for k in dst], dim=0) if len(dst) > 1 else (w,)
        for k, p in zip(dst, pieces):
            if p.shape != target[k]:
                raise LlmlabError(f"weight {k} has shape {tuple(p.shape)} in the source but {tuple(target[k])} "
                                  "in the model built from the config (check the overrides)")
            out[k] = p.contiguous()
    left = sorted(k for k in set(src) - used if src[k].numel())
    if left:
        raise LlmlabError(f"{len(left)} weight(s) have no llmlab equivalent (e.g. {left[0]}); "
                          "the model uses a feature llmlab does not convert")
    for k in set(target) - set(out):
        if not target[k].numel():  # zero-size: nothing to carry
            out[k] = torch.zeros(target[k])
    missing = sorted(set(target) - set(out))
    if missing:
        raise LlmlabError(f"no source weight for {missing[0]} ({len(missing)} missing)")
    return out


