#!/usr/bin/env bash
# Service users and groups, created before the packages are installed: HashiCorp's maintainer scripts only
# create them when they are missing, so ours (system accounts, no login shell, no home directory of their
# own) are the ones the image keeps.
set -euo pipefail

for svc in consul vault nomad; do
  if ! getent group "${svc}" >/dev/null; then
    groupadd --system "${svc}"
  fi
  if ! getent passwd "${svc}" >/dev/null; then
    useradd --system --gid "${svc}" --no-create-home --home-dir "/opt/${svc}" \
      --shell /usr/sbin/nologin --comment "HashiCorp ${svc} (hashistack)" "${svc}"
  fi
  id "${svc}"
done
