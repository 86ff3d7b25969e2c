"""docs/deploy.md walks a first deployment that the template accepts (issue 13): the roles it asks for can create
the template's role definitions, packer builds the directory packer/, the CLI's parameters file and the portal
walk take no step the template or the portal would refuse, the parameter table is the template's, the first
command on the jumpbox is `hashistack-agent status`, then the smoke test with the token from escrow, and the role-definition replication race is explained.
test_mutations.py proves each check can fail."""
from __future__ import annotations

import pytest

import armlib
import checks


def no_problems(problems: list[str]) -> None:
    assert not problems, "\n" + "\n".join(problems)


@pytest.fixture(scope="session")
def deploy_md() -> str:
    return (armlib.DOCS / "deploy.md").read_text(encoding="utf-8")


def test_deploy_asks_for_roles_that_can_create_role_definitions(deploy_md):
    no_problems(checks.check_deploy_doc_roles(deploy_md))


def test_packer_is_built_from_the_directory(deploy_md):
    texts = {"docs/deploy.md": deploy_md}
    for path in sorted((armlib.REPO / "packer").glob("*")):
        if path.is_file():
            texts[f"packer/{path.name}"] = path.read_text(encoding="utf-8")
    texts["arm-templates/createUiDefinition.json"] = (armlib.ARM_DIR / "createUiDefinition.json").read_text(
        encoding="utf-8")
    no_problems(checks.check_packer_commands_build_the_directory(texts))


def test_deploy_refers_to_no_issue_numbers(deploy_md):
    no_problems(checks.check_no_issue_numbers("docs/deploy.md", deploy_md))


def test_cli_walk_is_accepted_by_the_template(template, deploy_md):
    no_problems(checks.check_deploy_doc_cli_walk(template, deploy_md))


def test_parameter_table_is_the_templates(template, deploy_md):
    no_problems(checks.check_deploy_doc_parameter_table(template, deploy_md))


def test_portal_walk_names_every_field_to_fill_in(uidef, deploy_md):
    no_problems(checks.check_deploy_doc_portal_walk(uidef, deploy_md))


def test_first_commands_on_the_jumpbox_are_status_then_smoke(deploy_md):
    no_problems(checks.check_deploy_doc_first_command(deploy_md))


def test_role_definition_replication_race_is_explained(deploy_md):
    no_problems(checks.check_deploy_doc_role_replication(deploy_md))
