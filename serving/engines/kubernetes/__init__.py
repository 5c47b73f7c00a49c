"""The `kubernetes` driver: each engine worker is a Deployment of the vLLM OpenAI server and a Service, in
one namespace, labelled so the platform finds its own; its pods are the worker's replicas.

- `spec`: a model version's deployment settings (image, GPUs, weights, placement), checked (pure).
- `manifests`: the Secret, Deployment and Service of a worker (pure dicts, as the API server takes them).
- `status`: pods, EndpointSlices and Deployments read into what a person understands (pure).
- `cluster`: the API calls, through lightkube.
- `reconciler`: the loop behind `manage.py engine_agent --driver kubernetes`.
"""
