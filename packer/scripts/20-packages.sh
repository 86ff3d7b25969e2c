#!/usr/bin/env bash
# Consul, Vault and Nomad at pinned versions from HashiCorp's signed apt repository; the Azure CLI at a pinned
# version from Microsoft's signed apt repository (operators use az on the jumpbox); Docker (Ubuntu's docker.io)
# jq, nftables (the IMDS guard's rules) and the CNI reference plugins (containernetworking-plugins, pinned) from the
# Ubuntu archive.
set -euo pipefail

: "${CONSUL_VERSION:?CONSUL_VERSION is not set}"
: "${VAULT_VERSION:?VAULT_VERSION is not set}"
: "${NOMAD_VERSION:?NOMAD_VERSION is not set}"
: "${HASHICORP_APT_URL:?HASHICORP_APT_URL is not set}"
: "${HASHICORP_GPG_FINGERPRINT:?HASHICORP_GPG_FINGERPRINT is not set}"
: "${AZURE_CLI_VERSION:?AZURE_CLI_VERSION is not set}"
: "${CNI_PLUGINS_VERSION:?CNI_PLUGINS_VERSION is not set}"
: "${MICROSOFT_APT_URL:?MICROSOFT_APT_URL is not set}"
: "${MICROSOFT_GPG_FINGERPRINT:?MICROSOFT_GPG_FINGERPRINT is not set}"

export DEBIAN_FRONTEND=noninteractive
apt_get=(apt-get -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confold -y -q)
hashicorp_keyring=/usr/share/keyrings/hashicorp-archive-keyring.gpg
microsoft_keyring=/usr/share/keyrings/microsoft-archive-keyring.gpg

"${apt_get[@]}" update
"${apt_get[@]}" install --no-install-recommends ca-certificates curl gnupg

workdir="$(mktemp -d)"
trap 'rm -rf "${workdir}"' EXIT

# install_key NAME URL FINGERPRINT KEYRING: a repository's signing key, accepted only if it is exactly the key its
# publisher publishes.
install_key() {
  local name="$1" url="$2" want="$3" keyring="$4"
  local keys primary_count fingerprint
  curl --fail --silent --show-error --location --proto '=https' --tlsv1.2 --output "${workdir}/${name}.asc" "${url}"
  keys="$(gpg --batch --show-keys --with-colons "${workdir}/${name}.asc")"
  primary_count="$(printf '%s\n' "${keys}" | grep -c '^pub:' || true)"
  fingerprint="$(printf '%s\n' "${keys}" | awk -F: '$1 == "fpr" { print $10; exit }')"
  if [ "${primary_count}" != "1" ] || [ "${fingerprint}" != "${want}" ]; then
    echo "${name} signing key: expected exactly one key with fingerprint ${want}," \
      "got ${primary_count} key(s), first fingerprint '${fingerprint}'" >&2
    exit 1
  fi
  gpg --batch --yes --dearmor --output "${keyring}" "${workdir}/${name}.asc"
  chmod 0644 "${keyring}"
}

install_key HashiCorp "${HASHICORP_APT_URL}/gpg" "${HASHICORP_GPG_FINGERPRINT}" "${hashicorp_keyring}"
install_key Microsoft "${MICROSOFT_APT_URL}/keys/microsoft.asc" "${MICROSOFT_GPG_FINGERPRINT}" "${microsoft_keyring}"

codename="$(awk -F= '$1 == "VERSION_CODENAME" { print $2 }' /etc/os-release)"
if [ -z "${codename}" ]; then
  echo "/etc/os-release names no VERSION_CODENAME" >&2
  exit 1
fi
echo "deb [signed-by=${hashicorp_keyring}] ${HASHICORP_APT_URL} ${codename} main" \
  >/etc/apt/sources.list.d/hashicorp.list
echo "deb [arch=$(dpkg --print-architecture) signed-by=${microsoft_keyring}] ${MICROSOFT_APT_URL}/repos/azure-cli/ ${codename} main" \
  >/etc/apt/sources.list.d/azure-cli.list

"${apt_get[@]}" update
# "<version>-*": exactly this upstream version, whatever HashiCorp's packaging revision. The Azure CLI's packages
# are versioned "<version>-1~<codename>".
"${apt_get[@]}" install --no-install-recommends \
  "consul=${CONSUL_VERSION}-*" \
  "vault=${VAULT_VERSION}-*" \
  "nomad=${NOMAD_VERSION}-*" \
  "azure-cli=${AZURE_CLI_VERSION}-1~${codename}" \
  docker.io \
  "containernetworking-plugins=${CNI_PLUGINS_VERSION}*" \
  jq \
  nftables
# The image is rebuilt to upgrade, never upgraded in place.
apt-mark hold consul vault nomad azure-cli containernetworking-plugins

"${apt_get[@]}" clean
consul version
vault version
nomad version
# A throw-away config directory: az writes its settings on first use, which must not stay in root's home.
AZURE_CONFIG_DIR="${workdir}/azure" AZURE_CORE_COLLECT_TELEMETRY=false az version --output json
docker --version
jq --version
nft --version
# The CNI reference plugins in /usr/lib/cni (Nomad's client cni_path; image verify checks them).
dpkg-query -W containernetworking-plugins
ls -l /usr/lib/cni/bridge /usr/lib/cni/firewall /usr/lib/cni/host-local /usr/lib/cni/loopback /usr/lib/cni/portmap
