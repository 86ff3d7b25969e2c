# Example inputs: copy to e.g. my.pkrvars.hcl (not committed) and adjust.
#   packer build -var-file=my.pkrvars.hcl packer/
# With a service principal, pass the secret in the environment: export PKR_VAR_client_secret=...

subscription_id                   = "00000000-0000-0000-0000-000000000000"
use_azure_cli_auth                = true
location                          = "westeurope"
managed_image_resource_group_name = "rg-hashistack-images"

# REQUIRED, no default: the https base URL of Microsoft's Linux package repository, as Microsoft's Azure CLI
# install instructions for Ubuntu name it (or your mirror of it). Left empty here, `packer validate` says so.
microsoft_apt_url = ""

# Optional gallery output (the image definition must exist: Linux, generalized, Hyper-V generation V2).
# gallery_name                = "hashistack_gallery"
# gallery_resource_group_name = "rg-hashistack-images"
# gallery_image_name          = "hashistack"
# gallery_image_version       = "1.0.0"
# gallery_replication_regions = ["northeurope"]

# Pinned versions (defaults in variables.pkr.hcl); override to build another combination.
# consul_version = "1.21.4"
# vault_version  = "1.20.4"
# nomad_version  = "1.10.5"
# azure_cli_version = "2.91.0"
