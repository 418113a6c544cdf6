"""Regenerate the numbers of docs/ladder.md: run `llmlab compare --presets all --out docs/compare`
(finished presets in docs/compare/runs/ are reused), then rewrite every
<!-- numbers:NAME --> ... <!-- /numbers --> block of docs/ladder.md from docs/compare/results.json
and report.md. The prose around the blocks is left as written.

    python docs/make_ladder.py [--fresh] [--no-run] [-- extra llmlab compare flags]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
OUT = DOCS / "compare"
LADDER = DOCS / "ladder.md"
BLOCK = re.compile(r"(<!-- numbers:(\w+) -->\n)(.*?)(<!-- /numbers -->)", re.S)


def fmt(x, digits=0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def rung_line(r: dict, first: str) -> str:
    """One rung's numbers from its results.json object, in words."""
    if r["status"] != "ok":
        return f"**Measured** ([report](compare/report.md)): failed — {r.get('error', '')}\n"
    dec = r["decode"]
    ctx = "/".join(str(d["context"]) for d in dec)
    speeds = "/".join(fmt(d["tokens_per_s"]) for d in dec)
    comp = [d["compiled_tokens_per_s"] for d in dec]
    compiled = (f", compiled {'/'.join(fmt(c) for c in comp)}" if all(c is not None for c in comp)
                else ", compiled n/a")
    cache = (f"{fmt(r['cache_bytes_per_token'])} bytes/token ({r['cache_formula']})" if r["cache_bytes_per_token"]
             else "none (recomputes)")
    return (f"**Measured** ([report](compare/report.md), {r.get('measured_at', '')}): {fmt(r['params'])} parameters "
            f"({r['params_vs_first']:.3f}x {first}); val loss {r['val_loss']:.4f} after the last step "
            f"({r['val_loss_whole']:.4f} over the whole val split); {fmt(r['train_tokens_per_s'])} train tokens/s; "
            f"peak memory {fmt(r['peak_mem_mib'], 1)} MiB; decode ({r['decode_path']}) after {ctx} tokens: "
            f"{speeds} tokens/s{compiled}; cache {cache}.\n")


def table_block() -> str:
    """The report's header bullets and table, as they are in docs/compare/report.md."""
    report = (OUT / "report.md").read_text().splitlines()
    head = [ln for ln in report if ln.startswith(("- Date", "- Time", "  ran "))]
    rows = [ln for ln in report if ln.startswith("|")]
    return "\n".join(head) + "\n\n" + "\n".join(rows) + "\n"


def fill() -> None:
    results = {r["preset"]: r for r in json.loads((OUT / "results.json").read_text())}
    first = next((r["preset"] for r in results.values() if r["status"] == "ok"), "the first")

    def block(m: re.Match) -> str:
        name = m.group(2)
        if name == "table":
            body = table_block()
        elif name in results:
            body = rung_line(results[name], first)
        else:
            body = m.group(3)  # a rung not in this comparison keeps what it had
        return m.group(1) + body + m.group(4)

    LADDER.write_text(BLOCK.sub(block, LADDER.read_text()))
    print(f"wrote {LADDER.relative_to(ROOT)} from {(OUT / 'results.json').relative_to(ROOT)}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fresh", action="store_true", help="retrain every rung")
    p.add_argument("--no-run", action="store_true", help="only refill docs/ladder.md from docs/compare")
    ns, extra = p.parse_known_args(argv)
    if not ns.no_run:
        sys.path.insert(0, str(ROOT))
        from llmlab.cli import main as llmlab

        code = llmlab(["compare", "--presets", "all", "--out", str(OUT), *(["--fresh"] if ns.fresh else []),
                       *[a for a in extra if a != "--"]])
        if code == 2:
            return code
    fill()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
