# The hashistack gold image: Ubuntu 24.04 LTS (gen2) + Consul, Vault, Nomad (pinned, from HashiCorp's signed
# apt repository), the Azure CLI (pinned, from Microsoft's signed apt repository), Docker and jq, the service users and directories, the hardened units of systemd/ and the
# hashistack-agent binary. Only hashistack-agent.service is enabled: at every boot it reads the VM's tags and
# starts what the node's role needs.
#
#   cargo build --release -p hashistack-agent      # from the repository root, first
#   packer init packer/
#   packer build -var-file=my.pkrvars.hcl packer/
#
# The build ends with `hashistack-agent image verify` (the image contract, agent/src/image/) and the Azure
# VM agent's deprovisioning, in that order: nothing may run after deprovisioning.

packer {
  required_version = ">= 1.10.0"
  required_plugins {
    azure = {
      source  = "github.com/hashicorp/azure"
      version = "~> 2.1"
    }
  }
}

locals {
  build_stamp = formatdate("YYYYMMDDhhmmss", timestamp())

  # The versions it carries, then when it was built (a managed image name allows letters, digits, '.', '-', '_').
  managed_image_name = "${var.managed_image_name_prefix}-${var.consul_version}-${var.vault_version}-${var.nomad_version}-${local.build_stamp}"

  agent_binary = var.agent_binary != "" ? var.agent_binary : "${path.root}/../target/release/hashistack-agent"

  gallery_subscription_id = var.gallery_subscription_id != "" ? var.gallery_subscription_id : var.subscription_id
  gallery_regions         = distinct(concat([var.location], var.gallery_replication_regions))

  tags = merge(var.azure_tags, {
    "hashistack-image" = "true"
    "consul-version"   = var.consul_version
    "vault-version"    = var.vault_version
    "nomad-version"    = var.nomad_version
  })

  # Scripts run as root through sudo, with the pinned versions in their environment.
  sudo_execute = "chmod +x {{ .Path }}; {{ .Vars }} sudo -E bash '{{ .Path }}'"
}

source "azure-arm" "hashistack" {
  subscription_id    = var.subscription_id
  tenant_id          = var.tenant_id
  client_id          = var.client_id
  client_secret      = var.client_secret
  use_azure_cli_auth = var.use_azure_cli_auth

  location = var.location
  vm_size  = var.vm_size

  os_type         = "Linux"
  image_publisher = var.image_publisher
  image_offer     = var.image_offer
  image_sku       = var.image_sku

  managed_image_name                = local.managed_image_name
  managed_image_resource_group_name = var.managed_image_resource_group_name

  azure_tags = local.tags

  # Also publish a version to an Azure Compute Gallery image definition (when gallery_name is set), replicated to
  # the build region and gallery_replication_regions. A managed image lives in one region and cannot back a
  # Trusted Launch VM; a gallery version can be replicated to every region that deploys the cluster, and its
  # image definition can declare Trusted Launch support.
  dynamic "shared_image_gallery_destination" {
    for_each = var.gallery_name == "" ? [] : [var.gallery_name]
    content {
      subscription   = local.gallery_subscription_id
      resource_group = var.gallery_resource_group_name
      gallery_name   = shared_image_gallery_destination.value
      image_name     = var.gallery_image_name
      image_version  = var.gallery_image_version

      dynamic "target_region" {
        for_each = local.gallery_regions
        content {
          name = target_region.value
        }
      }
    }
  }
}

build {
  name    = "hashistack"
  sources = ["source.azure-arm.hashistack"]

  # cloud-init runs apt on the build VM's first boot; wait for it so the apt calls below do not collide.
  provisioner "shell" {
    execute_command = local.sudo_execute
    script          = "${path.root}/scripts/00-wait-cloud-init.sh"
  }

  # Upload what this repository builds: the agent binary and the units. The build user cannot write
  # system paths, so they are staged in /tmp and installed by 40-agent-and-units.sh.
  provisioner "shell" {
    inline = ["mkdir -p /tmp/hashistack/systemd"]
  }

  provisioner "file" {
    source      = local.agent_binary
    destination = "/tmp/hashistack/hashistack-agent"
  }

  provisioner "file" {
    source      = "${path.root}/../systemd/"
    destination = "/tmp/hashistack/systemd/"
  }

  provisioner "shell" {
    execute_command = local.sudo_execute
    environment_vars = [
      "CONSUL_VERSION=${var.consul_version}",
      "VAULT_VERSION=${var.vault_version}",
      "NOMAD_VERSION=${var.nomad_version}",
      "HASHICORP_APT_URL=${var.hashicorp_apt_url}",
      "HASHICORP_GPG_FINGERPRINT=${var.hashicorp_gpg_fingerprint}",
      "AZURE_CLI_VERSION=${var.azure_cli_version}",
      "CNI_PLUGINS_VERSION=${var.cni_plugins_version}",
      "MICROSOFT_APT_URL=${var.microsoft_apt_url}",
      "MICROSOFT_GPG_FINGERPRINT=${var.microsoft_gpg_fingerprint}",
    ]
    scripts = [
      "${path.root}/scripts/10-users.sh",
      "${path.root}/scripts/20-packages.sh",
      "${path.root}/scripts/30-layout.sh",
      "${path.root}/scripts/40-agent-and-units.sh",
    ]
  }

  # The image contract: binaries and versions, users, directories and modes, units and which are enabled.
  # A failure here fails the build, before anything is captured.
  provisioner "shell" {
    execute_command = local.sudo_execute
    inline          = ["/usr/local/bin/hashistack-agent image verify"]
  }

  # Generalize: remove the build user, SSH host keys, DHCP leases and the VM agent's state. Must be last.
  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; {{ .Vars }} sudo -E sh '{{ .Path }}'"
    inline_shebang  = "/bin/sh -x"
    inline          = ["/usr/sbin/waagent -force -deprovision+user && export HISTSIZE=0 && sync"]
  }

  post-processor "manifest" {
    output     = "packer-manifest.json"
    strip_path = true
    custom_data = {
      consul_version = var.consul_version
      vault_version  = var.vault_version
      nomad_version  = var.nomad_version
    }
  }
}
