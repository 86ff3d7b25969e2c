"""Fixtures for the offline checks of arm-templates/ (run: python -m pytest tests/infra -q)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import armlib  # noqa: E402


@pytest.fixture(scope="session")
def schemas() -> armlib.SchemaSet:
    root = armlib.schemas_dir()
    if not (root / "2019-04-01" / "deploymentTemplate.json").exists():
        pytest.fail(f"ARM schemas not found at {root} (set HASHISTACK_ARM_SCHEMAS or put shared/ next to the repo)")
    return armlib.SchemaSet(root)


@pytest.fixture(scope="session")
def template() -> dict:
    return armlib.load_json(armlib.ARM_DIR / "azuredeploy.json")


@pytest.fixture(scope="session")
def params_file() -> dict:
    return armlib.load_json(armlib.ARM_DIR / "azuredeploy.parameters.json")


@pytest.fixture(scope="session")
def uidef() -> dict:
    return armlib.load_json(armlib.ARM_DIR / "createUiDefinition.json")


@pytest.fixture(scope="session")
def metadata() -> dict:
    return armlib.load_json(armlib.ARM_DIR / "metadata.json")


@pytest.fixture(scope="session")
def param_values(template, params_file) -> dict:
    return armlib.default_values(template, params_file)


@pytest.fixture
def ev(template, param_values) -> armlib.Evaluator:
    return armlib.Evaluator(template, param_values)


@pytest.fixture
def ev_other_cluster(template, param_values) -> armlib.Evaluator:
    """The same template deployed a second time into the same resource group, as another cluster."""
    return armlib.Evaluator(template, dict(param_values, clusterName="hs2"))


@pytest.fixture
def ev_zone_cases(template, param_values) -> dict:
    """The template without zones, in one zone and over three zones."""
    return {case: armlib.Evaluator(template, dict(param_values, availabilityZones=zones))
            for case, zones in (("regional", []), ("one-zone", ["2"]), ("zones", ["1", "2", "3"]))}


@pytest.fixture(scope="session")
def network_md() -> str:
    return (armlib.DOCS / "network.md").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tags_md() -> str:
    return (armlib.DOCS / "tags.md").read_text(encoding="utf-8")
