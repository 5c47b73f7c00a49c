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


def _queues_of(argv: list[str]) -> set[str]:
    return set(argv[argv.index("-Q") + 1].split(",")) if "-Q" in argv else {"celery"}


def test_every_celery_queue_has_workers_in_the_procfile_and_in_compose() -> None:
    """Background work of each kind has its own queue (config/queues.py); `make run` and compose start workers
    for every one, and the analyses never share a worker with shadow mirrors or eval runs."""
    from config.queues import ANALYSIS, EVALS, SHADOW, all_queues

    procfile = [shlex.split(line.split(":", 1)[1]) for line in (REPO_ROOT / "Procfile").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    commands = [shlex.split(s["command"]) for s in compose.values() if isinstance(s.get("command"), str)]
    for name, argvs in (("Procfile", procfile), ("docker-compose.yml", commands)):
        workers = [_queues_of(argv) for argv in argvs if "worker" in argv and any(a.endswith("celery") for a in argv)]
        assert set(all_queues()) <= set().union(*workers), name
        for queues in workers:
            assert not (ANALYSIS in queues and (SHADOW in queues or EVALS in queues)), (name, queues)
