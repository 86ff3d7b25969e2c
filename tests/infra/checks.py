"""The checks behind tests/infra/test_arm.py. Each returns a list of problems; empty means the check passes.
test_mutations.py feeds them broken copies to prove that every one of them can fail."""
from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import json
import re
from typing import Any

from armlib import (CTX, ArmExprError, Evaluator, SchemaSet, calls_in, is_expr, iso_duration, literal_names,
                    markdown_tables, parse_expr, strings_in, strip_md, walk_ast)

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
# Resource types the shared schema subset does not carry (../shared/arm-schemas/README.md lists the providers it
# has): each is allowed at exactly this stable apiVersion, and its shape is checked by the named structural check
# instead of a published schema.
NOT_IN_SCHEMA_SET = {
    "Microsoft.OperationalInsights/workspaces": ("2025-02-01", "check_audit_trail"),
    # The newest stable diagnosticSettings API (category groups need a preview): explicit categories instead.
    "Microsoft.Insights/diagnosticSettings": ("2016-09-01", "check_audit_trail"),
    # The newest stable management locks API.
    "Microsoft.Authorization/locks": ("2020-05-01", "check_audit_trail"),
}


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
        if NOT_IN_SCHEMA_SET.get(r.get("type", ""), ("",))[0] == r.get("apiVersion"):
            continue
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

# arm-ttk "Template Should Not Contain Blanks": an empty string, array or object as a property value means
# something in a declarative model (clear it), so it must not be written by accident. These properties may be
# empty (arm-ttk's own list), and so may the value under an expression or resource-id key (userAssignedIdentities).
BLANK_OK_PROPERTIES = {"resources", "outputs", "variables", "parameters", "functions", "properties", "defaultValue",
                       "accessPolicies", "value", "promotionCode", "inputs", "notEquals", "clientId",
                       "allowedCallerIpAddresses"}


def check_no_blanks(template_text: str) -> list[str]:
    """The arm-ttk rule, on the template's text: no property value is "", [], {} or null."""
    problems = []
    colon = r"(?<=:)\s*"
    for m in re.finditer(colon + r"(\{\s*\}|\[\s*\]|\"\s*\"|null\b)", template_text):
        names = list(re.finditer(r'"([^"]+)"\s*:', template_text[:m.start()]))
        name = names[-1].group(1) if names else ""
        if name in BLANK_OK_PROPERTIES or re.match(r"\s*\[", name) or re.match(r"\s*/subscriptions/", name):
            continue
        line = template_text.count("\n", 0, m.start()) + 1
        problems.append(f"line {line}: {name!r} is blank ({m.group(1)})")
    return problems


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
        if rtype in NOT_IN_SCHEMA_SET:
            if api != NOT_IN_SCHEMA_SET[rtype][0]:
                problems.append(f"{label}: outside the schema set, only {NOT_IN_SCHEMA_SET[rtype][0]} is allowed")
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


PLACEHOLDER_VARIABLE = "escrowPlaceholderText"
PLACEHOLDER_VALUE = f"[variables('{PLACEHOLDER_VARIABLE}')]"


def _is_constant_text(t: dict, var: str) -> bool:
    """A variable that is literal text (no expression, so no parameter or reference can flow into it)."""
    v = t.get("variables", {}).get(var)
    return isinstance(v, str) and not is_expr(v)


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
            is_value_of_secret = r.get("type", "").lower() == "microsoft.keyvault/vaults/secrets" and path == "/value" \
                and s != key
            if is_value_of_secret and s == PLACEHOLDER_VALUE and _is_constant_text(t, PLACEHOLDER_VARIABLE):
                # The per-tier escrow secrets are created with a fixed, public placeholder text (their first
                # version) so the tier's writer can be assigned on that one secret; escrow versions follow.
                continue
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


def check_key_expiry(t: dict, ev: Evaluator) -> list[str]:
    """Every Key Vault key expires, and consistently with its rotation policy: the policy's expiryTime applies
    only to the versions it creates, so the first version carries attributes.exp = creation + the same lifetime;
    the policy rotates before its notify window opens (so 'notify' fires only when rotation did not happen), and
    both fit inside the lifetime. Without an expiry, 'notify N days before expiry' never fires."""
    problems = []
    keys = resources_of(t, "Microsoft.KeyVault/vaults/keys")
    if not keys:
        return ["no Key Vault keys"]
    for r in keys:
        label = f"key {r['name']}"
        p = r.get("properties", {})
        policy = p.get("rotationPolicy", {})
        lifetime_text = policy.get("attributes", {}).get("expiryTime")
        try:
            lifetime = iso_duration(lifetime_text)
        except ArmExprError as exc:
            problems.append(f"{label}: rotation policy expiryTime: {exc}")
            continue
        if lifetime < dt.timedelta(days=28):
            problems.append(f"{label}: rotation policy expiryTime {lifetime_text} is under Key Vault's 28 days")
        raw_exp = p.get("attributes", {}).get("exp")
        if raw_exp is None:
            problems.append(f"{label}: no attributes.exp: the first version never expires (expiryTime "
                            f"{lifetime_text} applies only to rotated versions), so 'notify' never fires")
        else:
            try:
                exp = ev.value(raw_exp)
            except ArmExprError as exc:
                problems.append(f"{label}: attributes.exp does not evaluate: {exc}")
                exp = None
            if exp is not None:
                want = int((ev.now + lifetime).timestamp())
                if not isinstance(exp, int) or abs(exp - want) > 86400:
                    problems.append(f"{label}: attributes.exp is {exp!r}, want the deployment time + {lifetime_text} "
                                    f"({want}), the rotation policy's lifetime")
        rotate = [a["trigger"] for a in policy.get("lifetimeActions", []) if a["action"]["type"].lower() == "rotate"]
        notify = [a["trigger"] for a in policy.get("lifetimeActions", []) if a["action"]["type"].lower() == "notify"]
        if not rotate or not notify:
            problems.append(f"{label}: the rotation policy must both rotate and notify")
            continue
        window = max(iso_duration(n["timeBeforeExpiry"]) for n in notify if "timeBeforeExpiry" in n)
        for trig in rotate:
            at = iso_duration(trig["timeAfterCreate"]) if "timeAfterCreate" in trig else \
                lifetime - iso_duration(trig["timeBeforeExpiry"])
            if at >= lifetime - window:
                problems.append(f"{label}: rotates at {at.days} days, not before the notify window opens "
                                f"({(lifetime - window).days} days)")
        if window >= lifetime:
            problems.append(f"{label}: notify window {window.days} days is not inside the lifetime {lifetime_text}")
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


SERVER_ROLES = {"consul-server", "vault-server", "nomad-server"}


def check_zone_resilience(t: dict, evaluators: dict[str, Evaluator]) -> list[str]:
    """With availability zones chosen, nothing zonal is left in one zone: the scale sets span the zones with one
    fault domain per zone (platformFaultDomainCount 1, Azure's advice for zone-spanning scale sets), the fixed-size
    raft tiers are kept strictly balanced across zones (zoneBalance; a raft majority must survive a zone), the
    internal load balancer's frontend is zone-redundant and the NAT gateway is (StandardV2, with a StandardV2
    public IP). Regional deployments (no zones) set none of it, and one zone gets no zoneBalance (the API refuses
    it with fewer than two zones). `evaluators`: 'regional', 'one-zone' and 'zones' parameter values."""
    problems = []
    for case, ev in evaluators.items():
        zones = ev.param("availabilityZones")
        spanning = len(zones) > 1
        for r in resources_of(t, "Microsoft.Compute/virtualMachineScaleSets"):
            role = r.get("tags", {}).get("hashistack-role")
            label = f"{case}: scale set {role}"
            p = r.get("properties", {})
            got_zones = ev.value(r.get("zones")) or []
            if got_zones != zones:
                problems.append(f"{label}: zones {got_zones}, want {zones}")
            fd = ev.value(p.get("platformFaultDomainCount"))
            if zones and fd != 1:
                problems.append(f"{label}: platformFaultDomainCount {fd!r}, want 1 with zones")
            if not zones and fd is not None:
                problems.append(f"{label}: platformFaultDomainCount {fd!r} without zones (leave it to the default)")
            zb = ev.value(p.get("zoneBalance"))
            if role in SERVER_ROLES and spanning and zb is not True:
                problems.append(f"{label}: zoneBalance {zb!r}: a fixed-size raft tier must spread evenly over the zones")
            if not spanning and zb is not None:
                problems.append(f"{label}: zoneBalance {zb!r} with {len(zones)} zone(s) (the API refuses it)")
        for lb in resources_of(t, "Microsoft.Network/loadBalancers"):
            for fe in lb["properties"].get("frontendIPConfigurations", []):
                fz = ev.value(fe.get("zones")) or []
                if fz != zones:
                    problems.append(f"{case}: load balancer frontend {fe['name']}: zones {fz}, want {zones} "
                                    f"(zone-redundant with several zones)")
        pips = {resource_id(ev, r): r for r in resources_of(t, "Microsoft.Network/publicIPAddresses")}
        for nat in resources_of(t, "Microsoft.Network/natGateways"):
            sku = ev.value(nat.get("sku", {}).get("name"))
            if zones and sku != "StandardV2":
                problems.append(f"{case}: NAT gateway SKU {sku!r}: a Standard NAT gateway lives in one zone; "
                                "StandardV2 is zone-redundant")
            if ev.value(nat.get("zones")):
                problems.append(f"{case}: NAT gateway pinned to zones {ev.value(nat.get('zones'))}")
            for ref in nat["properties"].get("publicIpAddresses", []):
                pip = pips.get(ev.value(ref["id"]))
                pip_sku = ev.value(pip["sku"]["name"]) if pip else None
                if pip_sku != sku:
                    problems.append(f"{case}: NAT gateway {sku} with a {pip_sku} public IP (the SKUs must match)")
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
    for c in ("escrow", "coordination", "snapshots"):
        labels[ev.fn_resourceid("Microsoft.Storage/storageAccounts/blobServices/containers", sa, "default",
                                ev.variable(f"{c}ContainerName")).lower()] = f"container:{c}"
    for k in VAULT_SUBNETS:
        labels[ev.fn_resourceid("Microsoft.KeyVault/vaults", ev.variable(f"{k}VaultName")).lower()] = f"vault:{k}"
    for k in ("unseal", "escrow"):
        labels[ev.fn_resourceid("Microsoft.KeyVault/vaults/keys", ev.variable(f"{k}VaultName"),
                                ev.variable(f"{k}KeyName")).lower()] = f"key:{k}"
    # Each server tier's own escrow secret (single-secret scope).
    for tier, name in ev.variable("escrowVaultEntries").items():
        labels[ev.fn_resourceid("Microsoft.KeyVault/vaults/secrets", ev.variable("escrowVaultName"),
                                name).lower()] = f"secret:escrow/{tier}"
    # The snapshot key lives in the escrow vault.
    labels[ev.fn_resourceid("Microsoft.KeyVault/vaults/keys", ev.variable("escrowVaultName"),
                            ev.variable("snapshotKeyName")).lower()] = "key:snapshot"
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
        out.append(dict(resource=r, principal=principal, scope=labels.get(scope.lower(), scope), scope_id=scope,
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
        (_t, f"secret:escrow/{_t}", custom(*ESCROW_SECRET_WRITE_ONLY)),
        (_t, "key:escrow", custom(*ESCROW_KEY_WRAP_ONLY)),
        (_t, "vault:shared", custom(f"{KV}/secrets/getSecret/action", f"{KV}/secrets/setSecret/action")),
        (_t, "vault:servers", custom(f"{KV}/secrets/getSecret/action", f"{KV}/secrets/setSecret/action")),
        (_t, "vault:status", custom(*ESCROW_SECRET_WRITE_ONLY)),
        (_t, "container:coordination", custom(f"{BLOB}/read", f"{BLOB}/write", f"{BLOB}/add/action")),
        # snapshots (docs/runbooks.md#snapshots): write-only blobs and a wrap-only key, as escrow
        (_t, "container:snapshots", custom(*ESCROW_BLOB_WRITE_ONLY)),
        (_t, "key:snapshot", custom(*ESCROW_KEY_WRAP_ONLY)),
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
    ("operator", "container:snapshots", "Storage Blob Data Reader"),
    ("operator", "key:snapshot", custom(f"{KV}/keys/unwrap/action")),
}


def check_access_matrix(t: dict, ev: Evaluator) -> list[str]:
    actual = {(a["principal"], a["scope"], a["role"]) for a in role_assignments(t, ev)}
    problems = [f"unexpected role assignment: {x}" for x in sorted(actual - EXPECTED_ACCESS)]
    problems += [f"missing role assignment: {x}" for x in sorted(EXPECTED_ACCESS - actual)]
    return problems


ESCROW_SCOPES = ({"container:escrow", "vault:escrow", "key:escrow", "container:snapshots", "key:snapshot"}
                 | {f"secret:escrow/{t}" for t in SERVER_TIERS})
PARENTS = {"container:escrow": {"storageAccount", "resourceGroup", "subscription"},
           "container:snapshots": {"storageAccount", "resourceGroup", "subscription"},
           "key:snapshot": {"vault:escrow", "resourceGroup", "subscription"},
           "vault:escrow": {"resourceGroup", "subscription"},
           **{f"secret:escrow/{t}": {"vault:escrow", "resourceGroup", "subscription"} for t in SERVER_TIERS},
           "key:escrow": {"vault:escrow", "resourceGroup", "subscription"},
           "key:unseal": {"vault:unseal", "resourceGroup", "subscription"}}


DATA_PREFIX = {"container:escrow": f"{BLOB}/", "vault:escrow": f"{KV}/secrets/", "key:escrow": f"{KV}/keys/",
               "container:snapshots": f"{BLOB}/", "key:snapshot": f"{KV}/keys/",
               "key:unseal": f"{KV}/keys/", **{f"secret:escrow/{t}": f"{KV}/secrets/" for t in SERVER_TIERS}}


def check_escrow_write_only(t: dict, ev: Evaluator) -> list[str]:
    """No VM identity can read escrow: on the escrow container, vault and key (and anything above them) VM
    identities hold exactly the write-only roles; the custom roles have exactly the listed data actions."""
    problems = []
    # Key Vault escrow: each server tier sets its own tier's escrow secret only (single-secret scope); nobody
    # holds a secret role on the whole escrow vault (checked through PARENTS below).
    want = {"container:escrow": ESCROW_BLOB_WRITE_ONLY, "key:escrow": ESCROW_KEY_WRAP_ONLY,
            "container:snapshots": ESCROW_BLOB_WRITE_ONLY, "key:snapshot": ESCROW_KEY_WRAP_ONLY,
            **{f"secret:escrow/{t}": ESCROW_SECRET_WRITE_ONLY for t in SERVER_TIERS}}
    holders_wanted = {scope: [scope.split("/", 1)[1]] if scope.startswith("secret:") else SERVER_TIERS
                      for scope in want}
    assignments = role_assignments(t, ev)
    vm = [a for a in assignments if a["principal"] in TIERS]
    for scope, exact in want.items():
        holders = [a for a in vm if a["scope"] == scope]
        if sorted({a["principal"] for a in holders}) != sorted(holders_wanted[scope]):
            problems.append(f"{scope}: write access held by {sorted({a['principal'] for a in holders})}, "
                            f"want {holders_wanted[scope]}")
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
# KeyVaultDouble::model_arm in lab/src/keyvault/mod.rs and agent/src/material.rs `Vaults`.
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


# Resources with a data-plane firewall, and the service (endpoint name, data action namespace) behind it.
FIREWALLED = {"Microsoft.Storage/storageAccounts": "Microsoft.Storage",
              "Microsoft.KeyVault/vaults": "Microsoft.KeyVault"}
# Where each principal's data-plane requests come from: a tier from its own subnet; operators sit outside the VNet
# and reach the data plane from the jumpbox (docs/deploy.md, docs/runbooks.md).
SUBNET_OF_PRINCIPAL = {**{tier: tier for tier in TIERS}, "operator": "jumpbox"}


def firewall_admissions(t: dict, ev: Evaluator) -> tuple[dict[str, dict], list[str]]:
    """For every storage account and Key Vault: {resource id: {"label", "admitted": subnets, "needed": {subnet:
    [why]}}}: the subnets its firewall admits, and the subnets it must admit because a principal there holds a
    data-plane role on it (on the resource itself, on something inside it, or on a scope above it)."""
    problems = []
    vnet = ev.fn_resourceid("Microsoft.Network/virtualNetworks", ev.variable("vnetName"))
    assignments = role_assignments(t, ev)
    labels = _scope_labels(t, ev)
    out = {}
    for rtype, service in FIREWALLED.items():
        for r in resources_of(t, rtype):
            rid = resource_id(ev, r)
            label = labels.get(rid.lower(), f"{rtype} {ev.value(r['name'])}")
            acls = r.get("properties", {}).get("networkAcls")
            if not acls:
                problems.append(f"{label}: no firewall (networkAcls)")
                continue
            if acls.get("defaultAction") != "Deny":
                problems.append(f"{label}: firewall default action is {acls.get('defaultAction')!r}, want Deny")
            if acls.get("ipRules"):
                problems.append(f"{label}: IP rules {acls['ipRules']} (only the cluster's subnets)")
            admitted = set()
            for rule in acls.get("virtualNetworkRules", []):
                sid = ev.value(rule["id"])
                parent, _, subnet = sid.rpartition("/subnets/")
                if parent != vnet:
                    problems.append(f"{label}: admits {sid}, a subnet outside the cluster's VNet")
                if rule.get("action", "Allow") != "Allow":
                    problems.append(f"{label}: rule for {subnet} has action {rule.get('action')!r}")
                admitted.add(subnet)
            needed: dict[str, list[str]] = {}
            for a in assignments:
                sid = a["scope_id"].lower()
                inside_or_on = sid == rid.lower() or sid.startswith(rid.lower() + "/")
                above = rid.lower().startswith(sid.rstrip("/") + "/")
                data = {d for d in a["data_actions"]
                        if d == "*" or d.lower().startswith(service.lower() + "/")
                        or fnmatch.fnmatchcase(f"{service}/x".lower(), d.lower())}
                if not data or not (inside_or_on or above):
                    continue
                subnet = SUBNET_OF_PRINCIPAL.get(a["principal"])
                if subnet is None:
                    problems.append(f"{label}: {a['principal']} holds {a['role']} on {a['scope']}, from no known subnet")
                    continue
                needed.setdefault(subnet, []).append(f"{a['principal']}: {a['role']} on {a['scope']}")
            out[rid] = {"label": label, "service": service, "admitted": admitted, "needed": needed}
    return out, problems


def check_firewalls_admit_data_plane_principals(t: dict, ev: Evaluator) -> list[str]:
    """Every firewall (the storage account and every Key Vault) admits exactly the subnets of the principals that
    hold a data-plane role on it: a principal whose subnet is missing has its requests refused by the network
    rules however right its role (workers' boot records were never published that way), and a subnet nobody
    there needs is an opening for nothing. Every admitted subnet has the service endpoint the rule relies on."""
    fws, problems = firewall_admissions(t, ev)
    vnets = resources_of(t, "Microsoft.Network/virtualNetworks")
    endpoints = {s["name"]: {e.get("service") for e in s.get("properties", {}).get("serviceEndpoints", [])}
                 for v in vnets for s in v["properties"]["subnets"]}
    if not fws:
        problems.append("no storage account or Key Vault with a firewall")
    for fw in fws.values():
        for subnet, why in sorted(fw["needed"].items()):
            if subnet not in fw["admitted"]:
                problems.append(f"{fw['label']}: the firewall does not admit subnet {subnet}, but "
                                f"{'; '.join(why)}: those requests are refused")
        for subnet in sorted(fw["admitted"] - set(fw["needed"])):
            problems.append(f"{fw['label']}: admits subnet {subnet}, where nobody holds a data-plane role on it")
        for subnet in sorted(fw["admitted"]):
            if fw["service"] not in endpoints.get(subnet, set()):
                problems.append(f"{fw['label']}: admits subnet {subnet}, which has no {fw['service']} service "
                                f"endpoint (the rule cannot match its traffic)")
    return problems


# docs/network.md names each firewalled resource by its name prefix.
DOC_TARGET_PREFIX = {"kvu": "vault:unseal", "kvs": "vault:shared", "kvc": "vault:servers", "kvj": "vault:status",
                     "kve": "vault:escrow", "hs": "storageAccount"}


def check_firewall_table_matches_doc(t: dict, ev: Evaluator, network_md: str) -> list[str]:
    """docs/network.md's 'target | admitted subnets' table is the template's firewalls, row for row."""
    fws, problems = firewall_admissions(t, ev)
    actual = {fw["label"]: fw["admitted"] for fw in fws.values()}
    documented: dict[str, set[str]] = {}
    for table in markdown_tables(network_md):
        if not table or "admitted subnets" not in table[0]:
            continue
        for row in table:
            m = re.search(r"`([a-z]+)(?:-)?…", row["target"])
            label = DOC_TARGET_PREFIX.get(m.group(1)) if m else None
            if label is None:
                problems.append(f"docs/network.md: cannot tell which resource {row['target']!r} is")
                continue
            documented[label] = {strip_md(s) for s in row["admitted subnets"].split(",")}
    if not documented:
        return problems + ["docs/network.md has no 'admitted subnets' table"]
    for label in sorted(set(actual) | set(documented)):
        if actual.get(label) != documented.get(label):
            problems.append(f"{label}: the template admits {sorted(actual.get(label, []))}, docs/network.md says "
                            f"{sorted(documented.get(label, []))}")
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


def _write_condition_prefixes(cond: str) -> list[str] | None:
    """The blob-path prefixes a role assignment condition lets writes go to, if it has exactly Microsoft's documented
    shape: `((!(ActionMatches{'<blobs>/write'}) AND !(ActionMatches{'<blobs>/add/action'})) OR (@Resource[<blobs>:path]
    StringStartsWith '<p1>' [OR @Resource[<blobs>:path] StringStartsWith '<p2>' ...]))`; None otherwise."""
    head = (f"((!(ActionMatches{{'{BLOB}/write'}}) AND !(ActionMatches{{'{BLOB}/add/action'}})) OR (")
    if not cond.startswith(head) or not cond.endswith("))"):
        return None
    body = cond[len(head):-2]
    prefixes = []
    for part in body.split(" OR "):
        m = re.fullmatch(rf"@Resource\[{re.escape(BLOB)}:path\] StringStartsWith '([^'*]+)'", part)
        if not m:
            return None
        prefixes.append(m.group(1))
    return prefixes


def check_tier_isolation(t: dict, ev: Evaluator) -> list[str]:
    """Issue 12, item 6: a server tier's identity writes only its own tier's escrow, snapshot and coordination
    objects. Its escrow blob writer, snapshot blob writer and coordination writer assignments carry an ABAC condition (version 2.0) letting
    `write` and `add/action` through only under `<clusterName>/<tier>/` (coordination also: the shared cluster
    material lease `<clusterName>/material/` and boot records `<clusterName>/nodes/`); its Key Vault escrow writer
    is scoped to its own tier's escrow secret, which the template creates."""
    problems = []
    cluster = ev.param("clusterName")
    want = {
        "container:escrow": lambda tier: [f"{cluster}/{tier}/"],
        # Snapshots are named <cluster>/<tier>/<time>-<index>-<id>.hsnap (agent/src/snapshot/mod.rs blob_name).
        "container:snapshots": lambda tier: [f"{cluster}/{tier}/"],
        "container:coordination": lambda tier: [f"{cluster}/{tier}/", f"{cluster}/material/", f"{cluster}/nodes/"],
    }
    assignments = role_assignments(t, ev)
    for tier in SERVER_TIERS:
        for scope, prefixes in want.items():
            held = [a for a in assignments if a["principal"] == tier and a["scope"] == scope
                    and any(d in (f"{BLOB}/write", f"{BLOB}/add/action") for d in a["data_actions"])]
            if len(held) != 1:
                problems.append(f"{tier}: {len(held)} write assignments on {scope}, want 1")
                continue
            props = held[0]["resource"].get("properties", {})
            cond = ev.value(props["condition"]) if "condition" in props else ""
            got = _write_condition_prefixes(cond)
            if props.get("conditionVersion") != "2.0":
                problems.append(f"{tier} on {scope}: conditionVersion {props.get('conditionVersion')!r}, want '2.0'")
            if got is None:
                problems.append(f"{tier} on {scope}: no path condition of the documented shape (got {cond!r})")
            elif got != prefixes(tier):
                problems.append(f"{tier} on {scope}: writes allowed under {got}, want exactly {prefixes(tier)}")
        secrets = {name: tier_ for tier_, name in ev.variable("escrowVaultEntries").items()}
        entry = ev.variable("escrowVaultEntries").get(tier)
        if entry != f"{cluster}-{tier}-escrow":
            problems.append(f"{tier}: escrow secret named {entry!r}, want '{cluster}-{tier}-escrow' "
                            "(agent/src/escrow/mod.rs tier_secret_name)")
        created = {ev.value(r["name"]) for r in resources_of(t, "Microsoft.KeyVault/vaults/secrets")}
        if f"{ev.variable('escrowVaultName')}/{entry}" not in created:
            problems.append(f"{tier}: its escrow secret {entry!r} is not created by the template")
        kv_writes = [a for a in assignments if a["principal"] == tier and _grants(SECRET_SET, a["data_actions"])
                     and (a["scope"].startswith("secret:escrow/") or a["scope"] in ("vault:escrow", "resourceGroup",
                                                                                       "subscription"))]
        if [a["scope"] for a in kv_writes] != [f"secret:escrow/{tier}"]:
            problems.append(f"{tier}: sets escrow secrets at {[a['scope'] for a in kv_writes]}, "
                            f"want only secret:escrow/{tier}")
        del secrets
    return problems


def check_escrow_immutable(t: dict, ev: Evaluator) -> list[str]:
    """Issue 12, item 6: the escrow container keeps every version of every escrow blob unchangeable: version-level
    immutability (WORM) enabled on the container, blob versioning on the account (which it requires), and a default
    time-based retention policy on the container, not extended to append writes."""
    problems = []
    sa = ev.variable("storageAccountName")
    esc = ev.variable("escrowContainerName")
    containers = [r for r in resources_of(t, "Microsoft.Storage/storageAccounts/blobServices/containers")
                  if ev.value(r["name"]) == f"{sa}/default/{esc}"]
    if len(containers) != 1:
        return [f"{len(containers)} escrow containers"]
    c = containers[0]
    if c.get("properties", {}).get("immutableStorageWithVersioning", {}).get("enabled") is not True:
        problems.append("escrow container: immutableStorageWithVersioning.enabled is not true")
    services = [r for r in resources_of(t, "Microsoft.Storage/storageAccounts/blobServices")
                if ev.value(r["name"]) == f"{sa}/default"]
    if not services or services[0].get("properties", {}).get("isVersioningEnabled") is not True:
        problems.append("blob service: isVersioningEnabled is not true (version-level immutability requires it)")
    policies = [r for r in resources_of(t, "Microsoft.Storage/storageAccounts/blobServices/containers/immutabilityPolicies")
                if ev.value(r["name"]) == f"{sa}/default/{esc}/default"]
    if len(policies) != 1:
        problems.append(f"escrow container: {len(policies)} default immutability policies, want 1")
    else:
        p = policies[0].get("properties", {})
        days = ev.value(p.get("immutabilityPeriodSinceCreationInDays", 0))
        if not isinstance(days, int) or days < 1:
            problems.append(f"escrow immutability period {days!r}: want at least one day")
        if p.get("allowProtectedAppendWrites") or p.get("allowProtectedAppendWritesAll"):
            problems.append("escrow immutability policy allows protected append writes")
        cid = ev.fn_resourceid("Microsoft.Storage/storageAccounts/blobServices/containers", sa, "default", esc)
        if cid not in {ev.value(d) for d in policies[0].get("dependsOn", [])}:
            problems.append("escrow immutability policy does not depend on the escrow container")
    return problems


AUDITED_VAULTS = ("unseal", "shared", "servers", "status", "escrow")
BLOB_LOG_CATEGORIES = {"StorageRead", "StorageWrite", "StorageDelete"}
LOCKED = ("storageAccount", "vault:escrow", "vault:unseal")


def check_audit_trail(t: dict, ev: Evaluator) -> list[str]:
    """Issue 12, item 8: a Log Analytics workspace of the template receives Key Vault `AuditEvent` logs from every
    vault and blob read, write and delete logs from the storage account's blob service (diagnostic settings as
    extension resources on them), and `CanNotDelete` locks sit on the storage account and the escrow and unseal
    vaults. The workspace's id and customer id are outputs (the runbook's query needs them)."""
    problems = []
    ws = resources_of(t, "Microsoft.OperationalInsights/workspaces")
    if len(ws) != 1:
        return [f"{len(ws)} Log Analytics workspaces, want 1"]
    ws_id = ev.fn_resourceid("Microsoft.OperationalInsights/workspaces", ev.value(ws[0]["name"]))
    days = ev.value(ws[0].get("properties", {}).get("retentionInDays", 0))
    if not isinstance(days, int) or days < 90:
        problems.append(f"workspace retention {days!r} days: want at least 90")
    rg = ev.fn_resourcegroup()["id"]
    labels = _scope_labels(t, ev)
    blob_service = ev.fn_resourceid("Microsoft.Storage/storageAccounts/blobServices",
                                    ev.variable("storageAccountName"), "default").lower()
    labels[blob_service] = "blobService"
    got: dict[str, set[str]] = {}
    for r in resources_of(t, "Microsoft.Insights/diagnosticSettings"):
        scope = ev.value(r.get("scope", ""))
        full = scope if scope.startswith("/") else f"{rg}/providers/{scope}"
        where = labels.get(full.lower(), full)
        p = r.get("properties", {})
        if ev.value(p.get("workspaceId", "")) != ws_id:
            problems.append(f"diagnostic setting on {where}: not sent to the template's workspace")
            continue
        if ws_id not in {ev.value(d) for d in r.get("dependsOn", [])}:
            problems.append(f"diagnostic setting on {where}: does not depend on the workspace")
        got.setdefault(where, set()).update(
            lg.get("category") for lg in p.get("logs", []) if lg.get("enabled") is True)
    for v in AUDITED_VAULTS:
        if "AuditEvent" not in got.get(f"vault:{v}", set()):
            problems.append(f"vault:{v}: no AuditEvent logs to the workspace")
    missing = BLOB_LOG_CATEGORIES - got.get("blobService", set())
    if missing:
        problems.append(f"blob service: no {sorted(missing)} logs to the workspace")
    locked = set()
    for r in resources_of(t, "Microsoft.Authorization/locks"):
        scope = ev.value(r.get("scope", ""))
        full = scope if scope.startswith("/") else f"{rg}/providers/{scope}"
        if r.get("properties", {}).get("level") == "CanNotDelete":
            locked.add(labels.get(full.lower(), full))
    for want in LOCKED:
        if want not in locked:
            problems.append(f"{want}: no CanNotDelete lock")
    for out in ("logAnalyticsWorkspaceId", "logAnalyticsCustomerId"):
        if out not in t.get("outputs", {}):
            problems.append(f"output {out} missing")
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


ROLE_DEF_PREFIX = f"/subscriptions/{CTX['subscriptionId']}/providers/Microsoft.Authorization/roleDefinitions/"


def check_role_definition_ids(t: dict, ev: Evaluator, other_cluster: Evaluator) -> list[str]:
    """Role assignments name their role in the form the service reports (subscriptionResourceId(): the resource
    group form of resourceId() is normalised away by the service, so what-if would show every assignment as
    changed on every run), and the custom role definitions of two clusters in one resource group (`other_cluster`:
    the same template with another clusterName) neither share nor rename each other's roles."""
    problems = []
    for r in resources_of(t, "Microsoft.Authorization/roleAssignments"):
        raw = r.get("properties", {}).get("roleDefinitionId", "")
        if not raw.startswith("[subscriptionResourceId('Microsoft.Authorization/roleDefinitions',"):
            problems.append(f"role assignment {r['name']}: roleDefinitionId {raw!r} is not built with "
                            "subscriptionResourceId() (the service reports the subscription form)")
            continue
        rid = ev.value(raw)
        if not rid.startswith(ROLE_DEF_PREFIX):
            problems.append(f"role assignment {r['name']}: roleDefinitionId evaluates to {rid!r}")
    ours = {ev.value(r["name"]): r for r in resources_of(t, "Microsoft.Authorization/roleDefinitions")}
    theirs = {other_cluster.value(r["name"]) for r in resources_of(t, "Microsoft.Authorization/roleDefinitions")}
    for guid in sorted(set(ours) & theirs):
        problems.append(f"role definition {_follow_variable(t, ours[guid]['name'])}: the same GUID for another "
                        f"cluster in the resource group (the name must include clusterName)")
    names = {ev.value(r["properties"]["roleName"]) for r in ours.values()}
    other_names = {other_cluster.value(r["properties"]["roleName"]) for r in ours.values()}
    for n in sorted(names & other_names):
        problems.append(f"role name {n!r} is the same for another cluster in the resource group")
    for r in resources_of(t, "Microsoft.Authorization/roleAssignments"):
        if ev.value(r["name"]) == other_cluster.value(r["name"]):
            problems.append(f"role assignment {r['name']}: the same name for another cluster in the resource group")
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


def _port_ranges(spec: str) -> list[tuple[int, int]]:
    if spec == "*":
        return [(0, 65535)]
    lo, _, hi = str(spec).partition("-")
    return [(int(lo), int(hi or lo))]


CONSUL_WAN_PORT = 8302


def check_consul_wan_decision(t: dict, ev: Evaluator, network_md: str) -> list[str]:
    """Consul WAN gossip (8302): this is a single-datacenter design. No NSG allows 8302 (from anywhere), and
    docs/network.md says so and says that the rendered Consul config turns the WAN listener off
    (ports.serf_wan = -1), so that servers neither listen on nor gossip over a port the network drops."""
    problems = []
    for nsg in resources_of(t, "Microsoft.Network/networkSecurityGroups"):
        for rule in nsg["properties"].get("securityRules", []):
            p = rule["properties"]
            if p.get("access") != "Allow":
                continue
            specs = p.get("destinationPortRanges") or [p.get("destinationPortRange")]
            for spec in specs:
                if any(lo <= CONSUL_WAN_PORT <= hi for lo, hi in _port_ranges(ev.value(spec))):
                    problems.append(f"{ev.value(nsg['name'])} rule {rule['name']} allows {spec}, which includes "
                                    f"Consul WAN gossip {CONSUL_WAN_PORT}: a single datacenter has no WAN pool")
    text = " ".join(network_md.split())
    if "single datacenter" not in text.lower():
        problems.append("docs/network.md does not say that the cluster is a single datacenter")
    if not re.search(r"serf_wan\W+(=|:)\s*-1", text):
        problems.append("docs/network.md does not say that the rendered Consul config sets ports.serf_wan = -1 "
                        "(the WAN listener off)")
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
    "hashistack-vault-address": r"https://\d+\.\d+\.\d+\.\d+:8200",
}
JOIN_TAG_TIER = {"hashistack-consul-join": "consul", "hashistack-vault-join": "vault", "hashistack-nomad-join": "nomad"}
# Which vault each Key Vault URI tag must name (a worker given the servers vault's URI as its shared vault would
# try to read the CA key's vault).
VAULT_OF_TAG = {"hashistack-keyvault-uri": "sharedVaultName", "hashistack-servers-vault-uri": "serversVaultName",
                "hashistack-status-vault-uri": "statusVaultName", "hashistack-escrow-vault-uri": "escrowVaultName"}
# Tags the agent refuses on a role (agent/src/node.rs `forbid`): a vault URI on a node with no business with
# that vault is a mis-tagged tier.
TAG_FORBIDDEN_FOR = {"hashistack-servers-vault-uri": {"worker", "jumpbox"},
                     "hashistack-status-vault-uri": {"worker"},
                     "hashistack-vault-address": {"consul-server"},
                     "hashistack-nomad-address": {"consul-server", "worker", "jumpbox"}}


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
            if tag == "hashistack-vault-address":
                # Vault's certificate names this address: it must be the load balancer's (the output operators use).
                want = ev.value(t["outputs"]["vaultApiAddress"]["value"])
                if value != want:
                    problems.append(f"{label}: {tag}={value!r} is not the Vault load balancer ({want})")
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


# ============================================================================================ createUiDefinition

# arm-ttk: every Microsoft.* control has a tooltip, except these.
NO_TOOLTIP_CONTROLS = {"Microsoft.Common.InfoBox", "Microsoft.Common.Section", "Microsoft.Common.TextBlock"}


def ui_elements(ui: dict) -> list[tuple[str, dict]]:
    """(step name or 'basics', element) for every element, nested ones (sections) included."""
    out = []

    def walk(where, elements):
        for el in elements:
            out.append((where, el))
            walk(where, el.get("elements", []))
    walk("basics", ui.get("parameters", {}).get("basics", []))
    for step in ui.get("parameters", {}).get("steps", []):
        walk(step["name"], step.get("elements", []))
    return out


def ui_output_elements(ui: dict) -> dict[str, tuple[str, dict]]:
    """template parameter -> (expression, element) for outputs that read one element."""
    by_ref = {}
    for where, el in ui_elements(ui):
        by_ref[(where, el["name"])] = el
    out = {}
    for param, value in ui.get("parameters", {}).get("outputs", {}).items():
        m = re.search(r"basics\('([^']+)'\)", value) or re.search(r"steps\('([^']+)'\)\.([A-Za-z0-9_]+)", value)
        if not m:
            continue
        key = ("basics", m.group(1)) if m.group(0).startswith("basics") else (m.group(1), m.group(2))
        if key in by_ref:
            out[param] = (value, by_ref[key])
    return out


def textbox_regexes(el: dict) -> list[str]:
    c = el.get("constraints", {})
    regexes = [c["regex"]] if c.get("regex") else []
    regexes += [v["regex"] for v in c.get("validations", []) if "regex" in v]
    return regexes


def ui_accepts(el: dict, text: str) -> bool:
    """Would the portal accept `text` in this TextBox? (Its regexes are plain ECMAScript patterns that Python's re
    reads the same way: classes, groups, alternation, quantifiers and lookahead.)"""
    return all(re.search(rx, text) for rx in textbox_regexes(el))


def check_uidef_refuses_what_the_template_refuses(t: dict, ui: dict) -> list[str]:
    """The portal refuses what the deployment would reject, and explains every control:
    - every control has a tooltip (arm-ttk: Tooltips Should Be Present);
    - the administrator name has no default (arm-ttk: Usernames Should Not Have A Default) and the template's
      length limit; the SSH key confirmation is shown (arm-ttk: Credential Confirmation Should Not Be Hidden);
    - every TextBox has a regex and a message (arm-ttk: Textboxes Are Well Formed);
    - a number typed into a TextBox is accepted exactly from the template parameter's minValue to its maxValue;
    - every DropDown value and default is one the template parameter allows;
    - every size selector offers exactly the template parameter's allowed sizes (the template hard-codes
      accelerated networking, Premium SSD disks and encryption at host, which not every size supports), with
      recommended sizes and the template's default among them."""
    problems = []
    params = t.get("parameters", {})
    for where, el in ui_elements(ui):
        typ, name = el.get("type", ""), el.get("name")
        if typ.startswith("Microsoft.") and typ not in NO_TOOLTIP_CONTROLS:
            tip = el.get("toolTip")
            texts = list(tip.values()) if isinstance(tip, dict) else [tip]
            if not tip or not all(isinstance(x, str) and x.strip() for x in texts):
                problems.append(f"{where}.{name}: no tooltip")
        if typ == "Microsoft.Compute.UserNameTextBox" and el.get("defaultValue"):
            problems.append(f"{where}.{name}: the user name has a default ({el['defaultValue']!r})")
        if typ == "Microsoft.Compute.CredentialsCombo" and el.get("options", {}).get("hideConfirmation") is True:
            problems.append(f"{where}.{name}: the credential confirmation is hidden")
        if typ == "Microsoft.Common.TextBox":
            c = el.get("constraints", {})
            if not textbox_regexes(el):
                problems.append(f"{where}.{name}: no regex")
            if c.get("regex") and not c.get("validationMessage"):
                problems.append(f"{where}.{name}: regex without a validationMessage")
            for v in c.get("validations", []):
                if not v.get("message"):
                    problems.append(f"{where}.{name}: a validation without a message")
    for param, (expr, el) in ui_output_elements(ui).items():
        decl = params.get(param)
        if decl is None:
            continue
        typ = el.get("type")
        label = f"{param} ({el['name']})"
        if typ == "Microsoft.Common.TextBox" and decl.get("type") == "int":
            lo, hi = decl.get("minValue"), decl.get("maxValue")
            if lo is None or hi is None:
                problems.append(f"{label}: the template parameter has no minValue/maxValue")
                continue
            accepted = {n for n in range(-10, 3 * hi + 1000) if ui_accepts(el, str(n))}
            wanted = set(range(lo, hi + 1))
            if accepted != wanted:
                extra, missing = sorted(accepted - wanted), sorted(wanted - accepted)
                problems.append(f"{label}: the portal accepts {len(extra)} numbers the template refuses "
                                f"{extra[:3]}{'…' if len(extra) > 3 else ''} and refuses {len(missing)} it allows "
                                f"{missing[:3]}{'…' if len(missing) > 3 else ''} (template: {lo}-{hi})")
            for junk in ("", " ", "1e3", "0x10", "+5", "-1"):
                if ui_accepts(el, junk) and junk.strip():
                    problems.append(f"{label}: the portal accepts {junk!r}")
        if typ == "Microsoft.Compute.UserNameTextBox" and decl.get("maxLength"):
            too_long = "a" * (decl["maxLength"] + 1)
            if ui_accepts(el, too_long):
                problems.append(f"{label}: the portal accepts {len(too_long)} characters, the template at most "
                                f"{decl['maxLength']}")
        if typ == "Microsoft.Common.DropDown" and "allowedValues" in decl:
            for v in el.get("constraints", {}).get("allowedValues", []):
                if v["value"] not in decl["allowedValues"]:
                    problems.append(f"{label}: offers {v['value']!r}, which the template refuses")
        if typ == "Microsoft.Common.DropDown" and "defaultValue" in el:
            labels = {v["label"]: v["value"] for v in el.get("constraints", {}).get("allowedValues", [])}
            if el["defaultValue"] not in labels:
                problems.append(f"{label}: default {el['defaultValue']!r} is not one of its labels")
            elif "defaultValue" in decl and not is_expr(decl["defaultValue"]) and \
                    labels[el["defaultValue"]] != decl["defaultValue"]:
                problems.append(f"{label}: the portal's default {labels[el['defaultValue']]!r} is not the "
                                f"template's {decl['defaultValue']!r}")
        if typ == "Microsoft.Compute.SizeSelector":
            allowed = el.get("constraints", {}).get("allowedSizes")
            if not decl.get("allowedValues"):
                problems.append(f"{label}: the template parameter allows any size, but the template hard-codes "
                                "accelerated networking, Premium SSD and encryption at host")
            if allowed is None:
                problems.append(f"{label}: the size selector offers every size (no constraints.allowedSizes)")
            elif sorted(allowed) != sorted(decl.get("allowedValues", [])):
                problems.append(f"{label}: the size selector's allowedSizes differ from the template's allowedValues")
            for size in el.get("recommendedSizes", []):
                if allowed is not None and size not in allowed:
                    problems.append(f"{label}: recommends {size}, which it does not allow")
            if allowed is not None and decl.get("defaultValue") not in allowed:
                problems.append(f"{label}: the template's default {decl.get('defaultValue')} is not allowed")
    return problems


# What must never open SSH to the jumpbox: the whole internet, spelt any way the NSG would accept.
SSH_REFUSED = [["0.0.0.0/0"], ["*"], ["Internet"], ["internet"], ["Any"], ["ANY"], ["10.1.2.3/0"],
               ["203.0.113.0/24", "0.0.0.0/0"]]
SSH_ACCEPTED = [["203.0.113.0/24"], ["203.0.113.7/32", "198.51.100.0/24"], ["100.64.0.0/10"]]


def check_ssh_source_refusal(t: dict, ui: dict, values: dict) -> list[str]:
    """allowedSshSourcePrefixes: the portal and the template both refuse SSH from the whole internet
    (0.0.0.0/0 or any /0, '*', 'Internet', 'Any'), and both accept ordinary prefixes; the portal also refuses
    what the NSG would (octets over 255, prefixes over /32)."""
    problems = []
    el = ui_output_elements(ui).get("allowedSshSourcePrefixes", (None, None))[1]
    if el is None:
        return ["createUiDefinition has no element for allowedSshSourcePrefixes"]
    for prefixes in SSH_REFUSED + [["300.1.2.3/24"], ["203.0.113.0/33"]]:
        for text in (", ".join(prefixes), ",".join(prefixes)):
            if ui_accepts(el, text):
                problems.append(f"the portal accepts SSH from {text!r}")
    for prefixes in SSH_ACCEPTED:
        if not ui_accepts(el, ", ".join(prefixes)):
            problems.append(f"the portal refuses SSH from {', '.join(prefixes)!r}")
    nsg = next((r for r in resources_of(t, "Microsoft.Network/networkSecurityGroups")
                for rule in r["properties"]["securityRules"] if rule["name"] == "SshFromAllowedPrefixes"), None)
    if nsg is None:
        return problems + ["no SshFromAllowedPrefixes rule in the template"]
    # The whole rule is evaluated: the refusal may sit in any of its properties (checkov reads the source prefixes
    # only when they are the parameter itself).
    rule = next(x for x in nsg["properties"]["securityRules"] if x["name"] == "SshFromAllowedPrefixes")
    for prefixes in SSH_REFUSED:
        try:
            got = Evaluator(t, dict(values, allowedSshSourcePrefixes=prefixes)).value(rule)["properties"]
            problems.append(f"the template opens SSH from {prefixes} (rule sources "
                            f"{got.get('sourceAddressPrefixes', got.get('sourceAddressPrefix'))})")
        except ArmExprError:
            pass
    for prefixes in SSH_ACCEPTED:
        try:
            got = Evaluator(t, dict(values, allowedSshSourcePrefixes=prefixes)).value(rule)["properties"]
            got = got.get("sourceAddressPrefixes", got.get("sourceAddressPrefix"))
            if got != prefixes:
                problems.append(f"the template turns {prefixes} into {got}")
        except ArmExprError as exc:
            problems.append(f"the template refuses SSH from {prefixes}: {exc}")
    return problems


def check_encryption_at_host_choice(t: dict, ui: dict) -> list[str]:
    """encryptionAtHost is off by default (it fails on subscriptions without the EncryptionAtHost feature), and
    the portal says so where the choice is made: a tooltip and an info box naming the feature."""
    problems = []
    decl = t.get("parameters", {}).get("encryptionAtHost", {})
    if decl.get("defaultValue") is not False:
        problems.append(f"encryptionAtHost defaults to {decl.get('defaultValue')!r}: deployments to a subscription "
                        "without the EncryptionAtHost feature fail")
    el = ui_output_elements(ui).get("encryptionAtHost", (None, {}))[1] or {}
    values = {v["label"]: v["value"] for v in el.get("constraints", {}).get("allowedValues", [])}
    if values.get(el.get("defaultValue")) is not False:
        problems.append(f"the portal's encryption at host default is {el.get('defaultValue')!r}, not off")
    if "EncryptionAtHost" not in (el.get("toolTip") or ""):
        problems.append("the encryption at host tooltip does not name the EncryptionAtHost feature")
    boxes = [e for _, e in ui_elements(ui) if e.get("type") == "Microsoft.Common.InfoBox"
             and "EncryptionAtHost" in e.get("options", {}).get("text", "")
             and "az feature register" in e.get("options", {}).get("text", "")]
    if not boxes:
        problems.append("no info box explains the EncryptionAtHost feature and how to register it")
    return problems


# ============================================================================================ docs/deploy.md

def _section(md: str, heading_prefix: str) -> str:
    """The text of the '## <heading_prefix>…' section, up to the next '## '."""
    m = re.search(r"^## " + re.escape(heading_prefix) + r".*?$(.*?)(?=^## |\Z)", md, re.M | re.S)
    return m.group(1) if m else ""


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)


def check_deploy_doc_roles(md: str) -> list[str]:
    """The roles deploy.md asks for can create the template's custom role definitions: Owner, or Contributor plus
    User Access Administrator. Role Based Access Control Administrator only writes role assignments."""
    problems = []
    text = " ".join(md.split())
    if "Owner" not in text or "User Access Administrator" not in text:
        problems.append("docs/deploy.md does not ask for Owner or Contributor + User Access Administrator")
    for sentence in re.split(r"(?<=[.:;])\s", text):
        if "Role Based Access Control Administrator" in sentence and not re.search(r"\bnot\b|cannot", sentence):
            problems.append(f"docs/deploy.md offers Role Based Access Control Administrator, which cannot create "
                            f"role definitions: {sentence.strip()!r}")
    return problems


def check_packer_commands_build_the_directory(texts: dict[str, str]) -> list[str]:
    """Every `packer init|validate|build` in the docs works on the directory packer/ (a single .pkr.hcl file
    leaves out variables.pkr.hcl: every variable would be undeclared)."""
    problems = []
    for where, text in texts.items():
        for line in text.splitlines():
            m = re.search(r"\bpacker (init|validate|build)\b(.*)", line)
            if not m:
                continue
            cmd = m.group(2).split("#")[0].split("`")[0].split()
            if not cmd:
                continue  # the command named in prose, without arguments
            target = cmd[-1]
            if target != "packer/":
                problems.append(f"{where}: `packer {m.group(1)}` on {target!r}, not the directory packer/: {line.strip()}")
            if ".pkr.hcl" in line and "packer build" in line:
                problems.append(f"{where}: builds a single file: {line.strip()}")
    return problems


def check_no_issue_numbers(where: str, md: str) -> list[str]:
    """A document speaks for itself: no 'the subject of issue 5'."""
    return [f"{where}: refers to an issue by number: {m.group(0)!r}"
            for m in re.finditer(r"\bissues? #?\d+", md, re.I)]


# Stand-ins for what the operator's shell substitutes in deploy.md's parameters file.
SHELL_STAND_INS = {
    "$IMAGE_ID": "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/rg-hashistack-images/providers/"
                 "Microsoft.Compute/images/hashistack-1.21.4-1.20.4-1.10.5-20261201120000",
    "$(cat ~/.ssh/id_ed25519.pub)": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHashistackDocsExampleKeyOnly op@laptop",
    "$(az ad group show -g hashistack-operators --query id -o tsv)": "00000000-0000-4000-8000-0000000000f0",
}


def deploy_doc_parameters(md: str) -> tuple[dict | None, list[str]]:
    """The parameters file deploy.md writes (its heredoc), with the shell's substitutions stood in for."""
    m = re.search(r"cat > (\S+) <<EOF\n(.*?)^EOF$", md, re.M | re.S)
    if not m:
        return None, ["docs/deploy.md writes no parameters file (cat > FILE <<EOF … EOF)"]
    body = m.group(2).replace("\\$", "\0")  # an escaped $ is a literal one
    for k, v in SHELL_STAND_INS.items():
        body = body.replace(k, v)
    left = re.findall(r"\$\(?[A-Za-z_][^\"]*", body)
    if left:
        return None, [f"docs/deploy.md's parameters file uses shell values the check cannot stand in for: {left}"]
    body = body.replace("\0", "$")
    try:
        return json.loads(body), []
    except json.JSONDecodeError as exc:
        return None, [f"docs/deploy.md's parameters file is not JSON: {exc}"]


def _param_problems(name: str, decl: dict, value: Any) -> list[str]:
    typ = decl.get("type", "").lower()
    types = {"string": str, "securestring": str, "int": int, "bool": bool, "array": list, "object": dict,
             "secureobject": dict}
    if typ in types and (not isinstance(value, types[typ]) or (typ == "int" and isinstance(value, bool))):
        return [f"{name}: {value!r} is not of type {typ}"]
    out = []
    if "allowedValues" in decl and value not in decl["allowedValues"]:
        out.append(f"{name}: {value!r} is not one of the allowed values")
    if "minValue" in decl and value < decl["minValue"] or "maxValue" in decl and value > decl["maxValue"]:
        out.append(f"{name}: {value!r} is outside {decl.get('minValue')}-{decl.get('maxValue')}")
    if isinstance(value, (str, list)):
        if len(value) < decl.get("minLength", 0) or len(value) > decl.get("maxLength", 10 ** 9):
            out.append(f"{name}: length {len(value)} is outside {decl.get('minLength')}-{decl.get('maxLength')}")
    return out


def check_deploy_doc_cli_walk(t: dict, md: str) -> list[str]:
    """deploy.md's CLI walk takes no step the template refuses: its parameters file names only declared
    parameters, gives every required one, each of the right type within the template's constraints, opens SSH to
    no more than the template allows, and the template's expressions evaluate with it; what-if and create deploy
    this template with that file."""
    pf, problems = deploy_doc_parameters(md)
    if pf is None:
        return problems
    declared = t.get("parameters", {})
    values = {k: v.get("value") for k, v in pf.get("parameters", {}).items()}
    for name, value in values.items():
        if name not in declared:
            problems.append(f"the parameters file sets {name!r}, which the template does not declare")
        else:
            problems += _param_problems(name, declared[name], value)
    for name, decl in declared.items():
        if "defaultValue" not in decl and name not in values:
            problems.append(f"the parameters file lacks required parameter {name!r}")
    ev = Evaluator(t, values)
    try:
        for name in t.get("variables", {}):
            ev.variable(name)
        for r in t.get("resources", []):
            ev.value(r.get("name"))
            if r.get("type") == "Microsoft.Network/networkSecurityGroups":
                ev.value(r["properties"])
    except ArmExprError as exc:
        problems.append(f"the template refuses deploy.md's parameters: {exc}")
    fname = re.search(r"cat > (\S+) <<EOF", md).group(1)
    for verb in ("what-if", "create"):
        if not re.search(rf"az deployment group {verb} -g \$RG .*-f arm-templates/azuredeploy\.json -p @{re.escape(fname)}",
                         md):
            problems.append(f"docs/deploy.md has no `az deployment group {verb}` of arm-templates/azuredeploy.json "
                            f"with -p @{fname}")
    return problems


def _doc_default(cell: str) -> Any:
    cell = strip_md(cell)
    if cell in ("—", "-"):
        return "(required)"
    if cell == "empty":
        return ""
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        return cell


def check_deploy_doc_parameter_table(t: dict, md: str) -> list[str]:
    """The 'parameter | default | meaning' table of deploy.md names every parameter once, with the template's
    default (or — for a required one)."""
    problems, seen = [], []
    declared = t.get("parameters", {})
    tables = [tb for tb in markdown_tables(md) if tb and "parameter" in tb[0] and "default" in tb[0]]
    if not tables:
        return ["docs/deploy.md has no parameter table"]
    for row in tables[0]:
        names = re.findall(r"`([A-Za-z]+)`", row["parameter"])
        defaults = [d.strip() for d in row["default"].split(",")] if len(names) > 1 else [row["default"]]
        if len(defaults) != len(names):
            defaults = [row["default"]] * len(names)
        for name, cell in zip(names, defaults):
            seen.append(name)
            decl = declared.get(name)
            if decl is None:
                problems.append(f"deploy.md lists {name!r}, which the template does not declare")
                continue
            want = decl.get("defaultValue", "(required)")
            got = _doc_default(cell)
            if is_expr(want):
                continue  # an expression's default is described in words (the resource group's, the deployment time)
            if got != want:
                problems.append(f"deploy.md: {name} defaults to {got!r}, the template to {want!r}")
    for name in sorted(set(declared) - set(seen)):
        problems.append(f"deploy.md's parameter table lacks {name!r}")
    return problems


def check_deploy_doc_portal_walk(ui: dict, md: str) -> list[str]:
    """The portal walk names every field the operator must fill in (required, no default)."""
    problems = []
    portal = _section(md, "2a.")
    if not portal:
        return ["docs/deploy.md has no '## 2a.' portal section"]
    for where, el in ui_elements(ui):
        c = el.get("constraints", {})
        if c.get("required") is not True or "defaultValue" in el:
            continue
        labels = list(el["label"].values()) if isinstance(el.get("label"), dict) else [el.get("label", "")]
        if el.get("type") == "Microsoft.Compute.CredentialsCombo":
            labels = [el["label"]["sshPublicKey"]]
        for label in labels:
            if label.lower() not in " ".join(portal.split()).lower():
                problems.append(f"the portal walk does not say what to enter in {label!r} ({where}.{el['name']})")
    return problems


def check_deploy_doc_first_command(md: str) -> list[str]:
    """After the deployment, the first thing an operator runs on the jumpbox is `hashistack-agent status` (until
    healthy) and then the smoke test, `hashistack-agent smoke`, with the Nomad token piped from `escrow open`."""
    problems = []
    blocks = _code_blocks(_section(md, "3."))
    if not blocks:
        return ["docs/deploy.md's '## 3.' section has no commands"]
    lines = [ln.split("#")[0].strip() for ln in blocks[0].splitlines() if ln.split("#")[0].strip()]
    ssh_at = next((i for i, ln in enumerate(lines) if ln.startswith("ssh ") or ln == "$SSH"), None)
    if ssh_at is None:
        problems.append("the first commands of '## 3.' do not reach the jumpbox over SSH")
    elif ssh_at + 1 >= len(lines) or lines[ssh_at + 1] != "hashistack-agent status":
        problems.append(f"the first command on the jumpbox is {lines[ssh_at + 1:ssh_at + 2]}, not hashistack-agent status")
    smoke = [ln for ln in lines if "hashistack-agent smoke" in ln]
    if not smoke:
        problems.append("the first commands on the jumpbox do not run the smoke test (hashistack-agent smoke)")
    elif not re.search(r"hashistack-agent escrow open\b.*--tier nomad\b.*\|.*hashistack-agent smoke --token-file -",
                       smoke[0]):
        problems.append(f"the smoke test does not take the Nomad token from escrow on standard input: {smoke[0]!r}")
    return problems


def check_deploy_doc_role_replication(md: str) -> list[str]:
    """deploy.md explains the role-definition replication race and what to do about it."""
    text = " ".join(md.split())
    problems = []
    if "RoleDefinitionDoesNotExist" not in text:
        problems.append("docs/deploy.md does not name RoleDefinitionDoesNotExist (definitions created and used in "
                        "one deployment can race replication)")
    if not re.search(r"RoleDefinitionDoesNotExist.{0,300}\bagain\b", text):
        problems.append("docs/deploy.md does not say to run the deployment again after RoleDefinitionDoesNotExist")
    return problems
