"""Reading an LLM judge's verdict: well-formed replies give scores, malformed ones a per-item error."""

from __future__ import annotations

import pytest

from evals.scorers import Judge, ScoreInput, UnparseableVerdict, parse_pairwise_verdict, parse_rubric_verdict


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ('{"score": 4, "reason": "mostly right"}', 4),
        ('Here is my grade:\n```json\n{"score": 5, "reason": "exact"}\n```', 5),
        ("Score: 2\nThe answer misses the carry.", 2),
        ("**Rating**: 3", 3),
        ("4/5", 4),
        (" 1 ", 1),
    ],
)
def test_rubric_verdicts_in_the_shapes_judges_write(reply: str, score: float) -> None:
    assert parse_rubric_verdict(reply, scale=5) == score


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "   ",
        "37+48=85",
        "I think the answer is good.",
        '{"score": "excellent"}',
        '{"score": 9}',
        "Score: 0",
        '{"score": 4',
        "\x00\x01<unk><unk>",
        "9" * 500,
    ],
)
def test_malformed_rubric_verdicts_are_refused(reply: str) -> None:
    with pytest.raises(UnparseableVerdict):
        parse_rubric_verdict(reply, scale=5)


@pytest.mark.parametrize(
    ("reply", "winner"),
    [
        ('{"winner": "B", "reason": "B adds correctly"}', "B"),
        ('{"winner": "tie"}', "tie"),
        ("Verdict: [[A]]", "A"),
        ("The better answer is B.", "B"),
        ("A", "A"),
        ("winner = tie", "tie"),
    ],
)
def test_pairwise_verdicts(reply: str, winner: str) -> None:
    assert parse_pairwise_verdict(reply) == winner


@pytest.mark.parametrize("reply", ["", "Both are fine I guess", '{"winner": "C"}', "AB", "12+34=46"])
def test_malformed_pairwise_verdicts_are_refused(reply: str) -> None:
    with pytest.raises(UnparseableVerdict):
        parse_pairwise_verdict(reply)


def test_a_malformed_reply_is_the_items_scorer_error_not_an_exception() -> None:
    judge = Judge(judge_model="judge-v1").bind(lambda messages, max_tokens: "85")
    score = judge(ScoreInput(output="85", reference="85", prompt="37+48="))
    assert score.value is None and score.passed is None
    assert score.error.startswith("unparseable judge verdict")
    assert "'85'" in score.error


def test_rubric_scores_are_scaled_to_zero_one_and_pass_at_the_threshold() -> None:
    judge = Judge(judge_model="j", scale=5, pass_threshold=0.75)
    assert judge.read_verdict('{"score": 5}').value == 1.0
    assert judge.read_verdict('{"score": 1}').value == 0.0
    four = judge.read_verdict('{"score": 4}')
    assert four.value == 0.75 and four.passed is True
    assert judge.read_verdict('{"score": 3}').passed is False


def test_pairwise_asks_both_orders_and_prefers_the_output_when_the_judge_picks_it_both_times() -> None:
    seen: list[list[dict[str, str]]] = []

    def call(messages: list[dict[str, str]], max_tokens: int) -> str:
        seen.append(messages)
        # A judge that recognises the right sum wherever it is shown.
        prompt = messages[-1]["content"]
        return '{"winner": "B"}' if "Answer B:\n85" in prompt else '{"winner": "A"}'

    judge = Judge(judge_model="j", mode="pairwise").bind(call)
    score = judge(ScoreInput(output="85", reference="84", prompt="37+48="))
    assert score.value == 1.0 and score.flipped is False and score.as_dict()["flipped"] is False
    assert len(seen) == 2
    assert "Answer A:\n84" in seen[0][-1]["content"] and "Answer B:\n85" in seen[0][-1]["content"]
    assert "Answer A:\n85" in seen[1][-1]["content"] and "Answer B:\n84" in seen[1][-1]["content"]
    assert judge.read_verdict("tie").value == 0.5
    assert judge.read_verdict("A").value == 0.0
    assert judge.read_verdict("A", swapped=True).value == 1.0


def test_a_judge_that_always_picks_the_first_answer_scores_a_tie_and_flips() -> None:
    judge = Judge(judge_model="j", mode="pairwise").bind(lambda messages, max_tokens: "Verdict: [[A]]")
    score = judge(ScoreInput(output="85", reference="84", prompt="37+48="))
    assert score.value == 0.5 and score.flipped is True
    assert "reference first" in score.detail and "output first" in score.detail


def test_an_unreadable_second_verdict_is_the_items_error() -> None:
    replies = iter(['{"winner": "B"}', "no idea"])
    judge = Judge(judge_model="j", mode="pairwise").bind(lambda messages, max_tokens: next(replies))
    score = judge(ScoreInput(output="85", reference="84", prompt="37+48="))
    assert score.value is None and score.error.startswith("with the answers swapped: unparseable judge verdict")


def test_a_judge_that_cannot_be_reached_is_the_items_error() -> None:
    def call(messages: list[dict[str, str]], max_tokens: int) -> str:
        raise ConnectionError("refused")

    score = Judge(judge_model="j").bind(call)(ScoreInput(output="x", prompt="q"))
    assert score.value is None and "judge request failed" in score.error
