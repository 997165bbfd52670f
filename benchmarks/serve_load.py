"""Load on `alphaedit serve` over loopback: concurrent asks while edit batches are submitted.

Starts the real command (`alphaedit serve`, its own process) on a free port with a new state,
applies one warm-up edit (which measures the statistics), then runs CLIENTS threads of ASKS asks
each while EDITS other clients each submit one CounterFact edit at the same moment. Checks that
every call was answered, that each edit was committed exactly once, and that the journal loads
after the server is killed with SIGKILL in the middle of a further batch. Prints the ask latency
percentiles and the edit jobs' times.

    python benchmarks/serve_load.py [--model smollm2-135m] [--clients 8] [--asks 50] [--edits 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import httpx

from alphaedit.journal import Journal

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COUNTERFACT = DATA / "counterfact" / "counterfact_test.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(client: httpx.Client, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            client.get("/api/status").raise_for_status()
            return
        except httpx.TransportError:
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)


def _job(client: httpx.Client, job_id: str) -> dict:
    while (job := client.get(f"/api/jobs/{job_id}").json())["status"] not in ("done", "failed"):
        time.sleep(0.2)
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--asks", type=int, default=50)
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--corpus", default=str(DATA / "wikitext2_raw" / "wiki.valid.raw"))
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    records = json.loads(COUNTERFACT.read_text())[: args.edits + 2]
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    state, port = work / "state", _free_port()
    server = subprocess.Popen([sys.executable, "-m", "alphaedit", "serve", "--model", args.model, "--state", str(state),
                               "--port", str(port), "--corpus", args.corpus, "--tokens", str(args.tokens)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    try:
        _wait_until_up(client, server)
        start = time.perf_counter()
        warm = _job(client, client.post("/api/edits", json={"requests": [records[0]]}).json()["id"])
        warm_up_s = time.perf_counter() - start
        latencies, failures, jobs = [], [], []

        def asker(n: int) -> None:
            with httpx.Client(base_url=client.base_url, timeout=600) as c:
                for i in range(args.asks):
                    prompt = records[(n + i) % len(records)]["neighborhood_prompts"][i % 10]
                    began = time.perf_counter()
                    r = c.post("/api/ask", json={"prompts": [prompt], "max_tokens": args.max_tokens})
                    latencies.append(time.perf_counter() - began)
                    if r.status_code != 200:
                        failures.append(f"ask {r.status_code}: {r.text[:200]}")

        def submitter(record: dict) -> None:
            with httpx.Client(base_url=client.base_url, timeout=600) as c:
                r = c.post("/api/edits", json={"requests": [record]})
                jobs.append(r.json()["id"]) if r.status_code == 202 else failures.append(f"edit {r.status_code}: {r.text[:200]}")

        threads = [threading.Thread(target=asker, args=(n,)) for n in range(args.clients)]
        threads += [threading.Thread(target=submitter, args=(r,)) for r in records[1 : 1 + args.edits]]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        finished = [_job(client, j) for j in jobs]
        load_s = time.perf_counter() - start
        # one more batch, killed half-way: the journal must still load
        last = client.post("/api/edits", json={"requests": [records[-1]]}).json()["id"]
        while client.get(f"/api/jobs/{last}").json()["phase"] != "editing":
            time.sleep(0.05)
        time.sleep(1.0)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
        client.close()
    journal = Journal.open(state)
    subjects = [journal.batch(b).requests[0]["subject"] for b in journal.batch_ids()]
    expected = [r["requested_rewrite"]["subject"] for r in records[: 1 + args.edits]]
    q = statistics.quantiles(latencies, n=100)
    result = {
        "model": args.model, "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "date": date.today().isoformat(),
        "clients": args.clients, "asks_per_client": args.asks, "max_tokens": args.max_tokens, "edits": args.edits,
        "asks_answered": len(latencies) - sum(f.startswith("ask") for f in failures), "failures": failures,
        "ask_p50_ms": 1000 * statistics.median(latencies), "ask_p95_ms": 1000 * q[94], "ask_max_ms": 1000 * max(latencies),
        "asks_per_s": len(latencies) / load_s, "load_seconds": load_s, "warm_up_edit_seconds": warm_up_s,
        "edit_job_seconds": [round(j["finished"] - j["started"], 1) for j in finished],
        "edit_jobs_done": sum(j["status"] == "done" for j in finished) + (warm["status"] == "done"),
        "journal_batches_after_kill": len(subjects), "killed_batch_committed": len(subjects) > len(expected),
        "each_edit_committed_once": sorted(subjects[: len(expected)]) == sorted(expected) and len(subjects) <= len(expected) + 1,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"alphaedit serve under load: {args.model}, {args.clients} clients x {args.asks} asks ({args.max_tokens} tokens) "
          f"beside {args.edits} concurrent edit submissions; {result['machine']}, {result['cores']} cores, {result['date']}")
    print(f"{'asks answered':<32}{result['asks_answered']} of {len(latencies)}")
    print(f"{'ask latency p50 / p95 / max':<32}{result['ask_p50_ms']:.0f} / {result['ask_p95_ms']:.0f} / {result['ask_max_ms']:.0f} ms")
    print(f"{'asks per second':<32}{result['asks_per_s']:.1f}")
    print(f"{'edit jobs (s each)':<32}{result['edit_job_seconds']} (warm-up edit with statistics: {warm_up_s:.0f} s)")
    print(f"{'each edit committed once':<32}{result['each_edit_committed_once']} ({len(subjects)} batches in the journal after kill -9)")
    if failures:
        print("failures:", *failures[:10], sep="\n  ")


if __name__ == "__main__":
    main()
