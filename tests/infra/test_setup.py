"""lab/setup.sh's Debian part on a scratch root, for every subset of its tools already present.

A fresh machine found the bug this guards against: setup ran `apt-get update` for the first missing tool, *then* added
the bullseye source, and `apt-get install consul/bullseye` failed with "E: Release 'bullseye' for 'consul' was not
found". CI stayed green because its machine already had those tools. Here a fake `apt-get` keeps apt's documented
behaviour that matters (an install sees only the suites of the sources present at the last `update`; a package asked
from a suite it does not know is "not found", exit 100), and PATH holds only the basic utilities plus the subset of
tools under test, so every order of presence runs.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "lab" / "setup.sh"

# The tools setup installs from Debian, and the package that provides each.
TOOLS = {"shellcheck": "shellcheck", "jq": "jq", "curl": "curl", "flock": "util-linux", "consul": "consul",
         "gpg": "gnupg", "nft": "nftables", "logrotate": "logrotate"}
# Utilities setup and the fakes need that are not under test.
BASICS = [
    "bash", "sh", "env", "cat", "grep", "awk", "sed", "tail", "head", "mkdir", "tee", "id", "dirname", "tr",
    "chmod", "rm", "ls", "sort", "cp", "mv", "touch", "basename", "readlink", "cmp", "wc", "date", "sleep",
]

FAKE_APT = r"""#!/bin/bash
# A fake apt-get: `update` records the suites of the sources present now; `install` takes a package only from a
# suite that the last update saw (as apt does), and "installs" it by writing an executable into $FAKE_INSTALLED.
set -u
state="$FAKE_APT_STATE"
etc="$HASHISTACK_APT_ETC"
sources_now() { cat "$etc"/sources.list.d/*.sources 2>/dev/null | grep -E '^Suites:' | sed 's/^Suites://' | tr ' ' '\n' | grep -v '^$' | sort -u; }
cmd=""
pkgs=()
for a in "$@"; do
  case "$a" in
    -*) ;;
    update|install) cmd="$a" ;;
    *) pkgs+=("$a") ;;
  esac
done
case "$cmd" in
  update)
    sources_now >"$state/lists"
    echo "update $(tr '\n' ' ' <"$state/lists")" >>"$state/log"
    ;;
  install)
    for p in "${pkgs[@]}"; do
      name="${p%%/*}"; suite=""
      [ "$name" != "$p" ] && suite="${p#*/}"
      if [ ! -f "$state/lists" ]; then echo "E: Unable to locate package $name" >&2; exit 100; fi
      if [ -n "$suite" ] && ! grep -qx "$suite" "$state/lists"; then
        echo "E: Release '$suite' for '$name' was not found" >&2; exit 100
      fi
      if [ "$name" = consul ] && [ -z "$suite" ] && ! grep -qx bullseye "$state/lists"; then
        echo "E: Unable to locate package consul" >&2; exit 100
      fi
    done
    for p in "${pkgs[@]}"; do
      name="${p%%/*}"
      case "$name" in
        util-linux) bin=flock ;;
        gnupg) bin=gpg ;;
        nftables) bin=nft ;;
        *) bin="$name" ;;
      esac
      if [ "$bin" = consul ]; then
        printf '#!/bin/bash\necho "Consul v1.8.7"\necho "Revision 1"\n' >"$FAKE_INSTALLED/consul"
      else
        printf '#!/bin/bash\nexit 0\n' >"$FAKE_INSTALLED/$bin"
      fi
      chmod +x "$FAKE_INSTALLED/$bin"
    done
    echo "install ${pkgs[*]}" >>"$state/log"
    ;;
  *) echo "fake apt-get: unsupported: $*" >&2; exit 2 ;;
esac
"""

DEBIAN_SOURCES = """Types: deb
URIs: http://debian.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


class Machine:
    """A scratch root: apt's configuration, a fake apt-get, and PATH = basics + the tools said to be present."""

    def __init__(self, root: Path, present: set[str]):
        self.root = root
        self.etc = root / "etc-apt"
        (self.etc / "sources.list.d").mkdir(parents=True)
        (self.etc / "preferences.d").mkdir()
        (self.etc / "sources.list.d" / "debian.sources").write_text(DEBIAN_SOURCES)
        self.state = root / "apt-state"
        self.state.mkdir()
        (self.state / "log").write_text("")
        self.basics = root / "basics"
        self.basics.mkdir()
        for tool in BASICS:
            found = shutil.which(tool)
            assert found, f"{tool} is needed to run this test"
            (self.basics / tool).symlink_to(found)
        self.installed = root / "installed"
        self.installed.mkdir()
        fake = self.basics / "apt-get"
        fake.write_text(FAKE_APT)
        fake.chmod(0o755)
        for tool in present:
            body = '#!/bin/bash\necho "Consul v1.8.7"\n' if tool == "consul" else "#!/bin/bash\nexit 0\n"
            (self.installed / tool).write_text(body)
            (self.installed / tool).chmod(0o755)
        if os.geteuid() != 0:
            sudo = self.basics / "sudo"
            sudo.write_text('#!/bin/bash\n[ "$1" = -n ] && shift\nexec "$@"\n')
            sudo.chmod(0o755)

    def run_setup(self) -> subprocess.CompletedProcess:
        env = {
            "PATH": f"{self.installed}:{self.basics}",
            "HOME": str(self.root),
            "HASHISTACK_APT_ETC": str(self.etc),
            "HASHISTACK_TOOLS_DIR": str(self.root / "tools"),
            "FAKE_APT_STATE": str(self.state),
            "FAKE_INSTALLED": str(self.installed),
        }
        return subprocess.run(
            [str(self.basics / "bash"), str(SETUP), "--debian-only"],
            env=env, capture_output=True, text=True, timeout=60,
        )

    def log(self) -> list[str]:
        return (self.state / "log").read_text().splitlines()


SUBSETS = [set(c) for n in range(len(TOOLS) + 1) for c in itertools.combinations(sorted(TOOLS), n)]


@pytest.mark.parametrize("present", SUBSETS, ids=lambda s: "+".join(sorted(s)) or "none")
def test_debian_setup_works_whatever_is_present(tmp_path: Path, present: set[str]) -> None:
    m = Machine(tmp_path, present)
    first = m.run_setup()
    assert first.returncode == 0, f"setup failed with {sorted(present)} present:\n{first.stdout}\n{first.stderr}"
    for tool in TOOLS:
        assert (m.installed / tool).exists(), f"{tool} missing after setup"
    log = m.log()
    missing = set(TOOLS) - present
    if missing:
        # One update, after the bullseye source (when consul was needed), then one install of everything missing.
        assert [line.split()[0] for line in log] == ["update", "install"], log
        if "consul" in missing:
            assert "bullseye" in log[0].split()[1:], f"the update did not see the bullseye source: {log}"
            assert "consul/bullseye" in log[1].split()
        want = {TOOLS[t] for t in missing}
        got = {p.split("/")[0] for p in log[1].split()[1:]}
        assert got == want, log
    else:
        assert log == [], f"nothing was missing, yet apt ran: {log}"
    # A second run finds everything and calls apt not at all.
    (m.state / "log").write_text("")
    second = m.run_setup()
    assert second.returncode == 0, second.stderr
    assert m.log() == [], f"second run called apt: {m.log()}"


def test_a_source_left_by_an_interrupted_run_still_gets_an_update(tmp_path: Path) -> None:
    """An earlier run wrote the bullseye source and died before `apt-get update`: this run updates before installing."""
    m = Machine(tmp_path, {"shellcheck", "jq", "curl", "flock", "gpg", "nft", "logrotate"})
    first = m.run_setup()
    assert first.returncode == 0, first.stderr
    # Simulate the interrupted run: lists from before the source existed, consul gone.
    (m.state / "lists").write_text("bookworm\nbookworm-updates\n")
    (m.installed / "consul").unlink()
    (m.state / "log").write_text("")
    again = m.run_setup()
    assert again.returncode == 0, again.stderr
    assert [line.split()[0] for line in m.log()] == ["update", "install"], m.log()


def test_the_fake_apt_refuses_an_install_from_a_suite_it_has_not_seen(tmp_path: Path) -> None:
    """The fake must be able to fail the way real apt did on the fresh machine, or the tests above prove nothing."""
    m = Machine(tmp_path, set())
    env = {"PATH": f"{m.installed}:{m.basics}", "HASHISTACK_APT_ETC": str(m.etc), "FAKE_APT_STATE": str(m.state),
           "FAKE_INSTALLED": str(m.installed)}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, executable=str(m.basics / "apt-get"))
    out = subprocess.run(["apt-get", "install", "-y", "consul/bullseye"], env=env, capture_output=True, text=True,
                         executable=str(m.basics / "apt-get"))
    assert out.returncode == 100
    assert "E: Release 'bullseye' for 'consul' was not found" in out.stderr
