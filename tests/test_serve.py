"""`alphaedit serve` on a tiny Llama: every endpoint, the OpenAI client, concurrency and a kill -9."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from alphaedit.config import EditConfig
from alphaedit.editor import Editor
from alphaedit.generate import greedy_completions
from alphaedit.journal import Journal
from alphaedit.layouts import mlp_out_weight
from alphaedit.serve import Workbench, create_app
from alphaedit.stats import CorpusSpec, StatsCache
from conftest import WIKITEXT
from serve_helpers import free_port, live, wait_for_job

pytestmark = pytest.mark.usefixtures("single_thread")

EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "target_true": "Paris"}
DARRIEUX = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English", "target_true": "French"}
SEINE = {"prompt": "{} flows through the city of", "subject": "The Seine", "target_new": "Berlin", "target_true": "Paris"}
LAYERS = (1, 2)


def _editor(model, layout, tokenizer, home: Path) -> Editor:
    config = EditConfig(method="alphaedit", layers=list(LAYERS), v_num_grad_steps=4, v_lr=0.5, nullspace_threshold=0.5,
                        context_template_length=6)
    return Editor(model, tokenizer, config, layout=layout, corpus=CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64),
                  cache=StatsCache(home), model_spec="tiny-llama", show_progress=False)


def _weights(model, layout) -> dict[int, torch.Tensor]:
    return {l: mlp_out_weight(model, layout, l).detach().clone() for l in LAYERS}


@pytest.fixture
def bench(llama, tokenizer, tmp_path):
    model, layout = llama
    bench = Workbench(_editor(copy.deepcopy(model), layout, tokenizer, tmp_path / "home"), tmp_path / "state", tmp_path / "exports",
                      max_requests=8, max_queue=4)
    yield bench
    bench.close()


@pytest.fixture
def client(bench):
    with TestClient(create_app(bench, max_body=64 * 1024)) as c:
        yield c


def _edit(client, *requests, batch_size=None) -> dict:
    response = client.post("/api/edits", json={"requests": list(requests), "batch_size": batch_size})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert job["status"] == "done", job
    return job


def test_an_edit_job_applies_each_batch_and_commits_it_to_the_journal(client, bench, llama, tokenizer):
    job = _edit(client, EIFFEL, DARRIEUX, batch_size=1)
    assert job["batches"] == 2 and job["batch_ids"] == [0, 1] and job["fraction"] == 1.0
    journal = client.get("/api/journal").json()
    assert [b["id"] for b in journal["batches"]] == [0, 1] and journal["method"] == "alphaedit"
    assert journal["batches"][0]["edits"][0]["subject"] == "The Eiffel Tower"
    assert Journal.open(bench.state).batch_ids() == [0, 1]
    # the journal on disk replays onto a fresh base model to the served weights
    model, layout = llama
    replayed = Editor.load_state(bench.state, copy.deepcopy(model), tokenizer, show_progress=False)
    for layer, weight in _weights(bench.editor.model, layout).items():
        torch.testing.assert_close(mlp_out_weight(replayed.model, layout, layer), weight)
    assert [j["id"] for j in client.get("/api/jobs").json()] == [job["id"]]
    status = client.get("/api/status").json()
    assert status["batches"] == 2 and status["model"] == "tiny-llama" and status["job_running"] is None


def test_progress_streams_as_server_sent_events_until_the_job_is_done(client):
    response = client.post("/api/edits", json={"requests": [EIFFEL, DARRIEUX], "batch_size": 1})
    updates = []
    with client.stream("GET", f"/api/jobs/{response.json()['id']}/events") as events:
        for line in events.iter_lines():
            if line.startswith("data: "):
                updates.append(json.loads(line[6:]))
    # the stream sends the job as it is at each change it sees (at most ten a second, so phases
    # may be skipped on a busy machine), and ends with the finished job
    assert updates[-1]["status"] == "done" and updates[-1]["fraction"] == 1.0 and updates[-1]["batch_ids"] == [0, 1]
    assert len(updates) >= 2 and updates[0]["status"] in ("queued", "running")  # statistics alone take a second here
    done = [u["done"] for u in updates]
    assert done == sorted(done) and updates[-1]["done"] == updates[-1]["total"] > 0


def test_a_jobs_eta_comes_from_its_pace_since_editing_began(monkeypatch):
    from alphaedit.batch import EditProgress
    from alphaedit.editor import EditRequest
    from alphaedit.serve.jobs import Job

    clock = [100.0]
    monkeypatch.setattr("alphaedit.serve.jobs.time.time", lambda: clock[0])
    job = Job([EditRequest("{} is", "A", "b")] * 4, batch_size=2)
    job.start(units_per_batch=10)
    assert job.total == 20 and job.eta() is None
    clock[0] = 160.0  # a minute of statistics: not part of the pace
    job.progress(1, 0, EditProgress("editing", 1, 1, 0, 10))
    clock[0] = 165.0
    job.progress(1, 0, EditProgress("editing", 1, 1, 5, 10))
    assert job.eta() == pytest.approx(15.0)  # 5 units in 5 s, 15 left
    job.finish()
    assert job.eta() is None and job.to_dict()["fraction"] == 1.0


def test_bad_input_is_refused_with_the_record_and_field_named_and_changes_nothing(client, bench):
    missing = client.post("/api/edits", json={"requests": [EIFFEL, {"prompt": "{} plays", "subject": "Messi"}]})
    assert missing.status_code == 400
    assert "record 2" in missing.json()["detail"] and "target_new" in missing.json()["detail"]
    conflict = client.post("/api/edits", json={"requests": [EIFFEL, {**EIFFEL, "target_new": "Berlin"}]})
    assert conflict.status_code == 400 and "The Eiffel Tower" in conflict.json()["detail"]
    too_many = client.post("/api/edits", json={"requests": [EIFFEL] * 9})
    assert too_many.status_code == 413 and "--max-requests" in too_many.json()["detail"]
    too_big = client.post("/api/edits", content=b'{"requests": [' + b" " * 70_000 + b"]}", headers={"content-type": "application/json"})
    assert too_big.status_code == 413
    not_json = client.post("/api/edits", json={"requests": "EIFFEL"})
    assert not_json.status_code == 422 and "requests" in json.dumps(not_json.json()["detail"])
    assert client.post("/api/ask", json={"prompts": ["  "]}).status_code == 422
    assert client.get("/api/jobs/nope").status_code == 404
    assert bench.jobs == {} and not bench.state.exists()


def test_ask_compares_the_edited_model_with_its_base_weights(client, bench, llama, tokenizer):
    # (edits barely move this random tiny model's near-uniform predictions: the SmolLM2 page test
    # shows a real edit changing the answer; here W_out of an edited layer is changed by hand)
    prompt = "The Eiffel Tower is located in the city of"
    _edit(client, EIFFEL)
    model, layout = llama
    with torch.no_grad():
        mlp_out_weight(bench.editor.model, layout, 2).mul_(40.0)
    after = greedy_completions(bench.editor.model, tokenizer, [prompt], 8)
    base = greedy_completions(copy.deepcopy(model), tokenizer, [prompt], 8)
    answer = client.post("/api/ask", json={"prompts": [prompt], "max_tokens": 8, "compare": True}).json()["answers"][0]
    assert answer["completion"] == after[0] and answer["base_completion"] == base[0] and after != base
    assert greedy_completions(bench.editor.model, tokenizer, [prompt], 8) == after  # the edited weights are back
    sampled = [client.post("/api/ask", json={"prompts": [prompt], "temperature": 1.0, "seed": 3}).json()["answers"][0]["completion"]
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seeded sample is reproducible


def test_an_ask_with_compare_holds_the_lock_once_so_no_batch_lands_between_its_answers(client, bench, monkeypatch):
    holds = []
    enter = type(bench.lock).__enter__
    monkeypatch.setattr(type(bench.lock), "__enter__", lambda lock: (holds.append(threading.current_thread().name), enter(lock))[1])
    answer = client.post("/api/ask", json={"prompts": ["The Eiffel Tower is in", "Paris is"], "max_tokens": 2, "compare": True}).json()
    assert len(holds) == 1 and answer["batches_applied"] == 0 and all("base_completion" in a for a in answer["answers"])


def test_the_server_remembers_only_its_newest_finished_jobs(client, bench):
    bench.keep_finished = 1
    first, second = _edit(client, EIFFEL), _edit(client, DARRIEUX)
    third = _edit(client, SEINE)  # submitted with two finished jobs: the older one is forgotten
    assert client.get(f"/api/jobs/{second['id']}").status_code == 200
    forgotten = client.get(f"/api/jobs/{first['id']}")
    assert forgotten.status_code == 404 and "newest 1 finished" in forgotten.json()["detail"]
    assert [j["id"] for j in client.get("/api/jobs").json()] == [second["id"], third["id"]]
    assert [b["id"] for b in client.get("/api/journal").json()["batches"]] == [0, 1, 2]  # the journal keeps every batch


def test_revert_restores_the_weights_and_is_journalled(client, bench, llama):
    _, layout = llama
    base = _weights(bench.editor.model, layout)
    _edit(client, EIFFEL)
    assert client.post("/api/journal/0/revert").status_code == 200
    for layer, weight in _weights(bench.editor.model, layout).items():
        torch.testing.assert_close(weight, base[layer], atol=1e-6, rtol=0)
    assert client.post("/api/journal/0/revert").status_code == 409
    assert client.post("/api/journal/7/revert").status_code == 404
    assert Journal.open(bench.state).reverted() == {0}
    assert client.get("/api/journal").json()["batches"][0]["reverted"] is True


def test_exports_stay_inside_the_export_folder(client, bench, tmp_path):
    _edit(client, EIFFEL)
    for name in ("../outside", "/tmp/outside", "a/../../outside", "", "."):
        response = client.post("/api/export", json={"name": name})
        assert response.status_code in (400, 422), (name, response.text)
    assert not (tmp_path / "outside").exists()
    assert client.post("/api/export", json={"name": "edited"}).json() == {"written": "edited"}
    assert (bench.exports / "edited" / "config.json").is_file()
    assert client.post("/api/export", json={"name": "edited"}).status_code == 409
    assert client.post("/api/export", json={"name": "edited", "force": True}).status_code == 200
    assert client.post("/api/export", json={"name": "d.safetensors", "deltas_only": True}).status_code == 200
    assert client.post("/api/export", json={"name": "d.bin", "deltas_only": True}).status_code == 400


def test_plots_are_png(client):
    _edit(client, EIFFEL)
    for name in ("growth", "efficacy"):
        response = client.get(f"/api/plots/{name}.png")
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
    assert client.get("/api/plots/nope.png").status_code == 404
    assert client.get("/").text.startswith("<!doctype html>")
    assert "/api/edits" in client.get("/openapi.json").json()["paths"]
    docs = client.get("/docs").text  # the OpenAPI page, with Swagger UI served locally (no CDN offline)
    script = re.search(r'src="([^"]*swagger-ui-bundle\.js)"', docs).group(1)
    assert script.startswith("/") and client.get(script).status_code == 200


def test_a_token_guards_every_api_but_the_page(bench):
    with TestClient(create_app(bench, token="s3cret")) as c:
        assert c.get("/").status_code == 200
        for path in ("/api/status", "/api/journal", "/v1/models"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_the_official_openai_client_talks_to_the_edited_model(bench, tokenizer):
    with live(create_app(bench)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        [model] = client.models.list().data
        assert model.id == "tiny-llama"
        prompt = "The Eiffel Tower is located in the city of"
        done = client.completions.create(model=model.id, prompt=prompt, max_tokens=6, temperature=0)
        assert done.choices[0].text == bench.complete([prompt], 6)[0].text == greedy_completions(bench.editor.model, tokenizer, [prompt], 6)[0]
        assert done.usage.completion_tokens <= 6 and done.choices[0].finish_reason in ("stop", "length")
        two = client.completions.create(model=model.id, prompt=[prompt, "The Seine flows"], max_tokens=4, temperature=0)
        assert [c.index for c in two.choices] == [0, 1]
        messages = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
        whole = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8, temperature=0)
        streamed = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8, temperature=0, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in streamed]
        assert "".join(pieces) == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
        stop = whole.choices[0].message.content[2:4]
        if stop.strip():
            cut = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8, temperature=0, stop=[stop])
            assert cut.choices[0].message.content == whole.choices[0].message.content[: whole.choices[0].message.content.find(stop)]
            assert cut.choices[0].finish_reason == "stop"
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4o", prompt=prompt)
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            client.completions.create(model=model.id, prompt=prompt, logprobs=2)


def test_an_ask_during_an_edit_sees_the_model_before_or_after_the_batch(bench, llama, monkeypatch):
    """Every forward pass an ask makes while a job is applied sees W_out as it was before a batch
    or as it is after one, and none of a batch's z-optimisation hooks."""
    _, layout = llama
    model = bench.editor.model
    fingerprint = lambda: tuple(float(w.double().sum()) for w in _weights(model, layout).values())
    foreign_hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) - 1
    seen = []

    def record(module, args):
        if threading.current_thread().name != "alphaedit-edits":  # an ask, not the edit's own passes
            seen.append((fingerprint(), foreign_hooks()))

    states = [fingerprint()]  # before the job, then after each committed batch
    commit = bench._commit
    monkeypatch.setattr(bench, "_commit", lambda job, batch_id: (states.append(fingerprint()), commit(job, batch_id)))
    handle = model.register_forward_pre_hook(record)
    try:
        with live(create_app(bench)) as url, httpx.Client(base_url=url, timeout=120) as c:
            job = c.post("/api/edits", json={"requests": [EIFFEL, DARRIEUX, SEINE], "batch_size": 1}).json()
            while c.get(f"/api/jobs/{job['id']}").json()["status"] != "done":
                assert c.post("/api/ask", json={"prompts": ["The Eiffel Tower is in"], "max_tokens": 2}).status_code == 200
    finally:
        handle.remove()
    assert len(set(states)) == 4 and len(seen) > 2
    assert {f for f, _ in seen} <= set(states) and {h for _, h in seen} == {0}


def test_a_client_that_disconnects_mid_edit_does_not_break_the_job(bench):
    with live(create_app(bench)) as url:
        with httpx.Client(base_url=url, timeout=60) as c:
            job = c.post("/api/edits", json={"requests": [EIFFEL, DARRIEUX], "batch_size": 1}).json()
            with c.stream("GET", f"/api/jobs/{job['id']}/events") as events:
                next(events.iter_lines())  # one event, then the client goes away mid-job
        with httpx.Client(base_url=url, timeout=60) as c:
            assert wait_for_job(c, job["id"])["status"] == "done"
            assert [b["id"] for b in c.get("/api/journal").json()["batches"]] == [0, 1]


def test_concurrent_clients_lose_no_batch_and_no_ask(bench, capsys):
    """8 clients × 50 asks while 3 clients submit an edit each: every call answered, 3 batches."""
    latencies, errors = [], []
    with live(create_app(bench)) as url:
        def asker(n: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                for i in range(50):
                    start = time.perf_counter()
                    r = c.post("/api/ask", json={"prompts": [f"Question {n}.{i}: the capital of France is"], "max_tokens": 3})
                    latencies.append(time.perf_counter() - start)
                    if r.status_code != 200:
                        errors.append(r.text)

        jobs = []

        def editor(request: dict) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                r = c.post("/api/edits", json={"requests": [request]})
                jobs.append(r.json()["id"]) if r.status_code == 202 else errors.append(r.text)

        threads = [threading.Thread(target=asker, args=(n,)) for n in range(8)]
        threads += [threading.Thread(target=editor, args=(r,)) for r in (EIFFEL, DARRIEUX, SEINE)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with httpx.Client(base_url=url) as c:
            finished = [wait_for_job(c, j) for j in jobs]
    assert errors == [] and len(latencies) == 400
    assert [j["status"] for j in finished] == ["done"] * 3
    committed = Journal.open(bench.state)
    subjects = sorted(committed.batch(b).requests[0]["subject"] for b in committed.batch_ids())
    assert subjects == sorted(r["subject"] for r in (EIFFEL, DARRIEUX, SEINE))  # each batch once
    q = statistics.quantiles(latencies, n=20)
    with capsys.disabled():
        print(f"\nserve load (tiny model): 400 asks beside 3 edits, p50 {1000 * statistics.median(latencies):.0f} ms, p95 {1000 * q[18]:.0f} ms")


def test_serve_refuses_another_address_without_a_token_and_a_bad_alpha(tmp_path):
    done = subprocess.run([sys.executable, "-m", "alphaedit", "serve", "--state", str(tmp_path / "s"), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--token" in done.stderr and not (tmp_path / "s").exists()
    done = subprocess.run([sys.executable, "-m", "alphaedit", "serve", "--state", str(tmp_path / "s"), "--l2", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--l2 0" in done.stderr and not (tmp_path / "s").exists()


def _start_server(folder: Path, state: Path, home: Path, *extra: str) -> tuple[subprocess.Popen, httpx.Client]:
    port = free_port()
    env = {**os.environ, "ALPHAEDIT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "alphaedit", "serve", "--model", str(folder), "--state", str(state),
                               "--port", str(port), *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.time() + 120
    while True:
        try:
            client.get("/api/status")
            return server, client
        except httpx.TransportError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise AssertionError(server.stderr.read().decode()[-2000:])
            time.sleep(0.2)


def test_a_server_killed_mid_batch_leaves_a_journal_that_loads_and_serve_continues_it(tiny_model_folder, llama, tokenizer, tmp_path):
    state, home = tmp_path / "state", tmp_path / "home"
    server, c = _start_server(tiny_model_folder, state, home, "--layers", "1-2", "--steps", "20", "--corpus", str(WIKITEXT), "--tokens", "2000",
                              "--l2", "40", "--rehearse", "1", "--reworded-prompts", "1")
    try:
        many = [{**EIFFEL, "subject": f"Tower {i}"} for i in range(40)]
        job = c.post("/api/edits", json={"requests": many, "batch_size": 1}).json()
        while not c.get(f"/api/jobs/{job['id']}").json()["batch_ids"]:
            time.sleep(0.05)
        time.sleep(0.3)  # into a later batch
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
        c.close()
    journal = Journal.open(state)
    committed = journal.batch_ids()
    assert 1 <= len(committed) < 40
    model, _ = llama
    replayed = Editor.load_state(state, copy.deepcopy(model), tokenizer, show_progress=False)
    assert len(replayed.batches) == len(committed)

    # the same command continues the state (a contradicting option is refused before loading)
    refused = subprocess.run([sys.executable, "-m", "alphaedit", "serve", "--state", str(state), "--layers", "0-1"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--layers" in refused.stderr
    assert journal.header["config"]["l2_alpha"] == 40  # a new state's α, as given
    refused = subprocess.run([sys.executable, "-m", "alphaedit", "serve", "--state", str(state), "--l2", "60"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--l2" in refused.stderr
    assert journal.header["config"]["rehearse"] == 1  # and its rehearsal
    refused = subprocess.run([sys.executable, "-m", "alphaedit", "serve", "--state", str(state), "--rehearse", "2"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--rehearse" in refused.stderr
    assert journal.header["config"]["reworded_prompts"] == 1  # and its reworded copies
    refused = subprocess.run([sys.executable, "-m", "alphaedit", "serve", "--state", str(state), "--reworded-prompts", "2"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--reworded-prompts" in refused.stderr
    server, c = _start_server(tiny_model_folder, state, home)
    try:
        assert [b["id"] for b in c.get("/api/journal").json()["batches"]] == committed
        job = c.post("/api/edits", json={"requests": [DARRIEUX]}).json()
        assert wait_for_job(c, job["id"])["batch_ids"] == [committed[-1] + 1]
    finally:
        server.kill()
        server.wait()
        c.close()
    assert Journal.open(state).batch_ids() == committed + [committed[-1] + 1]
