"""The six-task general-capability check: metrics against sklearn, parsing as the authors' harness,
and the batched check against a float64 one-prompt-at-a-time reference."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef
from transformers import AutoModelForCausalLM, LlamaConfig

from alphaedit.eval.general import FEW_SHOT_POOL, INVALID, TASKS, GeneralCheck, load_task_records, matthews, weighted_f1
from alphaedit.prompts import bos_prefix

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue_eval"
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("seed", range(30))
def test_metrics_equal_sklearn(seed):
    rng = random.Random(seed)
    classes = [0, 1] if seed % 3 else [0, 1, 2, 3]
    n = rng.randint(1, 40)
    labels = [rng.choice(classes) for _ in range(n)]
    predictions = [rng.choice([*classes, INVALID]) for _ in range(n)]
    if seed == 0:
        predictions = [INVALID] * n  # nothing valid: F1 0, MCC undefined -> 0
    assert weighted_f1(labels, predictions) == pytest.approx(f1_score(labels, predictions, average="weighted", zero_division=0), abs=1e-12)
    assert matthews(labels, predictions) == pytest.approx(matthews_corrcoef(labels, predictions), abs=1e-12)


@pytest.mark.parametrize(
    "task, continuation, expected",
    [
        ("sst2", " positive\n", 1),
        ("sst2", " Negative review", 0),
        ("sst2", " neutral", INVALID),
        ("sst2", " good.\nSentiment : negative", 0),  # read after the cue's last occurrence, as their split
        ("mrpc", " Yes, they are", 1),
        ("mrpc", " Not really", 0),  # their substring test: "no" is in "not"
        ("cola", " yes", 1),
        ("rte", " True", 0),  # GLUE coding: 0 = entailment
        ("rte", " true or false", 1),  # "false" is looked for first
        ("mmlu", " B\n", 1),
        ("mmlu", " B", INVALID),  # the letter must end a line
        ("mmlu", " (C) is d\n", 3),  # their order: a, b, c, d, first found wins
        ("nli", " False", 0),
        ("nli", " TRUE", 1),
    ],
)
def test_parse_as_the_harness(task, continuation, expected):
    assert TASKS[task].parse(continuation) == expected


def test_most_probable_label_rules():
    assert TASKS["sst2"].most_probable([-1.0, -2.0]) == 1
    assert TASKS["sst2"].most_probable([-2.0, -2.0]) == 0  # a tie goes to the second label, as their `>`
    assert TASKS["rte"].most_probable([-1.0, -2.0]) == 0  # "True" = entailment = GLUE 0
    assert TASKS["mmlu"].most_probable([-3.0, -1.0, -2.0, -4.0]) == 1
    assert TASKS["mmlu"].most_probable([-1.0, -1.0, -2.0, -4.0]) == INVALID


@pytest.mark.skipif(not GLUE.is_dir(), reason="the shared glue_eval data is not beside the checkout")
def test_records_and_prompts_follow_the_spec():
    for name in TASKS:
        records = load_task_records(GLUE, name, 100)
        lines = GLUE.joinpath(f"{name}.jsonl").read_text().splitlines()
        assert len(records) == 100 and records[0] == json.loads(lines[FEW_SHOT_POOL])  # the pool is skipped
    sst = load_task_records(GLUE, "sst2", 1)[0]
    assert TASKS["sst2"].prompt(sst) == f"Review :{sst['sentence']}\nSentiment :"
    mmlu = load_task_records(GLUE, "mmlu", 1)[0]
    c = mmlu["choices"]
    assert TASKS["mmlu"].prompt(mmlu) == f"Question: {mmlu['question']}\n(A) {c[0]}\n(B) {c[1]}\n(C) {c[2]}\n(D) {c[3]}\nAnswer:"
    nli = load_task_records(GLUE, "nli", 1)[0]
    assert TASKS["nli"].label(nli) == (1 if nli["label"] == "entailment" else 0)


def test_missing_or_broken_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="sst2.jsonl is missing"):
        load_task_records(tmp_path, "sst2", 5)
    lines = [json.dumps({"sentence": f"s{i}", "label": 1}) for i in range(FEW_SHOT_POOL)] + ['{"sentence": "x"}']
    tmp_path.joinpath("sst2.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"sst2.jsonl, line 11: not a sst2 record \(KeyError"):
        load_task_records(tmp_path, "sst2", 5)


@pytest.fixture(scope="module")
def long_llama(vocab_size):
    """A tiny Llama with room for MMLU's long prompts under the test tokenizer's small vocabulary."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config).eval()


def _reference(model, tokenizer, task, record, gen_len):
    """One prompt at a time, float64: greedy tokens and each label word's mean log-probability."""
    prompt = task.prompt(record)
    ids = bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    row = torch.tensor([ids])
    for _ in range(gen_len):
        with torch.no_grad():
            nxt = model(row).logits[0, -1].argmax()
        row = torch.cat([row, nxt.view(1, 1)], 1)
    generated = tokenizer.decode(row[0, len(ids):].tolist(), skip_special_tokens=True)
    mean_logp = {}
    for word, _ in task.choices:
        label = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]  # the word alone, after the prompt's tokens
        with torch.no_grad():
            logp = model(torch.tensor([ids + label])).logits[0].log_softmax(-1)
        mean_logp[word] = sum(logp[len(ids) + j - 1, label[j]].item() for j in range(len(label))) / len(label)
    return generated, mean_logp


@pytest.mark.skipif(not GLUE.is_dir(), reason="the shared glue_eval data is not beside the checkout")
@pytest.mark.parametrize("tokenizer_name", ["tokenizer", "bos_tokenizer"])
def test_batched_check_equals_float64_reference(long_llama, tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    check = GeneralCheck(long_llama, tokenizer, GLUE, tests=6, tasks=("sst2", "rte", "mmlu"))
    scores, rows = check.run()
    reference = copy.deepcopy(long_llama).double()
    for name in ("sst2", "rte", "mmlu"):
        task = TASKS[name]
        for record, row in zip(check.records[name], rows[name]):
            generated, mean_logp = _reference(reference, tokenizer, task, record, check.gen_len)
            assert row["generated"] == generated
            assert row["answer"] == task.parse(generated)
            for word in mean_logp:
                assert row["mean_logp"][word] == pytest.approx(mean_logp[word], abs=1e-4)
        labels = [task.label(r) for r in check.records[name]]
        assert scores[name]["f1"] == pytest.approx(f1_score(labels, [r["answer"] for r in rows[name]], average="weighted", zero_division=0))
        assert scores[name]["f1_label"] == pytest.approx(
            f1_score(labels, [r["most_probable"] for r in rows[name]], average="weighted", zero_division=0))
        assert scores[name]["total"] == 6
    # both ways of scoring the labels ran: read off the first generation step, and teacher-forced
    one_token = {name: all(len(tokenizer(f" {w}", add_special_tokens=False)["input_ids"]) == 1 for w, _ in TASKS[name].choices)
                 for name in ("sst2", "rte", "mmlu")}
    assert set(one_token.values()) == {True, False}, one_token


def test_fluency_texts_are_the_full_budget_long_and_go_on_past_the_end_of_sequence(llama, tokenizer):
    """ROME's generate_fast: every text is `max_length` tokens, prompt included, EOS or not."""
    from alphaedit.generate import generate_rows, prompt_ids

    model, _ = llama
    rows = sorted([prompt_ids(tokenizer, p) for p in ("The Eiffel Tower is", "A", "Because the river flows north, the valley")], key=len)
    first = generate_rows(model, tokenizer, rows, 1)  # the greedy next token of each row
    model.generation_config.eos_token_id = first[0][0]  # make that token the end of sequence
    try:
        stopping = generate_rows(model, tokenizer, rows[:1], 10)
        assert len(stopping[0]) == 1  # a plain generation stops there
        full = generate_rows(model, tokenizer, rows, 0, total_length=30)
        assert [len(r) + len(new) for r, new in zip(rows, full)] == [30, 30, 30]
        assert full[0][0] == first[0][0]  # it went on past the end-of-sequence token
    finally:
        model.generation_config.eos_token_id = 0
