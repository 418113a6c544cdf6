"""The `llmlab` command line. Every user error ends as one `error: ...` line and exit status 2."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Optional

from llmlab.errors import LlmlabError
from llmlab.fsutil import one_line


def _train_parser(sub) -> None:
    from llmlab.settings import add_flags
    from llmlab.training.args import TrainArgs

    # SUPPRESS: only flags given appear in the namespace, so they override the TOML file's values,
    # which override TrainArgs' defaults (cmd_train merges them). Every flag comes from a field.
    p = sub.add_parser("train", help="train a model (no arguments: a small model on the built-in corpus)",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of training settings, keys as the flags (flags override it)")
    add_flags(p, TrainArgs)


def build_parser() -> argparse.ArgumentParser:
    from llmlab.command_args import EvalArgs, RuntimeArgs, SampleArgs
    from llmlab.settings import OneLineParser, add_flags

    parser = OneLineParser(prog="llmlab", description="Build, train, sample and compare small LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    # SUPPRESS: flags not given stay out of the namespace, so the dataclasses' defaults apply
    p = sub.add_parser("sample", help="generate text from a run, printed as it is produced",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("run_dir")
    add_flags(p, SampleArgs)
    add_flags(p, RuntimeArgs)
    p.add_argument("--no-cache", dest="cache", action="store_const", const="none",
                   help="recompute every step instead of caching (= --cache none)")
    p = sub.add_parser("eval", help="validation loss and perplexity of a run", argument_default=argparse.SUPPRESS)
    p.add_argument("run_dir")
    add_flags(p, EvalArgs)
    p = sub.add_parser("convert", help="to / from Hugging Face transformers (GPT-2, Llama, Qwen2, DeepSeek-V2); "
                                       "a sharded (--parallel) checkpoint to a single one")
    p.add_argument("run_dir", nargs="?", help="llmlab run to export (with --to-hf), or a sharded checkpoint "
                                              "(RUN/last of a --parallel run, with --out)")
    p.add_argument("--from-hf", help="Hugging Face model directory to import (with --out)")
    p.add_argument("--out", help="checkpoint directory to write (with --from-hf, or a sharded run_dir)")
    p.add_argument("--to-hf", help="directory to write the Hugging Face model to")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold a LoRA run's adapters into its weights (with --out: a plain checkpoint; "
                        "--to-hf always merges them)")
    sub.add_parser("presets", help="list the rungs of the ladder")
    p = sub.add_parser("plot", help="PNG of train and val loss of a run")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    p = sub.add_parser("bench", help="benchmarks (decode: prefill/decode tokens/s, cache bytes per token)")
    p.add_argument("what", choices=["decode"])
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark (see --help)")
    _compare_parser(sub)
    _serve_parser(sub)
    return parser


def _serve_parser(sub) -> None:
    from llmlab.command_args import RuntimeArgs
    from llmlab.serve.args import ServeArgs
    from llmlab.settings import add_flags

    p = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching, and a chat page at /",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("run_dir", metavar="RUN_OR_HF_DIR")
    add_flags(p, ServeArgs)
    add_flags(p, RuntimeArgs, skip=("cache",))  # the server always decodes from the paged cache


def _compare_parser(sub) -> None:
    from llmlab.compare.settings import CompareSettings
    from llmlab.settings import add_flags

    p = sub.add_parser("compare", help="train several presets alike and measure them side by side: "
                                       "report.md with its claims table, results.json and plots",
                       argument_default=argparse.SUPPRESS)
    add_flags(p, CompareSettings)  # every flag comes from a field (help text and default there)


# ---- commands ------------------------------------------------------------------------------
def _read_toml(path: str) -> dict[str, Any]:
    """Settings from a TOML file, type-checked against TrainArgs' fields: valid TOML with a wrong
    type (`lr = "abc"`) or a binary file is one clear error, not a traceback later in training."""
    from llmlab.training.args import TrainArgs
    from llmlab.validate import check_fields

    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise LlmlabError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LlmlabError(f"config file {path} is not valid TOML ({one_line(e)})") from None
    except OSError as e:  # a directory, no permission, ...
        raise LlmlabError(f"cannot read config file {path} ({one_line(e)})") from None
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    # the types the flags are parsed with (the same TrainArgs annotations); ranges and choices:
    # TrainArgs.validate, for flags and files alike
    check_fields(TrainArgs, values, f"config file {path}")
    return values


def _given_settings(ns: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave: the TOML file's, then the flags' (flags win)."""
    values = _read_toml(ns.config) if getattr(ns, "config", None) else {}
    values.update({k: v for k, v in vars(ns).items() if k not in ("command", "config")})
    return values


def train_args(ns: argparse.Namespace):
    """TrainArgs from the flags over the TOML file over the defaults (a resume's saved settings
    come in at plan_run, under what was given)."""
    from llmlab.training import TrainArgs

    return TrainArgs(**_given_settings(ns))


def cmd_train(ns: argparse.Namespace) -> int:
    from llmlab.training import TrainArgs, train

    given = _given_settings(ns)
    summary = train(TrainArgs(**given), given=given)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return 0
    val = "n/a" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
    print(f"trained to step {summary['step']}: val loss {val} "
          f"(best {summary['best_val_loss']:.4f}), {summary['params'] / 1e6:.2f}M params -> {summary['out']}")
    if "sample" in summary:
        print("--- sample ---")
        print(summary["sample"])
    return 0


def cmd_sample(ns: argparse.Namespace) -> int:
    from llmlab.command_args import RuntimeArgs, SampleArgs, split
    from llmlab.run_loader import load_run
    from llmlab.sample import stream_text

    a, rt = split(ns, SampleArgs, RuntimeArgs)
    if a.seed is not None and not 0 <= a.seed < 2**63:
        raise LlmlabError(f"--seed must be in [0, 2^63), got {a.seed}")
    model, tok = load_run(ns.run_dir, a.device, rt.changes())
    if a.prompt:
        tok.encode(a.prompt)  # a prompt the tokenizer cannot encode fails here, before any output
        sys.stdout.write(a.prompt)
    for piece in stream_text(model, tok, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from llmlab.checkpoint import read_meta, resolve_checkpoint
    from llmlab.command_args import EvalArgs, split
    from llmlab.data import encode_corpus, load_text, split_ids
    from llmlab.run_loader import load_run
    from llmlab.training.evaluate import consecutive_windows, mean_loss
    from llmlab.training.plan import BUILTIN_DATA

    (a,) = split(ns, EvalArgs)
    model, tok = load_run(ns.run_dir, a.device)
    meta = read_meta(resolve_checkpoint(ns.run_dir))
    data = a.data if a.data is not None else meta["train"].get("data")
    if a.data is None and data not in BUILTIN_DATA and not Path(data).exists():
        sha = meta["state"].get("data_sha256")
        raise LlmlabError(f"this run was trained on {data}{f' (sha256 {sha})' if sha else ''}, which is missing; "
                          "pass --data PATH to evaluate on a copy of it (or on other text)")
    name, text = load_text(data)
    _, val = split_ids(encode_corpus(text, tok))
    blk = model.config.block_size
    if min(len(val) - 1, a.max_tokens) < blk:
        raise LlmlabError(f"the validation split of {name} ({len(val)} tokens) is shorter than block_size {blk}")
    n, batches = consecutive_windows(val, blk, a.max_tokens, device=model.tok_emb.weight.device)
    loss = mean_loss(model, batches)
    print(json.dumps({"data": name, "tokens": n, "val_loss": round(loss, 4), "perplexity": round(math.exp(loss), 3)}))
    return 0


def cmd_convert(ns: argparse.Namespace) -> int:
    from llmlab.fsutil import check_out_path
    from llmlab.training.dcp import is_sharded, to_single

    if ns.to_hf and ns.out:
        raise LlmlabError("--to-hf DIR is where the export goes; --out does not apply to it: drop one of them")
    if ns.merge_lora and ns.run_dir and ns.out and not ns.from_hf:
        from llmlab.checkpoint import resolve_checkpoint, save_merged
        from llmlab.training.dcp import load_plain

        out = check_out_path(ns.out, "--out", directory=True)
        directory = resolve_checkpoint(ns.run_dir)  # a sharded (--parallel) last/ reads its dcp/ shards
        save_merged(directory, out, load_plain(directory) if is_sharded(directory) else None)
        print(f"converted {ns.run_dir} -> {ns.out} (LoRA adapters merged into the weights)")
        return 0
    if ns.run_dir and ns.out and not ns.to_hf and not ns.from_hf and is_sharded(Path(ns.run_dir)):
        # the single-process rules: never into a run, a checkpoint, a non-empty folder or over a file
        out = check_out_path(ns.out, "--out", directory=True)
        to_single(Path(ns.run_dir), out)
        print(f"converted {ns.run_dir} -> {ns.out} (a single safetensors checkpoint)")
        return 0
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise LlmlabError("llmlab convert needs Hugging Face transformers: pip install -e '.[hf]'") from None
    from llmlab import hf

    hf_logging.disable_progress_bar()  # one line of output per conversion, not per-tensor bars
    if ns.from_hf and ns.out and not ns.to_hf and not ns.run_dir:
        hf.convert_from_hf(ns.from_hf, ns.out)
        print(f"converted {ns.from_hf} -> {ns.out}")
    elif ns.run_dir and ns.to_hf and not ns.from_hf:
        hf.convert_to_hf(ns.run_dir, ns.to_hf)
        print(f"converted {ns.run_dir} -> {ns.to_hf} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    else:
        raise LlmlabError("use `llmlab convert --from-hf HF_DIR --out RUN_DIR`, `llmlab convert RUN_DIR --to-hf HF_DIR`, "
                          "`llmlab convert RUN --merge-lora --out DIR` (a LoRA run) "
                          "or `llmlab convert RUN/last --out DIR` (a sharded checkpoint)")
    return 0


def cmd_presets(ns: argparse.Namespace) -> int:
    from llmlab.presets import PRESETS

    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        print(f"{name:<{width}}  {preset.description}")
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    from llmlab.plot import plot_run

    path = plot_run(Path(ns.run_dir), None if ns.out is None else ns.out)
    print(f"wrote {path}")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from llmlab.bench import main as bench_main

    return bench_main(ns.bench_args)


def cmd_compare(ns: argparse.Namespace) -> int:
    from llmlab.compare import CompareSettings, run_compare

    doc, paths = run_compare(CompareSettings(**{k: v for k, v in vars(ns).items() if k != "command"}))
    failed = [e["name"] for e in doc["entries"] if e["status"] != "ok"]
    print(f"compared {len(doc['entries'])} preset(s), {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    for path in paths.values():
        print(f"wrote {path}")
    return 1 if failed else 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from llmlab.command_args import RuntimeArgs, split
    from llmlab.serve.args import ServeArgs
    from llmlab.serve.server import serve

    a, rt = split(ns, ServeArgs, RuntimeArgs)
    return serve(ns.run_dir, a, rt.changes())


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "convert": cmd_convert,
            "presets": cmd_presets, "plot": cmd_plot, "bench": cmd_bench,
            "compare": cmd_compare, "serve": cmd_serve}


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so Python's final flush at exit cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (pytest's capture): nothing to flush
        pass


def main(argv: Optional[list[str]] = None) -> int:
    try:
        if argv is not None and any("\0" in str(a) for a in argv):  # no OS path may hold one
            raise LlmlabError("an argument contains a NUL byte; paths and values cannot")
        ns = build_parser().parse_args(argv)
        if ns.command != "presets":
            from llmlab.threads import use_free_cores

            use_free_cores()  # one torch thread per core no other process holds (why: llmlab/threads.py)
        code = COMMANDS[ns.command](ns)
        sys.stdout.flush()  # a full disk or a closed pipe shows here, inside the handlers below
        return code
    except BrokenPipeError:  # `llmlab sample ... | head -c 1`: the reader has what it wanted
        _silence_stdout()
        return 0
    except OSError as e:  # an unexpected I/O failure (`> /dev/full`): one line, never a traceback
        _silence_stdout()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except LlmlabError as e:  # one line, whatever the message holds (a path with a newline, ...)
        from llmlab.training.loop import RankError

        rank = int(os.environ.get("RANK", "0"))  # under torchrun: an error all ranks share prints once
        if rank == 0 or not isinstance(e, RankError):
            msg = one_line(e, limit=2000)
            print(f"error: {msg}" if rank == 0 else f"error (rank {rank}): {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training says where it stopped and how to continue
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
