from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from tests.support.processes import REPO_ROOT


def _module_exists(dotted: str) -> bool:
    path = REPO_ROOT / Path(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_every_compose_service_runs_something_the_project_has() -> None:
    from django.core.management import get_commands

    management_commands = set(get_commands())
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "web", "gateway", "worker", "beat", "engine-agent"} <= set(services)
    for name, service in services.items():
        if "image" in service and "build" not in service:
            continue  # postgres, redis: upstream images
        command = service["command"]
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if argv[:2] == ["python", "manage.py"]:
            assert argv[2] in management_commands, f"{name}: no management command {argv[2]}"
        elif argv[0] == "uvicorn":
            module = argv[1].partition(":")[0]
            assert _module_exists(module), f"{name}: no module {module}"
            if "--http" in argv:
                protocol = argv[argv.index("--http") + 1].partition(":")[0]
                assert _module_exists(protocol), f"{name}: no module {protocol}"
        elif argv[0] == "celery":
            assert argv[1:3] == ["-A", "config"] and argv[3] in {"worker", "beat"}, name
        else:
            raise AssertionError(f"{name}: unexpected command {argv}")
    agent = services["engine-agent"]
    devices = agent["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
