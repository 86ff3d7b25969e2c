"""The documentation against the code (issue 15): run from the repository root, after building the agent:

    cargo build -p hashistack-agent && python -m pytest tests/infra/test_docs.py -q

1. Every `hashistack-agent …` command line in the operator docs (README.md, docs/*.md, packer/README.md,
   lab/components.md, examples/) is checked through the built agent's own `--help`: the subcommand path exists
   (`hashistack-agent <sub…> --help` exits 0), every `--flag` is one that level accepts, and a command line in a
   code block gives every option the usage line marks required — unless the option has an environment variable
   (`[env: NAME=]`) that the same document names.
2. Every ARM parameter and output name the docs mention — in backticks, as a `<placeholder>`,
   `parameters('x')`, `--parameters x=…`, `"x": { "value": … }`, `…outputs.x` — exists in
   arm-templates/azuredeploy.json, as a parameter or output as the context demands.
3. Every relative markdown link resolves: the file (or directory) exists and the `#anchor`, if any, is a heading
   of that file (GitHub's slugs).
4. Every page under docs/, lab/components.md and packer/README.md is linked from another page.

The agent binary is target/debug/hashistack-agent; its absence is a failure, not a skip (tests/run.sh builds
before it runs pytest).
"""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "target" / "debug" / "hashistack-agent"
TEMPLATE = REPO / "arm-templates" / "azuredeploy.json"


def doc_files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "packer" / "README.md",
             REPO / "lab" / "components.md"]
    examples = REPO / "examples"
    if examples.is_dir():
        files += sorted(p for p in examples.rglob("*") if p.is_file())
    return [f for f in files if f.is_file()]


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


# ------------------------------------------------------------------------------------------ reading the docs

FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass
class Doc:
    path: Path
    text: str
    # (line number, text) of each line inside a fenced code block (continuations joined)
    code: list[tuple[int, str]] = field(default_factory=list)
    # (line number of the paragraph, span text) of each inline code span outside code blocks
    spans: list[tuple[int, str]] = field(default_factory=list)
    # (line number, paragraph text) outside code blocks, for links
    prose: list[tuple[int, str]] = field(default_factory=list)
    # for each paragraph in `prose`, the line number of each of its characters
    prose_lines: list[list[int]] = field(default_factory=list)


def read_doc(path: Path) -> Doc:
    text = path.read_text(encoding="utf-8")
    doc = Doc(path, text)
    lines = text.splitlines()
    if path.suffix != ".md":
        # A job specification or script: its comment lines are where commands appear.
        for n, line in enumerate(lines, 1):
            doc.code.append((n, re.sub(r"^\s*(#|//)\s?", "", line)))
        return doc
    in_fence, para = False, []  # para: (line number, text) of the current paragraph's lines
    pending, pending_start = "", 0

    def line_of(offset: int) -> int:
        """The line number of a character offset in the joined paragraph."""
        at = 0
        for n, t in para:
            at += len(t) + 1
            if offset < at:
                return n
        return para[-1][0]

    def flush_para():
        nonlocal para
        if para:
            joined = " ".join(t for _, t in para)
            doc.prose.append((para[0][0], joined))
            doc.prose_lines.append([n for n, t in para for _ in range(len(t) + 1)])
            for m in re.finditer(r"(`+)(.+?)\1", joined):
                doc.spans.append((line_of(m.start()), m.group(2).strip()))
        para = []

    for n, line in enumerate(lines, 1):
        if FENCE.match(line):
            flush_para()
            if in_fence and pending:
                doc.code.append((pending_start, pending))
                pending = ""
            in_fence = not in_fence
            continue
        if in_fence:
            if not pending:
                pending_start = n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            doc.code.append((pending_start, pending + line))
            pending = ""
            continue
        if not line.strip():
            flush_para()
            continue
        para.append((n, line.strip()))
    flush_para()
    return doc


@functools.lru_cache(maxsize=None)
def all_docs() -> tuple[Doc, ...]:
    return tuple(read_doc(p) for p in doc_files())


# ---------------------------------------------------------------------------------- the agent's own --help

@dataclass
class Option:
    value: str  # "none", "required" or "optional"
    env: str | None = None


@dataclass
class Help:
    ok: bool
    text: str
    subcommands: set[str]
    options: dict[str, Option]  # "--json", "-v" → Option
    required: list[str]  # long options the usage line marks required
    positionals: bool
    # A command with subcommands that also runs without one (`snapshot`: its first usage line has no <COMMAND>).
    runs_alone: bool = False


def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HASHISTACK_")}
    env["NO_COLOR"] = "1"
    env.pop("RUST_LOG", None)
    return env


@functools.lru_cache(maxsize=None)
def agent_help(path: tuple[str, ...]) -> Help:
    r = subprocess.run([str(AGENT), *path, "--help"], capture_output=True, text=True, env=agent_env(),
                       timeout=30)
    text = r.stdout
    subs, options, required, positionals, runs_alone = set(), {}, [], False, False
    section, current = None, None
    for line in text.splitlines():
        if re.match(r"^[A-Z][A-Za-z ]*:\s*$", line):
            section = line.strip().rstrip(":")
            current = None
            continue
        if line.startswith("Usage:"):
            runs_alone = "<COMMAND>" not in line and "[COMMAND]" not in line
            usage = re.sub(r"\[[^\]]*\]", "", line)
            required = re.findall(r"(--[\w-]+)", usage)
            continue
        if section == "Commands":
            m = re.match(r"^\s{2}([a-z][\w-]*)\b", line)
            if m and m.group(1) != "help":
                subs.add(m.group(1))
        elif section == "Arguments":
            if line.strip():
                positionals = True
        elif section == "Options":
            m = re.match(r"^\s+(?:(-\w),\s+)?(--[\w-]+)(?:\s+(\[<[^>]+>\]|<[^>]+>))?", line)
            if m:
                kind = "none" if not m.group(3) else ("optional" if m.group(3).startswith("[") else "required")
                current = Option(kind)
                options[m.group(2)] = current
                if m.group(1):
                    options[m.group(1)] = current
            if current is not None:
                e = re.search(r"\[env: (\w+)=", line)
                if e:
                    current.env = e.group(1)
    return Help(r.returncode == 0, text, subs, options, required, positionals, runs_alone and bool(subs))


@pytest.fixture(scope="session")
def agent() -> Path:
    if not AGENT.is_file():
        pytest.fail(f"{rel(AGENT)} is missing: build it first (cargo build -p hashistack-agent; "
                    "tests/run.sh builds before it runs pytest)")
    return AGENT


# ------------------------------------------------------------------------------- command lines in the docs

PLACEHOLDER = re.compile(r"<(?=[^\s<>])[^<>]*>")
SEGMENT_SPLIT = re.compile(r"&&|\|\||[|;`()]|\$\(")
PREFIX_WORDS = {"sudo", "exec", "time", "then", "do", "if", "!", "else", "command"}


@dataclass
class Command:
    doc: Doc
    line: int
    text: str
    words: list[str]
    in_block: bool


def strip_comment(line: str) -> str:
    out, quote = [], None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        out.append(ch)
    return "".join(out)


def commands_in(doc: Doc, line_no: int, text: str, in_block: bool) -> list[Command]:
    text = strip_comment(text) if in_block else text
    text = re.sub(r"^\s*\$\s+", "", text)  # a prompt
    text = PLACEHOLDER.sub("PLACEHOLDER", text)
    text = text.replace("[", " ").replace("]", " ")
    found = []
    for seg in SEGMENT_SPLIT.split(text):
        try:
            words = shlex.split(seg, posix=True)
        except ValueError:
            words = seg.split()
        while words and (words[0] in PREFIX_WORDS or re.match(r"^[A-Za-z_]\w*=", words[0])):
            words.pop(0)
        if not words or Path(words[0]).name != "hashistack-agent":
            continue
        cut = []
        for w in words[1:]:
            if re.match(r"^\d*>>?|^<|^&$|^2>", w):
                break
            cut.append(w)
        found.append(Command(doc, line_no, seg.strip(), cut, in_block))
    return found


def all_commands() -> list[Command]:
    cmds = []
    for doc in all_docs():
        for n, line in doc.code:
            cmds += commands_in(doc, n, line, True)
        for n, span in doc.spans:
            cmds += commands_in(doc, n, span, False)
    return cmds


def check_command(cmd: Command, words: list[str] | None = None, path: tuple[str, ...] = ()) -> list[str]:
    """Problems with one command line, walked the way clap parses it: each flag belongs to the level it follows."""
    where = f"{rel(cmd.doc.path)}:{cmd.line}: `{cmd.text}`"
    words = cmd.words if words is None else words
    h = agent_help(path)
    if not h.ok:
        return [f"{where}: `hashistack-agent {' '.join(path)} --help` failed: no such command"]
    problems, given = [], set()
    i = 0
    while i < len(words):
        w = words[i]
        i += 1
        if w in ("…", "...", "PLACEHOLDER") and not w.startswith("-"):
            if w == "PLACEHOLDER" and not h.subcommands and not h.positionals:
                problems.append(f"{where}: unexpected argument after `{' '.join(path)}`")
            continue
        if w.startswith("-") and w != "-":
            name, eq, _ = w.partition("=")
            opt = h.options.get(name)
            if opt is None:
                level = " ".join(("hashistack-agent", *path))
                problems.append(f"{where}: `{name}` is not an option of `{level}`")
                continue
            given.add(name)
            if not eq and opt.value == "required" and i < len(words):
                i += 1
            elif not eq and opt.value == "optional" and i < len(words) and not words[i].startswith("-") \
                    and words[i] not in h.subcommands:
                i += 1
            continue
        # A word: a subcommand of this level, or a/b naming two of them ("escrow open/verify").
        parts = w.split("/")
        if all(p in h.subcommands for p in parts):
            for p in parts:
                problems += check_command(cmd, words[i:], (*path, p))
            return problems
        if h.positionals:
            continue
        level = " ".join(("hashistack-agent", *path))
        if h.subcommands:
            problems.append(f"{where}: `{w}` is not a subcommand of `{level}` "
                            f"(it has: {', '.join(sorted(h.subcommands))})")
        else:
            problems.append(f"{where}: unexpected argument `{w}` to `{level}`")
        return problems
    if h.subcommands and cmd.in_block and not h.runs_alone:
        problems.append(f"{where}: `hashistack-agent {' '.join(path)}` needs a subcommand "
                        f"({', '.join(sorted(h.subcommands))})")
    if cmd.in_block and (not h.subcommands or h.runs_alone):
        for req in h.required:
            if req in given:
                continue
            env = h.options.get(req, Option("required")).env
            if env and env in cmd.doc.text:
                continue
            hint = f" (or ${env}, which this document never mentions)" if env else ""
            problems.append(f"{where}: omits `{req}`, which `hashistack-agent {' '.join(path)}` requires{hint}")
    return problems


def test_agent_command_lines_match_the_agents_help(agent):
    cmds = all_commands()
    # The extractor itself must keep finding the commands (a broken regex would otherwise pass silently).
    assert len([c for c in cmds if c.in_block]) >= 10, [c.text for c in cmds]
    assert any(c.doc.path.name == "README.md" for c in cmds)
    problems = []
    for c in cmds:
        problems += check_command(c)
    assert not problems, "\n" + "\n".join(problems)


# ------------------------------------------------------------------------------- ARM names in the docs

# lowerCamelCase words in backticks that are not ARM parameters or outputs (Key Vault data actions, ARM
# functions and properties, IMDS fields).
NOT_ARM = {"setSecret", "getSecret", "userData", "uniqueString", "principalType", "tagsList", "vmId",
           "imageReference", "storageProfile", "upgradePolicy", "deleteOption", "osDisk", "defaultAction",
           "vmScaleSetName", "resourceGroupName", "subscriptionId", "vaultUri", "primaryEndpoints",
           "zoneBalance", "platformFaultDomainCount", "singlePlacementGroup", "orchestrationMode"}


@functools.lru_cache(maxsize=None)
def arm_names() -> tuple[frozenset[str], frozenset[str]]:
    t = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    return frozenset(t.get("parameters", {})), frozenset(t.get("outputs", {}))


def arm_mentions(doc: Doc) -> list[tuple[int, str, str, str]]:
    """(line, name, kind, how) for every ARM name the document mentions; kind: parameter, output or either."""
    out = []
    texts = [(n, t, True) for n, t in doc.code] + [(n, t, False) for n, t in doc.prose]
    for n, t, code in texts:
        for m in re.finditer(r"parameters\('([A-Za-z]\w*)'\)", t):
            out.append((n, m.group(1), "parameter", m.group(0)))
        for m in re.finditer(r"outputs\.([A-Za-z]\w*)", t):
            out.append((n, m.group(1), "output", m.group(0)))
        for m in re.finditer(r"(?:--parameters|\s-p)((?:\s+[A-Za-z]\w*=\S*)+)", t):
            for name in re.findall(r"\s([A-Za-z]\w*)=", m.group(1)):
                out.append((n, name, "parameter", f"--parameters {name}="))
        for m in re.finditer(r'"([A-Za-z]\w*)"\s*:\s*\{\s*"value"', t):
            out.append((n, m.group(1), "parameter", m.group(0)))
        if code:
            for m in re.finditer(r"<([a-z][a-z0-9]*[A-Z][A-Za-z0-9]*)>", t):
                out.append((n, m.group(1), "either", m.group(0)))
    for n, span in doc.spans:
        if re.fullmatch(r"[a-z][a-z0-9]*[A-Z][A-Za-z0-9]*", span):
            out.append((n, span, "either", f"`{span}`"))
    return out


def test_arm_names_in_the_docs_exist_in_the_template():
    params, outputs = arm_names()
    assert "imageId" in params and "jumpboxFqdn" in outputs
    problems, seen = [], 0
    for doc in all_docs():
        for n, name, kind, how in arm_mentions(doc):
            seen += 1
            where = f"{rel(doc.path)}:{n}: {how}"
            if kind == "parameter" and name not in params:
                problems.append(f"{where}: no parameter `{name}` in {rel(TEMPLATE)}")
            elif kind == "output" and name not in outputs:
                problems.append(f"{where}: no output `{name}` in {rel(TEMPLATE)}")
            elif kind == "either" and name not in params | outputs and name not in NOT_ARM:
                problems.append(f"{where}: `{name}` is neither a parameter nor an output of {rel(TEMPLATE)} "
                                "(a name that is not an ARM name goes into NOT_ARM in this test)")
    assert seen >= 20, "the ARM-name extractor found almost nothing"
    assert not problems, "\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------- links and anchors

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    h = h.lower()
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        m = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        if s in seen:
            seen[s] += 1
            out.add(f"{s}-{seen[s]}")
        else:
            seen[s] = 0
            out.add(s)
    return frozenset(out)


def relative_links(doc: Doc) -> list[tuple[int, str]]:
    out = []
    for (n, para), lines in zip(doc.prose, doc.prose_lines):
        # links in code spans are code, not links (blanked, keeping offsets)
        para = re.sub(r"(`+).+?\1", lambda m: " " * len(m.group(0)), para)
        for m in LINK.finditer(para):
            target = m.group(1) or m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, …
                continue
            out.append((lines[m.start()] if m.start() < len(lines) else n, target))
    return out


def test_relative_links_resolve():
    problems, seen = [], 0
    for doc in all_docs():
        if doc.path.suffix != ".md":
            continue
        for n, target in relative_links(doc):
            seen += 1
            file_part, _, anchor = target.partition("#")
            dest = doc.path if not file_part else (doc.path.parent / file_part).resolve()
            where = f"{rel(doc.path)}:{n}: ({target})"
            if not dest.exists():
                problems.append(f"{where}: {file_part} does not exist")
                continue
            if anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {rel(dest)}")
    assert seen >= 30, "the link extractor found almost nothing"
    assert not problems, "\n" + "\n".join(problems)


def test_every_page_is_linked_from_another():
    pages = [p for p in doc_files()
             if (p.suffix == ".md" and p.name != "README.md") or p == REPO / "packer" / "README.md"]
    linked = set()
    for doc in all_docs():
        if doc.path.suffix != ".md":
            continue
        for _, target in relative_links(doc):
            file_part = target.partition("#")[0]
            if file_part:
                dest = (doc.path.parent / file_part).resolve()
                if dest != doc.path:
                    linked.add(dest)
    orphans = [rel(p) for p in pages if p.resolve() not in linked]
    assert not orphans, "pages no other page links to: " + ", ".join(orphans)


# ------------------------------------------------------------------------------ the checks catch mistakes

def synthetic(tmp_path: Path, name: str, text: str) -> Doc:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    d = read_doc(p)
    # Report paths relative to the repository like the real pages.
    d.path = REPO / "docs" / name
    return d


@pytest.mark.parametrize("line, expect", [
    ("hashistack-agent status --jsn", "`--jsn` is not an option of `hashistack-agent status`"),
    ("hashistack-agent escrow list --cluster c", "`list` is not a subcommand of `hashistack-agent escrow`"),
    ("sudo hashistack-agent escrow open --cluster c --tier vault", "omits `--blob-endpoint`"),
    ("X=1 hashistack-agent render --out d", "omits `--metadata`"),
    ("hashistack-agent status --json extra", "unexpected argument `extra`"),
    ("hashistack-agent escrow", "needs a subcommand"),
    ("hashistack-agent --verbose image verify --root / | tee x", None),
    ("hashistack-agent escrow verify --cluster c --blob-endpoint <b> --escrow-vault-uri <e>  # fine", None),
])
def test_command_check_catches_mistakes(agent, tmp_path, line, expect):
    doc = synthetic(tmp_path, "x.md", f"```sh\n{line}\n```\n")
    cmds = [c for n, t in doc.code for c in commands_in(doc, n, t, True)]
    assert len(cmds) == 1
    problems = check_command(cmds[0])
    if expect is None:
        assert not problems
    else:
        assert any(expect in p for p in problems), problems


def test_env_named_in_the_document_stands_for_the_flag(agent, tmp_path):
    doc = synthetic(tmp_path, "y.md", "Set `HASHISTACK_BLOB_ENDPOINT` and `HASHISTACK_ESCROW_VAULT_URI`.\n\n"
                                      "```sh\nhashistack-agent escrow verify --cluster c\n```\n")
    cmds = [c for n, t in doc.code for c in commands_in(doc, n, t, True)]
    assert check_command(cmds[0]) == []


def test_arm_and_link_checks_catch_mistakes(tmp_path):
    params, outputs = arm_names()
    doc = synthetic(tmp_path, "z.md",
                    "Pass `escrowVaultUri` and `imageId`.\n\n"
                    "```sh\naz deployment group show -g $RG -n hs --query properties.outputs.imageId.value\n"
                    "az deployment group create -g $RG -f t.json --parameters workerCounts=3 imageId=x\n```\n\n"
                    "See [runbooks](runbooks.md#no-such-heading) and [gone](nowhere.md).\n")
    found = {(name, kind) for _, name, kind, _ in arm_mentions(doc)}
    assert ("escrowVaultUri", "either") in found and "escrowVaultUri" not in params | outputs
    assert ("imageId", "output") in found and "imageId" not in outputs
    assert ("workerCounts", "parameter") in found and "workerCounts" not in params
    links = dict((t, n) for n, t in relative_links(doc))
    assert "runbooks.md#no-such-heading" in links and "nowhere.md" in links
    assert "no-such-heading" not in anchors(REPO / "docs" / "runbooks.md")
    headings = tmp_path / "h.md"
    headings.write_text("# Runbooks\n\n## `escrow open` / `escrow verify`\n\n## Scale: in, out\n\n"
                        "## Scale: in, out\n\n```sh\n# not a heading\n```\n", encoding="utf-8")
    assert anchors(headings) == {"runbooks", "escrow-open--escrow-verify", "scale-in-out", "scale-in-out-1"}


# ----------------------------------------------------------------------------------------- example jobs

def blocks(node, name: str) -> list[tuple[str | None, dict]]:
    """(label, body) of every `name` block in a python-hcl2 tree (labelled or not; old and new tree shapes)."""
    out = []
    for item in (node or {}).get(name, []):
        if isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item.values())), dict) \
                and not any(k in item for k in ("name", "aud", "role", "data", "port", "to")):
            label, body = next(iter(item.items()))
            out.append((label, body))
        elif isinstance(item, dict):
            out.append((None, item))
    return out


def attr(body: dict, key: str):
    v = body.get(key)
    while isinstance(v, list) and len(v) == 1 and key != "aud":
        v = v[0]
    return v


def test_example_job_uses_consul_checks_and_vault_through_workload_identity():
    """examples/hello.nomad.hcl parses as HCL and has what docs/getting-started.md says it has (Nomad >= 1.7)."""
    try:
        import hcl2
    except ImportError:
        pytest.fail("python-hcl2 is missing: it comes with checkov (bash lab/setup.sh)")
    path = REPO / "examples" / "hello.nomad.hcl"
    tree = hcl2.loads(path.read_text(encoding="utf-8"))
    jobs = blocks(tree, "job")
    assert [label for label, _ in jobs] == ["hello"]
    groups = blocks(jobs[0][1], "group")
    services = [s for _, g in groups for _, s in blocks(g, "service")]
    tasks = [t for _, g in groups for _, t in blocks(g, "task")]
    assert services and all(blocks(s, "check") for s in services), "a service with a Consul check"
    assert all(attr(s, "provider") in (None, "consul") for s in services)
    assert any(blocks(s, "identity") for s in services), "the service registers through its workload identity"
    vault_tasks = [t for t in tasks if blocks(t, "vault")]
    assert vault_tasks, "a task with a vault block"
    for t in vault_tasks:
        names = [attr(i, "name") for _, i in blocks(t, "identity")]
        assert "vault_default" in names, "the Vault identity (workload identity, not a Vault token)"
        assert "token" not in json.dumps(t).lower(), "no Vault token in the job"
        datas = [attr(b, "data") for _, b in blocks(t, "template")]
        assert any('secret "secret/data/' in (d or "") for d in datas), "a template reading secret/data/…"
    assert "hello.nomad.hcl" in (REPO / "docs" / "getting-started.md").read_text(encoding="utf-8")
