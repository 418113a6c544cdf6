"""Imports flow one way: a walk over every `import` in llmlab (module level and inside functions,
which run too) finds no cycle, except the known ones listed below, which are being removed
elsewhere (issue #18). A new cycle, or a known one that grows, fails."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "llmlab"

# Known cycles, each the set of modules of one strongly connected component when it was listed,
# being removed elsewhere: a component may shrink or vanish, never grow, and no other may appear.
# Delete an entry once its cycle is gone. The two listed with issue #18 (checkpoint -> train shim ->
# training.loop -> checkpoint; kernels.flash_mla <-> kernels.flash_mla_triton) are gone on main.
KNOWN_CYCLES: list[set[str]] = []


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__.py)."""
    out = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _under_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (the most specific one each
    statement names; imports under `if TYPE_CHECKING:` never run and are left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .a import b
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        if _under_type_checking(node, parents):
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
                if isinstance(node, ast.ImportFrom):
                    break  # the most specific module the statement names
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in g:
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_the_walk_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "llmlab"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom llmlab.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")  # inside a function, relative
    (pkg / "c.py").write_text("from llmlab.a import x\nfrom typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from llmlab.d import y\n")
    (pkg / "d.py").write_text("import llmlab.c\n")
    g = graph(pkg)
    assert g["llmlab.a"] == {"llmlab.sub.b"} and g["llmlab.sub.b"] == {"llmlab.c"}
    assert g["llmlab.c"] == {"llmlab.a"}  # the TYPE_CHECKING import never runs
    assert cycles(g) == [{"llmlab.a", "llmlab.sub.b", "llmlab.c"}]


def test_no_import_cycles_but_the_known_ones():
    found = cycles(graph())
    new = [sorted(c) for c in found if not any(c <= k for k in KNOWN_CYCLES)]
    assert not new, f"import cycle(s) not in KNOWN_CYCLES: {new}"


def test_compare_imports_flow_one_way():
    g = graph()
    compare = {m for m in g if m.startswith("llmlab.compare")}
    assert compare and not any(c & compare for c in cycles(g))
