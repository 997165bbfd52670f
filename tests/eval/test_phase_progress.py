"""A long evaluation phase tells its progress: the passes report what they have done, and the
evaluator turns that into a share and an ETA at most every `tick_seconds`."""

from __future__ import annotations

import pytest
import torch

from alphaedit.eval.datasets import EvalRecord
from alphaedit.eval.evaluator import EvalSettings, Evaluator
from alphaedit.generate import generate_rows, prompt_ids
from alphaedit.requests import EditRequest
from alphaedit.teacher_forcing import teacher_forced

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["The mother tongue of Danielle Darrieux is", "The Eiffel Tower is located in the city of", "Paris is the capital of",
           "Montesquieu spoke the language", "The Louvre is in"]
ANSWERS = ["English", "Rome", "France", "French", "Paris"]


def test_teacher_forced_reports_every_pass_up_to_all_its_tokens_and_scores_the_same(llama, tokenizer):
    model, _ = llama
    heard: list[tuple[int, int]] = []
    small = teacher_forced(model, tokenizer, PROMPTS, ANSWERS, tokens_per_pass=16, on_pass=lambda d, t: heard.append((d, t)))
    whole = teacher_forced(model, tokenizer, PROMPTS, ANSWERS)
    assert len(heard) > 2  # 16 tokens a pass: several passes
    done = [d for d, _ in heard]
    assert done == sorted(done) and len(set(done)) == len(done)  # each pass adds its tokens
    assert {t for _, t in heard} == {heard[-1][0]}  # one total, reached by the last pass
    for (logp_a, top1_a), (logp_b, top1_b) in zip(small, whole):
        torch.testing.assert_close(logp_a, logp_b, rtol=1e-5, atol=1e-5)
        assert torch.equal(top1_a, top1_b)


def test_generate_rows_reports_the_rows_done_after_each_pass(llama, tokenizer):
    model, _ = llama
    rows = [prompt_ids(tokenizer, p) for p in PROMPTS]
    heard: list[tuple[int, int]] = []
    new = generate_rows(model, tokenizer, rows, 3, rows_per_pass=2, on_pass=lambda d, t: heard.append((d, t)))
    assert heard == [(2, 5), (4, 5), (5, 5)]
    assert new == generate_rows(model, tokenizer, rows, 3, rows_per_pass=2)


def test_a_phase_tells_its_share_and_eta_at_most_every_tick_seconds(monkeypatch):
    import alphaedit.eval.evaluator as evaluator_module

    clock = [100.0]
    monkeypatch.setattr(evaluator_module.time, "perf_counter", lambda: clock[0])
    heard: list[str] = []
    evaluator = Evaluator(None, None, [], EvalSettings(), on_phase=heard.append)
    evaluator.tick_seconds = 60
    with evaluator.phase("teacher-forced scores", "4 records", 4) as tick:
        clock[0] += 30
        tick(1, 4)  # 30 s in: too soon to tell
        clock[0] += 50
        tick(2, 4)  # 80 s for half: 80 s left
        clock[0] += 10
        tick(3, 4)  # 10 s after the last line: too soon
        clock[0] += 60
        tick(3, 4)  # 150 s for three quarters: 50 s left
        tick(4, 4)  # done: the end of the phase says so
    assert heard == ["teacher-forced scores (4 records) …",
                     "teacher-forced scores: 50% · ETA 00:01:20",
                     "teacher-forced scores: 75% · ETA 00:00:50",
                     "teacher-forced scores: done in 00:02:30"]


def test_the_evaluation_of_records_reports_its_phases_progress(llama, tokenizer):
    model, _ = llama
    records = [EvalRecord("counterfact", k, EditRequest("{} is located in the city of", f"Tower {k}", "Rome", "Paris"),
                          paraphrases=[f"Tower {k} can be found in"], neighbourhood=["The Louvre is located in the city of"])
               for k in range(200)]  # several passes of each phase
    heard: list[str] = []
    evaluator = Evaluator(model, tokenizer, records, EvalSettings(), on_phase=heard.append)
    evaluator.tick_seconds = 0  # every pass
    quiet = Evaluator(model, tokenizer, records, EvalSettings())
    assert evaluator.evaluate().records == quiet.evaluate().records
    for phase in ("teacher-forced scores", "generative success"):
        lines = [h for h in heard if h.startswith(f"{phase}: ") and "ETA" in h]
        assert lines, f"no progress line for {phase}: {heard}"
        shares = [int(h.split(": ")[1].split("%")[0]) for h in lines]
        assert shares == sorted(shares) and 0 < shares[0] and shares[-1] < 100
