"""Two limits of issue #9 that must stay true: errors are types, not strings (no `Result<…, String>` in agent/src),
and no source file outside the tests grows past 1,000 lines (agent/ and lab/).

PENDING lists what other branches are still fixing; each entry must still break its limit (a fixed file fails the
test until its entry is removed), so the list only shrinks. It is empty once those branches have landed.

Run: python -m pytest tests/infra/test_source_limits.py -q. Print the findings: python tests/infra/test_source_limits.py
"""
from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 1000

# (limit, glob relative to the repository): a file still breaking `limit` while its branch lands.
PENDING: list[tuple[str, str]] = []


# What is not code: comments, char literals (before strings: '"'), raw and plain string literals.
NOT_CODE = re.compile(
    r"//[^\n]*|/\*.*?\*/|'(?:\\[^']*|[^'\\])'|\br(#*)\".*?\"\1|\"(?:\\.|[^\"\\])*\"", re.S
)


def code_only(text: str) -> str:
    """`text` without comments and literals (a doc comment may well say `Result<_, String>`); lines are kept."""
    return NOT_CODE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def string_errors(text: str) -> list[int]:
    """Lines of every `Result<T, String>` (the type, with any T; nested generics and line breaks allowed)."""
    code = code_only(text)
    found = []
    for m in re.finditer(r"\bResult\s*<", code):
        depth, i, parts, start = 1, m.end(), [], m.end()
        while depth and i < len(code):
            c = code[i]
            if c in "<([":
                depth += 1
            elif c in ">)]" and code[i - 1] not in "-=":
                depth -= 1
            elif c == "," and depth == 1:
                parts.append(code[start:i])
                start = i + 1
            i += 1
        parts.append(code[start : i - 1])
        if len(parts) > 1 and not parts[-1].strip():
            parts.pop()  # a trailing comma
        if len(parts) == 2 and re.fullmatch(r"\s*(?:std::string::)?String\s*", parts[1]):
            found.append(code.count("\n", 0, m.start()) + 1)
    return found


def is_test_file(rel: Path) -> bool:
    return "tests" in rel.parts[:-1] or rel.name == "tests.rs"


def findings(root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(limit, path, detail) for every file breaking a limit."""
    out = []
    for crate in ("agent", "lab"):
        for p in sorted((root / crate).rglob("*.rs")):
            rel = p.relative_to(root)
            if "target" in rel.parts:
                continue
            text = p.read_text()
            if rel.parts[:2] == ("agent", "src"):
                lines = string_errors(text)
                if lines:
                    out.append(("string-error", rel.as_posix(), f"Result<…, String> at line {', '.join(map(str, lines))}"))
            n = text.count("\n")
            if not is_test_file(rel) and n > MAX_LINES:
                out.append(("too-long", rel.as_posix(), f"{n} lines"))
    return out


def pending(limit: str, path: str) -> bool:
    return any(limit == l and fnmatch.fnmatch(path, g) for l, g in PENDING)


def test_errors_are_types_and_files_stay_short() -> None:
    bad = [f"{path}: {detail} ({limit})" for limit, path, detail in findings() if not pending(limit, path)]
    assert not bad, "\n".join(
        bad + ["errors are enums (thiserror), not strings; split a long file into a folder of modules"]
    )


def test_every_pending_entry_still_breaks_its_limit() -> None:
    """A file that was fixed leaves the list (the list only shrinks)."""
    found = findings()
    stale = [f"{l} {g}" for l, g in PENDING if not any(l == fl and fnmatch.fnmatch(p, g) for fl, p, _ in found)]
    assert not stale, "fixed: remove from PENDING in tests/infra/test_source_limits.py: " + ", ".join(stale)


def test_the_checks_can_fail(tmp_path) -> None:
    src = tmp_path / "agent" / "src"
    (src / "a").mkdir(parents=True)
    (tmp_path / "agent" / "tests").mkdir()
    (tmp_path / "lab" / "src").mkdir(parents=True)
    (src / "ok.rs").write_text(
        "/// Never `Result<(), String>`.\n"
        'const S: &str = "Result<u8, String>";\n'
        "fn a() -> Result<BTreeMap<String, String>, MyError> { todo!() }\n"
        "fn b() -> Result<String, Error> { todo!() }\n"
        "fn c(f: impl Fn() -> u8) -> Result<Vec<u8>, Strings> { todo!() }\n"
    )
    (src / "a" / "bad.rs").write_text(
        "fn a() -> Result<Vec<(u8, String)>, String> { todo!() }\n"
        "type Got<T> = Option<Result<\n    T,\n    std::string::String,\n>>;\n"
    )
    (src / "long.rs").write_text("\n" * (MAX_LINES + 1))
    (src / "a" / "tests.rs").write_text("\n" * (MAX_LINES + 1))
    (tmp_path / "agent" / "tests" / "long.rs").write_text("\n" * (MAX_LINES + 1))
    (tmp_path / "lab" / "src" / "long.rs").write_text("fn x() -> Result<(), String> {}\n" + "\n" * MAX_LINES)
    got = sorted((limit, path, detail) for limit, path, detail in findings(tmp_path))
    assert got == [
        ("string-error", "agent/src/a/bad.rs", "Result<…, String> at line 1, 2"),
        ("too-long", "agent/src/long.rs", f"{MAX_LINES + 1} lines"),
        ("too-long", "lab/src/long.rs", f"{MAX_LINES + 1} lines"),
    ], got


if __name__ == "__main__":
    for limit, path, detail in findings():
        print(f"{'pending ' if pending(limit, path) else ''}{limit:13} {path}: {detail}")
    sys.exit(0)
