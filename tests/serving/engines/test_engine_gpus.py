"""Which GPUs a local engine gets on a multi-GPU host (pure)."""

from __future__ import annotations

import re

import pytest

from serving.engines.gpus import GpuFitError, gpus_assign, gpus_parse, host_gpus


def test_engines_get_gpus_of_their_own_by_their_parallel_size() -> None:
    host = ("0", "1", "2", "3")
    first = gpus_assign(need=2, host=host, held={})
    second = gpus_assign(need=1, host=host, held={7: first.gpu_ids})
    third = gpus_assign(need=1, host=host, held={7: first.gpu_ids, 8: second.gpu_ids})
    assert (first.visible_devices, second.visible_devices, third.visible_devices) == ("0,1", "2", "3")


def test_an_engine_waits_while_its_gpus_are_held() -> None:
    with pytest.raises(GpuFitError) as caught:
        gpus_assign(need=2, host=("0", "1"), held={3: ("1",)})
    assert not caught.value.permanent
    assert caught.value.reason == "waiting for 2 free GPUs (1 free; GPU 1: engine 3)"


@pytest.mark.parametrize(("need", "host", "reason"), [
    (4, ("0", "1"), "needs 4 GPUs, this host has 2 (0,1)"),
    (1, (), "this host has no GPU"),
])
def test_an_engine_that_can_never_fit_is_refused_with_the_reason(need: int, host: tuple[str, ...], reason: str) -> None:
    with pytest.raises(GpuFitError, match=re.escape(reason)) as caught:
        gpus_assign(need=need, host=host, held={})
    assert caught.value.permanent


def test_the_hosts_gpus_come_from_the_setting_then_the_agents_visible_devices() -> None:
    assert gpus_parse("auto") is None and gpus_parse("none") == () and gpus_parse("0, 2,3") == ("0", "2", "3")
    with pytest.raises(ValueError, match="names a GPU twice"):
        gpus_parse("1,1")
    assert host_gpus(("5",), {"CUDA_VISIBLE_DEVICES": "0,1"}) == ("5",)
    assert host_gpus(None, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ("2", "3")
    assert host_gpus(None, {"CUDA_VISIBLE_DEVICES": "-1"}) == ()
