"""Train (or find cached) the demo models and register each as a model version.

Idempotent: a rerun with nothing changed trains nothing and registers nothing. The build directory of a
model is keyed by the hash of its recipe, so a changed recipe lands in a new directory; the version
with that label is then pointed at the new directory and its lineage recomputed (the label stays the
same, its lineage hash says the weights changed). Engines already running keep what they loaded until
they restart."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections
from django.db.migrations.executor import MigrationExecutor

from serving.models import ModelVersion
from serving.services import model_version_artifact_update, model_version_register

# Greedy, short answers: what the models were trained for, and what makes evals through an engine repeatable.
SAMPLING_DEFAULTS = {"temperature": 0.0, "max_tokens": 8}

# Prices per million (input, output) tokens. v2-slow is the same answers from a model many times the size,
# so it costs more per token: the cost guardrail of a canary to it has a real difference to find.
PRICES: dict[str, tuple[Decimal, Decimal]] = {
    "v1": (Decimal("0.10"), Decimal("0.20")),
    "v2": (Decimal("0.10"), Decimal("0.20")),
    "v2-slow": (Decimal("0.60"), Decimal("1.20")),
    "v2-broken": (Decimal("0.10"), Decimal("0.20")),
}
DEFAULT_PRICE = (Decimal("0.10"), Decimal("0.20"))


def family_name(label: str, version: str) -> str:
    """'adder-v2-slow' with version 'v2-slow' is the family 'adder'."""
    suffix = f"-{version}"
    if not label.endswith(suffix) or label == suffix:
        raise ValueError(f"demo model {label!r} does not end with its version {version!r}")
    return label[: -len(suffix)]


class Command(BaseCommand):
    help = "Train the demo models into DEMO_MODELS_DIR (cached by recipe) and register them as model versions."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--out-dir", default=None, help="Where to build (default: DEMO_MODELS_DIR).")

    def handle(self, *args: Any, out_dir: str | None, **options: Any) -> None:
        # torch and transformers load only when something must be trained, inside the builder.
        from serving.demo_models import build_demo_models

        # Registering needs the tables: say so before minutes of training, not in a traceback after them.
        executor = MigrationExecutor(connections["default"])
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
        if pending:
            raise CommandError(f"the database has {len(pending)} migration(s) not applied (the first: "
                               f"{pending[0][0]}); run `python manage.py migrate` first")
        target = Path(out_dir) if out_dir else Path(settings.DEMO_MODELS_DIR)
        self.stdout.write(f"building demo models in {target}")
        built = build_demo_models(target, log=lambda line: self.stdout.write(f"  {line}"))
        for model in built:
            name = family_name(model.served_name, model.version)
            artifact = str(Path(model.path).resolve())
            existing = ModelVersion.objects.filter(name=name, version=model.version).first()
            if existing is None:
                price_in, price_out = PRICES.get(model.version, DEFAULT_PRICE)
                version = model_version_register(
                    name=name, version=model.version, artifact=artifact, served_model_name=model.served_name,
                    # float32: vLLM on CPU would serve these in bfloat16, which changes a few greedy answers.
                    engine_args=list(model.engine_args),
                    sampling_defaults=dict(SAMPLING_DEFAULTS),
                    description=(f"{model.description} Exact match {model.exact_match:.1%} on the held-out sums; "
                                 f"{model.param_count:,} parameters."),
                    price_input_per_million=price_in, price_output_per_million=price_out,
                )
                self.stdout.write(self.style.SUCCESS(
                    f"registered {version.label} ({model.exact_match:.1%} exact match, lineage {version.lineage_hash[:12]})"))
            elif existing.artifact != artifact:
                before = existing.lineage_hash
                version = model_version_artifact_update(model_version=existing, artifact=artifact)
                changed = "changed" if version.lineage_hash != before else "unchanged"
                self.stdout.write(self.style.WARNING(
                    f"{version.label}: rebuilt into {artifact}; lineage {changed} ({version.lineage_hash[:12]})"))
            else:
                self.stdout.write(f"{existing.label}: already registered")
