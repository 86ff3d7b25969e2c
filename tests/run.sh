#!/usr/bin/env bash
# The whole test suite: installs what is missing (lab/setup.sh), builds, runs every Rust test (unit,
# integration against real Consul/OpenBao/Azurite, end-to-end labs) and the offline infrastructure checks,
# then prints one closing line: "N passed, M failed".
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

bash lab/setup.sh || { echo "setup failed"; echo "0 passed, 1 failed"; exit 1; }
# shellcheck source=/dev/null
. .tools/env.sh

mkdir -p target
LOG_RUST=target/test-rust.log
LOG_PY=target/test-infra.log
failed_steps=0

echo "== build"
if ! cargo build --workspace --bins --locked; then
  echo "build failed"; echo "0 passed, 1 failed"; exit 1
fi

echo "== cargo test"
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$LOG_RUST"
rust_rc=${PIPESTATUS[0]}

echo "== infrastructure checks (pytest)"
"$HASHISTACK_PYTHON" -m pytest tests/infra -q -p no:cacheprovider 2>&1 | tee "$LOG_PY"
py_rc=${PIPESTATUS[0]}

rust_passed=$(grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed' "$LOG_RUST" | awk '{s+=$4} END {print s+0}')
rust_failed=$(grep -Eo '[0-9]+ failed;' "$LOG_RUST" | awk '{s+=$1} END {print s+0}')
py_passed=$(tail -n 3 "$LOG_PY" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
py_failed=$(tail -n 3 "$LOG_PY" | grep -Eo '[0-9]+ (failed|error)' | awk '{s+=$1} END {print s+0}')

# A runner that died without reporting counts as a failure.
if [ "$rust_rc" -ne 0 ] && [ "$rust_failed" -eq 0 ]; then failed_steps=$((failed_steps + 1)); fi
if [ "$py_rc" -ne 0 ] && [ "$py_failed" -eq 0 ]; then failed_steps=$((failed_steps + 1)); fi

passed=$((rust_passed + py_passed))
failed=$((rust_failed + py_failed + failed_steps))
echo
echo "rust: $rust_passed passed, $rust_failed failed; infra: $py_passed passed, $py_failed failed"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
