"""Request bodies and response shapes of the HTTP API (OpenAI-compatible where OpenAI has one)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_text(value: str) -> str:
    """Refuse a string that is not valid Unicode text: JSON may carry a lone surrogate ("\\ud800"),
    which no tokenizer, database or UTF-8 encoder accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (U+{ord(value[e.start]):04X}) at character {e.start}, which is "
                         "not valid Unicode text") from None
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. Unknown fields are ignored, as OpenAI clients send many.

    Strict types: "3" or true is not an integer, "yes" is not a boolean (no silent coercion);
    an integer may stand for a float. Numbers out of range are 400, never an overflow later."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str = Field(description="A prefix name, or the served base model's name for no prefix.")
    prompt: str | list[str] = Field(description="One prompt, or a list of prompts (one choice each).")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate per prompt.")
    temperature: float = Field(default=1.0, ge=0.0, le=100.0, description="0 (or below 1e-5) means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: list[str] = Field(default_factory=list, description="A string or up to 8 strings that end the completion.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX,  # torch takes up to 2**64-1: seed + i fits
                             description="Makes sampling repeatable (prompt i uses seed + i).")
    n: int = Field(default=1, description="Only 1 is supported.")
    echo: bool = Field(default=False, description="Not supported.")
    logprobs: int | None = Field(default=None, description="Not supported.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt list is empty")
        for i, text in enumerate([v] if isinstance(v, str) else v):
            try:
                check_text(text)
            except ValueError as e:
                raise ValueError(f"{'' if isinstance(v, str) else f'prompt {i} '}{e}") from None
        return v

    @field_validator("model")
    @classmethod
    def _model_text(cls, v):
        return check_text(v)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if isinstance(stops, list) and len(stops) > 8:
            raise ValueError(f"at most 8 stop strings, got {len(stops)}")
        if isinstance(stops, list) and any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        for s in stops if isinstance(stops, list) else ():
            if isinstance(s, str):
                check_text(s)
        return stops

    @field_validator("n")
    @classmethod
    def _only_one(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported; send a list of prompts for several completions")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v is not None:
            raise ValueError("logprobs is not supported")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def choice(index: int, text: str, finish_reason: Literal["stop", "length"] | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def completion_body(id: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    body = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type: str, code: int | str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape; `param` names the request field at fault, when one is."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
