"""The scorers, without a database: each one's verdicts, its parameters, and the errors naming them."""

from __future__ import annotations

import pytest

from evals.scorers import (
    Contains,
    ExactMatch,
    JsonSchema,
    JsonValid,
    Numeric,
    Regex,
    ScoreInput,
    ScorerSpecError,
    Similarity,
    scorer_build,
    scorer_specs_normalise,
)


def case(output: str, reference: str | None = None) -> ScoreInput:
    return ScoreInput(output=output, reference=reference, prompt="q")


def test_exact_match_strips_by_default_and_can_ignore_case() -> None:
    assert ExactMatch()(case(" 85\n", "85")).passed is True
    assert ExactMatch()(case("85 ", "58")).passed is False
    assert ExactMatch()(case("Paris", "paris")).passed is False
    assert ExactMatch(case_sensitive=False)(case("Paris", "paris")).value == 1.0
    assert ExactMatch(strip=False)(case(" 85", "85")).passed is False


def test_a_scorer_that_needs_a_reference_says_so_instead_of_failing_the_answer() -> None:
    score = ExactMatch()(case("85", None))
    assert score.value is None and score.passed is None
    assert "reference" in score.error


def test_contains_uses_the_substring_or_the_reference() -> None:
    assert Contains(substring="Paris")(case("It is Paris.", None)).passed is True
    assert Contains()(case("The answer is 85.", "85")).passed is True
    assert Contains(case_sensitive=False)(case("PARIS", "paris")).passed is True
    assert Contains()(case("no", "yes")).passed is False


def test_regex_search_and_fullmatch() -> None:
    assert Regex(pattern=r"\d+")(case("answer: 85")).passed is True
    assert Regex(pattern=r"\d+", mode="fullmatch")(case("answer: 85")).passed is False
    assert Regex(pattern=r"\d+", mode="fullmatch")(case(" 85\n")).passed is True
    assert Regex(pattern="yes", flags="i")(case("YES")).passed is True


def test_numeric_reads_the_number_and_applies_the_tolerance() -> None:
    assert Numeric()(case("85", "85")).passed is True
    assert Numeric()(case("The sum is 85.", "85.0")).passed is True
    assert Numeric()(case("86", "85")).passed is False
    assert Numeric(tolerance=1)(case("86", "85")).passed is True
    assert Numeric(relative_tolerance=0.1)(case("95", "100")).passed is True
    assert Numeric(extract="last")(case("37+48=85", "85")).passed is True
    assert Numeric(extract="first")(case("37+48=85", "85")).passed is False
    wrong = Numeric()(case("no idea", "85"))
    assert wrong.passed is False and wrong.value == 0.0
    bad_reference = Numeric()(case("85", "eighty-five"))
    assert bad_reference.value is None and "not a number" in bad_reference.error


def test_json_validity_reads_through_a_markdown_fence_unless_strict() -> None:
    fenced = '```json\n{"a": 1}\n```'
    assert JsonValid()(case('{"a": 1}')).passed is True
    assert JsonValid()(case(fenced)).passed is True
    assert JsonValid(strict=True)(case(fenced)).passed is False
    assert JsonValid()(case("{'a': 1}")).passed is False


def test_json_schema_names_where_the_output_breaks_the_schema() -> None:
    scorer = JsonSchema(schema={"type": "object", "required": ["sum"], "properties": {"sum": {"type": "integer"}}})
    assert scorer(case('{"sum": 85}')).passed is True
    wrong_type = scorer(case('{"sum": "85"}'))
    assert wrong_type.passed is False and wrong_type.detail.startswith("sum:")
    assert scorer(case("85 is the answer")).passed is False


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"name": "levenshtein"}, "scorers[0].name", "must be one of"),
        ({"name": "regex"}, "scorers[0].params.pattern", "required"),
        ({"name": "regex", "params": {"pattern": "("}}, "scorers[0].params.pattern", "not a valid regular expression"),
        ({"name": "regex", "params": {"pattern": "a", "flags": "x"}}, "scorers[0].params.flags", "not one of"),
        ({"name": "numeric", "params": {"tolerance": -1}}, "scorers[0].params.tolerance", "non-negative"),
        ({"name": "numeric", "params": {"tolerance": True}}, "scorers[0].params.tolerance", "not a boolean"),
        ({"name": "exact_match", "params": {"strp": True}}, "scorers[0].params.strp", "unknown parameter"),
        ({"name": "json_schema", "params": {"schema": {"type": 5}}}, "scorers[0].params.schema", "not a valid JSON Schema"),
        ({"name": "similarity", "params": {"threshold": 2}}, "scorers[0].params.threshold", "between 0 and 1"),
        ({"name": "judge", "params": {}}, "scorers[0].params.judge_model", "required"),
        ({"name": "judge", "params": {"judge_model": "m", "mode": "vote"}}, "scorers[0].params.mode", "rubric"),
        ({"name": "exact_match", "label": "has space"}, "scorers[0].label", "label"),
    ],
)
def test_bad_specs_name_the_parameter(spec: dict, field: str, words: str) -> None:
    with pytest.raises(ScorerSpecError) as caught:
        scorer_specs_normalise([spec])
    assert caught.value.field == field
    assert words in caught.value.message


def test_specs_are_normalised_and_labels_must_differ() -> None:
    specs = scorer_specs_normalise(["exact_match", {"name": "regex", "params": {"pattern": "x"}, "label": "has-x"}])
    assert specs == [
        {"name": "exact_match", "label": "exact_match", "params": {}},
        {"name": "regex", "label": "has-x", "params": {"pattern": "x"}},
    ]
    with pytest.raises(ScorerSpecError) as caught:
        scorer_specs_normalise(["exact_match", "exact_match"])
    assert caught.value.field == "scorers[1].label"
    assert isinstance(scorer_build(specs[1]), Regex)


def test_a_scorer_that_raises_on_one_item_reports_it_as_that_items_error() -> None:
    class Broken(ExactMatch):
        def score(self, case: ScoreInput):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    score = Broken()(case("a", "a"))
    assert score.value is None and "boom" in score.error


PARAPHRASES = [
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("The meeting was moved to Friday afternoon.", "They rescheduled the meeting for Friday after lunch."),
    ("It is raining heavily in London today.", "There is a downpour in London right now."),
]
UNRELATED = [
    ("The cat is sleeping on the sofa.", "Quarterly revenue grew by eight percent."),
    ("How do I reset my password?", "The volcano erupted twice last century."),
    ("The meeting was moved to Friday afternoon.", "Photosynthesis converts light into chemical energy."),
    ("It is raining heavily in London today.", "She plays the cello in an orchestra."),
]


def test_similarity_ranks_paraphrases_above_unrelated_text() -> None:
    scorer = Similarity(threshold=0.5)
    paraphrase = [scorer(case(a, b)) for a, b in PARAPHRASES]
    unrelated = [scorer(case(a, b)) for a, b in UNRELATED]
    # Each sentence's paraphrase is closer than its unrelated partner, and every paraphrase is closer
    # than every unrelated pair.
    for para, other in zip(paraphrase, unrelated, strict=True):
        assert para.value is not None and other.value is not None
        assert para.value > other.value
    assert min(s.value for s in paraphrase if s.value is not None) > max(s.value for s in unrelated if s.value is not None)
    assert all(s.passed for s in paraphrase) and not any(s.passed for s in unrelated)
    assert scorer(case("same words", "same words")).value == pytest.approx(1.0, abs=1e-5)
