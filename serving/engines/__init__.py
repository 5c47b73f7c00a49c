"""Engine workers: the drivers that run them, the probes that judge them, and the reconcilers.

- `command`: the vLLM command line and environment of an engine, for the build installed (CPU or CUDA).
- `gpus`: which GPUs of a host a local engine gets (CUDA_VISIBLE_DEVICES by its parallel sizes).
- `flavors`: what differs between OpenAI-compatible servers a static worker may point at (pure).
- `probe`: readiness, health and the `/metrics` scrape over HTTP, as the worker's flavor wants them.
- `metrics`: Prometheus text to the vllm:* figures kept on the worker, and what is in flight (pure).
- `policy`: restart backoff and when to give up (pure).
- `drivers`: `local` (a child process) and `static` (someone else's endpoint).
- `kubernetes/`: the `kubernetes` driver (Deployments and Services, pods as replicas) and its reconciler.
- `capacity`: GPU budgets of aliases: replicas per arm, scaling them, when traffic may move.
- `services`: the reconcilers' state transitions, each one compare-and-set on the worker row.
- `agent`: the local reconcile loop behind `manage.py engine_agent`.
"""
