#!/usr/bin/env bash
# Consul, Vault and Nomad at pinned versions from HashiCorp's signed apt repository; Docker (Ubuntu's
# docker.io) and jq from the Ubuntu archive.
set -euo pipefail

: "${CONSUL_VERSION:?CONSUL_VERSION is not set}"
: "${VAULT_VERSION:?VAULT_VERSION is not set}"
: "${NOMAD_VERSION:?NOMAD_VERSION is not set}"
: "${HASHICORP_APT_URL:?HASHICORP_APT_URL is not set}"
: "${HASHICORP_GPG_FINGERPRINT:?HASHICORP_GPG_FINGERPRINT is not set}"

export DEBIAN_FRONTEND=noninteractive
apt_get=(apt-get -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confold -y -q)
keyring=/usr/share/keyrings/hashicorp-archive-keyring.gpg

"${apt_get[@]}" update
"${apt_get[@]}" install --no-install-recommends ca-certificates curl gnupg

# The repository's signing key, accepted only if it is exactly the key HashiCorp publishes.
workdir="$(mktemp -d)"
trap 'rm -rf "${workdir}"' EXIT
curl --fail --silent --show-error --location --proto '=https' --tlsv1.2 \
  --output "${workdir}/hashicorp.asc" "${HASHICORP_APT_URL}/gpg"
keys="$(gpg --batch --show-keys --with-colons "${workdir}/hashicorp.asc")"
primary_count="$(printf '%s\n' "${keys}" | grep -c '^pub:' || true)"
fingerprint="$(printf '%s\n' "${keys}" | awk -F: '$1 == "fpr" { print $10; exit }')"
if [ "${primary_count}" != "1" ] || [ "${fingerprint}" != "${HASHICORP_GPG_FINGERPRINT}" ]; then
  echo "HashiCorp signing key: expected exactly one key with fingerprint ${HASHICORP_GPG_FINGERPRINT}," \
    "got ${primary_count} key(s), first fingerprint '${fingerprint}'" >&2
  exit 1
fi
gpg --batch --yes --dearmor --output "${keyring}" "${workdir}/hashicorp.asc"
chmod 0644 "${keyring}"

codename="$(awk -F= '$1 == "VERSION_CODENAME" { print $2 }' /etc/os-release)"
if [ -z "${codename}" ]; then
  echo "/etc/os-release names no VERSION_CODENAME" >&2
  exit 1
fi
echo "deb [signed-by=${keyring}] ${HASHICORP_APT_URL} ${codename} main" \
  >/etc/apt/sources.list.d/hashicorp.list

"${apt_get[@]}" update
# "<version>-*": exactly this upstream version, whatever HashiCorp's packaging revision.
"${apt_get[@]}" install --no-install-recommends \
  "consul=${CONSUL_VERSION}-*" \
  "vault=${VAULT_VERSION}-*" \
  "nomad=${NOMAD_VERSION}-*" \
  docker.io \
  jq
# The image is rebuilt to upgrade, never upgraded in place.
apt-mark hold consul vault nomad

"${apt_get[@]}" clean
consul version
vault version
nomad version
docker --version
jq --version
