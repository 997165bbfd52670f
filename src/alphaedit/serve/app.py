"""The HTTP side of `alphaedit serve`: the editing API under /api, the OpenAI-compatible one under
/v1 (openai_api.py), and the web page at /. FastAPI documents it all at /docs (OpenAPI).

Bad input is answered 4xx with the record and field named (the same messages as `alphaedit
edit`), and nothing is queued; bodies over `max_body` bytes are refused before they are read.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi_offline import FastAPIOffline
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from ..generate import Sampling
from ..guard import DEFAULT_PROBES
from ..prompts import has_chat_template
from ..requests import RequestError, parse_requests
from .openai_api import openai_router
from .workbench import Refused, Workbench


class EditBody(BaseModel):
    requests: list[dict[str, Any]] = Field(min_length=1, description="Edit requests in any format `alphaedit edit` reads "
                                           "(CounterFact, MEMIT, EasyEdit or {prompt, subject, target_new[, question]}).")
    batch_size: int | None = Field(None, ge=1, description="Requests per sequential batch (default: all in one).")


class AskBody(BaseModel):
    prompts: list[str] = Field(min_length=1, max_length=64)
    max_tokens: int = Field(20, ge=1, le=512)
    chat: bool = Field(False, description="Ask each prompt as a user turn in the chat template.")
    compare: bool = Field(False, description="Also answer with the base model's weights (before any edit).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None


class ExportBody(BaseModel):
    name: str = Field(description="A folder (or, with deltas_only, a .safetensors file) inside the server's export folder.")
    deltas_only: bool = False
    force: bool = False


def create_app(bench: Workbench, token: str | None = None, max_body: int = 1 << 20) -> FastAPI:
    # FastAPI's own /docs and /redoc load their scripts from a CDN, which a machine without a
    # network cannot reach; fastapi-offline serves the same pages with the files in its wheel.
    app = FastAPIOffline(title="alphaedit serve", version="1", description="Edit facts in a language model, ask it, undo. "
                         "The edited model is also served under /v1 for OpenAI clients.")

    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "this server needs its token: send the header 'Authorization: Bearer <token>'")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return JSONResponse({"detail": f"the request body is over {max_body} bytes (--max-body): send fewer requests at once"}, 413)
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            return JSONResponse({"detail": "send the body with a Content-Length header"}, 411)
        return await call_next(request)

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return JSONResponse({"detail": str(e)}, e.status)

    guarded = [Depends(authorised)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("alphaedit.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/api/status", dependencies=guarded)
    def status() -> dict:
        config = bench.editor.config
        jobs = list(bench.jobs.values())
        return {"model": bench.model_name, "method": config.method, "layers": config.layers, "state": str(bench.state),
                "batches": len(bench.editor.batches), "chat_template": has_chat_template(bench.editor.tokenizer),
                "jobs_waiting": sum(j.status == "queued" for j in jobs), "job_running": next((j.id for j in jobs if j.status == "running"), None),
                "probes": list(DEFAULT_PROBES[:6])}

    @app.post("/api/edits", status_code=202, dependencies=guarded)
    def submit(body: EditBody) -> dict:
        try:
            requests = parse_requests(body.requests, source="request body")
        except RequestError as e:
            raise Refused(str(e)) from None
        job = bench.submit(requests, body.batch_size)
        return job.to_dict()

    @app.get("/api/jobs", dependencies=guarded)
    def jobs() -> list[dict]:
        return [j.to_dict() for j in bench.jobs.values()]

    def _job(job_id: str):
        job = bench.jobs.get(job_id)
        if job is None:
            raise Refused(f"no job {job_id!r} (the server forgets all but its newest {bench.keep_finished} finished jobs; "
                          "their batches are in /api/journal)", 404)
        return job

    @app.get("/api/jobs/{job_id}", dependencies=guarded)
    def job(job_id: str) -> dict:
        return _job(job_id).to_dict()

    @app.get("/api/jobs/{job_id}/events", dependencies=guarded)
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: the job's state at every change, until it is done or failed."""
        job = _job(job_id)

        async def events():
            seen = -1
            while not await request.is_disconnected():
                version = await run_in_threadpool(job.wait_for_change, seen, 10.0)
                if version == seen:
                    yield ": still working\n\n"  # keeps proxies from closing a quiet stream
                    continue
                seen = version
                yield f"event: progress\ndata: {json.dumps(job.to_dict())}\n\n"
                if job.finished_or_failed:
                    return
                await asyncio.sleep(0.1)  # at most ten updates a second

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/api/ask", dependencies=guarded)
    def ask(body: AskBody) -> dict:
        if any(not p.strip() for p in body.prompts):
            raise Refused("prompts: an empty prompt; give the start of a sentence, e.g. 'The Eiffel Tower is in'", 422)
        texts = [bench.prompt_text(p, body.chat) for p in body.prompts]
        sampling = None if body.temperature == 0 else Sampling(body.top_k, body.top_p, body.temperature)
        after, before, applied = bench.ask(texts, body.max_tokens, sampling, body.seed, compare=body.compare)
        answers = []
        for i, (prompt, a) in enumerate(zip(body.prompts, after)):
            answer = {"prompt": prompt, "completion": a.text, "finish_reason": a.finish_reason}
            if before is not None:
                answer["base_completion"] = before[i].text
            answers.append(answer)
        return {"answers": answers, "batches_applied": applied}

    @app.get("/api/journal", dependencies=guarded)
    def journal() -> dict:
        return bench.journal()

    @app.post("/api/journal/{batch_id}/revert", dependencies=guarded)
    def revert(batch_id: int) -> dict:
        bench.revert(batch_id)
        return {"reverted": batch_id}

    @app.post("/api/export", dependencies=guarded)
    def export(body: ExportBody) -> dict:
        return {"written": str(bench.export(body.name, body.deltas_only, body.force))}

    @app.get("/api/plots/{name}.png", dependencies=guarded)
    def plot(name: str) -> Response:
        return Response(bench.plot(name), media_type="image/png", headers={"Cache-Control": "no-store"})

    app.include_router(openai_router(bench, authorised))
    return app
