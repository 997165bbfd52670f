"""`alphaedit serve` (the local workbench: HTTP API, web page, OpenAI-compatible endpoint) and
`alphaedit demo` (ten edits to the bundled SmolLM2, before and after)."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..config import EditConfig
from ..methods import DEFAULT_METHOD, METHODS
from ..guard import Guard
from .common import (
    DeviceOption, DtypeOption, JsonOption, L2Option, LayersOption, ModelOption, ProjectOption, RehearseOption, RewordedOption, ContextTemplatesOption, StepsOption, TrustOption, _corpus_spec,
    _check_chat_values, _check_method_choice, _template_words, _edit_config, _fail, _parse_layers, _state_claim, _with_chat, app, console, out,
)
from .editing import _check_continuation, _state_editor, _state_journal


@app.command()
def serve(
    state: Annotated[Path, typer.Option("--state", "-s", help="State folder: created, or continued when it exists (every batch is committed to its journal).")],
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    token: Annotated[Optional[str], typer.Option(envvar="ALPHAEDIT_TOKEN", help="Require 'Authorization: Bearer TOKEN' on the API (and as the OpenAI api_key); open the page as http://HOST:PORT/#token=TOKEN.")] = None,
    exports: Annotated[Optional[Path], typer.Option(help="The only folder exports are written to (default: STATE-exports beside the state).")] = None,
    method: Annotated[Optional[str], typer.Option(help=f"Editing method for a new state: {', '.join(METHODS)} (default {DEFAULT_METHOD}).")] = None,
    project: ProjectOption = None,
    corpus: Annotated[Optional[str], typer.Option(help="Statistics corpus for a new state (see `edit --help`; default 'self').")] = None,
    tokens: Annotated[Optional[int], typer.Option(min=1, help="Token budget of the statistics corpus for a new state.")] = None,
    layers: LayersOption = None,
    steps: StepsOption = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Write requests that have a \"question\" also in the chat template (default on for a new state; a continued state keeps its own).")] = None,
    chat_values: Annotated[Optional[str], typer.Option(help="With chat-aware editing, 'own', 'shared' or 'trained' values for the chat forms (a new state; see `edit --help`).")] = None,
    l2: L2Option = None,
    rehearse: RehearseOption = None,
    reworded_prompts: RewordedOption = None,
    context_templates: ContextTemplatesOption = None,
    guard: Annotated[bool, typer.Option("--guard", help="Refuse batches that grow the matrices or drift probe answers too far (see `edit --guard`).")] = False,
    max_requests: Annotated[int, typer.Option(min=1, help="Most edit requests in one submission.")] = 1000,
    max_queue: Annotated[int, typer.Option(min=1, help="Most submissions waiting; more are answered 429.")] = 16,
    max_body: Annotated[int, typer.Option(min=1024, help="Largest request body in bytes.")] = 1 << 20,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    trust_remote_code: TrustOption = False,
) -> None:
    """Serve the model for editing and asking: an HTTP API (/docs), a web page (/) and /v1 for OpenAI clients."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        _fail(f"--host {host}: give an IP address such as 127.0.0.1 (or 0.0.0.0 with --token)")
    if not loopback and not token:
        _fail(f"--host {host} opens the server to other machines; give --token SECRET (clients send 'Authorization: Bearer SECRET')")
    _check_chat_values(chat_values)
    template_words = _template_words(context_templates)  # None: the preset's
    _check_method_choice(method or DEFAULT_METHOD, project, None, l2, rehearse=rehearse)
    with ExitStack() as claims:  # the state is the server's while it runs (locks.py)
        hold_state = _state_claim(claims, state, f"alphaedit serve on {host}:{port}")  # a new state: as the server starts
        journal = _state_journal(state)
        if journal is not None:
            _check_continuation(state, journal.header, dict(method=method, project=project, layers=_parse_layers(layers), steps=steps,
                                                            corpus=corpus, tokens=tokens, chat=chat,
                                                            chat_values=chat_values, l2=l2, rehearse=rehearse,
                                                            reworded_prompts=reworded_prompts,
                                                            context_templates=template_words))

        def new_config(lm) -> EditConfig:
            return _with_chat(_edit_config(lm, method or DEFAULT_METHOD, layers, steps, None, True, None, None, project=project, l2=l2,
                                           rehearse=rehearse, reworded_prompts=reworded_prompts, context_template_words=template_words),
                             chat, chat_values)

        editor, spec = _state_editor(state, journal, model, dtype, device, trust_remote_code, new_config, None,
                                     lambda: _corpus_spec(corpus, tokens, None, None))
        editor.show_progress = False
        if guard:
            editor.guard = Guard()
        import uvicorn

        from ..serve import Workbench, create_app

        bench = Workbench(editor, state, exports or state.with_name(state.name + "-exports"), max_requests=max_requests, max_queue=max_queue)
        console.print(f"serving {spec} with {state} on http://{host}:{port}/ (API docs at /docs, OpenAI clients at /v1)", soft_wrap=True)
        hold_state()
        uvicorn.run(create_app(bench, token, max_body), host=host, port=port, log_level="warning")


@app.command()
def demo(
    tokens: Annotated[int, typer.Option(min=1, help="Tokens sampled from the model for its statistics (sampling runs at ~100 tokens/s on 2 CPU cores).")] = 8_000,
    as_json: JsonOption = False,
) -> None:
    """Ten counterfactual edits to the bundled SmolLM2-135M, with a before/after table."""
    from ..demo import demo_prompts, demo_requests
    from ..editor import Editor
    from ..generate import greedy_completions
    from ..models import SMOLLM2_ALIAS, load_model
    from ..stats import CorpusSpec

    started = time.perf_counter()
    with console.status("loading SmolLM2-135M-Instruct (converted from its GGUF on first use)"):
        lm, tokenizer = load_model(SMOLLM2_ALIAS)
    rows = demo_prompts()
    prompts = [prompt for _, prompt, _ in rows]
    with console.status("completing the prompts before editing"):
        before = greedy_completions(lm, tokenizer, prompts, max_new_tokens=6)
    editor = Editor(lm, tokenizer, corpus=CorpusSpec("self", tokens=tokens), model_spec=SMOLLM2_ALIAS)
    reports = editor.edit(demo_requests())
    with console.status("completing the prompts after editing"):
        after = greedy_completions(lm, tokenizer, prompts, max_new_tokens=6)
    seconds = time.perf_counter() - started
    result = [
        {"kind": kind, "prompt": prompt, "expected": expected, "before": b, "after": a}
        for (kind, prompt, expected), b, a in zip(rows, before, after)
    ]
    if as_json:
        out.print_json(json.dumps({"seconds": seconds, "rows": result, "batches": [asdict(r) for r in reports]}))
        return
    table = Table(title=f"AlphaEdit on SmolLM2-135M: {len(demo_requests())} edits in one batch")
    for column in ("kind", "prompt", "before", "after"):
        table.add_column(column)
    for row in result:
        table.add_row(row["kind"], row["prompt"], _one_line(row["before"]), _one_line(row["after"]))
    out.print(table)
    out.print(f"done in {seconds:.0f} s (layers {editor.config.layers}, null-space rank kept: {editor.projector_rank})")


def _one_line(text: str) -> str:
    return text.split("\n")[0].strip()
