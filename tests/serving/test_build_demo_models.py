"""`manage.py build_demo_models`: the demo models trained (or found cached) and registered as versions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command

import serving.demo_models
from serving.demo_models import BuiltModel
from serving.models import ModelVersion
from tests.support.processes import REPO_ROOT

LABELS = ["adder-v1", "adder-v2", "adder-v2-broken", "adder-v2-slow"]


def run(**options: object) -> str:
    out = StringIO()
    call_command("build_demo_models", stdout=out, **options)
    return out.getvalue()


@pytest.mark.django_db
def test_builds_and_registers_the_four_demo_versions_once() -> None:
    # The real builder, on the shared cache: the first run of a machine trains for a few minutes.
    first = run()
    versions = {v.label: v for v in ModelVersion.objects.all()}
    assert sorted(versions) == LABELS
    for label, version in versions.items():
        assert version.name == "adder"
        assert version.served_model_name == label
        assert (Path(version.artifact) / "config.json").exists()
        assert Path(version.artifact).is_relative_to(Path(settings.DEMO_MODELS_DIR).resolve())
        assert version.sampling_defaults == {"temperature": 0.0, "max_tokens": 8}
        assert len(version.lineage_hash) == 64
        assert f"registered {label}" in first
    # The cost guardrail of a canary to v2-slow has a real difference to measure.
    assert versions["adder-v2-slow"].price_output_per_million > versions["adder-v2"].price_output_per_million
    assert versions["adder-v2"].price_output_per_million == Decimal("0.2000")
    # Different weights, different lineage.
    assert len({v.lineage_hash for v in versions.values()}) == 4

    again = run()
    assert ModelVersion.objects.count() == 4
    assert {v.label: v.lineage_hash for v in ModelVersion.objects.all()} == {
        label: v.lineage_hash for label, v in versions.items()}
    assert again.count("already registered") == 4
    assert "registered adder" not in again.replace("already registered", "")


@pytest.mark.django_db
def test_a_rebuilt_model_moves_its_version_to_the_new_build_with_a_new_lineage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run()
    before = ModelVersion.objects.get(name="adder", version="v1")
    real = serving.demo_models.build_demo_models
    moved = tmp_path / "adder-v1-newrecipe"

    def builder(out_dir: Path, **kwargs: Any) -> list[BuiltModel]:
        """The builder as if adder-v1's recipe had changed: a new build directory holding other weights."""
        built = real(out_dir, **kwargs)
        v1 = next(m for m in built if m.served_name == "adder-v1")
        shutil.copytree(v1.path, moved)
        weights = next(moved.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes() + b"\0")
        return [replace(m, path=moved, cached=False) if m is v1 else m for m in built]

    monkeypatch.setattr(serving.demo_models, "build_demo_models", builder)
    output = run()
    after = ModelVersion.objects.get(name="adder", version="v1")
    assert after.pk == before.pk
    assert after.artifact == str(moved.resolve())
    assert after.lineage_hash != before.lineage_hash
    assert after.lineage["weights"] != before.lineage["weights"]
    assert after.lineage["tokenizer"] == before.lineage["tokenizer"]
    assert "adder-v1: rebuilt into" in output and "lineage changed" in output
    assert ModelVersion.objects.count() == 4


def test_an_unmigrated_database_is_refused_before_anything_is_trained(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}", "PLATFORM_VAR_DIR": str(tmp_path),
           "DJANGO_SETTINGS_MODULE": "config.settings"}
    out_dir = tmp_path / "models"
    done = subprocess.run([sys.executable, "manage.py", "build_demo_models", "--out-dir", str(out_dir)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "migration(s) not applied" in done.stderr and "python manage.py migrate" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out_dir.exists()
