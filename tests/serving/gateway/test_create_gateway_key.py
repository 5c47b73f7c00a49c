from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from serving.models import GatewayKey
from serving.services import gateway_key_digest, route_set
from tests.serving.gateway.conftest import split, version_register

pytestmark = pytest.mark.django_db


def test_it_prints_a_new_key_and_keeps_only_its_hash(tmp_path: object) -> None:
    version = version_register("adder-v1", str(tmp_path))
    route_set(alias_name="adder", split=split(version))
    out = StringIO()
    call_command("create_gateway_key", "checkout", "--alias", "adder", stdout=out)
    raw = out.getvalue().strip()
    assert raw.startswith("gw_") and len(raw) > 20
    key = GatewayKey.objects.get(name="checkout")
    assert key.key_hash == gateway_key_digest(raw) and raw not in (key.key_hash, key.prefix)
    assert key.aliases == ["adder"]


def test_an_unknown_alias_is_refused() -> None:
    with pytest.raises(CommandError, match="alias: no alias named nope"):
        call_command("create_gateway_key", "checkout", "--alias", "nope", stdout=StringIO())
    assert not GatewayKey.objects.exists()


def test_limits_are_set_with_the_key_and_bad_ones_refused(tmp_path: object) -> None:
    call_command("create_gateway_key", "batch-jobs", "--rpm", "600", "--tpm", "100000", "--max-concurrency", "8",
                 stdout=StringIO())
    key = GatewayKey.objects.get(name="batch-jobs")
    assert (key.rpm_limit, key.tpm_limit, key.max_concurrency) == (600, 100000, 8)
    for flag, value in (("--rpm", "0"), ("--tpm", "many"), ("--max-concurrency", "-2")):
        with pytest.raises(CommandError, match=flag):
            call_command("create_gateway_key", "other", flag, value, stdout=StringIO())
    assert not GatewayKey.objects.filter(name="other").exists()


def test_the_admin_changes_a_keys_limits_and_gateways_see_it(admin_client: object) -> None:
    from serving.models import RouteGeneration
    from serving.services import KeyLimits, gateway_key_create

    key = gateway_key_create(name="shop", limits=KeyLimits(rpm_limit=60)).key
    before = RouteGeneration.objects.get(pk=1).generation
    response = admin_client.post(  # type: ignore[attr-defined]
        f"/admin/serving/gatewaykey/{key.pk}/change/", {"rpm_limit": "", "tpm_limit": "5000", "max_concurrency": "2"})
    assert response.status_code == 302, response.content[:2000]
    key.refresh_from_db()
    assert (key.rpm_limit, key.tpm_limit, key.max_concurrency) == (None, 5000, 2)
    assert RouteGeneration.objects.get(pk=1).generation == before + 1
    refused = admin_client.post(  # type: ignore[attr-defined]
        f"/admin/serving/gatewaykey/{key.pk}/change/", {"rpm_limit": "0", "tpm_limit": "", "max_concurrency": ""})
    assert refused.status_code == 200 and b"rpm_limit" in refused.content
    key.refresh_from_db()
    assert key.tpm_limit == 5000


def test_the_admin_sets_an_aliass_ttfb_timeout_within_bounds(admin_client: object, tmp_path: object) -> None:
    from serving.models import Alias

    version = version_register("adder-v1", str(tmp_path))
    route_set(alias_name="adder", split=split(version))
    alias = Alias.objects.get(name="adder")
    form = {"name": "adder", "baseline": version.pk, "candidate": "", "candidate_weight": "0", "shadow_rate": "0",
            "failover_to_candidate": "", "store_prompts": "on"}
    url = f"/admin/serving/alias/{alias.pk}/change/"
    refused = admin_client.post(url, {**form, "ttfb_timeout_s": "0"})  # type: ignore[attr-defined]
    assert refused.status_code == 200 and b"Between 0.05 and 3600 seconds" in refused.content
    assert admin_client.post(url, {**form, "ttfb_timeout_s": "2.5"}).status_code == 302  # type: ignore[attr-defined]
    alias.refresh_from_db()
    assert (alias.ttfb_timeout_s, alias.store_prompts) == (2.5, True)
