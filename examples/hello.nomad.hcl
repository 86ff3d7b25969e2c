# hello: the first job of docs/getting-started.md, and the job of the smoke test.
#
# A web service (Docker, busybox httpd) that Consul health-checks, serving a greeting it reads from Vault through
# the task's workload identity: Nomad (>= 1.7) signs a JWT for the task, Vault's JWT auth method exchanges it for
# a short-lived Vault token, and no Vault token is ever given to Nomad or written into the job.
#
# What the cluster needs before this job can run, and what the deployment does not set up yet:
# docs/getting-started.md#8-run-a-first-job. Then, on the jumpbox:
#
#   source /etc/hashistack/operator/vault.env && export VAULT_TOKEN=<a token that may write secret/>
#   vault kv put secret/default/hello/config greeting="hello from Vault"
#   source /etc/hashistack/operator/nomad.env && export NOMAD_TOKEN=<a token that may submit jobs>
#   nomad job run examples/hello.nomad.hcl
#   nomad job status hello
#
# The secret's path follows the policy `nomad setup vault` creates: a job may read
# secret/data/<its namespace>/<its job id>/*, here secret/data/default/hello/config.

job "hello" {
  type        = "service"
  datacenters = ["*"] # every datacenter; the agent renders the hashistack-datacenter tag (default dc1)

  group "web" {
    count = 1

    network {
      port "http" {
        to = 8080 # the container's port; Nomad maps a dynamic host port to it
      }
    }

    service {
      name     = "hello"
      provider = "consul"
      port     = "http"

      # Consul registers the service with a token it gives this identity (the JWT auth method `nomad setup
      # consul` creates), not with a token of the Nomad agent's.
      identity {
        aud = ["consul.io"]
        ttl = "1h"
      }

      check {
        name     = "http"
        type     = "http"
        path     = "/"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "web" {
      driver = "docker"

      config {
        image   = "busybox:1.36"
        command = "httpd"
        args    = ["-f", "-p", "8080", "-h", "/local/www"]
        ports   = ["http"]
      }

      # Vault through workload identity: the role `nomad setup vault` creates.
      vault {
        role = "nomad-workloads"
      }

      # The identity Nomad presents to Vault (the name vault_default is the default Vault cluster's).
      identity {
        name = "vault_default"
        aud  = ["vault.io"]
        ttl  = "1h"
      }

      # KV version 2 at secret/: the API path has data/ in it.
      template {
        data        = <<-EOT
          {{ with secret "secret/data/default/hello/config" }}{{ .Data.data.greeting }}{{ end }}
        EOT
        destination = "local/www/index.html"
        change_mode = "noop" # httpd reads the file at every request
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
