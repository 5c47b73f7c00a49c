"""LLM-as-judge: a rubric or a pairwise prompt sent to a judge model, and a tolerant reader of its verdict.

The scorer builds the prompt and reads the verdict; the request itself is a `JudgeCall` the runner binds
(it knows the judge model's engine). A verdict that cannot be read is the scorer's error for that item
("unparseable ..."), never an exception out of the run."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from .base import Score, ScoreInput, Scorer, ScorerSpecError, check_unknown, param

JudgeCall = Callable[[list[dict[str, str]], int], str]
"""(chat messages, max_tokens) -> the judge's reply text; raises when the judge could not be reached."""

DEFAULT_RUBRIC = (
    "Rate how well the answer responds to the question: correct, complete and to the point. "
    "1 means wrong or irrelevant, the top of the scale means fully correct."
)
SNIPPET_CHARS = 80


class UnparseableVerdict(ValueError):
    pass


def _json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object embedded in text, outermost first (judges wrap them in prose or fences)."""
    found = []
    decoder = json.JSONDecoder()
    for start in [m.start() for m in re.finditer(r"\{", text)]:
        try:
            value, _ = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


_RUBRIC_LABELLED = re.compile(r"\b(?:score|rating)\b[\s*]*(?:is|of)?[\s*:=]*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_RUBRIC_BARE = re.compile(r"^\W*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?\W*$")


def parse_rubric_verdict(text: str, *, scale: int) -> float:
    """The judge's score on 1..scale from `{"score": n}`, "Score: n" or a bare "n" / "n/5"."""
    candidates: list[Any] = [obj["score"] for obj in _json_objects(text) if "score" in obj]
    labelled = _RUBRIC_LABELLED.search(text)
    if labelled:
        candidates.append(labelled.group(1))
    bare = _RUBRIC_BARE.match(text.strip())
    if bare:
        candidates.append(bare.group(1))
    for candidate in candidates:
        try:
            value = float(candidate)
        except (TypeError, ValueError):
            continue
        if isinstance(candidate, bool):
            continue
        if 1 <= value <= scale:
            return value
        raise UnparseableVerdict(f"score {candidate!r} is outside 1..{scale}")
    raise UnparseableVerdict("no score found")


_PAIRWISE_LABELLED = re.compile(
    r"\b(?:verdict|winner|better(?: answer)?|choice)\b\s*(?:is)?\s*[:=]?\s*[\[\(\"'*]*\s*(A|B|tie)\b", re.IGNORECASE
)
_PAIRWISE_BARE = re.compile(r"^\W*(A|B|tie)\W*$", re.IGNORECASE)


def parse_pairwise_verdict(text: str) -> str:
    """"A", "B" or "tie" from `{"winner": ...}`, "Verdict: [[B]]" or a bare "B"."""
    candidates: list[Any] = [obj.get("winner", obj.get("verdict")) for obj in _json_objects(text)]
    for pattern in (_PAIRWISE_LABELLED, _PAIRWISE_BARE):
        match = pattern.search(text.strip())
        if match:
            candidates.append(match.group(1))
    for candidate in candidates:
        if not isinstance(candidate, str):
            continue
        word = candidate.strip().strip("[]()*\"'").lower()
        if word in ("a", "b"):
            return word.upper()
        if word in ("tie", "draw", "equal"):
            return "tie"
    raise UnparseableVerdict("no verdict A, B or tie found")


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat[:SNIPPET_CHARS] + ("…" if len(flat) > SNIPPET_CHARS else "")


# Where a judge's flip is stored beside its score on a shadow pair: "<label>#flipped" ('#' is never in a label).
FLIP_SUFFIX = "#flipped"


class Judge(Scorer):
    """A judge model grades the output on a rubric (1..scale, scaled to [0, 1]), or compares it with the
    reference answer (pairwise: the output wins 1, ties 0.5, loses 0).

    Pairwise, the judge is asked twice, once with the reference as answer A and the output as B and once
    swapped, and the score is the mean of the two readings: a judge that prefers whichever answer comes
    first (LLM judges often do; Zheng et al., "Judging LLM-as-a-judge with MT-Bench", 2023) then scores
    0.5, not a win. `Score.flipped` says whether the two readings disagreed; the run's summary and the
    shadow-quality check report how often. On shadow pairs the reference is the baseline's answer, so the
    score reads "how often the candidate is preferred" and 0.5 means "as good as the baseline"."""

    name = "judge"
    binary = False

    def __init__(self, *, judge_model: str, mode: str = "rubric", rubric: str = DEFAULT_RUBRIC, scale: int = 5,
                 pass_threshold: float = 0.5, max_tokens: int = 256, call: JudgeCall | None = None):
        if not judge_model:
            raise ScorerSpecError("judge_model is required (a model version such as adder-v1)",
                                  field="params.judge_model")
        if mode not in ("rubric", "pairwise"):
            raise ScorerSpecError("mode must be 'rubric' or 'pairwise'", field="params.mode")
        if not 2 <= scale <= 10:
            raise ScorerSpecError("scale must be between 2 and 10", field="params.scale")
        if not 0.0 <= pass_threshold <= 1.0:
            raise ScorerSpecError("pass_threshold must be between 0 and 1", field="params.pass_threshold")
        if not 1 <= max_tokens <= 4096:
            raise ScorerSpecError("max_tokens must be between 1 and 4096", field="params.max_tokens")
        if not rubric.strip():
            raise ScorerSpecError("rubric must not be empty", field="params.rubric")
        self.judge_model = judge_model
        self.mode = mode
        self.rubric = rubric
        self.scale = scale
        self.pass_threshold = pass_threshold
        self.max_tokens = max_tokens
        self.call = call

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.mode == "pairwise"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Judge:
        check_unknown(params, {"judge_model", "mode", "rubric", "scale", "pass_threshold", "max_tokens"})
        return cls(
            judge_model=param(params, "judge_model", str, required=True),
            mode=param(params, "mode", str, "rubric"),
            rubric=param(params, "rubric", str, DEFAULT_RUBRIC),
            scale=param(params, "scale", int, 5),
            pass_threshold=param(params, "pass_threshold", float, 0.5),
            max_tokens=param(params, "max_tokens", int, 256),
        )

    def bind(self, call: JudgeCall) -> Judge:
        return Judge(judge_model=self.judge_model, mode=self.mode, rubric=self.rubric, scale=self.scale,
                     pass_threshold=self.pass_threshold, max_tokens=self.max_tokens, call=call)

    def messages(self, case: ScoreInput, *, swapped: bool = False) -> list[dict[str, str]]:
        """The judge's prompt; pairwise, `swapped` shows the output as answer A and the reference as B."""
        if self.mode == "rubric":
            reference = f"\nReference answer:\n{case.reference}\n" if case.reference else ""
            body = (
                f"{self.rubric}\n\nQuestion:\n{case.prompt}\n{reference}\nAnswer to grade:\n{case.output}\n\n"
                f'Reply with JSON only: {{"score": <integer from 1 to {self.scale}>, "reason": "<one sentence>"}}'
            )
        else:
            first, second = (case.output, case.reference) if swapped else (case.reference, case.output)
            body = (
                f"{self.rubric}\n\nQuestion:\n{case.prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
                'Which answer is better? Reply with JSON only: {"winner": "A" | "B" | "tie", "reason": "<one sentence>"}'
            )
        return [
            {"role": "system", "content": "You are a strict, impartial grader."},
            {"role": "user", "content": body},
        ]

    def read_verdict(self, text: str, *, swapped: bool = False) -> Score:
        """The score a judge's reply gives the output; an unreadable reply is this item's scorer error."""
        try:
            if self.mode == "rubric":
                raw = parse_rubric_verdict(text, scale=self.scale)
                value = (raw - 1.0) / (self.scale - 1.0)
            else:
                output_is = "A" if swapped else "B"
                winner = parse_pairwise_verdict(text)
                value = 0.5 if winner == "tie" else (1.0 if winner == output_is else 0.0)
        except UnparseableVerdict as exc:
            return Score.failure(f"unparseable judge verdict ({exc}): {_snippet(text)!r}")
        return Score(value=value, passed=value >= self.pass_threshold, detail=_snippet(text))

    def _ask(self, case: ScoreInput, *, swapped: bool = False) -> Score:
        assert self.call is not None
        try:
            reply = self.call(self.messages(case, swapped=swapped), self.max_tokens)
        except Exception as exc:
            return Score.failure(f"judge request failed: {type(exc).__name__}: {exc}")
        return self.read_verdict(reply, swapped=swapped)

    def score(self, case: ScoreInput) -> Score:
        if self.call is None:
            return Score.failure("no judge engine is bound to this scorer")
        first = self._ask(case)
        if self.mode == "rubric" or first.value is None:
            return first
        second = self._ask(case, swapped=True)
        if second.value is None:
            return Score.failure(f"with the answers swapped: {second.error}")
        value = (first.value + second.value) / 2.0
        detail = f"reference first: {first.detail} | output first: {second.detail}"
        return Score(value=value, passed=value >= self.pass_threshold, detail=detail, flipped=first.value != second.value)
