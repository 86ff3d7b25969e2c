"""The checks behind tests/infra/test_arm.py. Each returns a list of problems; empty means the check passes.
test_mutations.py feeds them broken copies to prove that every one of them can fail."""
from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import re
from typing import Any

from armlib import (CTX, ArmExprError, Evaluator, SchemaSet, calls_in, is_expr, literal_names, markdown_tables,
                    parse_expr, strings_in, strip_md, walk_ast)

ROLE_OF_TIER = {"consul": "consul-server", "vault": "vault-server", "nomad": "nomad-server",
                "workers": "worker", "jumpbox": "jumpbox"}
TIERS = list(ROLE_OF_TIER)
SERVER_TIERS = ["consul", "vault", "nomad"]

# Built-in roles this template may use, with their permissions (Azure built-in role definitions).
BUILTIN_ROLES = {
    "acdd72a7-3385-48ef-bd42-f606fba81ae7": ("Reader", set()),
    "e147488a-f6f5-4113-8e2d-b22465e65bf6": ("Key Vault Crypto Service Encryption User", {
        "Microsoft.KeyVault/vaults/keys/read",
        "Microsoft.KeyVault/vaults/keys/wrap/action",
        "Microsoft.KeyVault/vaults/keys/unwrap/action"}),
    "4633458b-17de-408a-b874-0445c86b69e6": ("Key Vault Secrets User", {
        "Microsoft.KeyVault/vaults/secrets/getSecret/action",
        "Microsoft.KeyVault/vaults/secrets/readMetadata/action"}),
    "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1": ("Storage Blob Data Reader", {
        "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read"}),
}

BLOB = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs"
ESCROW_BLOB_WRITE_ONLY = {f"{BLOB}/write", f"{BLOB}/add/action"}
ESCROW_SECRET_WRITE_ONLY = {"Microsoft.KeyVault/vaults/secrets/setSecret/action"}
ESCROW_KEY_WRAP_ONLY = {"Microsoft.KeyVault/vaults/keys/wrap/action"}

# apiVersions older than two years are accepted only for these types, and only while they are still the newest
# stable version of the type in the schema set (there is nothing newer to move to).
STALE_API_OK = {
    "Microsoft.Authorization/roleAssignments": "2022-04-01 is the newest stable roleAssignments API",
    "Microsoft.Authorization/roleDefinitions": "2022-04-01 is the newest stable roleDefinitions API",
    "Microsoft.ManagedIdentity/userAssignedIdentities": "2024-11-30 is the newest stable version in the schema set",
}
MAX_API_AGE_DAYS = 730


def resources_of(t: dict, rtype: str) -> list[dict]:
    return [r for r in t.get("resources", []) if r.get("type", "").lower() == rtype.lower()]


def resource_id(ev: Evaluator, r: dict) -> str:
    names = ev.value(r["name"]).split("/")
    return ev.fn_resourceid(r["type"], *names)


# ============================================================================================ schema

def check_template_schema(t: dict, schemas: SchemaSet) -> list[str]:
    problems = [f"template: {e}" for e in schemas.errors(t, "2019-04-01/deploymentTemplate.json#")]
    for n, r in enumerate(t.get("resources", [])):
        label = f"resources[{n}] {r.get('type')} {r.get('name')}"
        if not schemas.has_type(r.get("apiVersion", ""), r.get("type", "")):
            problems.append(f"{label}: apiVersion {r.get('apiVersion')} has no schema for this type")
            continue
        problems += [f"{label}: {e}" for e in schemas.resource_errors(r)]
    return problems


def check_parameters_file(t: dict, pf: dict, schemas: SchemaSet) -> list[str]:
    problems = [f"parameters file: {e}" for e in schemas.errors(pf, "2019-04-01/deploymentParameters.json#")]
    declared = t.get("parameters", {})
    for name in pf.get("parameters", {}):
        if name not in declared:
            problems.append(f"parameters file sets {name!r}, which the template does not declare")
    for name, decl in declared.items():
        if "defaultValue" not in decl and name not in pf.get("parameters", {}):
            problems.append(f"parameters file lacks required parameter {name!r}")
    return problems


def check_uidef_schema(ui: dict, schemas: SchemaSet) -> list[str]:
    return [f"createUiDefinition: {e}" for e in
            schemas.errors(ui, "0.1.2-preview/CreateUIDefinition.MultiVm.json#")]


# ============================================================================================ structure

def check_parameters_used(t: dict) -> list[str]:
    problems = []
    declared = set(t.get("parameters", {}))
    body = {k: v for k, v in t.items() if k != "parameters"}
    used = literal_names(body, "parameters") | literal_names(t.get("parameters", {}), "parameters")
    for name in sorted(declared - used):
        problems.append(f"parameter {name!r} is declared but never used")
    for name in sorted(used - declared):
        problems.append(f"parameter {name!r} is used but not declared")
    # every parameters() call must name its parameter literally (so the above is complete)
    for path, args in calls_in(t, "parameters"):
        if not args or args[0][0] != "str":
            problems.append(f"{path}: parameters() with a computed name")
    vdecl = set(t.get("variables", {}))
    vused = literal_names(t, "variables")
    for name in sorted(vdecl - vused):
        problems.append(f"variable {name!r} is declared but never used")
    for name in sorted(vused - vdecl):
        problems.append(f"variable {name!r} is used but not declared")
    for name, decl in t.get("parameters", {}).items():
        if not decl.get("metadata", {}).get("description"):
            problems.append(f"parameter {name!r} has no metadata.description (quickstart convention)")
    return problems


def check_no_hardcoded_location(t: dict) -> list[str]:
    problems = []
    loc = t.get("parameters", {}).get("location")
    if not loc:
        return ["the template has no 'location' parameter"]
    if loc.get("defaultValue") != "[resourceGroup().location]":
        problems.append(f"parameter location defaults to {loc.get('defaultValue')!r}, not [resourceGroup().location]")
    for r in t.get("resources", []):
        if "location" in r and r["location"] != "[parameters('location')]":
            problems.append(f"{r['type']} {r['name']}: location is {r['location']!r}")
    return problems


def check_api_versions(t: dict, schemas: SchemaSet, today: dt.date) -> list[str]:
    problems = []
    for r in t.get("resources", []):
        rtype, api = r.get("type", ""), r.get("apiVersion", "")
        label = f"{rtype} {r.get('name')} @{api}"
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", api):
            problems.append(f"{label}: not a stable (non-preview) apiVersion")
            continue
        if not schemas.has_type(api, rtype):
            problems.append(f"{label}: not in the schema set")
            continue
        age = (today - dt.date.fromisoformat(api)).days
        if age >= MAX_API_AGE_DAYS:
            newest = [v for v in schemas.versions_of(rtype) if re.fullmatch(r"\d{4}-\d{2}-\d{2}", v)][-1:]
            if rtype in STALE_API_OK and newest == [api]:
                continue
            problems.append(f"{label}: {age} days old (limit {MAX_API_AGE_DAYS}); newest in the schema set: {newest}")
    return problems


SECRET_NAME = re.compile(r"(password|passwd|secret|token|credential|privatekey|connectionstring|sastoken|accountkey)",
                         re.I)


def check_secrets(t: dict) -> list[str]:
    problems = []
    params = t.get("parameters", {})
    secure = {n for n, d in params.items() if d.get("type", "").lower() in ("securestring", "secureobject")}
    for name, decl in params.items():
        if name in secure and "defaultValue" in decl:
            problems.append(f"secure parameter {name!r} has a default value")
        if SECRET_NAME.search(name) and name not in secure:
            problems.append(f"parameter {name!r} looks like a secret but is {decl.get('type')!r}, not secureString")
    for var, value in t.get("variables", {}).items():
        if SECRET_NAME.search(var):
            problems.append(f"variable {var!r} looks like a secret: secrets only come from secureString parameters")
    # Properties that carry secrets must come straight from a secure parameter.
    for r in t.get("resources", []):
        for path, s in strings_in(r.get("properties", {})):
            key = path.rsplit("/", 1)[-1]
            is_value_of_secret = r.get("type", "").lower() == "microsoft.keyvault/vaults/secrets" and path == "/value"
            if (SECRET_NAME.search(key) and key != s) or is_value_of_secret:
                m = re.fullmatch(r"\[parameters\('([^']+)'\)\]", s)
                if not (m and m.group(1) in secure):
                    problems.append(f"{r['type']} {r['name']}: {path} is not a secureString parameter")
        os_profile = r.get("properties", {}).get("osProfile") or \
            r.get("properties", {}).get("virtualMachineProfile", {}).get("osProfile")
        if os_profile is not None and "adminPassword" in os_profile:
            problems.append(f"{r['type']} {r['name']}: sets adminPassword (SSH keys only)")
    return problems


def check_outputs_no_secret(t: dict) -> list[str]:
    problems = []
    params = t.get("parameters", {})
    secure = {n for n, d in params.items() if d.get("type", "").lower() in ("securestring", "secureobject")}
    for name, out in t.get("outputs", {}).items():
        if out.get("type", "").lower() in ("securestring", "secureobject"):
            problems.append(f"output {name!r} has a secure type")
        if SECRET_NAME.search(name):
            problems.append(f"output {name!r} is named like a secret")
        for pname in literal_names(out, "parameters"):
            if pname in secure:
                problems.append(f"output {name!r} exposes secure parameter {pname!r}")
        for _, s in strings_in(out):
            if is_expr(s):
                for node in walk_ast(parse_expr(s)):
                    if node[0] == "call" and node[1].lower().startswith("list"):
                        problems.append(f"output {name!r} calls {node[1]}() (keys, SAS or secrets)")
                    if node[0] == "prop" and SECRET_NAME.search(node[2]):
                        problems.append(f"output {name!r} reads property {node[2]!r}")
    return problems


def check_uidef_outputs(t: dict, ui: dict) -> list[str]:
    problems = []
    params = t.get("parameters", {})
    uparams = ui.get("parameters", {})
    outputs = uparams.get("outputs", {})
    basics = {e["name"] for e in uparams.get("basics", [])}
    steps: dict[str, set[str]] = {}
    for step in uparams.get("steps", []):
        names = set()
        for el in step.get("elements", []):
            names.add(el["name"])
            for sub in el.get("elements", []):
                names.add(f"{el['name']}.{sub['name']}")
        steps[step["name"]] = names
    for name in outputs:
        if name not in params:
            problems.append(f"createUiDefinition output {name!r} is not a template parameter")
    for name, decl in params.items():
        if "defaultValue" not in decl and name not in outputs:
            problems.append(f"template parameter {name!r} has no default and no createUiDefinition output")
    for name, value in outputs.items():
        if not is_expr(value):
            problems.append(f"output {name!r} is a constant, not a UI element")
            continue
        refs = 0
        for node in walk_ast(parse_expr(value)):
            if node[0] == "call" and node[1] == "basics":
                refs += 1
                el = node[2][0][1] if node[2] and node[2][0][0] == "str" else None
                if el not in basics:
                    problems.append(f"output {name!r} refers to basics({el!r}), which does not exist")
            if node[0] == "call" and node[1] == "steps":
                refs += 1
            if node[0] == "call" and node[1] == "location":
                refs += 1
        for m in re.finditer(r"steps\('([^']+)'\)((?:\.[A-Za-z0-9_]+)+)", value):
            step, chain = m.group(1), m.group(2).lstrip(".").split(".")
            if step not in steps:
                problems.append(f"output {name!r} refers to step {step!r}, which does not exist")
                continue
            if chain[0] not in steps[step] and ".".join(chain[:2]) not in steps[step]:
                problems.append(f"output {name!r} refers to {step}.{'.'.join(chain)}, which does not exist")
        if refs == 0:
            problems.append(f"output {name!r} does not come from a UI element")
        if "defaultValue" not in params.get(name, {"defaultValue": 0}) and refs == 0:
            problems.append(f"required parameter {name!r} has no UI element")
    if outputs.get("location") not in (None, "[location()]"):
        problems.append("output location must be [location()]")
    return problems


METADATA_REQUIRED = {"$schema", "itemDisplayName", "description", "summary", "githubUsername", "dateUpdated", "type"}
METADATA_ALLOWED = METADATA_REQUIRED | {"docOwner", "validationType", "icon", "tags", "environments", "languages"}


def check_metadata(md: dict) -> list[str]:
    """The quickstart repository's metadata.json rules."""
    problems = []
    for k in sorted(METADATA_REQUIRED - set(md)):
        problems.append(f"metadata.json lacks {k!r}")
    for k in sorted(set(md) - METADATA_ALLOWED):
        problems.append(f"metadata.json has unknown key {k!r}")
    if md.get("$schema") != "https://aka.ms/azure-quickstart-templates-metadata-schema#":
        problems.append("metadata.json $schema is not the quickstart metadata schema")
    for key, lo, hi in (("itemDisplayName", 10, 60), ("description", 10, 1000), ("summary", 10, 200)):
        n = len(md.get(key, ""))
        if not lo <= n <= hi:
            problems.append(f"metadata.json {key} has {n} characters (allowed {lo}-{hi})")
    if not re.fullmatch(r"[a-zA-Z\d](?:[a-zA-Z\d]|-(?=[a-zA-Z\d])){0,38}", md.get("githubUsername", "")):
        problems.append("metadata.json githubUsername is not a GitHub user name")
    if not re.fullmatch(r"20[1-9]\d-(0[1-9]|1[012])-(0[1-9]|[12]\d|3[01])", md.get("dateUpdated", "")):
        problems.append("metadata.json dateUpdated is not YYYY-MM-DD")
    if md.get("type") not in ("QuickStart", "Application"):
        problems.append(f"metadata.json type {md.get('type')!r}")
    for env in md.get("environments", []):
        if env not in ("AzureCloud", "AzureUSGovernment", "AzureChinaCloud", "AzureGermanCloud"):
            problems.append(f"metadata.json environment {env!r}")
    return problems


# ============================================================================================ hardening

def check_storage_and_key_vaults(t: dict) -> list[str]:
    problems = []
    for r in resources_of(t, "Microsoft.Storage/storageAccounts"):
        p = r.get("properties", {})
        want = {"allowSharedKeyAccess": False, "allowBlobPublicAccess": False, "minimumTlsVersion": "TLS1_2",
                "supportsHttpsTrafficOnly": True}
        for k, v in want.items():
            if p.get(k) != v:
                problems.append(f"storage {r['name']}: {k} is {p.get(k)!r}, want {v!r}")
        if p.get("networkAcls", {}).get("defaultAction") != "Deny":
            problems.append(f"storage {r['name']}: firewall default action is not Deny")
    for r in resources_of(t, "Microsoft.Storage/storageAccounts/blobServices"):
        if r.get("properties", {}).get("isVersioningEnabled") is not True:
            problems.append(f"blob service {r['name']}: versioning is off")
    if not resources_of(t, "Microsoft.Storage/storageAccounts/blobServices"):
        problems.append("no blob service resource: versioning is not enabled")
    for r in resources_of(t, "Microsoft.Storage/storageAccounts/blobServices/containers"):
        if r.get("properties", {}).get("publicAccess", "None") != "None":
            problems.append(f"container {r['name']}: public access")
    vaults = resources_of(t, "Microsoft.KeyVault/vaults")
    if len(vaults) < len(VAULT_SUBNETS):
        problems.append(f"{len(vaults)} Key Vaults: secrets are split by readership into {sorted(VAULT_SUBNETS)}")
    for r in vaults:
        p = r.get("properties", {})
        for k in ("enableRbacAuthorization", "enableSoftDelete", "enablePurgeProtection"):
            if p.get(k) is not True:
                problems.append(f"key vault {r['name']}: {k} is {p.get(k)!r}")
        if p.get("networkAcls", {}).get("defaultAction") != "Deny":
            problems.append(f"key vault {r['name']}: firewall default action is not Deny")
        if p.get("accessPolicies"):
            problems.append(f"key vault {r['name']}: access policies (RBAC only)")
    for r in t.get("resources", []):
        n = r.get("name", "")
        if r.get("type") in ("Microsoft.Storage/storageAccounts", "Microsoft.KeyVault/vaults"):
            if "uniqueString" not in n and "variables(" not in n:
                problems.append(f"{r['type']} {n}: name not derived with uniqueString()")
    return problems


def check_network(t: dict, ev: Evaluator) -> list[str]:
    problems = []
    vnets = resources_of(t, "Microsoft.Network/virtualNetworks")
    if len(vnets) != 1:
        return [f"{len(vnets)} virtual networks, want 1"]
    subnets = {s["name"]: s for s in vnets[0]["properties"]["subnets"]}
    if set(subnets) != set(TIERS):
        problems.append(f"subnets {sorted(subnets)}, want {sorted(TIERS)}")
    nat_ids = {resource_id(ev, r) for r in resources_of(t, "Microsoft.Network/natGateways")}
    nsgs = {resource_id(ev, r): r for r in resources_of(t, "Microsoft.Network/networkSecurityGroups")}
    for name, s in subnets.items():
        p = s.get("properties", {})
        nsg_id = ev.value(p.get("networkSecurityGroup", {}).get("id", ""))
        if nsg_id not in nsgs:
            problems.append(f"subnet {name}: no NSG of this template")
        elif sum(1 for sn in subnets.values()
                 if ev.value(sn["properties"].get("networkSecurityGroup", {}).get("id", "")) == nsg_id) > 1:
            problems.append(f"subnet {name}: shares its NSG with another subnet")
        if ev.value(p.get("natGateway", {}).get("id", "")) not in nat_ids:
            problems.append(f"subnet {name}: outbound is not through the NAT gateway")
        if p.get("defaultOutboundAccess") is not False:
            problems.append(f"subnet {name}: default outbound access is not disabled")
    # Public IPs: the jumpbox's (on its NIC) and the NAT gateway's (outbound only); nothing else.
    pips = {resource_id(ev, r): r for r in resources_of(t, "Microsoft.Network/publicIPAddresses")}
    used_by = {}
    for nic in resources_of(t, "Microsoft.Network/networkInterfaces"):
        for ipc in nic["properties"].get("ipConfigurations", []):
            pid = ipc.get("properties", {}).get("publicIPAddress", {}).get("id")
            if pid:
                used_by[ev.value(pid)] = f"nic:{ev.value(nic['name'])}"
    for nat in resources_of(t, "Microsoft.Network/natGateways"):
        for ref in nat["properties"].get("publicIpAddresses", []):
            used_by[ev.value(ref["id"])] = "natGateway"
    for pid in pips:
        if pid not in used_by:
            problems.append(f"public IP {pid} is attached to nothing known")
    nic_pips = [pid for pid, user in used_by.items() if user.startswith("nic:")]
    jump_nic = ev.variable("jumpboxNicName")
    if [used_by[p] for p in nic_pips] != [f"nic:{jump_nic}"]:
        problems.append(f"public IPs on NICs: {[used_by[p] for p in nic_pips]}, want only the jumpbox's")
    for r in t.get("resources", []):
        for path, _ in strings_in(r):
            if path.endswith("/publicIPAddressConfiguration"):
                problems.append(f"{r['type']} {r['name']}: instances get public IPs ({path})")
    for lb in resources_of(t, "Microsoft.Network/loadBalancers"):
        for fe in lb["properties"].get("frontendIPConfigurations", []):
            if "publicIPAddress" in fe.get("properties", {}):
                problems.append(f"load balancer {lb['name']}: public frontend")
    return problems


def check_scale_sets(t: dict, ev: Evaluator) -> list[str]:
    problems = []
    vmss = resources_of(t, "Microsoft.Compute/virtualMachineScaleSets")
    by_role = {}
    for r in vmss:
        role = r.get("tags", {}).get("hashistack-role")
        by_role[role] = r
    want_counts = {"consul-server": "consulServerCount", "vault-server": "vaultServerCount",
                   "nomad-server": "nomadServerCount", "worker": "workerCount"}
    if set(by_role) != set(want_counts):
        problems.append(f"scale sets for roles {sorted(map(str, by_role))}, want {sorted(want_counts)}")
    for role, r in by_role.items():
        label = f"scale set {r['name']} ({role})"
        p = r.get("properties", {})
        vmp = p.get("virtualMachineProfile", {})
        if p.get("orchestrationMode") != "Uniform":
            problems.append(f"{label}: orchestrationMode {p.get('orchestrationMode')!r} (cloud auto-join needs Uniform)")
        if p.get("overprovision") is not False:
            problems.append(f"{label}: overprovisioning would boot extra servers that join the cluster")
        if role in want_counts and r.get("sku", {}).get("capacity") != f"[parameters('{want_counts[role]}')]":
            problems.append(f"{label}: capacity is not parameters('{want_counts[role]}')")
        if role in want_counts and role != "worker":
            allowed = t["parameters"].get(want_counts[role], {})
            if allowed.get("defaultValue") != 3:
                problems.append(f"{label}: default count is not 3")
        if role == "worker" and t["parameters"].get("workerCount", {}).get("defaultValue") != 3:
            problems.append(f"{label}: default worker count is not 3")
        problems += _vm_profile_problems(label, vmp, data_disk=role != "worker")
        ids = list(r.get("identity", {}).get("userAssignedIdentities", {}))
        if r.get("identity", {}).get("type") != "UserAssigned" or len(ids) != 1:
            problems.append(f"{label}: not exactly one user-assigned identity")
        for nic in vmp.get("networkProfile", {}).get("networkInterfaceConfigurations", []):
            for ipc in nic.get("properties", {}).get("ipConfigurations", []):
                sub = ev.value(ipc["properties"]["subnet"]["id"]).rsplit("/", 1)[-1]
                tier = {v: k for k, v in ROLE_OF_TIER.items()}[role] if role in ROLE_OF_TIER.values() else None
                if sub != tier:
                    problems.append(f"{label}: in subnet {sub!r}, want {tier!r}")
    identities = [list(r.get("identity", {}).get("userAssignedIdentities", {}) or [None])[0] for r in vmss]
    vms = [r for r in resources_of(t, "Microsoft.Compute/virtualMachines")]
    jump = [r for r in vms if r.get("tags", {}).get("hashistack-role") == "jumpbox"]
    if len(jump) != 1:
        problems.append(f"{len(jump)} jumpbox VMs, want 1")
    for r in jump:
        problems += _vm_profile_problems(f"jumpbox {r['name']}", r.get("properties", {}), data_disk=False)
        identities += list(r.get("identity", {}).get("userAssignedIdentities", {}))
    if len(set(identities)) != len(identities):
        problems.append("tiers share a user-assigned identity (each tier has its own)")
    return problems


def _vm_profile_problems(label: str, vmp: dict, data_disk: bool) -> list[str]:
    problems = []
    osp = vmp.get("osProfile", {})
    lc = osp.get("linuxConfiguration", {})
    if lc.get("disablePasswordAuthentication") is not True:
        problems.append(f"{label}: password authentication is not disabled")
    if not lc.get("ssh", {}).get("publicKeys"):
        problems.append(f"{label}: no SSH public key")
    if "adminPassword" in osp:
        problems.append(f"{label}: has an admin password")
    sp = vmp.get("storageProfile", {})
    if sp.get("imageReference") != {"id": "[parameters('imageId')]"}:
        problems.append(f"{label}: image is not parameters('imageId')")
    if data_disk and not sp.get("dataDisks"):
        problems.append(f"{label}: no data disk for server state")
    return problems


def check_vault_load_balancer(t: dict, ev: Evaluator) -> list[str]:
    problems = []
    lbs = resources_of(t, "Microsoft.Network/loadBalancers")
    if len(lbs) != 1:
        return [f"{len(lbs)} load balancers, want 1 (internal, Vault API)"]
    lb = lbs[0]
    p = lb["properties"]
    probes = p.get("probes", [])
    if not any(pr["properties"].get("protocol") == "Https" and pr["properties"].get("port") == 8200 and
               pr["properties"].get("requestPath") == "/v1/sys/health" for pr in probes):
        problems.append("no HTTPS health probe on 8200 /v1/sys/health")
    rules = p.get("loadBalancingRules", [])
    if not any(r["properties"].get("frontendPort") == 8200 and r["properties"].get("backendPort") == 8200 for r in rules):
        problems.append("no load-balancing rule for 8200")
    for fe in p.get("frontendIPConfigurations", []):
        sub = ev.value(fe["properties"].get("subnet", {}).get("id", "")).rsplit("/", 1)[-1]
        if sub != "vault":
            problems.append(f"frontend {fe['name']} is in subnet {sub!r}, not vault")
    pool_users = []
    for r in resources_of(t, "Microsoft.Compute/virtualMachineScaleSets"):
        for nic in r["properties"]["virtualMachineProfile"]["networkProfile"]["networkInterfaceConfigurations"]:
            for ipc in nic["properties"]["ipConfigurations"]:
                if ipc["properties"].get("loadBalancerBackendAddressPools"):
                    pool_users.append(r.get("tags", {}).get("hashistack-role"))
    if pool_users != ["vault-server"]:
        problems.append(f"backend pool members: {pool_users}, want ['vault-server']")
    return problems


# ============================================================================================ identities

def _custom_roles(t: dict, ev: Evaluator) -> dict[str, dict]:
    """roleDefinition GUID -> resource"""
    return {ev.value(r["name"]): r for r in resources_of(t, "Microsoft.Authorization/roleDefinitions")}


def _scope_labels(t: dict, ev: Evaluator) -> dict[str, str]:
    rg = ev.fn_resourcegroup()["id"]
    sa = ev.variable("storageAccountName")
    labels = {rg.lower(): "resourceGroup",
              f"/subscriptions/{CTX['subscriptionId']}".lower(): "subscription",
              ev.fn_resourceid("Microsoft.Storage/storageAccounts", sa).lower(): "storageAccount"}
    for c in ("escrow", "coordination"):
        labels[ev.fn_resourceid("Microsoft.Storage/storageAccounts/blobServices/containers", sa, "default",
                                ev.variable(f"{c}ContainerName")).lower()] = f"container:{c}"
    for k in VAULT_SUBNETS:
        labels[ev.fn_resourceid("Microsoft.KeyVault/vaults", ev.variable(f"{k}VaultName")).lower()] = f"vault:{k}"
    for k in ("unseal", "escrow"):
        labels[ev.fn_resourceid("Microsoft.KeyVault/vaults/keys", ev.variable(f"{k}VaultName"),
                                ev.variable(f"{k}KeyName")).lower()] = f"key:{k}"
    return labels


def role_assignments(t: dict, ev: Evaluator) -> list[dict]:
    """Every role assignment with principal, scope and role resolved to readable labels."""
    rg = ev.fn_resourcegroup()["id"]
    labels = _scope_labels(t, ev)
    customs = _custom_roles(t, ev)
    ident = {}
    for tier in TIERS:
        rid = ev.fn_resourceid("Microsoft.ManagedIdentity/userAssignedIdentities", ev.variable("identityNames")[tier])
        ident[ev.fn_reference(rid)["principalId"]] = tier
    out = []
    for r in resources_of(t, "Microsoft.Authorization/roleAssignments"):
        p = r.get("properties", {})
        scope = ev.value(r["scope"]) if "scope" in r else rg
        if not scope.startswith("/"):
            scope = f"{rg}/providers/{scope}"
        principal_raw = p.get("principalId", "")
        if principal_raw == "[parameters('operatorObjectId')]":
            principal = "operator"
        else:
            principal = ident.get(ev.value(principal_raw), f"?{principal_raw}")
        role_id = ev.value(p.get("roleDefinitionId", "")).rsplit("/", 1)[-1]
        if role_id in BUILTIN_ROLES:
            role_name, data_actions = BUILTIN_ROLES[role_id]
            actions = set()
        elif role_id in customs:
            perms = customs[role_id]["properties"]["permissions"]
            data_actions = {a for perm in perms for a in perm.get("dataActions", [])}
            actions = {a for perm in perms for a in perm.get("actions", [])}
            role_name = "custom[" + ", ".join(sorted(a.split("/", 1)[1] for a in data_actions)) + "]"
        else:
            role_name, data_actions, actions = f"unknown role {role_id}", {"*"}, {"*"}
        out.append(dict(resource=r, principal=principal, scope=labels.get(scope.lower(), scope),
                        role=role_name, role_id=role_id, data_actions=data_actions, actions=actions,
                        principal_type=p.get("principalType")))
    return out


def custom(*data_actions: str) -> str:
    return "custom[" + ", ".join(sorted(a.split("/", 1)[1] for a in data_actions)) + "]"


KV = "Microsoft.KeyVault/vaults"
EXPECTED_ACCESS = set()
for _t in SERVER_TIERS:
    EXPECTED_ACCESS |= {
        (_t, "resourceGroup", "Reader"),
        (_t, "container:escrow", custom(*ESCROW_BLOB_WRITE_ONLY)),
        (_t, "vault:escrow", custom(*ESCROW_SECRET_WRITE_ONLY)),
        (_t, "key:escrow", custom(*ESCROW_KEY_WRAP_ONLY)),
        (_t, "vault:shared", custom(f"{KV}/secrets/getSecret/action", f"{KV}/secrets/setSecret/action")),
        (_t, "vault:servers", custom(f"{KV}/secrets/getSecret/action", f"{KV}/secrets/setSecret/action")),
        (_t, "vault:status", custom(*ESCROW_SECRET_WRITE_ONLY)),
        (_t, "container:coordination", custom(f"{BLOB}/read", f"{BLOB}/write", f"{BLOB}/add/action")),
    }
EXPECTED_ACCESS |= {
    ("vault", "key:unseal", "Key Vault Crypto Service Encryption User"),
    ("workers", "resourceGroup", "Reader"),
    ("workers", "vault:shared", "Key Vault Secrets User"),
    ("jumpbox", "resourceGroup", "Reader"),
    ("jumpbox", "vault:shared", "Key Vault Secrets User"),
    ("jumpbox", "vault:status", "Key Vault Secrets User"),
    ("jumpbox", "container:coordination", "Storage Blob Data Reader"),
    # node boot records for `hashistack-agent status` (server tiers publish through coordinationWriter)
    ("workers", "container:coordination", custom(f"{BLOB}/write", f"{BLOB}/add/action")),
    ("jumpbox", "container:coordination", custom(f"{BLOB}/write", f"{BLOB}/add/action")),
    ("operator", "container:escrow", "Storage Blob Data Reader"),
    ("operator", "container:coordination", "Storage Blob Data Reader"),
    ("operator", "vault:escrow", "Key Vault Secrets User"),
    ("operator", "key:escrow", custom(f"{KV}/keys/unwrap/action")),
}


def check_access_matrix(t: dict, ev: Evaluator) -> list[str]:
    actual = {(a["principal"], a["scope"], a["role"]) for a in role_assignments(t, ev)}
    problems = [f"unexpected role assignment: {x}" for x in sorted(actual - EXPECTED_ACCESS)]
    problems += [f"missing role assignment: {x}" for x in sorted(EXPECTED_ACCESS - actual)]
    return problems


ESCROW_SCOPES = {"container:escrow", "vault:escrow", "key:escrow"}
PARENTS = {"container:escrow": {"storageAccount", "resourceGroup", "subscription"},
           "vault:escrow": {"resourceGroup", "subscription"},
           "key:escrow": {"vault:escrow", "resourceGroup", "subscription"},
           "key:unseal": {"vault:unseal", "resourceGroup", "subscription"}}


DATA_PREFIX = {"container:escrow": f"{BLOB}/", "vault:escrow": f"{KV}/secrets/", "key:escrow": f"{KV}/keys/",
               "key:unseal": f"{KV}/keys/"}


def check_escrow_write_only(t: dict, ev: Evaluator) -> list[str]:
    """No VM identity can read escrow: on the escrow container, vault and key (and anything above them) VM
    identities hold exactly the write-only roles; the custom roles have exactly the listed data actions."""
    problems = []
    want = {"container:escrow": ESCROW_BLOB_WRITE_ONLY, "vault:escrow": ESCROW_SECRET_WRITE_ONLY,
            "key:escrow": ESCROW_KEY_WRAP_ONLY}
    assignments = role_assignments(t, ev)
    vm = [a for a in assignments if a["principal"] in TIERS]
    for scope, exact in want.items():
        holders = [a for a in vm if a["scope"] == scope]
        if {a["principal"] for a in holders} != set(SERVER_TIERS):
            problems.append(f"{scope}: write access held by {sorted({a['principal'] for a in holders})}, "
                            f"want the server tiers {SERVER_TIERS}")
        for a in holders:
            if a["data_actions"] != exact:
                problems.append(f"{scope}: {a['principal']} holds data actions {sorted(a['data_actions'])}, "
                                f"want exactly {sorted(exact)}")
            if a["actions"]:
                problems.append(f"{scope}: {a['principal']} holds control-plane actions {sorted(a['actions'])}")
            if a["role_id"] in BUILTIN_ROLES:
                problems.append(f"{scope}: {a['principal']} holds built-in role {a['role']} (custom write-only role expected)")
            else:
                rd = _custom_roles(t, ev)[a["role_id"]]["properties"]
                for perm in rd["permissions"]:
                    if perm.get("notActions") or perm.get("notDataActions"):
                        problems.append(f"{scope}: role {a['role']} uses notActions/notDataActions")
                if rd.get("assignableScopes") != ["[resourceGroup().id]"]:
                    problems.append(f"{scope}: role {a['role']} is assignable outside the resource group")
        for a in vm:
            relevant = {d for d in a["data_actions"] if d.startswith(DATA_PREFIX[scope]) or d == "*"}
            if a["scope"] in PARENTS[scope] and relevant:
                problems.append(f"{scope}: {a['principal']} holds data actions {sorted(relevant)} on "
                                f"the enclosing {a['scope']}")
    # the storage account / escrow vault data plane must not be reachable through other VM roles either
    for a in vm:
        if a["scope"] in ESCROW_SCOPES:
            continue
        if any("*" in d for d in a["data_actions"]):
            problems.append(f"{a['principal']}: wildcard data actions on {a['scope']}")
    return problems


def check_unseal_key(t: dict, ev: Evaluator) -> list[str]:
    problems = []
    for a in role_assignments(t, ev):
        on_key = a["scope"] == "key:unseal" or (a["scope"] in PARENTS["key:unseal"] and
                                                 any("/keys/" in d for d in a["data_actions"]))
        if on_key and a["principal"] != "vault":
            problems.append(f"unseal key usable by {a['principal']} ({a['role']} on {a['scope']})")
    return problems


# Secrets are split across Key Vaults by who may read them (Azure RBAC is additive: a vault is the boundary).
# Who may get and who may set secrets in each vault, counting assignments on the vault and above it. Mirrors
# KeyVaultDouble::model_arm in lab/src/keyvault.rs and agent/src/material.rs `Vaults`.
SECRET_GET = f"{KV}/secrets/getSecret/action"
SECRET_SET = f"{KV}/secrets/setSecret/action"
VAULT_SECRET_ACCESS = {
    # CA certificate, Consul gossip key, Consul agent token, the shared Nomad client certificate and key
    "vault:shared": {"get": set(TIERS), "set": set(SERVER_TIERS)},
    # the CA key and the Nomad gossip key: server tiers only
    "vault:servers": {"get": set(SERVER_TIERS), "set": set(SERVER_TIERS)},
    # the read-only status tokens: servers hand them over (set only), only the jumpbox reads them
    "vault:status": {"get": {"jumpbox"}, "set": set(SERVER_TIERS)},
}
VAULT_PARENTS = {"resourceGroup", "subscription"}


def _grants(action: str, data_actions: set[str]) -> bool:
    """Does a role with these data actions (wildcards allowed) permit `action`?"""
    return any(fnmatch.fnmatchcase(action.lower(), d.lower()) for d in data_actions)


def check_vault_readership(t: dict, ev: Evaluator) -> list[str]:
    """Who can get and set secrets in the shared, servers and status vaults — through an assignment on the
    vault or on anything above it — is exactly VAULT_SECRET_ACCESS; nobody else holds any Key Vault data
    action there (not even `readMetadata`, which lists secret names)."""
    problems = []
    assignments = role_assignments(t, ev)
    for vault, want in VAULT_SECRET_ACCESS.items():
        covering = [a for a in assignments if a["scope"] == vault or a["scope"] in VAULT_PARENTS]
        got = {"get": set(), "set": set()}
        for a in covering:
            for op, action in (("get", SECRET_GET), ("set", SECRET_SET)):
                if _grants(action, a["data_actions"]):
                    got[op].add(a["principal"])
            kv_actions = {d for d in a["data_actions"] if d == "*" or d.lower().startswith(f"{KV}/".lower())
                          or fnmatch.fnmatchcase(f"{KV}/x".lower(), d.lower())}
            if kv_actions and a["principal"] not in want["get"] | want["set"]:
                problems.append(f"{vault}: {a['principal']} holds {sorted(kv_actions)} through {a['role']} on "
                                f"{a['scope']}, but has no business with this vault")
            if a["actions"] and a["scope"] == vault:
                problems.append(f"{vault}: {a['principal']} holds control-plane actions {sorted(a['actions'])}")
        for op in ("get", "set"):
            if got[op] != want[op]:
                problems.append(f"{vault}: {op} held by {sorted(got[op])}, want {sorted(want[op])}")
    return problems


# Subnets each Key Vault's firewall admits (docs/network.md): a vault admits the subnets of its readers and writers.
VAULT_SUBNETS = {
    "unseal": {"vault"},
    "shared": set(TIERS),
    "servers": set(SERVER_TIERS),
    "status": set(SERVER_TIERS) | {"jumpbox"},
    "escrow": set(SERVER_TIERS) | {"jumpbox"},
}


def check_vault_network_acls(t: dict, ev: Evaluator) -> list[str]:
    """Every Key Vault is one of VAULT_SUBNETS; its firewall denies by default, has no IP rules and admits
    exactly its subnets of this template's VNet."""
    problems = []
    by_name = {ev.value(r["name"]): r for r in resources_of(t, "Microsoft.KeyVault/vaults")}
    vnet = ev.fn_resourceid("Microsoft.Network/virtualNetworks", ev.variable("vnetName"))
    for k, want in VAULT_SUBNETS.items():
        name = ev.variable(f"{k}VaultName")
        r = by_name.pop(name, None)
        if r is None:
            problems.append(f"the {k} Key Vault ({name}) is missing")
            continue
        acls = r.get("properties", {}).get("networkAcls", {})
        if acls.get("defaultAction") != "Deny":
            problems.append(f"{k} vault: firewall default action is {acls.get('defaultAction')!r}, want Deny")
        if acls.get("ipRules"):
            problems.append(f"{k} vault: IP rules {acls['ipRules']} (only the cluster's subnets)")
        got = set()
        for rule in acls.get("virtualNetworkRules", []):
            sid = ev.value(rule["id"])
            parent, _, subnet = sid.rpartition("/subnets/")
            if parent != vnet:
                problems.append(f"{k} vault: admits {sid}, a subnet outside the cluster's VNet")
            got.add(subnet)
        if got != want:
            problems.append(f"{k} vault: admits subnets {sorted(got)}, want {sorted(want)}")
    for name in sorted(by_name):
        problems.append(f"Key Vault {name} is not one of {sorted(VAULT_SUBNETS)}")
    return problems


def _assignment_id(ev: Evaluator, r: dict) -> str:
    name = ev.value(r["name"])
    if "scope" not in r:
        return ev.fn_resourceid("Microsoft.Authorization/roleAssignments", name)
    scope = ev.value(r["scope"])
    if not scope.startswith("/"):
        scope = f"{ev.fn_resourcegroup()['id']}/providers/{scope}"
    return ev.fn_extensionresourceid(scope, "Microsoft.Authorization/roleAssignments", name)


def check_boot_dependencies(t: dict, ev: Evaluator) -> list[str]:
    """The first boot already has what it needs: each scale set and the jumpbox depend on every Key Vault whose
    URI they carry in a tag and on every role assignment of their identity; each role assignment depends on its
    identity, its custom role and the vault or key it is scoped to."""
    problems = []
    vault_ids = {ev.fn_reference(ev.fn_resourceid("Microsoft.KeyVault/vaults", ev.value(r["name"])))["vaultUri"]:
                 ev.fn_resourceid("Microsoft.KeyVault/vaults", ev.value(r["name"]))
                 for r in resources_of(t, "Microsoft.KeyVault/vaults")}
    ident_ids = {tier: ev.fn_resourceid("Microsoft.ManagedIdentity/userAssignedIdentities",
                                        ev.variable("identityNames")[tier]) for tier in TIERS}
    assignments = role_assignments(t, ev)
    carriers = resources_of(t, "Microsoft.Compute/virtualMachineScaleSets") + \
        resources_of(t, "Microsoft.Compute/virtualMachines")
    for r in carriers:
        label = f"{r['type'].split('/')[-1]} {r['name']}"
        deps = {ev.value(d) for d in r.get("dependsOn", [])}
        try:
            tags = ev.value(r.get("tags", {}))
        except ArmExprError:
            tags = {}
        for tag, value in tags.items():
            if value in vault_ids and vault_ids[value] not in deps:
                problems.append(f"{label}: carries {tag} but does not depend on that Key Vault")
        ids = {ev.value(i) for i in r.get("identity", {}).get("userAssignedIdentities", {})}
        tier = next((k for k, v in ident_ids.items() if v in ids), None)
        for a in assignments:
            if a["principal"] == tier and _assignment_id(ev, a["resource"]) not in deps:
                problems.append(f"{label}: does not depend on its identity's role assignment "
                                f"({a['role']} on {a['scope']}): the first boot could miss it")
    customs = {ev.value(r["name"]) for r in resources_of(t, "Microsoft.Authorization/roleDefinitions")}
    scoped = {resource_id(ev, r).lower(): resource_id(ev, r) for r in t.get("resources", [])
              if r.get("type") in ("Microsoft.KeyVault/vaults", "Microsoft.KeyVault/vaults/keys",
                                   "Microsoft.Storage/storageAccounts/blobServices/containers")}
    for a in assignments:
        r = a["resource"]
        deps = {ev.value(d) for d in r.get("dependsOn", [])}
        if a["principal"] in ident_ids and ident_ids[a["principal"]] not in deps:
            problems.append(f"role assignment {r['name']}: does not depend on its identity")
        if a["role_id"] in customs and \
                ev.fn_resourceid("Microsoft.Authorization/roleDefinitions", a["role_id"]) not in deps:
            problems.append(f"role assignment {r['name']}: does not depend on its custom role")
        if "scope" in r:
            scope = ev.value(r["scope"])
            full = scope if scope.startswith("/") else f"{ev.fn_resourcegroup()['id']}/providers/{scope}"
            if full.lower() in scoped and scoped[full.lower()] not in deps:
                problems.append(f"role assignment {r['name']}: does not depend on {a['scope']}, its scope")
    return problems


NODE_RECORD_WRITERS = ("workers", "jumpbox")


def check_node_record_writers(t: dict, ev: Evaluator) -> list[str]:
    """Workers and the jumpbox publish their boot records: on the coordination container they may create and
    overwrite blobs (exactly write + add/action, no read/list/lease/delete), and an ABAC condition keeps those
    writes under `<clusterName>/nodes/` so they cannot touch tier state or leader leases."""
    problems = []
    want = {f"{BLOB}/write", f"{BLOB}/add/action"}
    path_rule = f"@Resource[{BLOB}:path] StringLike '{ev.param('clusterName')}/nodes/*'"
    for who in NODE_RECORD_WRITERS:
        held = [a for a in role_assignments(t, ev) if a["principal"] == who and a["scope"] == "container:coordination"
                and any(d.startswith(BLOB) and not d.endswith("/read") for d in a["data_actions"])]
        if len(held) != 1:
            problems.append(f"{who}: {len(held)} write assignments on the coordination container, want 1")
            continue
        a = held[0]
        if a["data_actions"] != want:
            problems.append(f"{who}: coordination write role holds {sorted(a['data_actions'])}, want exactly {sorted(want)}")
        props = a["resource"].get("properties", {})
        cond = ev.value(props["condition"]) if "condition" in props else ""
        if props.get("conditionVersion") != "2.0" or path_rule not in cond:
            problems.append(f"{who}: coordination write assignment lacks the condition {path_rule!r}")
        for action in sorted(want):
            if f"ActionMatches{{'{action}'}}" not in cond:
                problems.append(f"{who}: the condition does not cover {action}")
    return problems


def _follow_variable(t: dict, value: str) -> str:
    """The raw text behind '[variables('a').b]' (one level), else value itself."""
    m = re.fullmatch(r"\[variables\('([^']+)'\)((?:\.[A-Za-z0-9_]+)*)\]", value)
    if not m:
        return value
    node = t.get("variables", {}).get(m.group(1))
    for part in filter(None, m.group(2).split(".")):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, str) else value


def check_assignment_hygiene(t: dict, ev: Evaluator) -> list[str]:
    problems = []
    for a in role_assignments(t, ev):
        r = a["resource"]
        if not a["principal_type"]:
            problems.append(f"role assignment {r['name']}: no principalType")
        if a["principal"] in TIERS and a["principal_type"] != "ServicePrincipal":
            problems.append(f"role assignment {r['name']}: principalType {a['principal_type']!r} for a managed identity")
        if a["principal"].startswith("?"):
            problems.append(f"role assignment {r['name']}: unknown principal {a['principal']}")
        if a["principal"] == "operator" and "condition" not in r:
            problems.append(f"role assignment {r['name']}: operator assignment without a condition on operatorObjectId")
        if "reference(" in r["name"] or "parameters('operatorObjectId')" in r["name"] and a["principal"] != "operator":
            problems.append(f"role assignment {r['name']}: name depends on runtime values")
    for r in resources_of(t, "Microsoft.Authorization/roleDefinitions"):
        name, role_name = _follow_variable(t, r["name"]), r["properties"].get("roleName", "")
        if "resourceGroup().id" not in name or not name.startswith("[guid("):
            problems.append(f"role definition {name}: name is not guid(resourceGroup().id, ...)")
        if "suffix" not in role_name and "uniqueString" not in role_name:
            problems.append(f"role definition {name}: roleName {role_name!r} is not unique per deployment")
    names = [ev.value(r["properties"]["roleName"]) for r in resources_of(t, "Microsoft.Authorization/roleDefinitions")]
    if len(set(names)) != len(names):
        problems.append("custom role names collide")
    return problems


# ============================================================================================ NSG vs docs

def nsg_rules_from_template(t: dict, ev: Evaluator) -> tuple[set[tuple], list[str]]:
    problems = []
    prefixes = ev.variable("subnetPrefixes")
    tier_of_prefix = {str(ipaddress.ip_network(v)): k for k, v in prefixes.items()}
    vnet = resources_of(t, "Microsoft.Network/virtualNetworks")[0]
    subnet_of_nsg = {}
    for s in vnet["properties"]["subnets"]:
        subnet_of_nsg[ev.value(s["properties"]["networkSecurityGroup"]["id"])] = s["name"]
    rows = set()
    for nsg in resources_of(t, "Microsoft.Network/networkSecurityGroups"):
        subnet = subnet_of_nsg.get(resource_id(ev, nsg), f"(unattached {nsg['name']})")
        for rule in nsg["properties"].get("securityRules", []):
            p = rule["properties"]
            raw_src = p.get("sourceAddressPrefixes", p.get("sourceAddressPrefix"))
            if isinstance(raw_src, str) and re.fullmatch(r"\[parameters\('([^']+)'\)\]", raw_src):
                sources = [re.fullmatch(r"\[parameters\('([^']+)'\)\]", raw_src).group(1)]
            else:
                vals = ev.value(raw_src)
                vals = vals if isinstance(vals, list) else [vals]
                sources = []
                for v in vals:
                    try:
                        sources.append(tier_of_prefix.get(str(ipaddress.ip_network(v)), v))
                    except ValueError:
                        sources.append(v)
            ports = p.get("destinationPortRanges") or [p.get("destinationPortRange")]
            dest = ev.value(p.get("destinationAddressPrefix", ""))
            if p.get("access") == "Allow" and dest != prefixes.get(subnet):
                problems.append(f"nsg {subnet} rule {rule['name']}: destination {dest!r} is not the subnet itself")
            if p.get("direction") != "Inbound":
                problems.append(f"nsg {subnet} rule {rule['name']}: direction {p.get('direction')!r}")
            rows.add((subnet, int(p["priority"]), rule["name"], p["access"], p["protocol"],
                      ", ".join(sorted(sources)), ", ".join(sorted(map(str, ports)))))
    return rows, problems


def nsg_rules_from_doc(text: str) -> set[tuple]:
    rows = set()
    for table in markdown_tables(text):
        if not table or "priority" not in table[0] or "subnet" not in table[0]:
            continue
        for row in table:
            srcs = sorted(strip_md(s) for s in row["source"].split(","))
            ports = sorted(strip_md(p) for p in row["ports"].split(","))
            rows.add((strip_md(row["subnet"]), int(strip_md(row["priority"])), strip_md(row["rule"]),
                      strip_md(row["access"]), strip_md(row["protocol"]), ", ".join(srcs), ", ".join(ports)))
    return rows


def check_nsg_matches_doc(t: dict, ev: Evaluator, network_md: str) -> list[str]:
    actual, problems = nsg_rules_from_template(t, ev)
    documented = nsg_rules_from_doc(network_md)
    if not documented:
        return ["docs/network.md has no NSG rule table"]
    problems += [f"in the template, not in docs/network.md: {r}" for r in sorted(actual - documented)]
    problems += [f"in docs/network.md, not in the template: {r}" for r in sorted(documented - actual)]
    by_subnet: dict[str, list[tuple]] = {}
    for r in actual:
        by_subnet.setdefault(r[0], []).append(r)
    for subnet, rules in by_subnet.items():
        last = max(rules, key=lambda r: r[1])
        if not (last[3] == "Deny" and last[4] == "*" and last[5] == "*" and last[6] == "*"):
            problems.append(f"nsg {subnet}: the last rule is not an explicit deny-all inbound")
        ssh = [r for r in rules if "22" in r[6].split(", ") and r[3] == "Allow"]
        want_src = "allowedSshSourcePrefixes" if subnet == "jumpbox" else "jumpbox"
        for r in ssh:
            if r[5] != want_src:
                problems.append(f"nsg {subnet}: SSH allowed from {r[5]}, want only {want_src}")
        if not ssh:
            problems.append(f"nsg {subnet}: no SSH rule from {want_src}")
        prios = [r[1] for r in rules]
        if len(set(prios)) != len(prios):
            problems.append(f"nsg {subnet}: duplicate priorities")
    return problems


# ============================================================================================ tags vs docs

def required_tags_from_doc(text: str) -> tuple[dict[str, set[str]], set[str]]:
    """{tag: roles that must carry it}, all documented tags. Fails loudly on an unknown 'required for' phrase."""
    all_roles = set(ROLE_OF_TIER.values())
    servers = {"consul-server", "vault-server", "nomad-server"}
    required, known = {}, set()
    for table in markdown_tables(text):
        if not table or "tag" not in table[0] or "required for" not in table[0]:
            continue
        for row in table:
            tag = strip_md(row["tag"])
            known.add(tag)
            phrase = strip_md(row["required for"]).lower()
            phrase = re.sub(r"\s*\(.*?\)", "", phrase)
            if phrase == "optional":
                roles = set()
            elif phrase == "all":
                roles = set(all_roles)
            elif phrase.startswith("vault-server with azurekeyvault seal"):
                roles = {"vault-server"}  # this template always uses the azurekeyvault seal
            else:
                roles = set()
                for part in (p.strip() for p in phrase.split(",")):
                    if part == "server tiers":
                        roles |= servers
                    elif part in all_roles:
                        roles.add(part)
                    else:
                        raise ValueError(f"docs/tags.md: cannot read 'required for' of {tag}: {row['required for']!r}")
            required[tag] = roles
    return required, known


TAG_VALUE_RULES = {
    "hashistack-cluster": r"[a-z][a-z0-9-]{0,31}",
    "hashistack-datacenter": r"[a-z0-9_-]{1,32}",
    "hashistack-consul-servers": r"[1357]",
    "hashistack-vault-servers": r"[1357]",
    "hashistack-nomad-servers": r"[1357]",
    "hashistack-tenant-id": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "hashistack-identity-client-id": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "hashistack-blob-endpoint": r"https://[a-z0-9]+\.blob\.[a-z0-9.]+/",
    "hashistack-keyvault-uri": r"https://[a-z0-9-]+\.vault\.[a-z0-9.]+/",
    "hashistack-escrow-vault-uri": r"https://[a-z0-9-]+\.vault\.[a-z0-9.]+/",
    "hashistack-servers-vault-uri": r"https://[a-z0-9-]+\.vault\.[a-z0-9.]+/",
    "hashistack-status-vault-uri": r"https://[a-z0-9-]+\.vault\.[a-z0-9.]+/",
    "hashistack-vault-seal": r"azurekeyvault vault_name=[A-Za-z0-9-]+ key_name=[A-Za-z0-9-]+",
}
JOIN_TAG_TIER = {"hashistack-consul-join": "consul", "hashistack-vault-join": "vault", "hashistack-nomad-join": "nomad"}
# Which vault each Key Vault URI tag must name (a worker given the servers vault's URI as its shared vault would
# try to read the CA key's vault).
VAULT_OF_TAG = {"hashistack-keyvault-uri": "sharedVaultName", "hashistack-servers-vault-uri": "serversVaultName",
                "hashistack-status-vault-uri": "statusVaultName", "hashistack-escrow-vault-uri": "escrowVaultName"}
# Tags the agent refuses on a role (agent/src/node.rs `forbid`): a vault URI on a node with no business with
# that vault is a mis-tagged tier.
TAG_FORBIDDEN_FOR = {"hashistack-servers-vault-uri": {"worker", "jumpbox"},
                     "hashistack-status-vault-uri": {"worker"}}


def check_tags(t: dict, ev: Evaluator, tags_md: str) -> list[str]:
    problems = []
    required, known = required_tags_from_doc(tags_md)
    if not required:
        return ["docs/tags.md has no tag table"]
    carriers = resources_of(t, "Microsoft.Compute/virtualMachineScaleSets") + \
        resources_of(t, "Microsoft.Compute/virtualMachines")
    seen_roles = set()
    for r in carriers:
        tags = r.get("tags", {})
        role = tags.get("hashistack-role")
        label = f"{r['type'].split('/')[-1]} {r['name']} ({role})"
        seen_roles.add(role)
        if role not in ROLE_OF_TIER.values():
            problems.append(f"{label}: hashistack-role {role!r} is not a documented role")
            continue
        for tag, roles in required.items():
            if role in roles and tag not in tags:
                problems.append(f"{label}: lacks required tag {tag}")
        for tag in tags:
            if tag.startswith("hashistack-") and tag not in known:
                problems.append(f"{label}: tag {tag} is not in docs/tags.md (the agent rejects it)")
            if role in TAG_FORBIDDEN_FOR.get(tag, ()):
                problems.append(f"{label}: carries {tag}, which role {role} must not have (the agent refuses it)")
        try:
            values = ev.value(tags)
        except ArmExprError as exc:
            problems.append(f"{label}: tag values do not evaluate: {exc}")
            continue
        for tag, value in values.items():
            if not isinstance(value, str):
                problems.append(f"{label}: {tag} is not a string")
                continue
            if len(value) > 256:
                problems.append(f"{label}: {tag} is longer than 256 characters")
            rule = TAG_VALUE_RULES.get(tag)
            if rule and not re.fullmatch(rule, value):
                problems.append(f"{label}: {tag}={value!r} does not match {rule}")
            if tag in VAULT_OF_TAG:
                want_uri = ev.fn_reference(ev.fn_resourceid("Microsoft.KeyVault/vaults",
                                                            ev.variable(VAULT_OF_TAG[tag])))["vaultUri"]
                if value != want_uri:
                    problems.append(f"{label}: {tag}={value!r} is not the {VAULT_OF_TAG[tag]} vault ({want_uri})")
            if tag in JOIN_TAG_TIER:
                kv = dict(x.split("=", 1) for x in value.split())
                want_vmss = ev.variable("vmssNames")[JOIN_TAG_TIER[tag]]
                if kv.get("provider") != "azure" or not value.startswith("provider="):
                    problems.append(f"{label}: {tag} is not a go-discover azure string")
                if kv.get("vm_scale_set") != want_vmss or kv.get("resource_group") != CTX["resourceGroup"]:
                    problems.append(f"{label}: {tag} points at {kv.get('resource_group')}/{kv.get('vm_scale_set')}, "
                                    f"want {CTX['resourceGroup']}/{want_vmss}")
                if kv.get("subscription_id") != CTX["subscriptionId"]:
                    problems.append(f"{label}: {tag} lacks subscription_id (go-discover needs it with a managed identity)")
        if values.get("hashistack-vault-seal"):
            kv = dict(x.split("=", 1) for x in values["hashistack-vault-seal"].split()[1:])
            if kv.get("vault_name") != ev.variable("unsealVaultName") or kv.get("key_name") != ev.variable("unsealKeyName"):
                problems.append(f"{label}: seal does not name the unseal vault and key")
        if values.get("hashistack-cluster") != ev.param("clusterName"):
            problems.append(f"{label}: hashistack-cluster is not the clusterName parameter")
    missing = set(ROLE_OF_TIER.values()) - seen_roles
    if missing:
        problems.append(f"no VM or scale set carries roles {sorted(missing)}")
    return problems


# ============================================================================================ checkov

def check_checkov_skips(config_text: str) -> list[str]:
    problems = []
    in_skip = False
    ids = []
    for line in config_text.splitlines():
        if re.match(r"^skip-check:\s*$", line):
            in_skip = True
            continue
        if in_skip:
            m = re.match(r"^\s+-\s+(CKV2?_[A-Z0-9_]+)\s*(?:#\s*(.*))?$", line)
            if m:
                ids.append(m.group(1))
                if not m.group(2) or len(m.group(2).strip()) < 20:
                    problems.append(f"checkov skip {m.group(1)} has no reason")
            elif line.strip() and not line.startswith(" "):
                in_skip = False
    if len(set(ids)) != len(ids):
        problems.append("duplicate checkov skips")
    return problems


def checkov_failures(report: Any) -> list[str]:
    reports = report if isinstance(report, list) else [report]
    out = []
    for rep in reports:
        for f in rep.get("results", {}).get("failed_checks", []):
            out.append(f"{f.get('check_id')} {f.get('check_name')} — {f.get('resource')}")
    return out


# --------------------------------------------------------------------------------------------- PGP escrow

PGP_PARAM = "operatorPgpPublicKeys"
SERVER_ROLES = ("consul-server", "vault-server", "nomad-server")


def check_pgp_user_data(t: dict, ev: Evaluator) -> list[str]:
    """docs/pgp-escrow.md: the operators' PGP keys are an array parameter, empty by default (option off), and
    reach every server tier (whose leaders escrow) as userData = base64 of {"hashistack":{"pgpKeys":[...]}};
    workers, which escrow nothing, get none."""
    import base64
    import json
    problems = []
    decl = t.get("parameters", {}).get(PGP_PARAM)
    if decl is None:
        return [f"parameter {PGP_PARAM!r} is missing"]
    if decl.get("type") != "array" or decl.get("defaultValue") != []:
        problems.append(f"parameter {PGP_PARAM!r}: not an array defaulting to [] (the option must be off by default)")
    sample = ["a2V5LTE=", "a2V5LTI="]
    for keys in ([], sample):
        ev2 = Evaluator(t, {**ev.values, PGP_PARAM: keys})
        for r in resources_of(t, "Microsoft.Compute/virtualMachineScaleSets"):
            role = r.get("tags", {}).get("hashistack-role")
            ud = r.get("properties", {}).get("virtualMachineProfile", {}).get("userData")
            label = f"scale set {r['name']} ({role})"
            if role not in SERVER_ROLES:
                if ud is not None:
                    problems.append(f"{label}: has userData; only the server tiers escrow")
                continue
            if ud is None:
                problems.append(f"{label}: no userData: its bootstrap would escrow without the operators' PGP keys")
                continue
            try:
                doc = json.loads(base64.b64decode(ev2.value(ud), validate=True))
            except (ArmExprError, ValueError) as exc:
                problems.append(f"{label}: userData is not base64 of a JSON document: {exc}")
                continue
            if doc != {"hashistack": {"pgpKeys": keys}}:
                problems.append(f"{label}: userData {doc} does not carry parameters('{PGP_PARAM}') as hashistack.pgpKeys")
    return sorted(set(problems))
