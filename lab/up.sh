#!/usr/bin/env bash
# The lab in one command: install what is missing, build, and bring up 3 Consul, 3 Vault (OpenBao) and 3 Nomad
# servers, 2 workers and a jumpbox, each configured by a real hashistack-agent from its (fake) instance metadata.
# It ends with the health table, `hashistack-agent status` on the jumpbox, and then the post-deploy smoke test
# (`hashistack-agent smoke` with the Nomad token from escrow: a canary job through Nomad, Vault and Consul), and
# exits non-zero if the smoke test fails. Ctrl-C stops everything.
# Extra arguments go to `hashistack-lab up` (e.g. --exit-when-healthy, --consul-servers 5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash lab/setup.sh
# shellcheck source=/dev/null
. .tools/env.sh
echo "lab: building the agent and the lab"
cargo build --workspace --bins --locked --quiet
exec ./target/debug/hashistack-lab up "$@"
