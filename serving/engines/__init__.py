"""Engine workers: the drivers that run them, the probes that judge them, and the agent that reconciles.

- `command`: the vLLM command line and environment of a local engine.
- `probe`: readiness, health and the `/metrics` scrape over HTTP.
- `metrics`: Prometheus text to the vllm:* figures kept on the worker (pure).
- `policy`: restart backoff and when to give up (pure).
- `drivers`: `local` (a child process) and `static` (someone else's endpoint).
- `services`: the agent's state transitions, each one compare-and-set on the worker row.
- `agent`: the reconcile loop behind `manage.py engine_agent`.
"""
