"""The create-a-rollout form and the paste-a-plan form.

Neither validates a plan: they only turn what was typed into the plan mapping (numbers where a number
was typed, "25%" kept as written), and `rollouts.services.plan_validate`, the one validator the API and
the CLI use too, judges it. Its errors come back by field path (``steps[1].weight``) and are put beside
the input that path came from (`place_plan_errors`)."""

from __future__ import annotations

import re
from typing import Any

from django import forms

from experiments.metrics import METRICS
from rollouts.plans import STRATEGIES

STEP_ROWS = 5
STRATEGY_CHOICES = [
    ("canary", "Canary: steps of weights"),
    ("shadow", "Shadow: mirror traffic, no users"),
    ("ab", "A/B: a fixed split, decided by a primary metric"),
    ("blue_green", "Blue-green: warm up on shadow traffic, then 100 %"),
]
assert [value for value, _ in STRATEGY_CHOICES] == list(STRATEGIES)
TRI_STATE = [("", "plan default"), ("yes", "yes"), ("no", "no")]
ON_INCONCLUSIVE_CHOICES = [
    ("", "pause: a person decides (default)"), ("advance", "advance"), ("rollback", "roll back"),
]
DEFAULT_GUARDRAILS_TEXT = "tpot_gmean_ms 10%\nerror_rate 0.01"
# Minimum candidate requests left blank: the validator fills each step's floor (the fewest at which its
# checks can be shown safe).
DEFAULT_STEPS: list[tuple[str, str, str, bool]] = [
    ("5%", "60", "", False),
    ("25%", "120", "", False),
    ("50%", "120", "", True),
    ("100%", "60", "", False),
]


def _text(label: str, *, help_text: str = "", placeholder: str = "", size: str = "") -> forms.CharField:
    attrs = {"placeholder": placeholder} if placeholder else {}
    if size:
        attrs["inputmode"] = size
    return forms.CharField(
        label=label, required=False, help_text=help_text, widget=forms.TextInput(attrs=attrs)
    )


def _select(
    label: str, *, choices: list[tuple[str, str]] | None = None, help_text: str = "", initial: str = ""
) -> forms.CharField:
    """A drop-down whose value is passed on as chosen: the plan validator, not the form, says what is wrong."""
    return forms.CharField(
        label=label, required=False, help_text=help_text, initial=initial or None,
        widget=forms.Select(choices=choices or []),
    )  # fmt: skip


def _number_or_text(raw: str) -> Any:
    """What the person typed, as the plan validator expects it: 0.25, 60, or "25%" as written. Text that is
    no number stays text, so the validator names the field and says what it expected."""
    value = raw.strip()
    if not value:
        return None
    if value.endswith("%"):
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def _lines(raw: str) -> list[str]:
    return [
        line.strip() for line in (raw or "").splitlines() if line.strip() and not line.strip().startswith("#")
    ]


class RolloutForm(forms.Form):
    name = _text("Name", placeholder="adder v2 canary")
    description = forms.CharField(
        label="Description", required=False, widget=forms.Textarea(attrs={"rows": 2})
    )
    alias = _text("Alias", help_text="The public model name whose traffic moves.", placeholder="adder")
    baseline = _select("Baseline", help_text="Leave as is to start from what the alias serves.")
    candidate = _select("Candidate")
    strategy = _select("Strategy", choices=STRATEGY_CHOICES, initial="canary")
    shadow_rate = _text(
        "Shadow rate", placeholder="10%", size="decimal",
        help_text="Share of requests mirrored to the candidate (required for shadow; optional otherwise).",
    )  # fmt: skip
    ab_weight = _text("A/B: candidate share", placeholder="50%", size="decimal")
    ab_min_duration_s = _text("A/B: minimum duration (s)", placeholder="3600", size="numeric")
    ab_min_candidate_requests = _text("A/B: minimum candidate requests", placeholder="1000", size="numeric")
    ab_horizon_s = _text(
        "A/B: horizon (s)", placeholder="604800", size="numeric", help_text="Ends here if undecided."
    )
    bg_warmup_s = _text("Blue-green: warm-up (s)", placeholder="300", size="numeric")
    bg_rollback_window_s = _text("Blue-green: rollback window (s)", placeholder="300", size="numeric")
    slos = forms.CharField(
        label="SLOs", required=False, widget=forms.Textarea(attrs={"rows": 3, "placeholder": "ttft_p99_ms <= 800\nerror_rate <= 0.01"}),
        help_text="One per line: metric <= number, or metric >= number.",
    )  # fmt: skip
    guardrails = forms.CharField(
        label="Guardrails", required=False, initial=DEFAULT_GUARDRAILS_TEXT,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="One per line: metric and how much worse the candidate may be: 10% (relative) or 0.005 (absolute).",
    )  # fmt: skip
    primary_metric = _select("Primary metric", help_text="Decides an A/B test.")
    primary_min_effect = _text("Smallest effect worth detecting", placeholder="0.05", size="decimal")
    alpha = _text(
        "Alpha",
        placeholder="0.05",
        size="decimal",
        help_text="The chance of a wrong decision over the whole rollout.",
    )
    eval_gate_suite = _select("Eval gate: suite", help_text="Run before any traffic moves.")
    eval_gate_scorer = _text("Eval gate: scorer", placeholder="exact_match")
    eval_gate_max_drop = _text("Eval gate: largest score drop", placeholder="0.05", size="decimal")
    allow_self_approval = forms.BooleanField(
        label="Let the creator (and whoever asks) approve their own steps", required=False
    )
    approvals_required = _text(
        "Approvals needed", placeholder="1", size="numeric",
        help_text="Different approvers who must approve a step that needs an approval; one rejection ends the wait.",
    )  # fmt: skip
    approval_ttl_s = _text(
        "An approval request expires after (s)", placeholder="86400", size="numeric",
        help_text="After that it must be asked again.",
    )  # fmt: skip
    promotion_requires_approval = _select("Promotion needs an approval", choices=TRI_STATE)
    on_inconclusive = _select(
        "When a step's planned sample is reached undecided", choices=ON_INCONCLUSIVE_CHOICES, initial="",
        help_text="A step ends only once every check is shown safe; this says what happens if its planned sample "
                  "(the estimate shown when you check the plan) is reached first.",
    )  # fmt: skip
    holdout = _text(
        "Holdout after promotion", placeholder="5%", size="decimal",
        help_text="Share of sessions kept on the baseline while the promotion bakes, compared on the same checks.",
    )  # fmt: skip
    bake_s = _text(
        "Bake (s)", placeholder="600", size="numeric",
        help_text="How long after promotion a breach, or a person, may still roll it back. 0: no bake.",
    )  # fmt: skip

    def __init__(
        self, *args: Any, versions: list[str] | None = None, suites: list[str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        labels = versions or []
        self._choices("baseline", [("", "what the alias serves now")] + [(v, v) for v in labels])
        self._choices("candidate", [("", "choose a model version")] + [(v, v) for v in labels])
        self._choices("primary_metric", [("", "none")] + [
            (name, name) for name, metric in sorted(METRICS.items()) if metric.shape != "percentile"
        ])  # fmt: skip
        self._choices("eval_gate_suite", [("", "no eval gate")] + [(s, s) for s in suites or []])
        for i in range(STEP_ROWS):
            weight, duration, requests, approval = (
                DEFAULT_STEPS[i] if i < len(DEFAULT_STEPS) else ("", "", "", False)
            )
            self.fields[f"step_{i}_weight"] = _text(f"Step {i + 1} weight", placeholder="25%", size="decimal")
            self.fields[f"step_{i}_min_duration_s"] = _text(
                f"Step {i + 1} minimum duration (s)", size="numeric"
            )
            self.fields[f"step_{i}_min_candidate_requests"] = _text(
                f"Step {i + 1} minimum candidate requests", size="numeric", placeholder="floor"
            )
            self.fields[f"step_{i}_requires_approval"] = forms.BooleanField(
                label=f"Step {i + 1} needs an approval", required=False
            )
            if not self.is_bound:
                self.initial.update({
                    f"step_{i}_weight": weight, f"step_{i}_min_duration_s": duration,
                    f"step_{i}_min_candidate_requests": requests, f"step_{i}_requires_approval": approval,
                })  # fmt: skip

    def _choices(self, name: str, choices: list[tuple[str, str]]) -> None:
        widget = self.fields[name].widget
        assert isinstance(widget, forms.Select)
        widget.choices = choices

    def step_rows(self) -> list[dict[str, Any]]:
        """The step inputs grouped by row, for the template."""
        rows = []
        for i in range(STEP_ROWS):
            fields = {
                key: self[f"step_{i}_{key}"]
                for key in ("weight", "min_duration_s", "min_candidate_requests", "requires_approval")
            }
            rows.append({"index": i, "number": i + 1, "errors": self.row_errors.get(i, []), **fields})
        return rows

    @property
    def row_errors(self) -> dict[int, list[str]]:
        return getattr(self, "_row_errors", {})

    def to_plan(self) -> dict[str, Any]:
        """The plan mapping from the cleaned inputs; only what was filled in (the validator adds defaults)."""
        data = self.cleaned_data
        plan: dict[str, Any] = {}
        for key in ("name", "description", "alias", "baseline", "candidate", "strategy"):
            if (data.get(key) or "").strip():
                plan[key] = data[key].strip()
        strategy = plan.get("strategy")
        if strategy in ("canary", "shadow"):
            steps = []
            for i in range(STEP_ROWS):
                weight = _number_or_text(data.get(f"step_{i}_weight") or "")
                if weight is None:
                    continue
                step: dict[str, Any] = {"weight": weight}
                for key in ("min_duration_s", "min_candidate_requests"):
                    value = _number_or_text(data.get(f"step_{i}_{key}") or "")
                    if value is not None:
                        step[key] = value
                if data.get(f"step_{i}_requires_approval"):
                    step["requires_approval"] = True
                steps.append(step)
            # A shadow rollout may leave its steps out (one mirrored step); a canary always sends them.
            if steps or strategy == "canary":
                plan["steps"] = steps
        shadow_rate = _number_or_text(data.get("shadow_rate") or "")
        if shadow_rate is not None:
            plan["shadow"] = {"rate": shadow_rate}
        if strategy == "ab":
            ab = {
                key: value for key, value in (
                    ("weight", _number_or_text(data.get("ab_weight") or "")),
                    ("min_duration_s", _number_or_text(data.get("ab_min_duration_s") or "")),
                    ("min_candidate_requests", _number_or_text(data.get("ab_min_candidate_requests") or "")),
                    ("horizon_s", _number_or_text(data.get("ab_horizon_s") or "")),
                ) if value is not None
            }  # fmt: skip
            if ab:
                plan["ab"] = ab
        if strategy == "blue_green":
            bg = {
                key: value for key, value in (
                    ("warmup_s", _number_or_text(data.get("bg_warmup_s") or "")),
                    ("rollback_window_s", _number_or_text(data.get("bg_rollback_window_s") or "")),
                ) if value is not None
            }  # fmt: skip
            if bg:
                plan["blue_green"] = bg
        slos = _lines(data.get("slos") or "")
        if slos:
            plan["slos"] = slos
        guardrail_lines = _lines(data.get("guardrails") or "")
        if guardrail_lines:
            plan["guardrails"] = [_guardrail(line) for line in guardrail_lines]
        if data.get("primary_metric"):
            primary: dict[str, Any] = {"metric": data["primary_metric"]}
            min_effect = _number_or_text(data.get("primary_min_effect") or "")
            if min_effect is not None:
                primary["min_effect"] = min_effect
            plan["primary_metric"] = primary
        alpha = _number_or_text(data.get("alpha") or "")
        if alpha is not None:
            plan["alpha"] = alpha
        if data.get("eval_gate_suite"):
            gate: dict[str, Any] = {
                "suite": data["eval_gate_suite"],
                "scorer": (data.get("eval_gate_scorer") or "").strip() or "exact_match",
            }
            max_drop = _number_or_text(data.get("eval_gate_max_drop") or "")
            if max_drop is not None:
                gate["max_drop"] = max_drop
            plan["eval_gate"] = gate
        if data.get("allow_self_approval"):
            plan["allow_self_approval"] = True
        for name in ("approvals_required", "approval_ttl_s"):
            value = _number_or_text(data.get(name) or "")
            if value is not None:
                plan[name] = value
        if data.get("on_inconclusive"):
            plan["on_inconclusive"] = data["on_inconclusive"]
        for name in ("holdout", "bake_s"):
            value = _number_or_text(data.get(name) or "")
            if value is not None:
                plan[name] = value
        if data.get("promotion_requires_approval") in ("yes", "no"):
            plan["promotion_requires_approval"] = data["promotion_requires_approval"] == "yes"
        return plan

    def place_errors(self, errors: dict[str, list[str]]) -> None:
        """Put each plan error beside the input its path came from; anything else above the form."""
        filled = _filled_rows(self)
        row_errors: dict[int, list[str]] = {}
        for path, reasons in errors.items():
            step = re.match(r"^steps\[(\d+)\](?:\.(\w+))?", path)
            for reason in reasons:
                if path == "steps":
                    row_errors.setdefault(-1, []).append(reason)
                elif step is not None:
                    index = int(step.group(1))
                    row = filled[index] if index < len(filled) else 0
                    key = step.group(2)
                    if key in ("weight", "min_duration_s", "min_candidate_requests", "requires_approval"):
                        self.add_error(f"step_{row}_{key}", reason)
                    else:
                        row_errors.setdefault(row, []).append(reason)
                else:
                    self.add_error(*_form_target(path, reason))
        self._row_errors = row_errors

    @property
    def steps_errors(self) -> list[str]:
        return self.row_errors.get(-1, [])


def _filled_rows(form: RolloutForm) -> list[int]:
    """Which rows the plan's steps came from: steps[i] is the i-th row with a weight."""
    return [i for i in range(STEP_ROWS) if (form.cleaned_data.get(f"step_{i}_weight") or "").strip()]


def _guardrail(line: str) -> Any:
    """ "tpot_gmean_ms 10%" -> {metric, margin}; a line that is not two words goes to the validator as written."""
    parts = line.replace(":", " ").split()
    if len(parts) != 2:
        return line
    return {"metric": parts[0], "margin": _number_or_text(parts[1])}


_LIST_FIELDS = {"slos": "slos", "guardrails": "guardrails"}
_PREFIX_FIELDS = {
    "shadow": "shadow_rate",
    "ab.weight": "ab_weight",
    "ab.min_duration_s": "ab_min_duration_s",
    "ab.min_candidate_requests": "ab_min_candidate_requests",
    "ab.horizon_s": "ab_horizon_s",
    "ab": "ab_weight",
    "blue_green.warmup_s": "bg_warmup_s",
    "blue_green.rollback_window_s": "bg_rollback_window_s",
    "blue_green": "bg_warmup_s",
    "primary_metric.min_effect": "primary_min_effect",
    "primary_metric": "primary_metric",
    "eval_gate.max_drop": "eval_gate_max_drop",
    "eval_gate.scorer": "eval_gate_scorer",
    "eval_gate": "eval_gate_suite",
}
_DIRECT = {
    "name", "description", "alias", "baseline", "candidate", "strategy", "alpha", "allow_self_approval",
    "promotion_requires_approval", "approvals_required", "approval_ttl_s", "on_inconclusive", "holdout", "bake_s",
}  # fmt: skip


def _form_target(path: str, reason: str) -> tuple[str | None, str]:
    """The form field a plan error path belongs to, and the message to show there."""
    if path in _DIRECT:
        return path, reason
    listed = re.match(r"^(slos|guardrails)\[(\d+)\]", path)
    if listed is not None:
        return _LIST_FIELDS[listed.group(1)], f"line {int(listed.group(2)) + 1}: {reason}"
    for prefix in sorted(_PREFIX_FIELDS, key=len, reverse=True):
        if path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "["):
            return _PREFIX_FIELDS[prefix], reason
    return None, f"{path}: {reason}"


class PastePlanForm(forms.Form):
    plan = forms.CharField(
        label="Plan (YAML or JSON)", required=False,
        widget=forms.Textarea(attrs={"rows": 22, "spellcheck": "false", "class": "code"}),
    )  # fmt: skip

    def place_errors(self, errors: dict[str, list[str]]) -> None:
        """Every error under the text box, each naming its field path."""
        for path, reasons in errors.items():
            for reason in reasons:
                self.add_error("plan", reason if path == "plan" else f"{path}: {reason}")
