"""MLA decode at long contexts: absorbed vs decompressing, beside MHA, GQA and MQA of the same width.

    python benchmarks/mla_decode.py                       # d_model 256, 8 heads, 4 layers; contexts 512,2048,4096
    python benchmarks/mla_decode.py --contexts 256,1024 --rounds 3

Contestants, all on one block (RoPE, RMSNorm, SwiGLU, untied head: the llama / rope_mla block) with
the same d_model, layers and heads; only attention differs:
    MHA                 llama with n_kv_head = n_head           cache 2·H·d per layer
    GQA-2, MQA          llama with 2 / 1 key-value heads        cache 2·H_kv·d
    MLA absorbed        rope_mla (d_c 128, d_r 16, as `bench decode --shape deepseek`): each one-token
                        step folds W_UK into the query and attends over the cached latents
    MLA decompressing   the same model and cache, but each step expands every cached latent into
                        per-head keys and values (kv_up) first: the cost absorption removes
Each contestant runs in its own process; turns go round-robin (llmlab.compare.timing, as `llmlab
compare` times), after an untimed warm-up round. Batch 1, greedy, eager one-token steps (both MLA
paths alike), --decode-steps tokens after a prefill of C random tokens, random weights (speed does
not depend on their values). Prints a table of decode tokens/s, median (min-max) over the rounds,
the absorbed/decompressing ratio per context against the target (>= 3x at the longest), and a
JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmlab.bench import MLA_SIZES, print_table  # noqa: E402
from llmlab.compare.stats import speed_range  # noqa: E402
from llmlab.compare.timing import Contestant, time_round_robin  # noqa: E402
from llmlab.presets import preset_config  # noqa: E402

TARGET = 3.0  # absorbed / decompressing at the longest context (issue 17)


def contestants(a) -> list[tuple[str, Contestant]]:
    sizes = dict(vocab_size=256, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=128)
    configs = {"MHA": preset_config("llama", **sizes, n_kv_head=a.n_head),
               "GQA-2": preset_config("llama", **sizes, n_kv_head=2),
               "MQA": preset_config("llama", **sizes, n_kv_head=1),
               "MLA absorbed": preset_config("rope_mla", **sizes, **MLA_SIZES),
               "MLA decompressing": preset_config("rope_mla", **sizes, **MLA_SIZES)}
    out = []
    for label, cfg in configs.items():
        variant = "decompressing" if label == "MLA decompressing" else "own"
        name = label.lower().replace(" ", "_").replace("-", "")
        out.append((label, Contestant(name, cfg.to_dict(), a.contexts, a.decode_steps, train_steps=0,
                                      variants=[variant], compile=False, threads=a.threads, seed=a.seed)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 4096])
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per contestant (default 1)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    named = contestants(a)
    print(f"MLA decode benchmark: d_model {a.n_embd}, {a.n_head} heads, {a.n_layer} layers; MLA d_c "
          f"{MLA_SIZES['kv_lora_rank']}, d_r {MLA_SIZES['qk_rope_head_dim']}; {a.rounds} rounds round-robin, "
          f"{a.decode_steps} tokens after each context, {a.threads} thread(s) per process", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = time_round_robin([c for _, c in named], a.rounds, Path(tmp),
                               lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    speeds, rows = {}, []
    for label, c in named:
        t = res["entries"][c.name]
        if t["error"]:
            rows.append([label, "-", *(["failed: " + t["error"]] + ["-"] * (len(a.contexts) - 1))])
            continue
        variant = c.variants[0]
        speeds[label] = {n: speed_range([r["decode"][variant][str(n)] for r in t["rounds"]]) for n in a.contexts}
        rows.append([label, f"{t['ready']['cache_bytes_per_token']:,}"] + [speeds[label][n].text() for n in a.contexts])
    print_table("decode tokens/s, batch 1, eager, median (min-max) over the rounds",
                ["attention", "cache B/token"] + [f"@ {n}" for n in a.contexts], rows)
    ratios = {}
    if "MLA absorbed" in speeds and "MLA decompressing" in speeds:
        ratios = {n: speeds["MLA absorbed"][n].median / speeds["MLA decompressing"][n].median for n in a.contexts}
        longest = max(a.contexts)
        print("\nabsorbed / decompressing: " + ", ".join(f"{r:.1f}x @ {n}" for n, r in ratios.items())
              + f"; target >= {TARGET:g}x @ {longest}: {'met' if ratios[longest] >= TARGET else 'NOT met'}")
    print(json.dumps({"contexts": a.contexts, "tokens_per_s": {k: {n: round(v[n].median, 1) for n in a.contexts}
                                                               for k, v in speeds.items()},
                      "absorbed_over_decompressing": {n: round(r, 2) for n, r in ratios.items()},
                      "order": res["order"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
