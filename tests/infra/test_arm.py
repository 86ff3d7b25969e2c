"""Offline checks of arm-templates/ (issue 4, "Checks in CI"). Run from the repository root:

    python -m pytest tests/infra -q

Schemas come from ../shared/arm-schemas (or $HASHISTACK_ARM_SCHEMAS). Nothing here touches the network.
test_mutations.py proves that each of these checks fails on a template broken in the way it guards against.
"""
from __future__ import annotations

import json
import re

import pytest

import armlib
import checks


def no_problems(problems: list[str]) -> None:
    assert not problems, "\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------- JSON schema

def test_template_validates_against_arm_schemas(template, schemas):
    """Top level against deploymentTemplate.json, every resource against its provider schema at its apiVersion."""
    no_problems(checks.check_template_schema(template, schemas))


def test_parameters_file_validates_and_matches_template(template, params_file, schemas):
    no_problems(checks.check_parameters_file(template, params_file, schemas))


def test_create_ui_definition_validates(uidef, schemas):
    no_problems(checks.check_uidef_schema(uidef, schemas))


def test_files_are_canonical_json():
    """Every JSON file parses, and no key appears twice in an object (json.load would silently keep the last)."""
    def no_dupes(pairs):
        keys = [k for k, _ in pairs]
        dupes = {k for k in keys if keys.count(k) > 1}
        assert not dupes, f"duplicate keys {dupes}"
        return dict(pairs)
    for path in sorted(armlib.ARM_DIR.glob("*.json")):
        json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_dupes)


# --------------------------------------------------------------------------------------------- structure

def test_template_contains_no_blanks():
    """arm-ttk's "Template Should Not Contain Blanks": no property is an empty string, array or object, except the
    ones that rule allows (issue 13, item 9)."""
    no_problems(checks.check_no_blanks((armlib.ARM_DIR / "azuredeploy.json").read_text(encoding="utf-8")))


def test_every_parameter_used_and_declared(template):
    no_problems(checks.check_parameters_used(template))


def test_no_hard_coded_location(template):
    no_problems(checks.check_no_hardcoded_location(template))


def test_api_versions_exist_are_recent_and_stable(template, schemas):
    no_problems(checks.check_api_versions(template, schemas, armlib.today()))


def test_secrets_only_in_secure_parameters_without_defaults(template):
    no_problems(checks.check_secrets(template))


def test_no_secret_in_outputs(template):
    no_problems(checks.check_outputs_no_secret(template))


def test_template_expressions_evaluate(template, ev):
    """Every expression in variables, resource names and outputs evaluates with the parameters file's values
    (catches typos in variables()/parameters() paths and malformed format strings)."""
    problems = []
    for name in template["variables"]:
        try:
            ev.variable(name)
        except armlib.ArmExprError as exc:
            problems.append(f"variable {name}: {exc}")
    for r in template["resources"]:
        for key in ("name", "scope", "condition"):
            if key in r:
                try:
                    ev.value(r[key])
                except armlib.ArmExprError as exc:
                    problems.append(f"{r['type']} {key} {r[key]}: {exc}")
    for name, out in template["outputs"].items():
        try:
            ev.value(out["value"])
        except armlib.ArmExprError as exc:
            problems.append(f"output {name}: {exc}")
    no_problems(problems)


def test_resource_names_fit_azure_limits(template, ev):
    limits = {
        "Microsoft.Storage/storageAccounts": r"[a-z0-9]{3,24}",
        "Microsoft.KeyVault/vaults": r"[a-zA-Z](?!.*--)[a-zA-Z0-9-]{1,22}[a-zA-Z0-9]",
        "Microsoft.Compute/virtualMachineScaleSets": r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}",
    }
    problems = []
    for r in template["resources"]:
        rule = limits.get(r["type"])
        if rule:
            name = ev.value(r["name"])
            if not re.fullmatch(rule, name):
                problems.append(f"{r['type']} name {name!r} does not match {rule}")
    # Linux scale sets: computerNamePrefix is 1-58 characters
    for r in checks.resources_of(template, "Microsoft.Compute/virtualMachineScaleSets"):
        prefix = ev.value(r["properties"]["virtualMachineProfile"]["osProfile"]["computerNamePrefix"])
        if len(prefix) > 58:
            problems.append(f"computerNamePrefix {prefix!r} too long")
    no_problems(problems)


def test_create_ui_definition_outputs_match_template_parameters(template, uidef):
    no_problems(checks.check_uidef_outputs(template, uidef))


def test_metadata_follows_quickstart_conventions(metadata):
    no_problems(checks.check_metadata(metadata))


# --------------------------------------------------------------------------------------------- security

def test_escrow_is_write_only_for_vm_identities(template, ev):
    no_problems(checks.check_escrow_write_only(template, ev))


def test_unseal_key_usable_by_vault_servers_only(template, ev):
    no_problems(checks.check_unseal_key(template, ev))


def test_access_matrix_is_least_privilege(template, ev):
    """The exact set of (principal, scope, role) triples, documented in docs/deploy.md."""
    no_problems(checks.check_access_matrix(template, ev))


def test_key_vaults_split_by_readership(template, ev):
    """The CA key's vault (servers) is the server tiers' alone; the status tokens' vault is read by the jumpbox
    only and written (set, never get) by the server tiers; every cluster identity reads the shared vault."""
    no_problems(checks.check_vault_readership(template, ev))


def test_key_vault_firewalls_admit_only_their_readers_subnets(template, ev):
    no_problems(checks.check_vault_network_acls(template, ev))


def test_every_firewall_admits_every_data_plane_principal(template, ev):
    """The storage account and every Key Vault: each principal with a data-plane role on it (or inside it, or
    above it) can reach it through its network rules, and nothing else is admitted (issue 13, item 1)."""
    no_problems(checks.check_firewalls_admit_data_plane_principals(template, ev))


def test_firewall_table_matches_docs_network_md(template, ev, network_md):
    no_problems(checks.check_firewall_table_matches_doc(template, ev, network_md))


def test_first_boot_has_its_vaults_and_role_assignments(template, ev):
    """Scale sets and the jumpbox depend on the vaults they are tagged with and on their identity's role
    assignments; each assignment on its identity, custom role and scope."""
    no_problems(checks.check_boot_dependencies(template, ev))


def test_node_record_writers_write_only_under_nodes(template, ev):
    """Workers and the jumpbox publish boot records for `hashistack-agent status`, and nothing else."""
    no_problems(checks.check_node_record_writers(template, ev))


def test_each_server_tier_writes_only_its_own_escrow_and_coordination(template, ev):
    """ABAC conditions on the escrow and coordination writers (StringStartsWith '<cluster>/<tier>/'), and the Key
    Vault escrow writer scoped to the tier's own escrow secret (issue 12, item 6)."""
    no_problems(checks.check_tier_isolation(template, ev))


def test_escrow_container_is_immutable(template, ev):
    """Version-level WORM with a default time-based retention policy on the escrow container (issue 12, item 6)."""
    no_problems(checks.check_escrow_immutable(template, ev))


def test_audit_trail_and_locks(template, ev):
    """Key Vault AuditEvent and blob read/write/delete logs to the template's Log Analytics workspace; CanNotDelete
    locks on the storage account and the escrow and unseal vaults (issue 12, item 8)."""
    no_problems(checks.check_audit_trail(template, ev))


def test_role_assignments_and_custom_roles_hygiene(template, ev):
    no_problems(checks.check_assignment_hygiene(template, ev))


def test_role_ids_are_stable_and_per_cluster(template, ev, ev_other_cluster):
    """roleDefinitionId in the subscription form (no what-if noise); custom role GUIDs and names, and assignment
    names, differ between two clusters in one resource group (issue 13, item 3)."""
    no_problems(checks.check_role_definition_ids(template, ev, ev_other_cluster))


def test_keys_expire_consistently_with_their_rotation_policy(template, ev):
    """attributes.exp on the first version, rotation before the notify window (issue 13, item 7)."""
    no_problems(checks.check_key_expiry(template, ev))


def test_storage_and_key_vaults_hardened(template):
    no_problems(checks.check_storage_and_key_vaults(template))


# --------------------------------------------------------------------------------------------- network, compute

def test_network_layout(template, ev):
    no_problems(checks.check_network(template, ev))


def test_nsg_rules_match_docs_network_md(template, ev, network_md):
    no_problems(checks.check_nsg_matches_doc(template, ev, network_md))


def test_consul_wan_is_neither_opened_nor_needed(template, ev, network_md):
    """Single datacenter: no NSG opens 8302, and docs/network.md records that the agent turns the WAN listener
    off (issue 13, item 4)."""
    no_problems(checks.check_consul_wan_decision(template, ev, network_md))


def test_scale_sets_and_jumpbox(template, ev):
    no_problems(checks.check_scale_sets(template, ev))


def test_operators_pgp_keys_reach_the_server_tiers_in_user_data(template, ev):
    no_problems(checks.check_pgp_user_data(template, ev))


def test_zones_make_everything_zone_resilient(template, ev_zone_cases):
    """Under the zones condition: LB frontend and NAT gateway zone-redundant, zoneBalance on the raft tiers,
    platformFaultDomainCount 1 (issue 13, item 8)."""
    no_problems(checks.check_zone_resilience(template, ev_zone_cases))


def test_vault_internal_load_balancer(template, ev):
    no_problems(checks.check_vault_load_balancer(template, ev))


def test_tags_carry_what_docs_tags_md_requires(template, ev, tags_md):
    no_problems(checks.check_tags(template, ev, tags_md))


# --------------------------------------------------------------------------------------------- checkov

def test_checkov_skips_have_reasons():
    no_problems(checks.check_checkov_skips((armlib.ARM_DIR / ".checkov.yaml").read_text(encoding="utf-8")))


def test_checkov_passes_offline():
    code, report, stderr = armlib.run_checkov(armlib.ARM_DIR, armlib.ARM_DIR / ".checkov.yaml")
    assert report, f"checkov produced no JSON report (exit {code}):\n{stderr}"
    failures = checks.checkov_failures(report)
    no_problems(failures)
    reports = report if isinstance(report, list) else [report]
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    assert passed > 50, f"checkov ran only {passed} checks: did it scan the template?"
    assert code == 0, stderr


def test_workers_reach_each_others_workload_ports(template) -> None:
    """Nomad's dynamic ports (20000-32000, with Connect's sidecar range 21000-21255 inside) between workers, TCP and
    UDP, before the deny-all rule: otherwise one job cannot reach another on a different worker."""
    nsg = next(r for r in template["resources"]
               if r["type"] == "Microsoft.Network/networkSecurityGroups" and "workers" in r["name"])
    rules = [x["properties"] for x in nsg["properties"]["securityRules"]]
    deny = min(p["priority"] for p in rules if p["access"] == "Deny")
    for proto in ("Tcp", "Udp"):
        ok = [p for p in rules
              if p["access"] == "Allow" and p["direction"] == "Inbound" and p["protocol"] == proto
              and p["priority"] < deny
              and p.get("sourceAddressPrefix") == "[variables('subnetPrefixes').workers]"
              and p.get("destinationPortRange") == "20000-32000"]
        assert ok, f"no {proto} rule opens 20000-32000 between workers"
