"""Request bodies of the judge server, as strict pydantic models.

Strict: a number sent as a string, a bool sent as 0/1 or an unknown field in a judge request is a 422
with the field's name, never a silent coercion. The judging rules themselves (what a valid request is,
the rating scale) stay in `themis_ray.judging`; these models call them rather than restate them.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from themis_ray.judging import MODES, JudgeRequest, RatingScale
from themis_ray.scenarios import Criterion

MAX_SCALE_POINTS = 101  # a scale wider than this is a mistake, not a rubric
_UNCLASSIFIED = "<to be classified>"  # stand-in scenario while validating a request with none


def _not_blank(value: Optional[str], what: str) -> Optional[str]:
    if value is not None and not value.strip():
        raise ValueError(f"{what} is empty")
    return value


class CriterionBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(max_length=200)
    description: str = Field(max_length=4000)

    @field_validator("name", "description")
    @classmethod
    def _filled(cls, value: str, info) -> str:
        return _not_blank(value, f"criterion {info.field_name}")


class ScaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    low: int = 1
    high: int = 5

    @model_validator(mode="after")
    def _valid(self) -> "ScaleBody":
        self.to_scale()  # RatingScale owns the rule low < high
        if self.high - self.low + 1 > MAX_SCALE_POINTS:
            raise ValueError(f"rating scale has at most {MAX_SCALE_POINTS} points; got {self.low}..{self.high}")
        return self

    def to_scale(self) -> RatingScale:
        return RatingScale(low=self.low, high=self.high)


class JudgeBody(BaseModel):
    """POST /v1/judge."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal[MODES] = "single"  # type: ignore[valid-type]
    instruction: str
    response: Optional[str] = None
    response_a: Optional[str] = None
    response_b: Optional[str] = None
    reference: Optional[str] = None
    scenario: Optional[str] = Field(default=None, description="absent: the classifier picks it")
    criteria: Optional[list[CriterionBody]] = Field(
        default=None, min_length=1, max_length=20, description="replace the scenario's criteria"
    )
    scale: ScaleBody = Field(default_factory=ScaleBody)
    rationale: bool = Field(
        default=True,
        description="false: the score (pairwise: the verdict) and its distribution from one forward pass, no text",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "JudgeBody":
        if self.mode == "pairwise" and self.response is not None:
            raise ValueError("pairwise mode takes response_a and response_b, not response")
        if self.mode != "pairwise" and (self.response_a is not None or self.response_b is not None):
            raise ValueError(
                f"{self.mode} mode takes response, not response_a/response_b; "
                "set mode to 'pairwise' to compare two responses"
            )
        if self.mode == "single" and self.reference is not None:
            raise ValueError("single mode never shows a reference; set mode to 'reference' to grade against it")
        if self.scenario is not None and not self.scenario.strip():
            raise ValueError("scenario is empty; leave it out to let the classifier pick one")
        self.to_request(self.scenario or _UNCLASSIFIED).validate()  # judging's own rules
        return self

    def to_request(self, scenario: str) -> JudgeRequest:
        return JudgeRequest(
            instruction=self.instruction,
            scenario=scenario,
            mode=self.mode,
            response=self.response,
            response_a=self.response_a,
            response_b=self.response_b,
            reference=self.reference,
            criteria=[Criterion(c.name, c.description) for c in self.criteria] if self.criteria else None,
            scale=self.scale.to_scale(),
        )


# --- OpenAI-compatible chat completions ---------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]

    def as_engine_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class ChatCompletionBody(BaseModel):
    """POST /v1/chat/completions: the subset of OpenAI's body a local judge can honour.

    Fields it does not use (user, presence_penalty, ...) are ignored, as OpenAI-compatible servers do;
    fields it cannot honour (n > 1) are rejected.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=-(2**63), le=2**63 - 1)  # a 64-bit integer, as OpenAI's
    # vLLM's extensions: continue the last assistant message instead of starting a new one.
    continue_final_message: bool = False
    add_generation_prompt: Optional[bool] = None

    @model_validator(mode="after")
    def _supported(self) -> "ChatCompletionBody":
        if self.n not in (None, 1):
            raise ValueError(f"only n=1 is supported; got n={self.n}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        last = self.messages[-1].role
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise ValueError("continue_final_message=true needs add_generation_prompt=false")
            if last != "assistant":
                raise ValueError("continue_final_message=true needs the last message to be from the assistant")
        elif last == "assistant":
            raise ValueError(
                "the last message is from the assistant; set continue_final_message=true "
                "(and add_generation_prompt=false) to continue it"
            )
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
