"""Regenerate docs/compare and the numbers of docs/ladder.md: run the docs comparison (below) into
docs/compare (finished runs in docs/compare/runs/ are reused), then rewrite every
<!-- numbers:NAME --> ... <!-- /numbers --> block of docs/ladder.md from docs/compare/results.json.
The prose around the blocks states no measured number; where the text interprets numbers
(the "reading" block, each rung's claims) it is generated from the claims table.

    python docs/make_ladder.py                 # the docs comparison, then fill docs/ladder.md
    python docs/make_ladder.py --fresh         # retrain and re-time everything
    python docs/make_ladder.py --no-run        # only refill docs/ladder.md from docs/compare/results.json
    python docs/make_ladder.py --out /tmp/c --ladder /tmp/ladder.md -- --presets kv_cache,sinusoidal --max-iters 20

Flags after `--` go to `llmlab compare` after the docs' own (a later flag wins; with --presets,
the docs' --set items of entries not named are dropped).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
BLOCK = re.compile(r"(<!-- numbers:([\w-]+) -->\n)(.*?)(<!-- /numbers -->)", re.S)

# The docs comparison: every rung, and the attention kinds on the controlled Llama block (RoPE,
# RMSNorm, SwiGLU, untied, no biases: llama and rope_mla's block) with everything else equal.
# 8 heads: MLA's cache (d_c + d_r = 72 values a layer) is below 1/3 of MHA's (2·8·16 = 256).
# 18 entries x 3 seeds = 54 runs of 300 steps, 2 at a time, then 5 timing rounds at 512/2k/4k of
# the eager steps (the compiled step, 1.4-1.8x at 4k here, would add ~7 min of compiling and rounds;
# `llmlab bench decode` measures it).
PRESETS = "all,llama_mha=llama,llama_gqa4=llama,llama_mqa=llama,mla_c32=rope_mla,mla_c128=rope_mla"
SETS = ["llama_mha:n_kv_head=8", "llama_gqa4:n_kv_head=4", "llama_mqa:n_kv_head=1", "mla_c32:kv_lora_rank=32",
        "mla_c128:kv_lora_rank=128"]
ARGS = ["--n-layer", "4", "--n-head", "8", "--n-embd", "128", "--block-size", "128", "--batch-size", "8",
        "--max-iters", "300", "--seeds", "3", "--val-tokens", "100000", "--contexts", "512,2048,4096",
        "--decode-steps", "16", "--rounds", "5", "--no-compile", "--jobs", "2", "--threads", "1"]


def compare_argv(out: Path, extra: list[str], fresh: bool) -> list[str]:
    presets = PRESETS
    if "--presets" in extra:
        i = extra.index("--presets")
        presets, extra = extra[i + 1], extra[:i] + extra[i + 2:]
    names = {item.partition("=")[0] for item in presets.split(",")}
    sets = [s for s in SETS if s.partition(":")[0] in names]
    return (["compare", "--presets", presets, "--out", str(out), *ARGS, *[a for s in sets for a in ("--set", s)],
             *(["--fresh"] if fresh else []), *extra])


# ---- the blocks --------------------------------------------------------------------------------------
def rung_block(doc: dict, name: str, claims: list) -> str:
    """One rung's numbers and claims, in words, from its results.json entry."""
    from llmlab.compare.report import versus_parent
    from llmlab.compare.results import best_decode_variant, decode_speed, train_speed, val

    e = next((x for x in doc["entries"] if x["name"] == name), None)
    if e is None:
        return "_Not in this comparison._\n"
    if e["status"] != "ok":
        return f"**Measured** ([report](compare/report.md)): failed — {e.get('error', '')}\n"
    ctxs = doc["settings"]["contexts"]
    variant = best_decode_variant(e)
    speeds = [decode_speed(e, variant, c) for c in ctxs]
    decode = "/".join(s.text() if s else "n/a" for s in speeds)
    cache = (f"{e['cache_bytes_per_token']:,} bytes/token ({e['cache_formula']})" if e["cache_bytes_per_token"]
             else "none (recomputes)")
    ts = train_speed(e)
    text = (f"**Measured** ([report](compare/report.md)): {e['params']:,} parameters; val loss {val(e).text()} over "
            f"the whole val split ({versus_parent(doc, e)} against {e.get('parent_label') or 'no parent'}); "
            f"{ts.text() if ts else 'n/a'} train tokens/s; decode ({e['decode_path']}"
            f"{', compiled' if variant == 'compiled' else ''}) after {'/'.join(map(str, ctxs))} tokens: {decode} "
            f"tokens/s; cache {cache}.\n")
    mine = [c for c in claims if name in [r.strip() for r in c.rung.split(",")]]
    for c in mine:
        text += f"\n{c.mark} *{c.text}*: {c.measured or 'not measured'}{' — ' + c.note if c.note else ''}.\n"
    return text


def reading(claims: list) -> str:
    """The comparison in words, generated from the claims table (so it never contradicts it)."""
    held = [c for c in claims if c.verdict is True]
    failed = [c for c in claims if c.verdict is False]
    lines = [f"Of {len(claims)} claims, {len(held)} hold (✓), {len(failed)} do not (✗) and "
             f"{len(claims) - len(held) - len(failed)} were not measured here (–)."]
    lines += [f"- ✓ {c.text}: {c.measured}." for c in held]
    lines += [f"- ✗ {c.text}: {c.measured}. Why it can fail: {c.note}." for c in failed]
    return "\n".join(lines) + "\n"


def blocks(doc: dict) -> dict[str, str]:
    from llmlab.compare import claims as claims_mod
    from llmlab.compare import report

    claims = claims_mod.evaluate(doc)
    runs = [r for e in doc["entries"] for r in e["runs"]]
    reused = sum(1 for r in runs if r.get("reused"))
    jobs = doc["settings"]["jobs"]
    # an interrupted comparison reuses its finished runs, so the last invocation's time is not the cost
    time = (f"the {len(runs)} runs (training + measuring) took {sum(r.get('wall_s') or 0 for r in runs) / 60:.0f} "
            f"min summed over runs, {jobs} at a time (`llmlab compare`), then the timing rounds; the last invocation "
            f"took {doc['wall_s'] / 60:.0f} min" + (f" and reused {reused} finished run(s)" if reused else ""))
    header = (f"- Date: {doc['date']}. Machine: {doc['machine']}; torch threads per process: "
              f"{doc['settings']['threads']}.\n- Time: {time}.\n"
              f"- {report.settings_text(doc)}\n- {report.timing_text(doc)}\n")
    out = {"settings": header, "claims": claims_mod.markdown(claims) + "\n", "reading": reading(claims),
           "table": report.ladder_table(doc) + "\n\n" + report.controlled_pairs(doc) + "\n",
           "attention": report.attention_tables(doc) + "\n", "speed": report.speed_table(doc) + "\n"}
    for e in doc["entries"]:
        out[f"rung-{e['name']}"] = rung_block(doc, e["name"], claims)
    return out


def fill(out: Path, ladder: Path) -> None:
    """Rewrite every numbers block of `ladder` from out/results.json (a block it has no numbers
    for says so)."""
    from llmlab.compare.results import FORMAT

    path = out / "results.json"
    doc = json.loads(path.read_text()) if path.is_file() else None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        values: dict[str, str] = {}
        missing = f"_Not generated yet: `python docs/make_ladder.py` fills this from {path.name}._\n"
    else:
        values, missing = blocks(doc), "_Not in this comparison._\n"
    from llmlab.fsutil import atomic_write_bytes

    text = BLOCK.sub(lambda m: m.group(1) + values.get(m.group(2), missing) + m.group(4), ladder.read_text())
    atomic_write_bytes(ladder, text.encode("utf-8"))
    print(f"wrote {ladder} from {path}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fresh", action="store_true", help="retrain and re-time everything")
    p.add_argument("--no-run", action="store_true", help="only refill the ladder from the comparison's results.json")
    p.add_argument("--out", type=Path, default=DOCS / "compare", help="the comparison's folder (default docs/compare)")
    p.add_argument("--ladder", type=Path, default=DOCS / "ladder.md", help="the file to fill (default docs/ladder.md)")
    ns, extra = p.parse_known_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    if not ns.no_run:
        from llmlab.cli import main as llmlab

        code = llmlab(compare_argv(ns.out, [a for a in extra if a != "--"], ns.fresh))
        if code == 2:
            return code
    fill(ns.out, ns.ladder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
