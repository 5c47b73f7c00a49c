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
