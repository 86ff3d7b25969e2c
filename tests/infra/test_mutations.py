"""Every check in test_arm.py can fail: each case breaks a copy of the template (or of a doc it is compared with)
in one way and asserts that the check guarding against it reports a problem."""
from __future__ import annotations

import datetime as dt
import json
import shutil

import pytest

import armlib
import checks

ESCROW_BLOB_ROLE = "escrowBlobWriter"


def res(t, rtype, pred=lambda r: True):
    found = [r for r in t["resources"] if r["type"] == rtype and pred(r)]
    assert found, f"mutation target {rtype} not found"
    return found


def vmss(t, role):
    return res(t, "Microsoft.Compute/virtualMachineScaleSets", lambda r: r["tags"]["hashistack-role"] == role)[0]


def nsg(t, tier):
    return res(t, "Microsoft.Network/networkSecurityGroups", lambda r: f".{tier}]" in r["name"])[0]


def assignment(t, key, tier=None):
    def pred(r):
        return f"'{key}')]" in r["name"] and (tier is None or f"identityNames').{tier})" in r["name"])
    return res(t, "Microsoft.Authorization/roleAssignments", pred)[0]


def role_def(t, key):
    return res(t, "Microsoft.Authorization/roleDefinitions", lambda r: r["name"] == f"[variables('customRoles').{key}]")[0]


def set_rule(t, tier, name, **props):
    for rule in nsg(t, tier)["properties"]["securityRules"]:
        if rule["name"] == name:
            rule["properties"].update(props)
            return
    raise AssertionError(name)


IDENTITY = "resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', variables('identityNames').{})"
SECRETS_USER = "[subscriptionResourceId('Microsoft.Authorization/roleDefinitions', variables('builtInRoles').keyVaultSecretsUser)]"


def custom_role(key):
    return f"[subscriptionResourceId('Microsoft.Authorization/roleDefinitions', variables('customRoles').{key})]"


def grant(t, who, vault_var, role=SECRETS_USER):
    """Adds a role assignment on a Key Vault, built like the template's own (who: a tier or 'operator')."""
    if who == "operator":
        principal, ptype = "[parameters('operatorObjectId')]", "[parameters('operatorPrincipalType')]"
    else:
        principal = f"[reference({IDENTITY.format(who)}, '2024-11-30').principalId]"
        ptype = "ServicePrincipal"
    t["resources"].append({
        "type": "Microsoft.Authorization/roleAssignments", "apiVersion": "2022-04-01",
        "name": f"[guid(resourceId('Microsoft.KeyVault/vaults', variables('{vault_var}')), '{who}', 'mutation')]",
        "scope": f"[format('Microsoft.KeyVault/vaults/{{0}}', variables('{vault_var}'))]",
        "properties": {"roleDefinitionId": role, "principalId": principal, "principalType": ptype}})


def key_vault(t, var):
    return res(t, "Microsoft.KeyVault/vaults", lambda r: r["name"] == f"[variables('{var}')]")[0]


def vault_rules(t, var):
    return key_vault(t, var)["properties"]["networkAcls"]["virtualNetworkRules"]


def subnet_rule(subnet):
    return {"id": f"[resourceId('Microsoft.Network/virtualNetworks/subnets', variables('vnetName'), '{subnet}')]",
            "ignoreMissingVnetServiceEndpoint": False}


def storage_rules(t):
    return res(t, "Microsoft.Storage/storageAccounts")[0]["properties"]["networkAcls"]["virtualNetworkRules"]


def drop_subnet(rules, subnet):
    before = len(rules)
    rules[:] = [r for r in rules if not r["id"].endswith(f"'{subnet}')]")]
    assert len(rules) == before - 1, subnet


def subnet_def(t, name):
    return [s for s in res(t, "Microsoft.Network/virtualNetworks")[0]["properties"]["subnets"] if s["name"] == name][0]


def jumpbox(t):
    return res(t, "Microsoft.Compute/virtualMachines")[0]


def drop_dep(r, *needles):
    """Removes the dependsOn entries that contain every needle (at least one must)."""
    before = list(r["dependsOn"])
    r["dependsOn"] = [d for d in before if not all(n in d for n in needles)]
    assert len(r["dependsOn"]) < len(before), needles


# Each case: (id, mutate(ctx), run(ctx, schemas) -> problems). ctx holds deep copies of every input.
def _schema(ctx, s):
    return checks.check_template_schema(ctx["t"], s)


def _ev(ctx):
    return armlib.Evaluator(ctx["t"], armlib.default_values(ctx["t"], ctx["pf"]))


def _md(ctx, old, new):
    assert old in ctx["deploy_md"], old
    ctx["deploy_md"] = ctx["deploy_md"].replace(old, new, 1)


def _ui_el(ctx, where, name):
    params = ctx["ui"]["parameters"]
    elements = params["basics"] if where == "basics" else \
        [s for s in params["steps"] if s["name"] == where][0]["elements"]
    return [e for e in elements if e["name"] == name][0]


def _zone_evs(ctx):
    values = armlib.default_values(ctx["t"], ctx["pf"])
    return {case: armlib.Evaluator(ctx["t"], dict(values, availabilityZones=zones))
            for case, zones in (("regional", []), ("one-zone", ["2"]), ("zones", ["1", "2", "3"]))}


def _ev_other_cluster(ctx):
    return armlib.Evaluator(ctx["t"], dict(armlib.default_values(ctx["t"], ctx["pf"]), clusterName="hs2"))


CASES = [
    # --- JSON schema
    ("schema: bad NSG protocol",
     lambda c: set_rule(c["t"], "consul", "ConsulServerRpc", protocol="Sctp"), _schema),
    ("schema: unknown top-level key",
     lambda c: c["t"].__setitem__("resourcez", []), _schema),
    ("schema: scale set capacity of the wrong type",
     lambda c: vmss(c["t"], "worker")["sku"].__setitem__("capacity", "three"), _schema),
    ("schema: apiVersion without a schema",
     lambda c: res(c["t"], "Microsoft.Storage/storageAccounts")[0].__setitem__("apiVersion", "2019-06-01"), _schema),
    ("params file: undeclared parameter",
     lambda c: c["pf"]["parameters"].__setitem__("nope", {"value": 1}),
     lambda c, s: checks.check_parameters_file(c["t"], c["pf"], s)),
    ("params file: required parameter missing",
     lambda c: c["pf"]["parameters"].pop("imageId"),
     lambda c, s: checks.check_parameters_file(c["t"], c["pf"], s)),
    ("params file: schema ($schema missing)",
     lambda c: c["pf"].pop("$schema"),
     lambda c, s: checks.check_parameters_file(c["t"], c["pf"], s)),
    ("createUiDefinition: schema (TextBox without label)",
     lambda c: c["ui"]["parameters"]["basics"][0].pop("label"),
     lambda c, s: checks.check_uidef_schema(c["ui"], s)),
    # --- structure
    ("parameter declared, never used",
     lambda c: c["t"]["parameters"].__setitem__("unused", {"type": "string", "defaultValue": "x",
                                                           "metadata": {"description": "unused"}}),
     lambda c, s: checks.check_parameters_used(c["t"])),
    ("parameter used, not declared",
     lambda c: c["t"]["parameters"].pop("datacenter"),
     lambda c, s: checks.check_parameters_used(c["t"])),
    ("variable used, not declared",
     lambda c: c["t"]["variables"].pop("vnetName"),
     lambda c, s: checks.check_parameters_used(c["t"])),
    ("hard-coded location",
     lambda c: res(c["t"], "Microsoft.KeyVault/vaults")[0].__setitem__("location", "westeurope"),
     lambda c, s: checks.check_no_hardcoded_location(c["t"])),
    ("location parameter default hard-coded",
     lambda c: c["t"]["parameters"]["location"].__setitem__("defaultValue", "eastus"),
     lambda c, s: checks.check_no_hardcoded_location(c["t"])),
    ("preview apiVersion",
     lambda c: res(c["t"], "Microsoft.KeyVault/vaults")[0].__setitem__("apiVersion", "2026-02-01-preview"),
     lambda c, s: checks.check_api_versions(c["t"], s, dt.date(2026, 11, 27))),
    ("apiVersion older than two years",
     lambda c: [r.__setitem__("apiVersion", "2024-10-01") for r in res(c["t"], "Microsoft.Network/natGateways")],
     lambda c, s: checks.check_api_versions(c["t"], s, dt.date(2026, 11, 27))),
    ("apiVersion ages out (today moves on)",
     lambda c: c.__setitem__("today", dt.date(2028, 6, 1)),
     lambda c, s: checks.check_api_versions(c["t"], s, c["today"])),
    ("secret parameter as plain string",
     lambda c: c["t"]["parameters"].__setitem__("adminPassword", {"type": "string", "metadata": {"description": "x"}}),
     lambda c, s: checks.check_secrets(c["t"])),
    ("secureString parameter with a default",
     lambda c: c["t"]["parameters"].__setitem__("gossipKey", {"type": "securestring", "defaultValue": "abc",
                                                              "metadata": {"description": "x"}}),
     lambda c, s: checks.check_secrets(c["t"])),
    ("literal password in a VM profile",
     lambda c: vmss(c["t"], "worker")["properties"]["virtualMachineProfile"]["osProfile"].__setitem__(
         "adminPassword", "Hunter2Hunter2!"),
     lambda c, s: checks.check_secrets(c["t"])),
    ("output calls listKeys()",
     lambda c: c["t"]["outputs"].__setitem__("storageKey", {
         "type": "string", "value": "[listKeys(resourceId('Microsoft.Storage/storageAccounts', "
                                    "variables('storageAccountName')), '2026-04-01').keys[0].value]"}),
     lambda c, s: checks.check_outputs_no_secret(c["t"])),
    ("output of a secure parameter",
     lambda c: (c["t"]["parameters"].__setitem__("pgp", {"type": "securestring", "metadata": {"description": "x"}}),
                c["t"]["outputs"].__setitem__("pgpOut", {"type": "string", "value": "[parameters('pgp')]"})),
     lambda c, s: checks.check_outputs_no_secret(c["t"])),
    ("createUiDefinition lacks a required parameter",
     lambda c: c["ui"]["parameters"]["outputs"].pop("imageId"),
     lambda c, s: checks.check_uidef_outputs(c["t"], c["ui"])),
    ("createUiDefinition outputs an unknown parameter",
     lambda c: c["ui"]["parameters"]["outputs"].__setitem__("imageID", "[basics('imageId')]"),
     lambda c, s: checks.check_uidef_outputs(c["t"], c["ui"])),
    ("createUiDefinition output refers to a missing element",
     lambda c: c["ui"]["parameters"]["outputs"].__setitem__("workerCount", "[int(steps('cluster').workers)]"),
     lambda c, s: checks.check_uidef_outputs(c["t"], c["ui"])),
    ("metadata.json lacks summary",
     lambda c: c["md"].pop("summary"),
     lambda c, s: checks.check_metadata(c["md"])),
    # --- identities and escrow
    ("a tier's escrow blob writer loses its path condition",
     lambda c: [assignment(c["t"], "escrowBlobWriter", "vault")["properties"].pop(k) for k in ("condition", "conditionVersion")],
     lambda c, s: checks.check_tier_isolation(c["t"], _ev(c))),
    ("a tier's escrow condition names another tier's path",
     lambda c: assignment(c["t"], "escrowBlobWriter", "consul")["properties"].__setitem__(
         "condition", "[variables('escrowTierCondition').nomad]"),
     lambda c, s: checks.check_tier_isolation(c["t"], _ev(c))),
    ("a tier's snapshot blob writer loses its path condition",
     lambda c: [assignment(c["t"], "snapshotBlobWriter", "nomad")["properties"].pop(k) for k in ("condition", "conditionVersion")],
     lambda c, s: checks.check_tier_isolation(c["t"], _ev(c))),
    ("a tier's snapshot condition names another tier's path",
     lambda c: assignment(c["t"], "snapshotBlobWriter", "vault")["properties"].__setitem__(
         "condition", "[variables('escrowTierCondition').consul]"),
     lambda c, s: checks.check_tier_isolation(c["t"], _ev(c))),
    ("a tier's coordination condition opens the whole cluster prefix",
     lambda c: c["t"]["variables"]["coordinationTierCondition"].__setitem__(
         "vault", c["t"]["variables"]["coordinationTierCondition"]["vault"].replace("'/vault/''", "'/''")),
     lambda c, s: checks.check_tier_isolation(c["t"], _ev(c))),
    ("a tier sets secrets on the whole escrow vault again",
     lambda c: assignment(c["t"], "escrowSecretWriter", "nomad").__setitem__(
         "scope", "[format('Microsoft.KeyVault/vaults/{0}', variables('escrowVaultName'))]"),
     lambda c, s: checks.check_tier_isolation(c["t"], _ev(c))),
    ("escrow container without version-level immutability",
     lambda c: res(c["t"], "Microsoft.Storage/storageAccounts/blobServices/containers",
                   lambda r: "escrow" in r["name"])[0]["properties"].pop("immutableStorageWithVersioning"),
     lambda c, s: checks.check_escrow_immutable(c["t"], _ev(c))),
    ("escrow container without a retention policy",
     lambda c: c["t"]["resources"].remove(res(
         c["t"], "Microsoft.Storage/storageAccounts/blobServices/containers/immutabilityPolicies")[0]),
     lambda c, s: checks.check_escrow_immutable(c["t"], _ev(c))),
    ("blob versioning off",
     lambda c: res(c["t"], "Microsoft.Storage/storageAccounts/blobServices")[0]["properties"].__setitem__(
         "isVersioningEnabled", False),
     lambda c, s: checks.check_escrow_immutable(c["t"], _ev(c))),
    ("the escrow vault's audit log is not collected",
     lambda c: c["t"]["resources"].remove(res(c["t"], "Microsoft.Insights/diagnosticSettings",
                                              lambda r: "escrowVaultName" in r["scope"])[0]),
     lambda c, s: checks.check_audit_trail(c["t"], _ev(c))),
    ("blob reads are not logged",
     lambda c: res(c["t"], "Microsoft.Insights/diagnosticSettings", lambda r: "blobServices" in r["scope"])[0][
         "properties"]["logs"].pop(0),
     lambda c, s: checks.check_audit_trail(c["t"], _ev(c))),
    ("the unseal vault's lock is gone",
     lambda c: c["t"]["resources"].remove(res(c["t"], "Microsoft.Authorization/locks",
                                              lambda r: "unsealVaultName" in r["scope"])[0]),
     lambda c, s: checks.check_audit_trail(c["t"], _ev(c))),
    ("the storage account lock is ReadOnly, not CanNotDelete",
     lambda c: res(c["t"], "Microsoft.Authorization/locks", lambda r: "storageAccounts" in r["scope"])[0][
         "properties"].__setitem__("level", "ReadOnly"),
     lambda c, s: checks.check_audit_trail(c["t"], _ev(c))),
    ("a type outside the schema set at another apiVersion",
     lambda c: res(c["t"], "Microsoft.Authorization/locks")[0].__setitem__("apiVersion", "2016-09-01"),
     lambda c, s: checks.check_api_versions(c["t"], s, dt.date(2026, 11, 27))),
    ("escrow blob role can read",
     lambda c: role_def(c["t"], ESCROW_BLOB_ROLE)["properties"]["permissions"][0]["dataActions"].append(
         "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read"),
     lambda c, s: checks.check_escrow_write_only(c["t"], _ev(c))),
    ("escrow secret role can get",
     lambda c: role_def(c["t"], "escrowSecretWriter")["properties"]["permissions"][0]["dataActions"].append(
         "Microsoft.KeyVault/vaults/secrets/getSecret/action"),
     lambda c, s: checks.check_escrow_write_only(c["t"], _ev(c))),
    ("escrow key role can unwrap",
     lambda c: role_def(c["t"], "escrowKeyWrapper")["properties"]["permissions"][0]["dataActions"].append(
         "Microsoft.KeyVault/vaults/keys/unwrap/action"),
     lambda c, s: checks.check_escrow_write_only(c["t"], _ev(c))),
    ("VM identity gets a built-in reader role on the escrow container",
     lambda c: assignment(c["t"], "escrowBlobWriter", "consul")["properties"].__setitem__(
         "roleDefinitionId", "[subscriptionResourceId('Microsoft.Authorization/roleDefinitions', "
                             "variables('builtInRoles').storageBlobDataReader)]"),
     lambda c, s: checks.check_escrow_write_only(c["t"], _ev(c))),
    ("VM identity reads blobs account-wide (covers escrow)",
     lambda c: assignment(c["t"], "coordinationReader", "jumpbox").__setitem__(
         "scope", "[format('Microsoft.Storage/storageAccounts/{0}', variables('storageAccountName'))]"),
     lambda c, s: checks.check_escrow_write_only(c["t"], _ev(c))),
    ("workers get escrow write",
     lambda c: assignment(c["t"], "sharedSecretsUser", "workers").update({
         "scope": "[format('Microsoft.KeyVault/vaults/{0}', variables('escrowVaultName'))]",
         "properties": dict(assignment(c["t"], "sharedSecretsUser", "workers")["properties"],
                            roleDefinitionId="[subscriptionResourceId('Microsoft.Authorization/roleDefinitions', "
                                             "variables('customRoles').escrowSecretWriter)]")}),
     lambda c, s: checks.check_escrow_write_only(c["t"], _ev(c))),
    ("unseal key usable by consul servers",
     lambda c: assignment(c["t"], "unseal", "vault").__setitem__(
         "properties", dict(assignment(c["t"], "unseal", "vault")["properties"],
                            principalId="[reference(resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', "
                                        "variables('identityNames').consul), '2024-11-30').principalId]")),
     lambda c, s: checks.check_unseal_key(c["t"], _ev(c))),
    ("operator unwrap assignment removed",
     lambda c: c["t"]["resources"].remove(assignment(c["t"], "operatorEscrowKeyUnwrapper")),
     lambda c, s: checks.check_access_matrix(c["t"], _ev(c))),
    ("reader widened to the subscription",
     lambda c: assignment(c["t"], "reader", "workers").__setitem__("scope", "[subscription().id]"),
     lambda c, s: checks.check_access_matrix(c["t"], _ev(c))),
    ("assignment without principalType",
     lambda c: assignment(c["t"], "reader", "vault")["properties"].pop("principalType"),
     lambda c, s: checks.check_assignment_hygiene(c["t"], _ev(c))),
    ("custom role name not unique per deployment",
     lambda c: role_def(c["t"], "escrowKeyWrapper")["properties"].__setitem__("roleName", "hashistack escrow key wrapper"),
     lambda c, s: checks.check_assignment_hygiene(c["t"], _ev(c))),
    # --- storage and key vaults
    ("storage shared keys on",
     lambda c: res(c["t"], "Microsoft.Storage/storageAccounts")[0]["properties"].__setitem__("allowSharedKeyAccess", True),
     lambda c, s: checks.check_storage_and_key_vaults(c["t"])),
    ("blob versioning off",
     lambda c: res(c["t"], "Microsoft.Storage/storageAccounts/blobServices")[0]["properties"].__setitem__(
         "isVersioningEnabled", False),
     lambda c, s: checks.check_storage_and_key_vaults(c["t"])),
    ("key vault without purge protection",
     lambda c: res(c["t"], "Microsoft.KeyVault/vaults")[1]["properties"].__setitem__("enablePurgeProtection", False),
     lambda c, s: checks.check_storage_and_key_vaults(c["t"])),
    ("key vault in access-policy mode",
     lambda c: res(c["t"], "Microsoft.KeyVault/vaults")[2]["properties"].__setitem__("enableRbacAuthorization", False),
     lambda c, s: checks.check_storage_and_key_vaults(c["t"])),
    # --- network
    ("scale set instances get public IPs",
     lambda c: vmss(c["t"], "worker")["properties"]["virtualMachineProfile"]["networkProfile"][
         "networkInterfaceConfigurations"][0]["properties"]["ipConfigurations"][0]["properties"].__setitem__(
         "publicIPAddressConfiguration", {"name": "pip"}),
     lambda c, s: checks.check_network(c["t"], _ev(c))),
    ("subnet bypasses the NAT gateway",
     lambda c: res(c["t"], "Microsoft.Network/virtualNetworks")[0]["properties"]["subnets"][2]["properties"].pop("natGateway"),
     lambda c, s: checks.check_network(c["t"], _ev(c))),
    ("NSG port differs from docs/network.md",
     lambda c: set_rule(c["t"], "consul", "ConsulSerfLanTcp", destinationPortRange="8302"),
     lambda c, s: checks.check_nsg_matches_doc(c["t"], _ev(c), c["network_md"])),
    ("NSG source widened",
     lambda c: set_rule(c["t"], "vault", "VaultCluster", sourceAddressPrefix="VirtualNetwork"),
     lambda c, s: checks.check_nsg_matches_doc(c["t"], _ev(c), c["network_md"])),
    ("docs/network.md row missing",
     lambda c: c.__setitem__("network_md", c["network_md"].replace(
         "| nomad | 130 | `NomadRpc` | Allow | Tcp | nomad, workers | 4647 |\n", "")),
     lambda c, s: checks.check_nsg_matches_doc(c["t"], _ev(c), c["network_md"])),
    ("deny-all removed (doc updated too)",
     lambda c: (nsg(c["t"], "workers")["properties"]["securityRules"].pop(),
                c.__setitem__("network_md", c["network_md"].replace(
                    "| workers | 4096 | `DenyAllInbound` | Deny | * | * | * |\n", ""))),
     lambda c, s: checks.check_nsg_matches_doc(c["t"], _ev(c), c["network_md"])),
    ("SSH to a tier from the internet (doc updated too)",
     lambda c: (set_rule(c["t"], "nomad", "SshFromJumpbox", sourceAddressPrefix="Internet"),
                c.__setitem__("network_md", c["network_md"].replace(
                    "| nomad | 200 | `SshFromJumpbox` | Allow | Tcp | jumpbox | 22 |",
                    "| nomad | 200 | `SshFromJumpbox` | Allow | Tcp | Internet | 22 |"))),
     lambda c, s: checks.check_nsg_matches_doc(c["t"], _ev(c), c["network_md"])),
    # --- compute
    ("scale set in Flexible mode",
     lambda c: vmss(c["t"], "consul-server")["properties"].__setitem__("orchestrationMode", "Flexible"),
     lambda c, s: checks.check_scale_sets(c["t"], _ev(c))),
    ("password login allowed",
     lambda c: vmss(c["t"], "nomad-server")["properties"]["virtualMachineProfile"]["osProfile"][
         "linuxConfiguration"].__setitem__("disablePasswordAuthentication", False),
     lambda c, s: checks.check_scale_sets(c["t"], _ev(c))),
    ("server without a data disk",
     lambda c: vmss(c["t"], "vault-server")["properties"]["virtualMachineProfile"]["storageProfile"].pop("dataDisks"),
     lambda c, s: checks.check_scale_sets(c["t"], _ev(c))),
    ("marketplace image instead of imageId",
     lambda c: vmss(c["t"], "worker")["properties"]["virtualMachineProfile"]["storageProfile"].__setitem__(
         "imageReference", {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest"}),
     lambda c, s: checks.check_scale_sets(c["t"], _ev(c))),
    ("vault probe on the wrong path",
     lambda c: res(c["t"], "Microsoft.Network/loadBalancers")[0]["properties"]["probes"][0]["properties"].__setitem__(
         "requestPath", "/"),
     lambda c, s: checks.check_vault_load_balancer(c["t"], _ev(c))),
    # --- tags
    ("vault servers lack the seal tag",
     lambda c: vmss(c["t"], "vault-server")["tags"].pop("hashistack-vault-seal"),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("misspelt tag",
     lambda c: vmss(c["t"], "worker")["tags"].__setitem__("hashistack-rol", "worker"),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("vault join points at the consul scale set",
     lambda c: vmss(c["t"], "vault-server")["tags"].__setitem__(
         "hashistack-vault-join", vmss(c["t"], "vault-server")["tags"]["hashistack-vault-join"].replace(
             "vmssNames').vault", "vmssNames').consul")),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("node record writers may write anywhere in the coordination container",
     lambda c: assignment(c["t"], "coordinationRecordWriter", "workers")["properties"].pop("condition"),
     lambda c, s: checks.check_node_record_writers(c["t"], _ev(c))),
    ("node record condition covers another path",
     lambda c: c["t"]["variables"].__setitem__("nodeRecordsCondition", c["t"]["variables"]["nodeRecordsCondition"]
                                               .replace("/nodes/*", "/*")),
     lambda c, s: checks.check_node_record_writers(c["t"], _ev(c))),
    ("node record role can delete",
     lambda c: role_def(c["t"], "coordinationRecordWriter")["properties"]["permissions"][0]["dataActions"].append(
         "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete"),
     lambda c, s: checks.check_node_record_writers(c["t"], _ev(c))),
    ("workers lack the blob endpoint",
     lambda c: vmss(c["t"], "worker")["tags"].pop("hashistack-blob-endpoint"),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("jumpbox lacks the blob endpoint",
     lambda c: res(c["t"], "Microsoft.Compute/virtualMachines")[0]["tags"].pop("hashistack-blob-endpoint"),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("server count tag not 1/3/5/7",
     lambda c: c["t"]["parameters"]["consulServerCount"].__setitem__("defaultValue", 4),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    # --- Key Vaults split by readership
    ("workers get Secrets User on the servers vault (the CA key)",
     lambda c: grant(c["t"], "workers", "serversVaultName"),
     lambda c, s: checks.check_vault_readership(c["t"], _ev(c))),
    ("jumpbox gets Secrets User on the servers vault",
     lambda c: grant(c["t"], "jumpbox", "serversVaultName"),
     lambda c, s: checks.check_vault_readership(c["t"], _ev(c))),
    ("operators get Secrets User on the servers vault",
     lambda c: grant(c["t"], "operator", "serversVaultName"),
     lambda c, s: checks.check_vault_readership(c["t"], _ev(c))),
    ("workers get the cluster material role on the servers vault",
     lambda c: grant(c["t"], "workers", "serversVaultName", custom_role("clusterMaterialWriter")),
     lambda c, s: checks.check_vault_readership(c["t"], _ev(c))),
    ("workers read the status vault",
     lambda c: grant(c["t"], "workers", "statusVaultName"),
     lambda c, s: checks.check_vault_readership(c["t"], _ev(c))),
    ("a server tier can get on the status vault (read-write role instead of set-only)",
     lambda c: assignment(c["t"], "statusSecretWriter", "vault")["properties"].__setitem__(
         "roleDefinitionId", custom_role("clusterMaterialWriter")),
     lambda c, s: checks.check_vault_readership(c["t"], _ev(c))),
    ("the reused escrow secret writer role gains get (reaches the status vault)",
     lambda c: role_def(c["t"], "escrowSecretWriter")["properties"]["permissions"][0]["dataActions"].append(
         "Microsoft.KeyVault/vaults/secrets/getSecret/action"),
     lambda c, s: checks.check_vault_readership(c["t"], _ev(c))),
    ("the jumpbox loses its read of the status vault",
     lambda c: c["t"]["resources"].remove(assignment(c["t"], "statusSecretsUser", "jumpbox")),
     lambda c, s: checks.check_vault_readership(c["t"], _ev(c))),
    ("nomad loses its servers vault role",
     lambda c: c["t"]["resources"].remove(assignment(c["t"], "serversMaterialWriter", "nomad")),
     lambda c, s: checks.check_vault_readership(c["t"], _ev(c))),
    ("workers hold Secrets User on the resource group (every vault)",
     lambda c: assignment(c["t"], "reader", "workers")["properties"].__setitem__("roleDefinitionId", SECRETS_USER),
     lambda c, s: checks.check_vault_readership(c["t"], _ev(c))),
    ("servers vault firewall admits the workers subnet",
     lambda c: vault_rules(c["t"], "serversVaultName").append(subnet_rule("workers")),
     lambda c, s: checks.check_vault_network_acls(c["t"], _ev(c))),
    ("servers vault firewall admits the jumpbox subnet",
     lambda c: vault_rules(c["t"], "serversVaultName").append(subnet_rule("jumpbox")),
     lambda c, s: checks.check_vault_network_acls(c["t"], _ev(c))),
    ("status vault firewall lacks the jumpbox subnet",
     lambda c: vault_rules(c["t"], "statusVaultName").pop(),
     lambda c, s: checks.check_vault_network_acls(c["t"], _ev(c))),
    ("status vault firewall admits the workers subnet",
     lambda c: vault_rules(c["t"], "statusVaultName").append(subnet_rule("workers")),
     lambda c, s: checks.check_vault_network_acls(c["t"], _ev(c))),
    ("servers vault firewall admits an IP range",
     lambda c: key_vault(c["t"], "serversVaultName")["properties"]["networkAcls"].__setitem__(
         "ipRules", [{"value": "203.0.113.0/24"}]),
     lambda c, s: checks.check_vault_network_acls(c["t"], _ev(c))),
    ("servers vault removed (CA key back in the shared vault)",
     lambda c: c["t"]["resources"].remove(key_vault(c["t"], "serversVaultName")),
     lambda c, s: checks.check_vault_network_acls(c["t"], _ev(c))),
    ("workers tagged with the servers vault",
     lambda c: vmss(c["t"], "worker")["tags"].__setitem__(
         "hashistack-servers-vault-uri", vmss(c["t"], "nomad-server")["tags"]["hashistack-servers-vault-uri"]),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("jumpbox tagged with the servers vault",
     lambda c: jumpbox(c["t"])["tags"].__setitem__(
         "hashistack-servers-vault-uri", vmss(c["t"], "nomad-server")["tags"]["hashistack-servers-vault-uri"]),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("vault address tag not the load balancer's",
     lambda c: vmss(c["t"], "vault-server")["tags"].__setitem__(
         "hashistack-vault-address", "[format('https://{0}:8200', cidrHost(variables('subnetPrefixes').vault, 4))]"),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("consul servers tagged with the vault address",
     lambda c: vmss(c["t"], "consul-server")["tags"].__setitem__(
         "hashistack-vault-address", jumpbox(c["t"])["tags"]["hashistack-vault-address"]),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("workers' vault address not the load balancer's",
     lambda c: vmss(c["t"], "worker")["tags"].__setitem__(
         "hashistack-vault-address", "[format('https://{0}:8200', cidrHost(variables('subnetPrefixes').vault, 4))]"),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("workers tagged with the status vault",
     lambda c: vmss(c["t"], "worker")["tags"].__setitem__(
         "hashistack-status-vault-uri", jumpbox(c["t"])["tags"]["hashistack-status-vault-uri"]),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("nomad servers' servers vault tag names the shared vault",
     lambda c: vmss(c["t"], "nomad-server")["tags"].__setitem__(
         "hashistack-servers-vault-uri", vmss(c["t"], "nomad-server")["tags"]["hashistack-keyvault-uri"]),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("workers' shared vault tag names the servers vault",
     lambda c: vmss(c["t"], "worker")["tags"].__setitem__(
         "hashistack-keyvault-uri", vmss(c["t"], "consul-server")["tags"]["hashistack-servers-vault-uri"]),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("status vault tag is not an https URL",
     lambda c: jumpbox(c["t"])["tags"].__setitem__(
         "hashistack-status-vault-uri", "[format('http://{0}.vault.azure.net/', variables('statusVaultName'))]"),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("vault servers lack the servers vault tag",
     lambda c: vmss(c["t"], "vault-server")["tags"].pop("hashistack-servers-vault-uri"),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("consul servers lack the status vault tag",
     lambda c: vmss(c["t"], "consul-server")["tags"].pop("hashistack-status-vault-uri"),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("jumpbox lacks the status vault tag",
     lambda c: jumpbox(c["t"])["tags"].pop("hashistack-status-vault-uri"),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("workers lack the shared vault tag",
     lambda c: vmss(c["t"], "worker")["tags"].pop("hashistack-keyvault-uri"),
     lambda c, s: checks.check_tags(c["t"], _ev(c), c["tags_md"])),
    ("consul scale set does not wait for its servers vault assignment",
     lambda c: drop_dep(vmss(c["t"], "consul-server"), "extensionResourceId", "serversVaultName"),
     lambda c, s: checks.check_boot_dependencies(c["t"], _ev(c))),
    ("jumpbox does not wait for its status vault assignment",
     lambda c: drop_dep(jumpbox(c["t"]), "extensionResourceId", "statusVaultName"),
     lambda c, s: checks.check_boot_dependencies(c["t"], _ev(c))),
    ("nomad scale set does not wait for the status vault",
     lambda c: drop_dep(vmss(c["t"], "nomad-server"), "[resourceId('Microsoft.KeyVault/vaults', variables('statusVaultName'))]"),
     lambda c, s: checks.check_boot_dependencies(c["t"], _ev(c))),
    ("status vault assignment does not wait for the status vault",
     lambda c: drop_dep(assignment(c["t"], "statusSecretsUser", "jumpbox"), "variables('statusVaultName'))]"),
     lambda c, s: checks.check_boot_dependencies(c["t"], _ev(c))),
    ("servers vault assignment does not wait for its custom role",
     lambda c: drop_dep(assignment(c["t"], "serversMaterialWriter", "vault"), "roleDefinitions"),
     lambda c, s: checks.check_boot_dependencies(c["t"], _ev(c))),
    # --- PGP escrow (docs/pgp-escrow.md)
    ("vault scale set without the operators' PGP keys in userData",
     lambda c: vmss(c["t"], "vault-server")["properties"]["virtualMachineProfile"].pop("userData"),
     lambda c, s: checks.check_pgp_user_data(c["t"], _ev(c))),
    ("userData that drops the keys",
     lambda c: vmss(c["t"], "nomad-server")["properties"]["virtualMachineProfile"].__setitem__(
         "userData", "[base64(string(createObject('hashistack', createObject('pgpKeys', createArray()))))]"),
     lambda c, s: checks.check_pgp_user_data(c["t"], _ev(c))),
    ("PGP escrow on by default",
     lambda c: c["t"]["parameters"]["operatorPgpPublicKeys"].__setitem__("defaultValue", ["a2V5"]),
     lambda c, s: checks.check_pgp_user_data(c["t"], _ev(c))),
    ("createUiDefinition: PGP keys element gone, its output left",
     lambda c: c["ui"]["parameters"]["steps"][2]["elements"].pop(
         [e["name"] for e in c["ui"]["parameters"]["steps"][2]["elements"]].index("operatorPgpPublicKeys")),
     lambda c, s: checks.check_uidef_outputs(c["t"], c["ui"])),
    # --- every firewall against the data-plane roles (issue 13, item 1)
    ("storage firewall shuts out the workers (their boot records are refused)",
     lambda c: drop_subnet(storage_rules(c["t"]), "workers"),
     lambda c, s: checks.check_firewalls_admit_data_plane_principals(c["t"], _ev(c))),
    ("storage firewall shuts out the jumpbox (status and operators)",
     lambda c: drop_subnet(storage_rules(c["t"]), "jumpbox"),
     lambda c, s: checks.check_firewalls_admit_data_plane_principals(c["t"], _ev(c))),
    ("unseal vault firewall shuts out the vault servers",
     lambda c: drop_subnet(vault_rules(c["t"], "unsealVaultName"), "vault"),
     lambda c, s: checks.check_firewalls_admit_data_plane_principals(c["t"], _ev(c))),
    ("shared vault firewall shuts out the workers",
     lambda c: drop_subnet(vault_rules(c["t"], "sharedVaultName"), "workers"),
     lambda c, s: checks.check_firewalls_admit_data_plane_principals(c["t"], _ev(c))),
    ("escrow vault firewall shuts out the jumpbox (where operators read the escrow)",
     lambda c: drop_subnet(vault_rules(c["t"], "escrowVaultName"), "jumpbox"),
     lambda c, s: checks.check_firewalls_admit_data_plane_principals(c["t"], _ev(c))),
    ("workers lose their record writer role, the storage firewall still admits them",
     lambda c: c["t"]["resources"].remove(assignment(c["t"], "coordinationRecordWriter", "workers")),
     lambda c, s: checks.check_firewalls_admit_data_plane_principals(c["t"], _ev(c))),
    ("unseal vault admits the consul subnet, where nobody holds a role on it",
     lambda c: vault_rules(c["t"], "unsealVaultName").append(subnet_rule("consul")),
     lambda c, s: checks.check_firewalls_admit_data_plane_principals(c["t"], _ev(c))),
    ("operators get a role on the servers vault (from the jumpbox, which it does not admit)",
     lambda c: grant(c["t"], "operator", "serversVaultName"),
     lambda c, s: checks.check_firewalls_admit_data_plane_principals(c["t"], _ev(c))),
    ("storage firewall admits an IP range",
     lambda c: res(c["t"], "Microsoft.Storage/storageAccounts")[0]["properties"]["networkAcls"].__setitem__(
         "ipRules", [{"value": "203.0.113.0/24", "action": "Allow"}]),
     lambda c, s: checks.check_firewalls_admit_data_plane_principals(c["t"], _ev(c))),
    ("workers subnet loses its Storage service endpoint",
     lambda c: subnet_def(c["t"], "workers")["properties"].__setitem__(
         "serviceEndpoints", [{"service": "Microsoft.KeyVault"}]),
     lambda c, s: checks.check_firewalls_admit_data_plane_principals(c["t"], _ev(c))),
    ("docs/network.md's firewall table lacks workers on the storage account",
     lambda c: c.__setitem__("network_md", c["network_md"].replace(
         "containers) | consul, vault, nomad, workers, jumpbox |", "containers) | consul, vault, nomad, jumpbox |")),
     lambda c, s: checks.check_firewall_table_matches_doc(c["t"], _ev(c), c["network_md"])),
    ("firewall admits a subnet that docs/network.md does not list",
     lambda c: vault_rules(c["t"], "serversVaultName").append(subnet_rule("workers")),
     lambda c, s: checks.check_firewall_table_matches_doc(c["t"], _ev(c), c["network_md"])),
    # --- role ids (issue 13, item 3)
    ("a custom role's id in the resource group form (what-if noise on every run)",
     lambda c: assignment(c["t"], "escrowKeyWrapper", "vault")["properties"].__setitem__(
         "roleDefinitionId", "[resourceId('Microsoft.Authorization/roleDefinitions', "
                             "variables('customRoles').escrowKeyWrapper)]"),
     lambda c, s: checks.check_role_definition_ids(c["t"], _ev(c), _ev_other_cluster(c))),
    ("a built-in role's id in the resource group form",
     lambda c: assignment(c["t"], "reader", "workers")["properties"].__setitem__(
         "roleDefinitionId", "[resourceId('Microsoft.Authorization/roleDefinitions', variables('builtInRoles').reader)]"),
     lambda c, s: checks.check_role_definition_ids(c["t"], _ev(c), _ev_other_cluster(c))),
    ("custom role GUID without the cluster name (two clusters rename each other's roles)",
     lambda c: c["t"]["variables"]["customRoles"].__setitem__(
         "coordinationWriter", "[guid(resourceGroup().id, 'hashistack', 'coordinationWriter')]"),
     lambda c, s: checks.check_role_definition_ids(c["t"], _ev(c), _ev_other_cluster(c))),
    ("custom role name without the per-cluster suffix",
     lambda c: role_def(c["t"], "escrowBlobWriter")["properties"].__setitem__(
         "roleName", "[format('hashistack escrow blob writer ({0})', resourceGroup().name)]"),
     lambda c, s: checks.check_role_definition_ids(c["t"], _ev(c), _ev_other_cluster(c))),
    # --- key expiry (issue 13, item 7)
    ("unseal key without an expiry",
     lambda c: res(c["t"], "Microsoft.KeyVault/vaults/keys")[0]["properties"]["attributes"].pop("exp"),
     lambda c, s: checks.check_key_expiry(c["t"], _ev(c))),
    ("escrow key expires a year before its rotated versions would",
     lambda c: res(c["t"], "Microsoft.KeyVault/vaults/keys")[1]["properties"]["attributes"].__setitem__(
         "exp", "[dateTimeToEpoch(dateTimeAdd(parameters('keyValidFrom'), 'P1Y'))]"),
     lambda c, s: checks.check_key_expiry(c["t"], _ev(c))),
    ("rotation only after the notify window opened",
     lambda c: res(c["t"], "Microsoft.KeyVault/vaults/keys")[0]["properties"]["rotationPolicy"]["lifetimeActions"][0][
         "trigger"].__setitem__("timeAfterCreate", "P710D"),
     lambda c, s: checks.check_key_expiry(c["t"], _ev(c))),
    ("rotation policy lifetime changed, the first version's expiry not",
     lambda c: res(c["t"], "Microsoft.KeyVault/vaults/keys")[1]["properties"]["rotationPolicy"]["attributes"].__setitem__(
         "expiryTime", "P3Y"),
     lambda c, s: checks.check_key_expiry(c["t"], _ev(c))),
    # --- zones (issue 13, item 8)
    ("vault raft tier without zoneBalance",
     lambda c: vmss(c["t"], "vault-server")["properties"].pop("zoneBalance"),
     lambda c, s: checks.check_zone_resilience(c["t"], _zone_evs(c))),
    ("zoneBalance even with one zone (refused by the API)",
     lambda c: vmss(c["t"], "consul-server")["properties"].__setitem__(
         "zoneBalance", "[if(variables('zoned'), true(), null())]"),
     lambda c, s: checks.check_zone_resilience(c["t"], _zone_evs(c))),
    ("workers keep five fault domains over zones",
     lambda c: vmss(c["t"], "worker")["properties"].pop("platformFaultDomainCount"),
     lambda c, s: checks.check_zone_resilience(c["t"], _zone_evs(c))),
    ("fault domain count forced without zones",
     lambda c: vmss(c["t"], "nomad-server")["properties"].__setitem__("platformFaultDomainCount", 1),
     lambda c, s: checks.check_zone_resilience(c["t"], _zone_evs(c))),
    ("internal load balancer frontend in no zone",
     lambda c: res(c["t"], "Microsoft.Network/loadBalancers")[0]["properties"]["frontendIPConfigurations"][0].pop("zones"),
     lambda c, s: checks.check_zone_resilience(c["t"], _zone_evs(c))),
    ("Standard NAT gateway with zones",
     lambda c: res(c["t"], "Microsoft.Network/natGateways")[0]["sku"].__setitem__("name", "Standard"),
     lambda c, s: checks.check_zone_resilience(c["t"], _zone_evs(c))),
    ("StandardV2 NAT gateway with a Standard public IP",
     lambda c: res(c["t"], "Microsoft.Network/publicIPAddresses",
                   lambda r: r["name"] == "[variables('natPublicIpName')]")[0]["sku"].__setitem__("name", "Standard"),
     lambda c, s: checks.check_zone_resilience(c["t"], _zone_evs(c))),
    # --- createUiDefinition against the template (issue 13, items 5 and 6)
    ("a control loses its tooltip",
     lambda c: _ui_el(c, "cluster", "workerCount").pop("toolTip"),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("administrator name gets a default",
     lambda c: _ui_el(c, "basics", "adminUsername").__setitem__("defaultValue", "azureuser"),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("administrator name longer than the template allows",
     lambda c: _ui_el(c, "basics", "adminUsername")["constraints"].__setitem__("regex", "^[a-z_][a-z0-9_-]{0,63}$"),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("SSH key confirmation hidden",
     lambda c: _ui_el(c, "basics", "sshCredentials")["options"].__setitem__("hideConfirmation", True),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("data disk regex accepts 4096-9999 (the old one)",
     lambda c: _ui_el(c, "cluster", "serverDataDiskSizeGB")["constraints"].__setitem__(
         "regex", "^([1-9][6-9]|[2-9][0-9]|[1-9][0-9]{2,3})$"),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("template raises the data disk maximum, the portal does not follow",
     lambda c: c["t"]["parameters"]["serverDataDiskSizeGB"].__setitem__("maxValue", 8191),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("worker count accepts 0",
     lambda c: _ui_el(c, "cluster", "workerCount")["constraints"].__setitem__("regex", "^([0-9][0-9]?|100)$"),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("server size selector unconstrained",
     lambda c: _ui_el(c, "cluster", "serverVmSize").pop("constraints"),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("worker size selector offers a size without accelerated networking",
     lambda c: _ui_el(c, "cluster", "workerVmSize")["constraints"]["allowedSizes"].append("Standard_B2s"),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("template allows any jumpbox size",
     lambda c: c["t"]["parameters"]["jumpboxVmSize"].pop("allowedValues"),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("a dropdown offers a server count the template refuses",
     lambda c: _ui_el(c, "cluster", "nomadServerCount")["constraints"]["allowedValues"].append({"label": "2", "value": 2}),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("a textbox validation without a message",
     lambda c: _ui_el(c, "basics", "allowedSshSourcePrefixes")["constraints"]["validations"][1].__setitem__("message", ""),
     lambda c, s: checks.check_uidef_refuses_what_the_template_refuses(c["t"], c["ui"])),
    ("portal accepts SSH from 0.0.0.0/0 (the refusal dropped)",
     lambda c: _ui_el(c, "basics", "allowedSshSourcePrefixes")["constraints"]["validations"].pop(1),
     lambda c, s: checks.check_ssh_source_refusal(c["t"], c["ui"], armlib.default_values(c["t"], c["pf"]))),
    ("portal accepts octets over 255",
     lambda c: _ui_el(c, "basics", "allowedSshSourcePrefixes")["constraints"]["validations"][0].__setitem__(
         "regex", "^\\s*\\d{1,3}(\\.\\d{1,3}){3}/\\d{1,2}\\s*(,\\s*\\d{1,3}(\\.\\d{1,3}){3}/\\d{1,2}\\s*)*$"),
     lambda c, s: checks.check_ssh_source_refusal(c["t"], c["ui"], armlib.default_values(c["t"], c["pf"]))),
    ("template opens SSH to whatever it is given",
     lambda c: c["t"]["variables"].__setitem__("sshFromTheInternet", "[false()]"),
     lambda c, s: checks.check_ssh_source_refusal(c["t"], c["ui"], armlib.default_values(c["t"], c["pf"]))),
    ("template lets 'Any' through (case)",
     lambda c: c["t"]["variables"].__setitem__("sshPrefixesText", "[replace(string(parameters('allowedSshSourcePrefixes')), ' ', '')]"),
     lambda c, s: checks.check_ssh_source_refusal(c["t"], c["ui"], armlib.default_values(c["t"], c["pf"]))),
    ("encryption at host back on by default",
     lambda c: c["t"]["parameters"]["encryptionAtHost"].__setitem__("defaultValue", True),
     lambda c, s: checks.check_encryption_at_host_choice(c["t"], c["ui"])),
    ("portal defaults encryption at host to Enabled",
     lambda c: _ui_el(c, "security", "encryptionAtHost").__setitem__("defaultValue", "Enabled"),
     lambda c, s: checks.check_encryption_at_host_choice(c["t"], c["ui"])),
    ("no info box explains encryption at host",
     lambda c: [s["elements"].remove(_ui_el(c, "security", "encryptionAtHostInfo")) for s in c["ui"]["parameters"]["steps"]
                if s["name"] == "security"],
     lambda c, s: checks.check_encryption_at_host_choice(c["t"], c["ui"])),
    # --- Consul WAN (issue 13, item 4)
    ("consul NSG opens WAN gossip",
     lambda c: set_rule(c["t"], "consul", "ConsulServerRpc", destinationPortRange="8300-8302"),
     lambda c, s: checks.check_consul_wan_decision(c["t"], _ev(c), c["network_md"])),
    ("docs/network.md no longer records that the WAN listener is off",
     lambda c: c.__setitem__("network_md", c["network_md"].replace("`ports.serf_wan = -1`", "nothing")),
     lambda c, s: checks.check_consul_wan_decision(c["t"], _ev(c), c["network_md"])),
    # --- docs/deploy.md walks a first deployment the template accepts (issue 13)
    ("deploy.md offers Contributor + RBAC Administrator again",
     lambda c: _md(c, "Contributor** plus **User Access\n  Administrator**",
                   "Contributor** plus **Role Based Access Control\n  Administrator**"),
     lambda c, s: checks.check_deploy_doc_roles(c["deploy_md"])),
    ("deploy.md builds a single .pkr.hcl file",
     lambda c: _md(c, "packer build -var-file=my.pkrvars.hcl packer/\n",
                   "packer build -var-file=my.pkrvars.hcl packer/hashistack.pkr.hcl\n"),
     lambda c, s: checks.check_packer_commands_build_the_directory({"docs/deploy.md": c["deploy_md"]})),
    ("deploy.md points to an issue for the cluster view",
     lambda c: _md(c, "([status.md](status.md)).", "([status.md](status.md)), the subject of issue 5."),
     lambda c, s: checks.check_no_issue_numbers("docs/deploy.md", c["deploy_md"])),
    ("deploy.md's parameters file opens SSH to the internet",
     lambda c: _md(c, '["203.0.113.7/32"]', '["0.0.0.0/0"]'),
     lambda c, s: checks.check_deploy_doc_cli_walk(c["t"], c["deploy_md"])),
    ("deploy.md's parameters file sets a parameter the template does not have",
     lambda c: _md(c, '"clusterName": { "value": "hs" },', '"clusterName": { "value": "hs" },\n    "clustername": { "value": "hs" },'),
     lambda c, s: checks.check_deploy_doc_cli_walk(c["t"], c["deploy_md"])),
    ("deploy.md's parameters file forgets the image",
     lambda c: _md(c, '    "imageId": { "value": "$IMAGE_ID" },\n', ""),
     lambda c, s: checks.check_deploy_doc_cli_walk(c["t"], c["deploy_md"])),
    ("deploy.md's parameters file picks a refused VM size",
     lambda c: _md(c, '"adminUsername": { "value": "azureuser" },',
                   '"adminUsername": { "value": "azureuser" },\n    "workerVmSize": { "value": "Standard_B2s" },'),
     lambda c, s: checks.check_deploy_doc_cli_walk(c["t"], c["deploy_md"])),
    ("deploy.md says encryption at host defaults to true",
     lambda c: _md(c, "| `encryptionAtHost` | `false` |", "| `encryptionAtHost` | `true` |"),
     lambda c, s: checks.check_deploy_doc_parameter_table(c["t"], c["deploy_md"])),
    ("a template parameter missing from deploy.md's table",
     lambda c: c["t"]["parameters"].__setitem__("newThing", {"type": "int", "defaultValue": 1,
                                                             "metadata": {"description": "x"}}),
     lambda c, s: checks.check_deploy_doc_parameter_table(c["t"], c["deploy_md"])),
    ("the portal walk forgets the administrator name",
     lambda c: _md(c, "**Administrator user name**", "**Admin**"),
     lambda c, s: checks.check_deploy_doc_portal_walk(c["ui"], c["deploy_md"])),
    ("something else before hashistack-agent status on the jumpbox",
     lambda c: _md(c, "$SSH                                                  # ssh <adminUsername>@<jumpbox FQDN>\n",
                   "$SSH                                                  # ssh <adminUsername>@<jumpbox FQDN>\nsudo -i\n"),
     lambda c, s: checks.check_deploy_doc_first_command(c["deploy_md"])),
    ("deploy.md no longer runs the smoke test first",
     lambda c: _md(c, "| jq -r .secret_id | hashistack-agent smoke --token-file -\n", "\n"),
     lambda c, s: checks.check_deploy_doc_first_command(c["deploy_md"])),
    ("deploy.md puts the Nomad token on the smoke command line",
     lambda c: _md(c, "| jq -r .secret_id | hashistack-agent smoke --token-file -\n",
                   "| jq -r .secret_id > t; NOMAD_TOKEN=$(cat t) hashistack-agent smoke\n"),
     lambda c, s: checks.check_deploy_doc_first_command(c["deploy_md"])),
    ("deploy.md no longer explains the role replication race",
     lambda c: _md(c, "`RoleDefinitionDoesNotExist` (or", "an error (or"),
     lambda c, s: checks.check_deploy_doc_role_replication(c["deploy_md"])),
    # --- arm-ttk's no-blanks rule (issue 13, item 9)
    ("empty actions array in a custom role",
     lambda c: role_def(c["t"], "escrowKeyWrapper")["properties"]["permissions"][0].__setitem__("actions", []),
     lambda c, s: checks.check_no_blanks(json.dumps(c["t"], indent=2))),
    ("empty ipRules in a Key Vault firewall",
     lambda c: key_vault(c["t"], "sharedVaultName")["properties"]["networkAcls"].__setitem__("ipRules", []),
     lambda c, s: checks.check_no_blanks(json.dumps(c["t"], indent=2))),
    ("empty tags object",
     lambda c: res(c["t"], "Microsoft.Network/natGateways")[0].__setitem__("tags", {}),
     lambda c, s: checks.check_no_blanks(json.dumps(c["t"], indent=2))),
    ("empty string description",
     lambda c: assignment(c["t"], "reader", "vault")["properties"].__setitem__("description", ""),
     lambda c, s: checks.check_no_blanks(json.dumps(c["t"], indent=2))),
    # --- checkov config
    ("checkov skip without a reason",
     lambda c: c.__setitem__("checkov_yaml", c["checkov_yaml"] + "  - CKV_AZURE_1\n"),
     lambda c, s: checks.check_checkov_skips(c["checkov_yaml"])),
]


@pytest.fixture
def ctx(template, params_file, uidef, metadata, network_md, tags_md):
    return {"t": json.loads(json.dumps(template)), "pf": json.loads(json.dumps(params_file)),
            "ui": json.loads(json.dumps(uidef)), "md": json.loads(json.dumps(metadata)),
            "network_md": network_md, "tags_md": tags_md, "today": dt.date(2026, 11, 27),
            "deploy_md": (armlib.DOCS / "deploy.md").read_text(encoding="utf-8"),
            "checkov_yaml": (armlib.ARM_DIR / ".checkov.yaml").read_text(encoding="utf-8")}


@pytest.mark.parametrize("mutate,run", [(m, r) for _, m, r in CASES], ids=[c[0] for c in CASES])
def test_check_fails_on_broken_copy(ctx, schemas, mutate, run):
    assert not run(ctx, schemas), "the unbroken input must pass first"
    mutate(ctx)
    assert run(ctx, schemas), "the check did not notice the breakage"


def test_tags_doc_parser_rejects_unknown_phrases(tags_md):
    broken = tags_md.replace("| `hashistack-nomad-servers` | nomad-server |", "| `hashistack-nomad-servers` | nomad leaders |")
    assert broken != tags_md
    with pytest.raises(ValueError):
        checks.required_tags_from_doc(broken)


def test_checkov_fails_on_insecure_copy(tmp_path):
    t = armlib.load_json(armlib.ARM_DIR / "azuredeploy.json")
    sa = res(t, "Microsoft.Storage/storageAccounts")[0]["properties"]
    sa["minimumTlsVersion"] = "TLS1_0"
    sa["supportsHttpsTrafficOnly"] = False
    work = tmp_path / "arm-templates"
    work.mkdir()
    (work / "azuredeploy.json").write_text(json.dumps(t), encoding="utf-8")
    shutil.copy(armlib.ARM_DIR / ".checkov.yaml", work / ".checkov.yaml")
    code, report, stderr = armlib.run_checkov(work, work / ".checkov.yaml")
    failed = {f.split()[0] for f in checks.checkov_failures(report)}
    assert {"CKV_AZURE_44", "CKV_AZURE_3"} <= failed, (failed, stderr)
    assert code != 0
