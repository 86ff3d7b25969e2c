"""The agent's rooms and what each may import (docs/architecture.md, "Rooms"): no import cycle, and no arrow from a
lower room to a higher one. Reads agent/src: every `crate::…`/`super::…` path outside comments and outside the
`#[cfg(test)]` part of a file is an import of the module it names.

Run: python -m pytest tests/infra/test_layers.py -q. Print the graph: python tests/infra/test_layers.py
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "agent" / "src"

# Rooms from the bottom up. A module may import its own room (without a cycle) and any room below it.
# Submodules belong to their top-level module's room unless named here themselves.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation: no I/O of its own", ["retry", "logging", "names", "ids", "version", "files", "config"]),
    ("the node's inputs", ["imds", "identity", "node", "tls", "userdata", "disk"]),
    ("Azure and the rendered node", ["azure", "render", "services"]),
    ("shared records", ["record", "coordination", "election", "escrow", "material", "warm"]),
    ("writers", ["bootstrap", "publish"]),
    ("boot, the orchestrator", ["boot", "converge", "snapshot"]),
    ("the reader", ["status", "smoke"]),
    ("operators' commands and the image", ["image", "main", "cli"]),
]

PATH = r"[a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*"


def modules() -> dict[tuple[str, ...], Path]:
    mods = {}
    for p in SRC.rglob("*.rs"):
        rel = list(p.relative_to(SRC).with_suffix("").parts)
        if rel[-1] in ("mod", "lib"):
            rel = rel[:-1]
        mods[tuple(rel)] = p
    return mods


def code_of(path: Path) -> str:
    text = path.read_text()
    text = text.split("#[cfg(test)]")[0]
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def graph() -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    mods = modules()

    def resolve(parts: tuple[str, ...]):
        while parts and parts not in mods:
            parts = parts[:-1]
        return parts or None

    edges: dict[tuple[str, ...], set[tuple[str, ...]]] = {m: set() for m in mods}
    for m, p in mods.items():
        code = code_of(p)
        refs = [tuple(r.split("::")) for r in re.findall(rf"\bcrate::({PATH})", code)]
        for grp in re.findall(r"\bcrate::\{([^}]*)\}", code):
            refs += [tuple(r.split("::")) for r in re.findall(PATH, grp)]
        # `super` is the parent of the module the file is (`a/b.rs` and `a/b/mod.rs` are both module a::b).
        for sup, ref in re.findall(rf"\b((?:super::)+)({PATH})", code):
            base = m[: len(m) - sup.count("super::")]
            refs.append(base + tuple(ref.split("::")))
        for r in refs:
            t = resolve(r)
            if t is not None and t != m and m[: len(t)] != t:
                edges[m].add(t)
    return edges


def cycles(edges) -> list[list[tuple[str, ...]]]:
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def layer_of(m: tuple[str, ...]) -> int:
    for i, (_, names) in enumerate(LAYERS):
        if "::".join(m) in names:
            return i
    for i, (_, names) in enumerate(LAYERS):
        if m and m[0] in names:
            return i
    raise AssertionError(f"module {'::'.join(m)} is in no room: add it to LAYERS and docs/architecture.md")


def name(m) -> str:
    return "::".join(m) or "crate"


def test_the_agent_has_no_import_cycle() -> None:
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(name(m) for m in c) for c in found)


def test_no_room_imports_a_higher_one() -> None:
    edges = graph()
    upward = []
    for m, ts in edges.items():
        if not m or m == ("lib",):
            continue
        for t in ts:
            if layer_of(t) > layer_of(m):
                upward.append(f"{name(m)} ({LAYERS[layer_of(m)][0]}) -> {name(t)} ({LAYERS[layer_of(t)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_every_module_is_in_a_room() -> None:
    for m in modules():
        if m:
            layer_of(m)


def test_the_checker_sees_a_cycle_and_an_upward_arrow(tmp_path, monkeypatch) -> None:
    """The checks above must be able to fail: a tiny crate with a cycle and an upward import."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "lib.rs").write_text("pub mod a; pub mod retry; pub mod boot;\n")
    (src / "a" / "mod.rs").write_text("use super::boot::X; // crate::retry in a comment is not an import\n")
    (src / "retry.rs").write_text("use crate::boot::Y;\n#[cfg(test)]\nmod t { use crate::a::Z; }\n")
    (src / "boot.rs").write_text("use crate::retry::W;\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", src)
    e = graph()
    assert e[("retry",)] == {("boot",)}, e
    assert e[("a",)] == {("boot",)}, e
    assert cycles(e) == [[("boot",), ("retry",)]]
    assert layer_of(("retry",)) < layer_of(("boot",))


if __name__ == "__main__":
    g = graph()
    for m in sorted(g):
        print(f"{name(m):28} [{layer_of(m) if m else '-'}] -> {', '.join(sorted(name(t) for t in g[m]))}")
    print("cycles:", cycles(g))
