"""rolloutctl: the platform's rollouts from a CI pipeline, over the REST API (httpx only, no Django)."""

__version__ = "0.1.0"
