#!/usr/bin/env bash
# Wait for cloud-init's first-boot work on the build VM: it runs apt, and our apt calls must not collide.
set -euo pipefail

rc=0
cloud-init status --wait >/dev/null || rc=$?
# 0: done. 2: done with recoverable errors (for instance a deprecated key in the platform's user data),
# which do not concern the image. Anything else is a broken build VM.
if [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then
  echo "cloud-init failed on the build VM (cloud-init status exit code ${rc})" >&2
  cloud-init status --long >&2 || true
  exit 1
fi
echo "cloud-init finished (status ${rc})"
