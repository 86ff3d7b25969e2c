"""createUiDefinition.json against the template: the portal refuses what the deployment would reject, explains
every control, and encryption at host is a choice the portal explains (issue 13, items 5 and 6).
test_mutations.py proves each check can fail."""
from __future__ import annotations

import checks


def no_problems(problems: list[str]) -> None:
    assert not problems, "\n" + "\n".join(problems)


def test_portal_refuses_what_the_template_refuses(template, uidef):
    no_problems(checks.check_uidef_refuses_what_the_template_refuses(template, uidef))


def test_ssh_from_the_internet_is_refused_by_portal_and_template(template, uidef, param_values):
    no_problems(checks.check_ssh_source_refusal(template, uidef, param_values))


def test_encryption_at_host_is_off_by_default_and_explained(template, uidef):
    no_problems(checks.check_encryption_at_host_choice(template, uidef))
