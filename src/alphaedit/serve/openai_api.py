"""The OpenAI-compatible endpoints of `alphaedit serve`: /v1/models, /v1/completions and
/v1/chat/completions, the subset that the official `openai` client uses, streaming included.

The edited model answers; chat goes through the tokenizer's chat template (chat_text). Options
that would change what an answer means and that we do not implement (logprobs, echo, tools,
penalties) are refused with an OpenAI-shaped error rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..generate import Sampling
from .workbench import Completion, Workbench

MAX_TOKENS = 1024


class OpenAIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}, self.status)


class _Options(BaseModel):
    model_config = ConfigDict(extra="allow")  # the client sends fields we accept and do not use (user, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "tool_choice", "logit_bias"):
            if extra.get(name) not in (None, False, 0, [], {}):
                raise OpenAIError(f"'{name}' is not supported by alphaedit serve", name)
        for name in ("presence_penalty", "frequency_penalty"):
            if extra.get(name) not in (None, 0, 0.0):
                raise OpenAIError(f"'{name}' is not supported by alphaedit serve; leave it at 0", name)
        if (extra.get("best_of") or 1) > 1:
            raise OpenAIError("'best_of' above 1 is not supported by alphaedit serve", "best_of")

    def sampling(self) -> Sampling | None:
        return None if self.temperature == 0 else Sampling(top_p=self.top_p, temperature=self.temperature)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise OpenAIError("'stop' takes at most 4 sequences", "stop")
        return stops


class CompletionBody(_Options):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self, position: int) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise OpenAIError(f"messages[{position}]: only text content is supported, not {part.get('type')!r}", "messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatBody(_Options):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)


def openai_router(bench: Workbench, authorised) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(authorised)], tags=["OpenAI-compatible"])

    def check_model(name: str) -> None:
        if name != bench.model_name:
            raise OpenAIError(f"The model '{name}' does not exist; this server serves '{bench.model_name}'", "model", 404,
                              "model_not_found")

    @router.get("/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": bench.model_name, "object": "model", "created": 0, "owned_by": "alphaedit"}]}

    @router.post("/completions")
    def completions(body: CompletionBody):
        try:
            check_model(body.model)
            body.refuse_unsupported()
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not prompts or len(prompts) * body.n > 64:
                raise OpenAIError("'prompt': give 1 to 64 prompts (times n)", "prompt")
            answer = _Answer(bench, body, "cmpl", "text_completion")
            if body.stream:
                return answer.stream(prompts, chat=False)
            done = bench.complete([p for p in prompts for _ in range(body.n)], body.max_tokens, body.sampling(), body.seed, body.stops())
            return answer.whole(done, lambda c: {"text": c.text, "logprobs": None})
        except OpenAIError as e:
            return e.response()

    @router.post("/chat/completions")
    def chat_completions(body: ChatBody):
        try:
            check_model(body.model)
            body.refuse_unsupported()
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
            text = bench.conversation_text(messages)
            body.max_tokens = body.max_completion_tokens or body.max_tokens or 256
            answer = _Answer(bench, body, "chatcmpl", "chat.completion")
            if body.stream:
                return answer.stream([text], chat=True)
            done = bench.complete([text] * body.n, body.max_tokens, body.sampling(), body.seed, body.stops())
            return answer.whole(done, lambda c: {"message": {"role": "assistant", "content": c.text}})
        except OpenAIError as e:
            return e.response()

    return router


class _Answer:
    """One response in OpenAI's shape, whole or as server-sent chunks."""

    def __init__(self, bench: Workbench, body: _Options, prefix: str, kind: str):
        self.bench, self.body, self.kind = bench, body, kind
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.bench.model_name}

    def whole(self, done: list[Completion], choice) -> dict:
        prompt_tokens = sum(c.prompt_tokens for c in done[:: self.body.n])
        completion_tokens = sum(c.completion_tokens for c in done)
        return {**self._head(self.kind),
                "choices": [{"index": i, **choice(c), "finish_reason": c.finish_reason} for i, c in enumerate(done)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}}

    def stream(self, texts: list[str], chat: bool) -> StreamingResponse:
        if len(texts) != 1 or self.body.n != 1:
            raise OpenAIError("'stream' takes one prompt and n = 1", "stream")
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def piece(delta: str | None, finish: str | None) -> str:
            if chat:
                choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "finish_reason": finish}
                if delta == "":
                    choice["delta"] = {"role": "assistant", "content": ""}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**self._head(chunk_kind), 'choices': [choice]})}\n\n"

        def events() -> Iterator[str]:
            if chat:
                yield piece("", None)  # the role comes first, as OpenAI sends it
            for part in self.bench.stream(texts[0], self.body.max_tokens, self.body.sampling(), self.body.seed, self.body.stops()):
                if isinstance(part, Completion):
                    yield piece(None, part.finish_reason)
                elif part:
                    yield piece(part, None)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
