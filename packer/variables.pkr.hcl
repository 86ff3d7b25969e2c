# Inputs of the gold image build. Every version is pinned: an image is rebuilt, never upgraded in place.
# Copy example.pkrvars.hcl, fill it in, and pass it with -var-file (see packer/README.md).

# --- Azure authentication -------------------------------------------------------------------------------
# Either an Azure CLI login (use_azure_cli_auth = true) or a service principal (client_id/client_secret,
# best passed as PKR_VAR_client_secret in the environment rather than in a file).

variable "subscription_id" {
  type        = string
  description = "Subscription the build VM and the image live in."
}

variable "tenant_id" {
  type        = string
  default     = ""
  description = "Entra tenant of the service principal; empty with Azure CLI authentication."
}

variable "client_id" {
  type        = string
  default     = ""
  description = "Service principal application id; empty with Azure CLI authentication."
}

variable "client_secret" {
  type        = string
  default     = ""
  sensitive   = true
  description = "Service principal secret; empty with Azure CLI authentication."
}

variable "use_azure_cli_auth" {
  type        = bool
  default     = false
  description = "Authenticate with the operator's `az login` session instead of a service principal."
}

# --- Where the build runs and what it produces ---------------------------------------------------------

variable "location" {
  type        = string
  description = "Azure region of the temporary build VM (and of the managed image)."
}

variable "vm_size" {
  type        = string
  default     = "Standard_D2s_v5"
  description = "Size of the temporary build VM (must support generation 2 images)."
}

variable "managed_image_resource_group_name" {
  type        = string
  description = "Existing resource group that receives the managed image."
}

variable "managed_image_name_prefix" {
  type        = string
  default     = "hashistack"
  description = "The managed image is named <prefix>-<consul>-<vault>-<nomad>-<UTC timestamp>, e.g. hashistack-1.21.4-1.20.4-1.10.5-20261201120000."
}

variable "azure_tags" {
  type        = map(string)
  default     = {}
  description = "Extra tags for the build resources and the image."
}

# --- Optional Azure Compute Gallery (Shared Image Gallery) output ---------------------------------------
# Leave gallery_name empty to produce only the managed image.

variable "gallery_name" {
  type        = string
  default     = ""
  description = "Existing gallery to publish an image version to; empty: no gallery output."
}

variable "gallery_resource_group_name" {
  type        = string
  default     = ""
  description = "Resource group of the gallery."
}

variable "gallery_subscription_id" {
  type        = string
  default     = ""
  description = "Subscription of the gallery; empty: the build subscription."
}

variable "gallery_image_name" {
  type        = string
  default     = "hashistack"
  description = "Existing image definition (Linux, generalized, Hyper-V generation V2) in the gallery."
}

variable "gallery_image_version" {
  type        = string
  default     = ""
  description = "Version to publish, e.g. 1.0.0 (required with a gallery). Gallery versions are three integers, so the product versions travel in the version's tags (consul-version, vault-version, nomad-version)."

  validation {
    condition     = var.gallery_image_version == "" || can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.gallery_image_version))
    error_message = "The gallery_image_version must be MAJOR.MINOR.PATCH (three integers), e.g. 1.0.0."
  }
}

variable "gallery_replication_regions" {
  type        = list(string)
  default     = []
  description = "Regions to replicate the version to; the build location is always included."
}

# --- Base image: Ubuntu 24.04 LTS, Hyper-V generation 2 -------------------------------------------------

variable "image_publisher" {
  type    = string
  default = "Canonical"
}

variable "image_offer" {
  type    = string
  default = "ubuntu-24_04-lts"
}

variable "image_sku" {
  type        = string
  default     = "server"
  description = "\"server\" is the generation 2 SKU of the offer (\"server-gen1\" is generation 1)."
}

# --- What goes into the image ---------------------------------------------------------------------------

variable "consul_version" {
  type        = string
  default     = "1.21.4"
  description = "Exact Consul version from HashiCorp's apt repository."

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.consul_version))
    error_message = "The consul_version must be an exact release such as 1.21.4: images pin their versions."
  }
}

variable "vault_version" {
  type        = string
  default     = "1.20.4"
  description = "Exact Vault version from HashiCorp's apt repository."

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.vault_version))
    error_message = "The vault_version must be an exact release such as 1.20.4: images pin their versions."
  }
}

variable "nomad_version" {
  type        = string
  default     = "1.10.5"
  description = "Exact Nomad version from HashiCorp's apt repository."

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.nomad_version))
    error_message = "The nomad_version must be an exact release such as 1.10.5: images pin their versions."
  }
}

variable "hashicorp_apt_url" {
  type        = string
  default     = "https://apt.releases.hashicorp.com"
  description = "HashiCorp's signed apt repository (or an internal mirror of it)."
}

variable "hashicorp_gpg_fingerprint" {
  type        = string
  default     = "798AEC654E5C15428C8E42EEAA16FCBCA621E701"
  description = "Fingerprint the repository's signing key must have, as HashiCorp publishes it."
}

variable "azure_cli_version" {
  type        = string
  default     = "2.91.0"
  description = "Exact Azure CLI version from Microsoft's apt repository: the jumpbox runbooks use az (az login --use-device-code)."

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.azure_cli_version))
    error_message = "The azure_cli_version must be an exact release such as 2.91.0: images pin their versions."
  }
}

variable "microsoft_apt_url" {
  type        = string
  description = "Base URL of Microsoft's Linux package repository, as Microsoft's Azure CLI install instructions for Ubuntu name it (or an internal mirror of it): its signing key is <url>/keys/microsoft.asc and the Azure CLI is in <url>/repos/azure-cli/. No default: set it in your variables file."

  validation {
    condition     = can(regex("^https://[^ ]+[^/ ]$", var.microsoft_apt_url))
    error_message = "Set microsoft_apt_url to the https base URL of Microsoft's Linux package repository (no trailing slash), as Microsoft's Azure CLI install instructions for Ubuntu name it."
  }
}

variable "microsoft_gpg_fingerprint" {
  type        = string
  default     = "BC528686B50D79E339D3721CEB3E94ADBE1229CF"
  description = "Fingerprint Microsoft's repository signing key (keys/microsoft.asc) must have, as Microsoft publishes it."
}

variable "agent_binary" {
  type        = string
  default     = ""
  description = "hashistack-agent binary to bake in; empty: target/release/hashistack-agent of this repository."
}
