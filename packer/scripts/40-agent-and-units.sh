#!/usr/bin/env bash
# The agent binary and the units from this repository; only hashistack-agent.service is enabled.
set -euo pipefail

staging=/tmp/hashistack

install -o root -g root -m 0755 "${staging}/hashistack-agent" /usr/local/bin/hashistack-agent

# /etc/systemd/system, not /usr/lib/systemd/system: the HashiCorp packages install their own consul, vault
# and nomad units in /usr/lib/systemd/system, and units in /etc/systemd/system take precedence over them.
for unit in hashistack-agent hashistack-data hashistack-imds-guard hashistack-snapshot consul vault nomad nomad-client; do
  install -o root -g root -m 0644 "${staging}/systemd/${unit}.service" "/etc/systemd/system/${unit}.service"
done
install -o root -g root -m 0644 "${staging}/systemd/hashistack-snapshot.timer" /etc/systemd/system/hashistack-snapshot.timer
# The IMDS guard's rules (docs/trust-model.md#workloads-and-imds), checked before they are installed.
for rules in hashistack-imds-guard hashistack-imds-workers; do
  nft -c -f "${staging}/systemd/${rules}.nft"
  install -o root -g root -m 0644 "${staging}/systemd/${rules}.nft" "/etc/hashistack/nftables/${rules}.nft"
done
systemctl daemon-reload

# The agent starts the services a node's role needs at every boot; nothing else may start them at boot.
# hashistack-data.service (the data disk) is pulled in by the agent's unit (Wants=), not enabled on its own.
# hashistack-imds-guard.service is enabled: it must run at every boot, before Docker and Nomad.
systemctl enable hashistack-agent.service hashistack-imds-guard.service
# The snapshot timer (docs/runbooks.md#snapshots): on every VM; its service is skipped where no data disk is mounted.
systemctl enable hashistack-snapshot.timer
for unit in consul vault nomad nomad-client; do
  rm -f "/etc/systemd/system/multi-user.target.wants/${unit}.service"
done
# Docker runs on workers only: nomad-client.service pulls it in there.
systemctl disable --now docker.service docker.socket containerd.service

rm -rf "${staging}"
# For the build log only.
systemctl list-unit-files --no-pager 'hashistack-agent.service' 'hashistack-snapshot.*' 'consul.service' 'vault.service' \
  'nomad*.service' 'docker.*' 'containerd.service' || true
