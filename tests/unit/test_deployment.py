"""The deployment files agree: docker-compose.yml runs the Procfile's processes, pins its images,
has no password that works by default, and the image installs the lock file's versions."""

from __future__ import annotations

import re
import shlex
import tomllib
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO_ROOT


def procfile() -> dict[str, str]:
    lines = (REPO_ROOT / "Procfile").read_text().splitlines()
    return {
        name.strip(): command.strip()
        for name, _, command in (line.partition(":") for line in lines if line.strip())
    }


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return loaded


def expanded(line: str, env: dict[str, str]) -> str:
    """A command as its shell would run it with `env`: `${VAR:-default}` replaced."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda found: env.get(found[1], found[2]), line)


def normalised(words: list[str]) -> str:
    """`words` without `--host 0.0.0.0`: compose adds it where the Procfile may not, since
    inside a container a server must listen on all interfaces to be reached."""
    for at in range(len(words) - 1):
        if words[at : at + 2] == ["--host", "0.0.0.0"]:
            return normalised(words[:at] + words[at + 2 :])
    return shlex.join(words)


def compose_command(service: dict[str, Any]) -> str:
    command = service["command"]
    assert isinstance(command, list), command
    if command[:2] == ["sh", "-c"]:
        return str(command[2]).replace("$$", "$")
    return normalised([expanded(str(word), {}) for word in command])


def test_compose_runs_every_procfile_process_as_the_procfile_does() -> None:
    services = compose()["services"]
    for name, line in procfile().items():
        assert name in services, f"no {name} service in docker-compose.yml"
        service = services[name]
        env = {key: str(value) for key, value in service.get("environment", {}).items()}
        want = expanded(line, env)
        if not want.startswith("case "):
            want = normalised(shlex.split(want))
        assert compose_command(service) == want, name


def test_release_runs_before_every_process_using_the_ledger() -> None:
    services = compose()["services"]
    assert procfile()["release"] == "oncelery db upgrade"
    # The sandbox stands for the provider: it has no ledger.
    for name in set(procfile()) - {"release", "sandbox"}:
        condition = services[name]["depends_on"]["release"]["condition"]
        assert condition == "service_completed_successfully", name


def test_web_listens_on_port() -> None:
    assert "--port ${PORT:-8000}" in procfile()["web"]
    # honcho gives $PORT to the first line and the next hundreds to the others.
    assert next(iter(procfile())) == "web"


def test_images_are_pinned_to_a_patch_release() -> None:
    for name, service in compose()["services"].items():
        if "build" in service:
            continue
        image, _, tag = service["image"].partition(":")
        # Postgres numbers its patch releases MAJOR.MINOR.
        patch = r"\d+\.\d+" if image == "postgres" else r"\d+\.\d+\.\d+"
        assert re.match(patch + r"(-|$)", tag), f"{name}: {service['image']}"
    base = re.search(r"^FROM (\S+)", (REPO_ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base[1]), base[1]


def test_every_service_has_a_healthcheck_but_the_release() -> None:
    for name, service in compose()["services"].items():
        assert ("healthcheck" in service) == (name != "release"), name


def test_no_password_has_a_default() -> None:
    text = (REPO_ROOT / "docker-compose.yml").read_text()
    for variable in ("POSTGRES_PASSWORD", "RABBITMQ_PASSWORD", "FLOWER_BASIC_AUTH"):
        uses = re.findall(r"\$\{" + variable + r"([^}]*)\}", text)
        assert uses, variable
        assert all(use.startswith(":?") for use in uses), (variable, uses)
    assert "guest:guest" not in text
    assert ":oncelery@" not in text


def locked() -> dict[str, str]:
    pins = re.findall(
        r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO_ROOT / "requirements.lock").read_text(), re.MULTILINE
    )
    return {canonicalize_name(name): version for name, version in pins}


@pytest.mark.parametrize(
    "dependency",
    tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"],
)
def test_the_lock_pins_every_dependency_in_its_range(dependency: str) -> None:
    requirement = Requirement(dependency)
    versions = locked()
    name = canonicalize_name(requirement.name)
    assert name in versions, f"{name} is not in requirements.lock: run pip-compile (README)"
    assert requirement.specifier.contains(versions[name]), (dependency, versions[name])


def test_the_image_installs_the_lock() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements.lock" in dockerfile
    assert "pip install --no-deps ." in dockerfile
