#!/usr/bin/env bash
# Directories with their owners and modes (the image contract in agent/src/image/ checks every one),
# and removal of what the packages install that must not reach a node.
set -euo pipefail

: "${CONSUL_VERSION:?CONSUL_VERSION is not set}"
: "${VAULT_VERSION:?VAULT_VERSION is not set}"
: "${NOMAD_VERSION:?NOMAD_VERSION is not set}"

# path owner group mode
# /var/lib/hashistack-data is the mount point of the server tiers' data disk (hashistack-data.service formats
# it when blank and mounts it at boot); on the OS disk it stays empty.
# /etc/hashistack is traversable so operators reach /etc/hashistack/operator (CA, CLI environments) without sudo;
# what is secret below it keeps its own mode. /etc/hashistack/nftables holds the IMDS guard's rules
# (40-agent-and-units.sh installs them).
layout=(
  "/etc/hashistack root root 0755"
  "/etc/hashistack/env root root 0750"
  "/etc/hashistack/nftables root root 0755"
  "/etc/consul.d consul consul 0750"
  "/opt/consul consul consul 0750"
  "/etc/vault.d vault vault 0750"
  "/opt/vault vault vault 0750"
  "/etc/nomad.d root nomad 0750"
  "/opt/nomad nomad nomad 0750"
  "/var/lib/hashistack-data root root 0755"
)
for entry in "${layout[@]}"; do
  read -r path owner group mode <<<"${entry}"
  install -d "${path}"
  chown "${owner}:${group}" "${path}"
  chmod "${mode}" "${path}"
done

# The packages' sample configs: every file in the config directories is loaded, so they would be merged
# into the config the agent renders.
rm -f \
  /etc/consul.d/consul.hcl /etc/consul.d/consul.env \
  /etc/vault.d/vault.hcl /etc/vault.d/vault.env /etc/vault.d/agent.hcl \
  /etc/nomad.d/nomad.hcl /etc/nomad.d/nomad.env /etc/nomad.d/client.hcl /etc/nomad.d/server.hcl
# The vault package generates a self-signed key pair at install time: baked into an image, every VM would
# share that private key. The agent issues each node its own certificate.
rm -rf /opt/vault/tls

# The vault package gives /usr/bin/vault the cap_ipc_lock file capability for mlock. The rendered config
# sets disable_mlock (HashiCorp's advice with integrated storage) and vault.service keeps an empty
# capability bounding set, under which a binary with a file capability cannot even be executed.
vault_caps="$(getcap /usr/bin/vault)"
if [ -n "${vault_caps}" ]; then
  setcap -r /usr/bin/vault
fi

# What this image carries, for `hashistack-agent image verify` and `status`.
jq -n --arg consul "${CONSUL_VERSION}" --arg vault "${VAULT_VERSION}" --arg nomad "${NOMAD_VERSION}" \
  '{consul: $consul, vault: $vault, nomad: $nomad}' >/etc/hashistack/image.json
chown root:root /etc/hashistack/image.json
chmod 0644 /etc/hashistack/image.json
