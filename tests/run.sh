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

echo "== build tests"
if ! cargo test --workspace --locked --no-run; then
  echo "test build failed"; echo "0 passed, 1 failed"; exit 1
fi

# The end-to-end lab suites (tests/tests/*.rs) mostly wait on real servers, so they run in two lanes beside
# each other; every suite binds loopback nets of its own (127.<net>.0.x, `options(name, net)`), so lanes never
# share an address. Heaviest first, each to the lane with less work (seconds measured on a 2-core machine;
# a suite not in the table counts 60). E2E_LANES=1 runs them one after another.
declare -A WEIGHT=([lab_cluster]=330 [power_loss]=140 [bootstrap]=120 [status]=117 [nomad]=85 [faults]=75
                   [snapshots]=80 [reimage]=45 [fencing]=50 [pgp_escrow]=44 [scaling]=26 [workers]=20 [smoke]=30 [nomad_consul]=11 [warm_boot]=70 [infra_packer]=1)
suites=$(for f in tests/tests/*.rs; do t=$(basename "$f" .rs); echo "${WEIGHT[$t]:-60} $t"; done | sort -rn | awk '{print $2}')
lanes=${E2E_LANES:-2}
declare -a lane_list lane_load
for ((i = 0; i < lanes; i++)); do lane_list[i]=""; lane_load[i]=0; done
for t in $suites; do
  best=0
  for ((i = 1; i < lanes; i++)); do [ "${lane_load[i]}" -lt "${lane_load[best]}" ] && best=$i; done
  lane_list[best]="${lane_list[best]} $t"
  lane_load[best]=$(( lane_load[best] + ${WEIGHT[$t]:-60} ))
done
run_lane() {
  local rc=0 t
  for t in $1; do cargo test -p hashistack-e2e --locked --no-fail-fast --test "$t" || rc=1; done
  return "$rc"
}

echo "== cargo test: unit and integration tests, and the infrastructure checks"
cargo test --workspace --exclude hashistack-e2e --locked --no-fail-fast 2>&1 | tee "$LOG_RUST"
rust_rc=${PIPESTATUS[0]}
cargo test -p hashistack-e2e --lib --locked 2>&1 | tee -a "$LOG_RUST"
[ "${PIPESTATUS[0]}" -ne 0 ] && rust_rc=1

echo "== infrastructure checks (pytest)"
"$HASHISTACK_PYTHON" -m pytest tests/infra -q -p no:cacheprovider 2>&1 | tee "$LOG_PY"
py_rc=${PIPESTATUS[0]}

echo "== end-to-end lab suites, $lanes lanes"
pids=()
for ((i = 0; i < lanes; i++)); do
  echo "lane $i:${lane_list[i]}"
  run_lane "${lane_list[i]}" > "target/test-e2e-lane-$i.log" 2>&1 &
  pids[i]=$!
done
for ((i = 0; i < lanes; i++)); do
  wait "${pids[i]}" || rust_rc=1
  echo "---- lane $i:${lane_list[i]}"
  cat "target/test-e2e-lane-$i.log"
  cat "target/test-e2e-lane-$i.log" >> "$LOG_RUST"
done

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
