"""Pages of rollouts: the dashboard, a rollout with its live evidence and its actions, creating a rollout
(a form or a pasted plan) with the sample-size estimate, and the audit log.

Pages read through `rollouts.selectors` (and the evals and serving selectors) and act through
`rollouts.services`, which check roles and states again; the buttons shown are `rollout_actions`.
Live parts are partials (`config.live`): the page embeds them and htmx polls the same partial."""

from __future__ import annotations

from rollouts.views.actions import rollout_action
from rollouts.views.audit import audit_log, audit_log_csv
from rollouts.views.create import rollout_new
from rollouts.views.dashboard import dashboard, dashboard_live
from rollouts.views.detail import rollout_detail, rollout_history, rollout_series_json, rollout_status
from rollouts.views.experiments import experiment_detail, experiment_detail_live, experiment_list

__all__ = [
    "audit_log",
    "audit_log_csv",
    "dashboard",
    "dashboard_live",
    "experiment_detail",
    "experiment_detail_live",
    "experiment_list",
    "rollout_action",
    "rollout_detail",
    "rollout_history",
    "rollout_new",
    "rollout_series_json",
    "rollout_status",
]
