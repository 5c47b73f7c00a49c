from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from serving.engines.agent import AgentConfig, EngineAgent, agent_stats
from serving.engines.drivers import cpus_check, process_group_signal

logger = logging.getLogger("serving.engines.agent")


class Command(BaseCommand):
    help = ("Run this host's engine agent: start, health-check, restart and drain the engine workers "
            "registered for the host, until SIGTERM or Ctrl-C (which stop its engines). With --driver kubernetes, "
            "reconcile the host's Kubernetes workers (Deployments, Services, pods as replicas) instead.")
    # The system checks import the URL configuration and with it every app's API (scipy, statsmodels):
    # 140 MB the agent never uses. `make run` checks the project before it starts anything.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host-name", default=None,
                            help="The host whose workers to run (default: ENGINE_AGENT_HOST, else 'localhost').")
        parser.add_argument("--interval", type=float, default=1.0, help="Seconds between passes (default 1).")
        parser.add_argument("--once", action="store_true",
                            help="One pass, wait for its probes, apply them, stop what it started, and exit.")
        parser.add_argument("--driver", choices=("local", "kubernetes"), default="local",
                            help="local (default): run local and static workers; kubernetes: reconcile Kubernetes "
                                 "workers in ENGINE_KUBERNETES_NAMESPACE (in-cluster service account, or "
                                 "ENGINE_KUBERNETES_KUBECONFIG).")

    def handle(self, *args: Any, host_name: str | None, interval: float, once: bool, driver: str = "local",
               **options: Any) -> None:
        if interval <= 0:
            raise SystemExit("--interval: must be a positive number of seconds")
        if driver == "kubernetes":
            self._kubernetes(host_name=host_name, interval=interval, once=once)
            return
        try:
            config = AgentConfig.from_settings(host_name=host_name, interval_s=interval)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        if config.cpus is not None:
            try:
                cpus_check(config.cpus)
            except ValueError as exc:
                raise SystemExit(str(exc)) from None
            logger.info("engine agent: local engines run on CPUs %s", ",".join(map(str, sorted(config.cpus))))
        agent = EngineAgent(config)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if agent.stopping:
                # A second Ctrl-C: no more waiting; the engines go now.
                for engine in list(agent.engines.values()):
                    process_group_signal(engine.pid, signal.SIGKILL)
                os._exit(1)
            logger.info("engine agent: %s received, stopping engines", signal.Signals(signum).name)
            agent.request_stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if config.build == "cuda":
            logger.info("engine agent: CUDA build; GPUs for engines: %s", ",".join(config.gpus) or "none found")
        logger.info("engine agent memory: %s", agent_stats())
        agent.run(once=once)
        sys.stdout.flush()

    def _kubernetes(self, *, host_name: str | None, interval: float, once: bool) -> None:
        from django.conf import settings

        from serving.engines.kubernetes.cluster import Cluster, ClusterError, kube_config
        from serving.engines.kubernetes.reconciler import KubernetesReconciler, ReconcilerConfig

        config = ReconcilerConfig.from_settings(host_name=host_name, interval_s=interval)
        try:
            cluster = Cluster(namespace=config.namespace, config=kube_config(settings.ENGINE_KUBERNETES_KUBECONFIG))
        except ClusterError as exc:
            raise SystemExit(str(exc)) from None
        reconciler = KubernetesReconciler(config, cluster)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("kubernetes reconciler: %s received, stopping (the engines keep running)",
                        signal.Signals(signum).name)
            reconciler.request_stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            reconciler.run(once=once)
        finally:
            cluster.close()
        sys.stdout.flush()
