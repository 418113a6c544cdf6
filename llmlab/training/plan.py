"""plan_run(): every decision about a run made before any work, as one frozen RunPlan.

The CLI, `llmlab compare` and Python callers all train through it, so a resume means the same
thing everywhere: the run's saved settings are the base, settings given now win (model and
tokenizer settings may not change), its schedule horizon and global batch are kept. Nothing here
writes or trains; the caller's TrainArgs is never changed.

Which settings were "given": the CLI passes the flags and TOML keys it read; a Python caller's
TrainArgs has every field, so there a field left at its default counts as not given (on resume it
takes the run's saved value: `train(TrainArgs(out=R, resume=True))` continues R as it was started).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from llmlab.errors import LlmlabError
from llmlab.fsutil import check_out_path
from llmlab.training.args import MODEL_FLAGS, TrainArgs
from llmlab.training.schedule import LRSchedule, schedule_for

# Settings that make the model and its tokens: a resumed run keeps its own, so differing ones are errors.
FIXED_ON_RESUME = MODEL_FLAGS + ("preset", "tokenizer", "vocab_size", "lora_rank", "lora_alpha", "lora_targets")
# What a run started --init-from SRC takes from SRC: flags given that contradict it are errors
# (dropout is the new run's own: it shapes no weight).
FROM_SOURCE = tuple(k for k in MODEL_FLAGS if k != "dropout") + ("preset", "tokenizer", "vocab_size")
BUILTIN_DATA = (None, "shakespeare")  # --data values that are not paths


@dataclass(frozen=True)
class RunPlan:
    args: TrainArgs  # the merged settings, as saved with the run (resume False)
    out: Path
    resume: bool  # False also when --resume found no checkpoint yet (then `notes` says so)
    start_step: int
    world: int  # ranks the run trains on (torchrun's WORLD_SIZE)
    schedule: LRSchedule
    saved: dict = dataclasses.field(default_factory=dict)  # last/config.json of the run resumed
    notes: tuple[str, ...] = ()  # lines to tell the user (rank 0, unless quiet)
    source: Optional[Any] = None  # --init-from: the checked InitSource (llmlab.training.source) of a new run
    lora: Optional[Any] = None  # --lora-rank: the LoraSettings (llmlab.lora) the model is adapted with

    @property
    def global_batch(self) -> int:
        return self.args.batch_size * self.world


def given_fields(args: TrainArgs) -> set[str]:
    """Fields of a Python caller's TrainArgs that differ from the defaults."""
    return {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != f.default}


def _saved_checkpoint(out: Path) -> Optional[Path]:
    for last in (out / "last", out / ".last.old"):  # .old: a swap a kill interrupted (train repairs it)
        if (last / "config.json").is_file():
            return last
    return None


def _default_out(preset: str, resume: bool, world: int) -> str:
    if resume:
        raise LlmlabError("--resume needs --out RUN_DIR: the run to continue")
    if world > 1:  # each rank would pick its own timestamp
        raise LlmlabError("--parallel under torchrun needs --out RUN_DIR (one directory for all ranks)")
    return time.strftime(f"runs/{preset}-%Y%m%d-%H%M%S")


def _data_path(data: Optional[str]) -> Optional[str]:
    """--data as saved with the run: a path made absolute (eval and resume then work from any folder)."""
    if data in BUILTIN_DATA:
        return data
    if not str(data).strip():
        raise LlmlabError("--data is empty; pass a text file, a directory of text files or 'shakespeare' "
                          "(or leave it out for the built-in corpus)")
    return str(Path(data).expanduser().absolute())


def plan_run(args: TrainArgs, given: Optional[Iterable[str]] = None, world: Optional[int] = None) -> RunPlan:
    """The plan of `args` (see the module docstring). `given`: the settings the user gave (None:
    those that differ from TrainArgs' defaults); `world`: the number of ranks (None: torchrun's)."""
    from llmlab import checkpoint as ckpt
    from llmlab.training import parallel

    given = given_fields(args) if given is None else set(given)
    world = parallel.launched_ranks() if world is None else world
    args.validate()
    if args.init_from is not None and args.resume:
        raise LlmlabError("--init-from starts a new run from existing weights and --resume continues the run in "
                          "--out: use one or the other")
    name = "finetune" if args.init_from is not None else args.preset
    out_text = args.out if args.out is not None else _default_out(name, args.resume, world)
    # a file, a path under a file or an unwritable place: one line before any work (an existing run
    # directory is fine here; below decides about new runs in it)
    out = check_out_path(out_text, "--out", directory=True, allow_existing=True)
    values: dict[str, Any] = dataclasses.asdict(args) | {"out": out_text}
    notes: list[str] = []
    resume, saved, step = args.resume, {}, 0
    last = _saved_checkpoint(out)
    if resume and last is None:
        # The run stopped (a crash, a kill, a failed write) before its first checkpoint was whole,
        # and a run that fails at once removes its directory: there is nothing to continue, so it
        # starts over from the settings given now; the note says so, in case --out was mistyped.
        resume = False
        notes.append(f"--resume: {out} has no checkpoint (none was written yet): starting it from step 0")
    if not resume and (last is not None or (out / "best").exists()):
        raise LlmlabError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    source, config = None, None
    if resume:
        saved = ckpt.read_meta(last)
        values = _merge_saved(values, saved, given, world)
        step = ckpt.saved_step(saved, last)
        config = ckpt.model_config(saved, last)
        if "lora_rank" in given and ckpt.lora_settings(saved, last) is None:
            raise LlmlabError(f"{out} was trained without LoRA; a resumed run keeps its model: drop --lora-rank")
    elif args.init_from is not None:
        from llmlab.training.source import resolve_source

        source = resolve_source(args.init_from)
        _check_outside(out, source.path)
        values = _from_source(values, source, given)
        config = source.config
    adapters = _lora(values, given, config)
    values["data"] = _data_path(values["data"])
    if values["lr_decay_iters"] is None:  # saved with the run: extending it later keeps this schedule
        values["lr_decay_iters"] = values["max_iters"]
    merged = TrainArgs(**(values | {"resume": False}))
    merged.validate()
    if resume and step >= merged.max_iters:
        raise LlmlabError(f"{out} finished at step {step} (--max-iters {merged.max_iters}); nothing to do: pass a "
                          f"larger --max-iters to train on")
    return RunPlan(merged, out, resume, step, world, schedule_for(merged), saved, tuple(notes), source, adapters)


def _check_outside(out: Path, src: Path) -> None:
    o, s = out.resolve(), src.resolve()
    if o == s or s in o.parents:
        raise LlmlabError(f"--out {out} is inside --init-from {src}; llmlab never writes into the source: choose "
                          "another --out")


def _from_source(values: dict, source, given: set[str]) -> dict:
    """The settings of a run started from `source`: its model shape, tokenizer and preset (flags
    given that contradict them are errors), the rest the new run's own."""
    cfg, tok = source.config, source.tokenizer
    have = {k: getattr(cfg, k) for k in MODEL_FLAGS} | {  # as the flags mean them: effective values
        "n_kv_head": cfg.kv_heads, "kv_lora_rank": cfg.latent_dim if cfg.attention == "mla" else None,
        "preset": source.preset, "tokenizer": tok.kind, "vocab_size": tok.vocab_size}
    for key in FROM_SOURCE:
        if key in given and values[key] is not None and values[key] != have[key]:
            theirs = "has no preset" if have[key] is None else f"has {key} {have[key]}"
            raise LlmlabError(f"--{key.replace('_', '-')} {values[key]} contradicts --init-from {source.path}, which "
                              f"{theirs}: the model and tokenizer come from the source; drop the flag")
    dropout = values["dropout"] if "dropout" in given and values["dropout"] is not None else cfg.dropout
    return values | {k: getattr(cfg, k) for k in MODEL_FLAGS} | {
        "dropout": dropout, "preset": source.preset or "custom", "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size if tok.kind == "bpe" else values["vocab_size"], "init_from": str(source.path)}


def _lora(values: dict, given: set[str], config):
    """The LoraSettings of --lora-rank (None without it), checked against the model; a LoRA run's
    base stays frozen, an MoE router's balancing bias included."""
    asked = [k for k in ("lora_alpha", "lora_targets") if k in given]
    if values["lora_rank"] is None:
        if asked:
            raise LlmlabError(f"--{asked[0].replace('_', '-')} applies to LoRA: add --lora-rank R")
        return None
    if config is None:
        raise LlmlabError("--lora-rank adapts existing weights: add --init-from SRC (a run, a checkpoint or a "
                          "Hugging Face model folder)")
    import torch

    from llmlab import lora
    from llmlab.model import Transformer

    with torch.device("meta"):  # names and shapes only, nothing allocated
        model = Transformer(config)
    settings = lora.settings_for(model, values["lora_rank"], values["lora_alpha"], values["lora_targets"])
    values["lora_alpha"] = settings.alpha
    if config.mlp == "moe":
        if "moe_bias_rate" in given and values["moe_bias_rate"] > 0:
            raise LlmlabError("LoRA keeps the base model frozen, the MoE routers' balancing bias included: "
                              "drop --moe-bias-rate (or fine-tune fully, without --lora-rank)")
        values["moe_bias_rate"] = 0.0
    return settings


def _merge_saved(values: dict, saved: dict, given: set[str], world: int) -> dict:
    """The run's saved settings under the ones given now; model/tokenizer settings may not differ;
    the global batch is kept when the number of ranks changes (unless --batch-size is given)."""
    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    train = {k: v for k, v in saved.get("train", {}).items() if k in fields}
    for key in FIXED_ON_RESUME:
        if key in given and key in train and values[key] != train[key]:
            raise LlmlabError(f"--{key.replace('_', '-')} {values[key]} differs from the run's {train[key]}: "
                              "a resumed run keeps its model and tokenizer; drop the flag")
    merged = values | {k: v for k, v in train.items() if k not in given and k not in ("out", "resume")}
    saved_world = saved.get("state", {}).get("world")
    if isinstance(saved_world, int) and saved_world != world and "batch_size" not in given:
        rows = train.get("batch_size", merged["batch_size"]) * saved_world  # the run's global batch
        if rows % world:
            raise LlmlabError(f"the run trained on {saved_world} rank(s) with a global batch of {rows} rows, "
                              f"which {world} ranks cannot split evenly; resume on a divisor of {rows} ranks "
                              "or pass --batch-size (per rank) to change the global batch")
        merged["batch_size"] = rows // world
    return merged


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
