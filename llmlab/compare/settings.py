"""CompareSettings: every setting of `llmlab compare`, declared once (the CLI's flags are derived
from these fields by llmlab.settings, as `llmlab train`'s are from TrainArgs), and the entries a
comparison trains: the presets named by --presets, each with its --set overrides, once per seed.

An entry is a preset (`rope`), or a named configuration of one (`--presets rope_mha=rope --set
rope_mha:n_kv_head=8`), so one change can be isolated from a rung with everything else equal.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llmlab.errors import LlmlabError
from llmlab.settings import check_choices, setting
from llmlab.training.args import MODEL_FLAGS, TOKENIZERS, TrainArgs
from llmlab.validate import check_fields

RESULT = "compare.json"  # one run's measurements, in its run directory
SPEC = "compare_spec.json"  # what the run was asked to do: written first, so it also marks the directory as ours
# --set keys: the model flags of `llmlab train` (sizes and kinds) and a few training settings
OVERRIDABLE = MODEL_FLAGS + ("lr", "batch_size")
ALIASES = {"tie": "tie_embeddings"}
# Settings every run of a comparison shares; they and the entry's overrides make a run's key.
TRAIN_KEYS = ("data", "tokenizer", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
              "lr", "eval_interval", "eval_iters", "device")
TIMING_KEYS = ("contexts", "decode_steps", "rounds", "compile", "threads", "batch_size", "block_size", "device",
               "seed")


_ = setting  # a field with its help text next to it

@dataclass
class Entry:
    name: str  # the row's name: the preset's, or NAME of NAME=PRESET
    preset: str
    overrides: dict[str, Any]  # --set NAME:KEY=VALUE, keys as TrainArgs fields

    @property
    def is_rung(self) -> bool:
        """A preset as the ladder defines it (not a configuration of one)."""
        return self.name == self.preset and not self.overrides


@dataclass
class CompareSettings:
    presets: list[str] = _(["all"], "rungs to compare, comma-separated, or all; NAME=PRESET adds a named "
                                    "configuration of a preset, set with --set NAME:KEY=VALUE", metavar="A,B,...")
    out: str = _("runs/compare", "comparison directory (made and marked by compare, or empty); run again to "
                                 "reuse its finished runs", metavar="DIR")
    fresh: bool = _(False, "retrain and re-time everything instead of reusing finished runs (deletes only "
                           "what compare made)")
    data: Optional[str] = _(None, "text file, directory of text files, or 'shakespeare'", none="built-in corpus",
                            metavar="PATH")
    tokenizer: str = _("byte", "tokenizer to build", choices=TOKENIZERS)
    n_layer: int = _(4, "transformer blocks, the same for every preset")
    n_head: int = _(8, "attention heads, the same for every preset (8: MLA's cache is below 1/3 of MHA's)")
    n_embd: int = _(128, "embedding width, the same for every preset")
    block_size: int = _(128, "training context in tokens")
    batch_size: int = _(8, "sequences per training step")
    max_iters: int = _(300, "training steps of every run")
    lr: float = _(2e-3, "peak learning rate (warmup and cosine as `llmlab train`)")
    eval_interval: int = _(50, "steps between evals")
    eval_iters: int = _(10, "batches per eval")
    seed: int = _(1337, "seed of the first run of each preset (weights, data order)")
    seeds: int = _(1, "runs per preset, with seeds SEED, SEED+1, ...: val loss as mean ± spread")
    set: list[str] = _([], "one preset's own setting: a size, a kind (norm, mlp, position, attention, tie) or "
                           "kv_lora_rank, lr, batch_size; e.g. gqa:n_kv_head=4 (repeatable)", repeat=True,
                       metavar="PRESET:KEY=VALUE")
    device: str = _("auto", "auto (cuda > mps > cpu), cpu, cuda, mps", metavar="NAME")
    contexts: list[int] = _([128, 512, 2048], "decode context lengths in tokens (learned positions are "
                                              "timed on a table this long)")
    decode_steps: int = _(16, "decode tokens timed after each context (a recomputing rung times 1)")
    rounds: int = _(5, "timing rounds, round-robin over the presets' processes; median with min-max")
    compile: bool = _(True, "also time the compiled decode step where it applies (10-30 s to compile per preset)")
    val_tokens: Optional[int] = _(None, "the whole-split val loss over at most this many tokens",
                                  none="all of them")
    threads: int = _(1, "torch threads per process (1: steady on a shared machine; 0: torch's default)")
    jobs: int = _(1, "runs trained at once, each in its own process (timing always runs alone)")
    quiet: bool = _(False, "no progress bar or per-run lines")

    def entries(self) -> list[Entry]:
        """The presets to compare, in --presets order, with their overrides."""
        from llmlab.presets import PRESETS

        names: list[tuple[str, str]] = []
        for item in self.presets:
            if item.strip() == "all":
                names += [(p, p) for p in PRESETS]
                continue
            name, eq, preset = (s.strip() for s in item.partition("="))
            names.append((name, preset if eq else name))
        overrides = parse_overrides(self.set)
        return [Entry(name, preset, overrides.get(name, {})) for name, preset in names]

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def validate(self) -> None:
        from llmlab.presets import PRESETS, preset_config

        check_choices(self)
        entries = self.entries()
        if not entries:
            raise LlmlabError("--presets names no preset")
        for e in entries:
            if not e.name.replace("_", "").replace("-", "").isalnum():
                raise LlmlabError(f"--presets {e.name!r}: a name is letters, digits, '_' and '-' (it names a folder)")
            if e.preset not in PRESETS:
                raise LlmlabError(f"unknown preset {e.preset!r}; choose from: {', '.join(PRESETS)} or all")
        names = [e.name for e in entries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise LlmlabError(f"--presets names {', '.join(twice)} twice; give a configuration its own NAME=PRESET")
        for name in parse_overrides(self.set):
            if name not in names:
                raise LlmlabError(f"--set {name}:...: {name} is not among --presets")
        if min(self.contexts, default=0) < 1:
            raise LlmlabError("--contexts must be comma-separated positive integers")
        for flag, v in (("--decode-steps", self.decode_steps), ("--rounds", self.rounds), ("--seeds", self.seeds),
                        ("--max-iters", self.max_iters), ("--eval-interval", self.eval_interval),
                        ("--eval-iters", self.eval_iters), ("--batch-size", self.batch_size), ("--jobs", self.jobs),
                        ("--n-layer", self.n_layer), ("--n-head", self.n_head), ("--n-embd", self.n_embd),
                        ("--block-size", self.block_size)):
            if v < 1:
                raise LlmlabError(f"{flag} must be >= 1, got {v}")
        from llmlab.bench import MAX_LEN, MAX_REPEATS

        if max(self.contexts) + self.decode_steps > MAX_LEN:
            raise LlmlabError(f"the longest context + --decode-steps must stay within {MAX_LEN:,} tokens "
                              f"(got {max(self.contexts) + self.decode_steps:,})")
        if self.rounds > MAX_REPEATS or self.seeds > MAX_REPEATS:
            raise LlmlabError(f"--rounds and --seeds must be at most {MAX_REPEATS}")
        if self.threads < 0:
            raise LlmlabError(f"--threads must be >= 0 (0: torch's default), got {self.threads}")
        if not 0 <= self.seed < 2**63 - self.seeds:
            raise LlmlabError(f"--seed must be in [0, 2^63 - seeds), got {self.seed}")
        if self.val_tokens is not None and self.val_tokens < self.block_size:
            raise LlmlabError(f"--val-tokens {self.val_tokens} is shorter than --block-size {self.block_size}")
        for e in entries:  # every model builds (sizes fit the kinds) before anything runs: one line if not
            check_fields(TrainArgs, e.overrides, f"--set {e.name}:...")  # types: `lr=abc` is refused here
            try:
                preset_config(e.preset, **self.model_sizes(e))
            except (LlmlabError, TypeError, ValueError) as err:
                raise LlmlabError(f"{e.name}: {' '.join(str(err).split())}") from None

    def model_sizes(self, e: Entry) -> dict[str, Any]:
        """The ModelConfig values this comparison gives entry `e` (its preset adds the kinds)."""
        sizes = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
        return sizes | {k: v for k, v in e.overrides.items() if k in MODEL_FLAGS}

    def run_spec(self, e: Entry, seed: int) -> dict[str, Any]:
        """What one (entry, seed) run's process is given (llmlab.compare.worker)."""
        train = {k: getattr(self, k) for k in TRAIN_KEYS} | {"preset": e.preset, "seed": seed} | e.overrides
        run_dir = Path(self.out) / "runs" / e.name / f"seed{seed}"
        key = {"train": train, "val_tokens": self.val_tokens, "threads": self.threads}
        return {"entry": e.name, "preset": e.preset, "seed": seed, "run_dir": str(run_dir), "train": train,
                "settings": key, "measure": {"val_tokens": self.val_tokens, "threads": self.threads}}

    def timing_key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TIMING_KEYS}


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """--set NAME:KEY=VALUE (repeatable), e.g. gqa:n_kv_head=4, rope:norm=rmsnorm, llama:tie=true."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, _, assign = item.partition(":")
        k, eq, v = assign.partition("=")
        k = k.strip().replace("-", "_")
        k = ALIASES.get(k, k)
        if not name.strip() or not eq or not k:
            raise LlmlabError(f"--set {item!r}: expected PRESET:KEY=VALUE, e.g. gqa:n_kv_head=4")
        if k not in OVERRIDABLE:
            raise LlmlabError(f"--set {item!r}: {k} cannot be set per preset; choose from "
                              f"{', '.join(OVERRIDABLE)} (tie = tie_embeddings)")
        try:
            value: Any = json.loads(v)  # numbers and true/false; anything else stays a string
        except ValueError:
            value = v.strip()
        out.setdefault(name.strip(), {})[k] = value
    return out
