"""DIR/results.json: every number of a comparison, raw (each seed's losses, each round's speeds),
and the readers the report, the claims and docs/make_ladder.py compute from. Nothing downstream
measures anything: change a number in results.json and the report and its claims follow.

    {"format", "date", "machine", "wall_s", "settings", "timing_order": [[round, name], ...],
     "entries": [{"name", "preset", "rung", "parent", "changes", "status", "config", "params",
                  "cache_kind", "decode_path", "cache_bytes_per_token", "seeds", "val_loss",
                  "val_loss_whole", "val_curves", "greedy_tokens", "timing": {...}, ...}, ...]}
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

from llmlab.compare.runtime import runtime_fields
from llmlab.compare.stats import Range, Spread, speed_range, spread

FORMAT = "llmlab-compare-2"
# ModelConfig fields that say how attention shares or compresses keys and values: one "change"
ATTENTION_FIELDS = ("attention", "n_kv_head", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim")
RUNTIME_FIELDS = runtime_fields()  # how the same weights run, not what they compute


def machine() -> str:
    """One line: CPU model and cores (or the GPU), OS, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


# ---- configs ----------------------------------------------------------------------------------------
def normalized(config: dict[str, Any]) -> dict[str, Any]:
    """The config with derived sizes filled in (n_kv_head None is n_head; MLA's None sizes are
    their defaults), so equal models compare equal."""
    import dataclasses

    import llmlab.model  # noqa: F401 - registers the kinds ModelConfig validates against
    from llmlab.config import MLA_FIELDS, ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}  # a recorded config may also hold runtime fields
    c = ModelConfig.from_dict({k: v for k, v in config.items() if k in known})
    out = dict(config) | {"n_kv_head": c.kv_heads}
    if c.attention == "mla":
        out |= {"n_kv_head": None, "kv_lora_rank": c.latent_dim, "qk_nope_head_dim": c.nope_head_dim,
                "qk_rope_head_dim": c.rope_head_dim, "v_head_dim": c.value_head_dim}
    else:
        out |= {f: None for f in MLA_FIELDS}
    return out


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list]:
    """{field: [a's value, b's value]} where the normalized configs differ."""
    na, nb = normalized(a), normalized(b)
    return {k: [na.get(k), nb.get(k)] for k in sorted(set(na) | set(nb)) if na.get(k) != nb.get(k)}


def change_groups(diff: dict[str, list]) -> list[str]:
    """The changes a diff makes, counting every attention field as one change ("attention") and
    the MLP kind with its mixture-of-experts sizes as another ("mlp")."""
    from llmlab.config import MOE_FIELDS

    groups = []
    for k in diff:
        g = "attention" if k in ATTENTION_FIELDS else ("mlp" if k in MOE_FIELDS else k)
        if g not in groups:
            groups.append(g)
    return groups


def describe(diff: dict[str, list]) -> str:
    """'norm layernorm → rmsnorm, attention mha → mla (kv_lora_rank 64)' ('same config' for none)."""
    if not diff:
        return "same config"
    parts = []
    if "attention" in diff:
        sizes = [f"{k} {diff[k][1]}" for k in ATTENTION_FIELDS[1:] if k in diff and diff[k][1] is not None]
        parts.append(f"attention {diff['attention'][0]} → {diff['attention'][1]}"
                     + (f" ({', '.join(sizes)})" if sizes else ""))
    for k, (old, new) in diff.items():
        if k == "attention" or ("attention" in diff and k in ATTENTION_FIELDS):
            continue
        parts.append(f"{k.replace('runtime_', 'runtime ')} {old} → {new}")
    return ", ".join(parts)


def attention_label(config: dict[str, Any]) -> str:
    """MHA, GQA-G (G key/value heads), MQA or MLA d_c=.. d_r=.. of a config."""
    n = normalized(config)
    if n["attention"] == "mla":
        return f"MLA d_c={n['kv_lora_rank']} d_r={n['qk_rope_head_dim']}"
    kv, h = n["n_kv_head"], n["n_head"]
    return "MHA" if kv == h else ("MQA" if kv == 1 else f"GQA-{kv}")


def base_key(config: dict[str, Any]) -> tuple:
    """What a config is apart from its attention and how it runs: entries with equal keys differ
    only in attention (a controlled comparison of attention kinds)."""
    n = normalized(config)
    return tuple(sorted((k, str(v)) for k, v in n.items() if k not in ATTENTION_FIELDS + RUNTIME_FIELDS))


def model_key(config: dict[str, Any]) -> str:
    """The model a config describes, whatever way it runs (flash_mla is rope_mla's model) and
    however its sizes were given (kv_lora_rank=None is its default)."""
    return json.dumps({k: v for k, v in normalized(config).items() if k not in RUNTIME_FIELDS}, sort_keys=True)


# ---- readers --------------------------------------------------------------------------------------------
def ok(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in doc["entries"] if e["status"] == "ok"]


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in ok(doc)}


# The loss every claim and difference uses: the whole validation split, the same windows for every
# entry and seed, so less noisy than the last eval's sampled batches (which the tables also show).
QUALITY = "val_loss_whole"


def val(e: dict[str, Any], key: str = QUALITY) -> Optional[Spread]:
    return spread(e.get(key) or [])


def train_speed(e: dict[str, Any]) -> Optional[Range]:
    return speed_range([r.get("train_tokens_per_s") for r in e.get("timing", {}).get("rounds", [])])


def decode_speed(e: dict[str, Any], variant: str, context: int) -> Optional[Range]:
    rounds = e.get("timing", {}).get("rounds", [])
    return speed_range([r["decode"].get(variant, {}).get(str(context)) for r in rounds if "decode" in r])


def best_decode_variant(e: dict[str, Any]) -> str:
    """The fastest way the rung's own path runs: compiled where it applies, else its own."""
    variants = (e.get("timing", {}).get("ready") or {}).get("variants", [])
    return "compiled" if "compiled" in variants else "own"


# ---- assembling ---------------------------------------------------------------------------------------
def assemble(settings, entries, runs: dict[tuple[str, int], dict[str, Any]], timing: dict[str, Any],
             parents: dict[str, tuple[Optional[str], str, dict]], wall_s: float) -> dict[str, Any]:
    """results.json's document from the runs' compare.json results and the timing rounds.
    parents: name -> (parent entry name in this comparison or None, parent's label, its config)."""
    from dataclasses import asdict

    doc_entries = []
    for e in entries:
        rs = [runs[(e.name, s)] for s in settings.seed_list()]
        good = [r for r in rs if r["status"] == "ok"]
        item: dict[str, Any] = {"name": e.name, "preset": e.preset, "overrides": e.overrides, "rung": e.is_rung,
                                "runs": [{k: r.get(k) for k in ("seed", "status", "error", "wall_s", "measured_at",
                                                                "reused", "train_tokens_per_s_logged")} for r in rs]}
        if len(good) < len(rs):
            failed = next(r for r in rs if r["status"] != "ok")
            item |= {"status": "failed", "error": f"seed {failed['seed']}: {failed.get('error', '')}"}
            doc_entries.append(item)
            continue
        first = good[0]
        parent, parent_label, parent_config = parents[e.name]
        diff = config_diff(parent_config, first["config"]) if parent_config else {}
        item |= {"status": "ok", "parent": parent, "parent_label": parent_label,
                 "changes": diff, "change_groups": change_groups(diff), "config": first["config"],
                 "attention_label": attention_label(first["config"]), "params": first["params"],
                 "cache_kind": first["cache_kind"], "decode_path": first["decode_path"],
                 "cache_bytes_per_token": first["cache_bytes_per_token"], "cache_formula": first["cache_formula"],
                 "seeds": [r["seed"] for r in good], "val_loss": [r["val_loss"] for r in good],
                 "val_loss_whole": [r["val_loss_whole"] for r in good], "val_tokens": first["val_tokens"],
                 "val_curves": [r["val_curve"] for r in good],
                 "peak_mem_mib": max((r["peak_mem_mib"] for r in good if r["peak_mem_mib"] is not None), default=None),
                 "greedy_tokens": first["greedy_tokens"], "device": first["device"],
                 "timing": timing["entries"].get(e.name, {"error": "not timed"})}
        doc_entries.append(item)
    return {"format": FORMAT, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "wall_s": round(wall_s, 1),
            "settings": {k: v for k, v in asdict(settings).items() if k not in ("fresh", "quiet")},
            "timing_order": timing.get("order", []), "entries": doc_entries}
