"""Build an evaluation request and parse an evaluation: the one place judging logic lives.

The label stage, the evaluate stage and the Serve app all call these functions, so the prompt a judge
is trained on is the prompt it is served with.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Optional

from themis_ray import prompts
from themis_ray.scenarios import Criterion, get_scenario, load_tiers

MODES = ("single", "reference", "pairwise")
VERDICTS = ("A", "B", "C")  # pairwise: the first response wins, the second, a tie
SCORE_PREFILL = "[["  # the answer's first characters when the engine is made to start with the score
_SCORE = re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]")
_INTEGER = re.compile(r"-?[0-9]+")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
# Markers that delimit untrusted text in the prompt; text under judgement may not forge them.
_MARKER = re.compile(r"\[(Instruction|Reference answer|Response(?: [AB])?) (start|end)\]", re.I)


@dataclass(frozen=True)
class RatingScale:
    low: int = 1
    high: int = 5

    def __post_init__(self):
        if self.high <= self.low:
            raise ValueError(f"rating scale needs low < high, got {self.low}..{self.high}")

    @property
    def scores(self) -> list[int]:
        return list(range(self.low, self.high + 1))


@dataclass
class JudgeRequest:
    instruction: str
    scenario: str
    mode: str = "single"
    response: Optional[str] = None
    response_a: Optional[str] = None
    response_b: Optional[str] = None
    reference: Optional[str] = None
    criteria: Optional[list[Criterion]] = None  # custom criteria replace the scenario's
    scale: RatingScale = field(default_factory=RatingScale)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not self.instruction or not self.instruction.strip():
            raise ValueError("instruction is empty")
        if self.mode == "pairwise":
            if not (self.response_a and self.response_a.strip()) or not (
                self.response_b and self.response_b.strip()
            ):
                raise ValueError("pairwise mode needs non-empty response_a and response_b")
        elif not self.response or not self.response.strip():
            raise ValueError("response is empty")
        if self.mode == "reference" and not (self.reference and self.reference.strip()):
            raise ValueError("reference mode needs a non-empty reference answer")


@dataclass
class Evaluation:
    score: Optional[float] = None  # overall score (pointwise)
    verdict: Optional[str] = None  # A, B or C (pairwise)
    criterion_scores: list[float] = field(default_factory=list)
    explanation: str = ""
    error: Optional[str] = None  # why the text could not be parsed

    @property
    def ok(self) -> bool:
        return self.error is None


def _as_data(text: Optional[str]) -> Optional[str]:
    """Keep untrusted text inside its delimiters: defuse any marker it tries to forge."""
    if text is None:
        return None
    return _MARKER.sub(lambda m: f"({m.group(1)} {m.group(2)})", text)


def _tiers(scale: RatingScale, with_reference: bool, scenarios_dir: Optional[str] = None) -> list[tuple[int, str]]:
    if (scale.low, scale.high) == (1, 5):
        key = "with_reference" if with_reference else "without_reference"
        return sorted(load_tiers(scenarios_dir)[key].items())
    return [(scale.low, "the worst: severely flawed or irrelevant"), (scale.high, "the best: excellent")]


def render_prompt(request: JudgeRequest, scenarios_dir: Optional[str] = None) -> str:
    """The five-part evaluation prompt for one request."""
    request.validate()
    scenario = get_scenario(request.scenario, scenarios_dir)
    # Single-answer grading never shows a reference; pairwise may carry one.
    reference = request.reference if request.mode in ("reference", "pairwise") else None
    return prompts.render(
        "evaluation",
        mode=request.mode,
        scenario=scenario,
        criteria=request.criteria or scenario.criteria,
        scale=request.scale,
        tiers=_tiers(request.scale, reference is not None, scenarios_dir),
        instruction=_as_data(request.instruction),
        response=_as_data(request.response),
        response_a=_as_data(request.response_a),
        response_b=_as_data(request.response_b),
        reference=_as_data(reference),
    )


def build_messages(prompt: str, prefill: bool = False) -> list[dict[str, str]]:
    """The conversation sent to a judge; with `prefill`, its answer starts at the score."""
    messages = [{"role": "user", "content": prompt}]
    if prefill:
        messages.append({"role": "assistant", "content": SCORE_PREFILL})
    return messages


def full_text(completion_text: str, prefill: bool) -> str:
    """The judge's whole answer, prefill included."""
    return SCORE_PREFILL + completion_text if prefill else completion_text


def parse_evaluation(text: str, mode: str = "single", scale: RatingScale = RatingScale()) -> Evaluation:
    """The first `[[n]]` is the overall score, later ones per-criterion; pairwise wants [[A|B|C]]."""
    if mode == "pairwise":
        match = _VERDICT.search(text)
        if not match:
            return Evaluation(error="no verdict [[A]], [[B]] or [[C]] found", explanation=text)
        return Evaluation(verdict=match.group(1), explanation=text[match.end() :].strip())
    scores = [float(s) for s in _SCORE.findall(text)]
    if not scores:
        return Evaluation(error="no overall score [[n]] found", explanation=text)
    overall = scores[0]
    if not scale.low <= overall <= scale.high:
        return Evaluation(
            error=f"overall score {overall:g} is outside {scale.low}..{scale.high}", explanation=text
        )
    first = _SCORE.search(text)
    return Evaluation(
        score=overall,
        criterion_scores=[s for s in scores[1:] if scale.low <= s <= scale.high],
        explanation=text[first.end() :].strip(),
    )


def score_distribution(
    tokens: Optional[list[str]],
    top_logprobs: Optional[list[dict[str, float]]],
    scale: RatingScale = RatingScale(),
    prefill: bool = False,
) -> Optional[dict[int, float]]:
    """Probabilities of each score at the overall `[[n]]` position, renormalised over the scale.

    With a prefill the first generated token is the score; otherwise it is the token right after the
    first "[[" in the generated text. None when the engine gave no log-probabilities there.
    """
    if not tokens or not top_logprobs:
        return None
    position = 0 if prefill else _score_token_position(tokens)
    if position is None or position >= len(top_logprobs):
        return None
    probs: dict[int, float] = {}
    for token, logprob in top_logprobs[position].items():
        stripped = token.strip()
        # ASCII digits only: "²".isdigit() is true but int("²") raises, and so does int("--5").
        if _INTEGER.fullmatch(stripped) and scale.low <= int(stripped) <= scale.high:
            probs[int(stripped)] = probs.get(int(stripped), 0.0) + math.exp(logprob)
    total = sum(probs.values())
    if total <= 0:
        return None
    return {s: probs.get(s, 0.0) / total for s in scale.scores}


def _score_token_position(tokens: list[str]) -> Optional[int]:
    text = ""
    for i, token in enumerate(tokens):
        if text.rstrip().endswith("[["):
            return i
        if "[[" in text:
            # The first "[[" ended inside a token (e.g. "[[4"): its score has no token of its own, and
            # a later "[[" is a per-criterion score, not the overall one.
            return None
        text += token
    return None


def score_options(scale: RatingScale = RatingScale()) -> list[str]:
    """What may follow the "[[" prefill when the score is chosen by log-probability: "1]]", "2]]", ..."""
    return [f"{score}]]" for score in scale.scores]


def choice_options(mode: str = "single", scale: RatingScale = RatingScale()) -> list[str]:
    """What may follow the "[[" prefill: a score on the scale, or a pairwise verdict."""
    return [f"{v}]]" for v in VERDICTS] if mode == "pairwise" else score_options(scale)


def evaluation_from_choices(option_logprobs: list[float], mode: str = "single",
                            scale: RatingScale = RatingScale()) -> tuple[str, Evaluation, dict]:
    """Score-only judging: log-probabilities of `choice_options` after the "[[" prefill, read in one
    forward pass with no text generated -> (the answer "[[x]]", its evaluation, the distribution).

    The distribution is over the scale's scores (its mean is the expected score) or over A, B, C.
    """
    options = VERDICTS if mode == "pairwise" else scale.scores
    peak = max(option_logprobs)
    weights = [math.exp(lp - peak) for lp in option_logprobs]
    distribution = {option: w / sum(weights) for option, w in zip(options, weights)}
    choice = max(distribution, key=distribution.get)
    text = f"{SCORE_PREFILL}{choice}]]"
    return text, parse_evaluation(text, mode, scale), distribution


def stop_at_verdict(sampling, mode: str, rationale_tokens: Optional[int]):
    """`sampling` that stops an answer once its overall score (pairwise: its verdict) is written and it
    has `rationale_tokens` tokens: a rationale written first is kept whole, one written after the
    verdict is cut at that length. The stop only fires after a whole `[[n]]`, so it never cuts a score.
    None: unchanged (the answer runs to max_tokens or the end of turn)."""
    if rationale_tokens is None:
        return sampling
    from omegaconf import OmegaConf

    plain = OmegaConf.to_object(sampling) if OmegaConf.is_config(sampling) else sampling
    pattern = (_VERDICT if mode == "pairwise" else _SCORE).pattern
    return replace(plain, stop_pattern=pattern, stop_min_tokens=max(0, int(rationale_tokens)))


def content_free_prompt(scenario: str, mode: str, scale: RatingScale = RatingScale(),
                        criteria: Optional[list[Criterion]] = None, scenarios_dir=None) -> str:
    """The prompt of a record with no content ("N/A" instruction and answers) of this scenario and mode:
    what a judge answers to it is its prior, which contextual calibration divides out."""
    blank = JudgeRequest(instruction="N/A", scenario=scenario, mode=mode, scale=scale, criteria=criteria,
                         **({"response_a": "N/A", "response_b": "N/A"} if mode == "pairwise" else
                            {"response": "N/A", "reference": "N/A" if mode == "reference" else None}))
    return render_prompt(blank, scenarios_dir)


class Calibration:
    """Contextual calibration (Zhao et al., 2021) of choice log-probabilities: a record's minus the
    judge's own on a content-free record of the same scenario and mode, so a judge's lean toward one
    score (or, pairwise, one position) does not decide every record. `choice_logprobs(prompt, mode)`
    scores the options after a prompt; each prior is asked once and kept."""

    def __init__(self, choice_logprobs, scale: RatingScale = RatingScale(),
                 criteria: Optional[list[Criterion]] = None, scenarios_dir=None):
        self._score, self.scale, self.criteria, self.scenarios_dir = choice_logprobs, scale, criteria, scenarios_dir
        self.priors: dict[tuple[str, str], list[float]] = {}

    def __call__(self, option_logprobs: list[float], scenario: str, mode: str) -> list[float]:
        key = (scenario, mode)
        if key not in self.priors:
            self.priors[key] = self._score(content_free_prompt(scenario, mode, self.scale, self.criteria,
                                                               self.scenarios_dir), mode)
        return [lp - prior for lp, prior in zip(option_logprobs, self.priors[key])]


def choice_distribution(option_logprobs: list[float], scale: RatingScale = RatingScale()) -> dict[int, float]:
    """Log-probabilities of `score_options(scale)` -> P(score), normalised over the scale."""
    peak = max(option_logprobs)
    weights = [math.exp(lp - peak) for lp in option_logprobs]
    return {score: w / sum(weights) for score, w in zip(scale.scores, weights)}


def expected_score(distribution: Optional[dict[int, float]]) -> Optional[float]:
    if not distribution:
        return None
    return sum(score * p for score, p in distribution.items())


def swap_pair(request: JudgeRequest) -> JudgeRequest:
    """The same pairwise request with the responses in the other order."""
    return JudgeRequest(
        **{**request.__dict__, "response_a": request.response_b, "response_b": request.response_a}
    )


SWAPPED = {"A": "B", "B": "A", "C": "C"}  # a verdict as it reads with the two responses swapped


def unswap_verdict(verdict: Optional[str]) -> Optional[str]:
    """A verdict given with the responses swapped, in the original order (None: not a verdict)."""
    return SWAPPED.get(verdict) if isinstance(verdict, str) else None


def combine_pairwise(verdict_ab: Optional[str], verdict_ba: Optional[str]) -> tuple[str, bool]:
    """Verdicts from both orders -> (verdict in the original order, whether they agreed).

    A verdict that flips with the order is a tie.
    """
    unswapped = unswap_verdict(verdict_ba)
    if verdict_ab is None or unswapped is None:
        return "C", False
    if verdict_ab == unswapped:
        return verdict_ab, True
    return "C", False


def judge_mode(row: dict, scenarios_dir: Optional[str] = None) -> str:
    """single or reference for a pointwise row: graded against its reference answer only where one is
    given and the scenario's reference helps (closed-ended scenarios)."""
    helps = get_scenario(row["scenario"], scenarios_dir).reference_helps
    return "reference" if row.get("reference") and helps else "single"


def request_from_row(row: dict, scenarios_dir: Optional[str] = None, mode: Optional[str] = None,
                     scale: RatingScale = RatingScale(), criteria: Optional[list[Criterion]] = None) -> JudgeRequest:
    """A row (a labelled record, a user's record, a benchmark's) -> the request that judges it.

    Pairwise when `mode` says so or the row has two responses and no single one; otherwise single, or
    reference where the scenario's reference helps. A reference reaches a pairwise prompt on the same
    condition. Raises KeyError for an unknown scenario and ValueError for a row that cannot be judged.
    """
    if mode is None:
        mode = "pairwise" if row.get("response_a") is not None and row.get("response") is None else None
    helps = judge_mode(row, scenarios_dir) == "reference"
    if mode == "pairwise":
        request = JudgeRequest(instruction=row.get("instruction"), scenario=row["scenario"], mode="pairwise",
                               response_a=row.get("response_a"), response_b=row.get("response_b"),
                               reference=row.get("reference") if helps else None, scale=scale, criteria=criteria)
    else:
        request = JudgeRequest(instruction=row.get("instruction"), scenario=row["scenario"],
                               mode=mode or ("reference" if helps else "single"), response=row.get("response"),
                               reference=row.get("reference"), scale=scale, criteria=criteria)
    request.validate()
    return request
