"""Model-facing evaluation, batched across records: dozens of sequences per forward pass."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..generate import TOP5, end_of_turn_ids, generate_rows, greedy_completions, prompt_ids, seeded, until_end
from ..prompts import chat_prompt, has_chat_template, target_ids
from ..teacher_forcing import continuation_accuracy, teacher_forced
from .datasets import EvalRecord
from .metrics import TfIdf, mean, ngram_entropy, perplexity
from .judge import AnswerJudge
from .questions import states


ROLES = ("rewrite", "paraphrase", "neighbourhood")
# Every function below that runs the model over many records takes `on_pass(done, in all)`, called
# as each batched pass ends (tokens or rows, whatever its passes count): the evaluator's progress.
OnPass = Callable[[int, int], None] | None


def _probes(records: Sequence[EvalRecord]) -> list[tuple[int, str, str, str]]:
    """(record index, role, prompt, expected answer) for every prompt of every record.

    Rewrite and paraphrase prompts expect the new object; neighbourhood prompts their own
    answer when the dataset gives one (zsRE), else the record's true object (CounterFact).
    """
    probes = []
    for i, rec in enumerate(records):
        probes.append((i, "rewrite", rec.request.text(), rec.request.target_new))
        probes += [(i, "paraphrase", text, rec.request.target_new) for text in rec.paraphrases]
        answers = rec.neighbourhood_answers or [rec.request.target_true or ""] * len(rec.neighbourhood)
        probes += [(i, "neighbourhood", text, answer) for text, answer in zip(rec.neighbourhood, answers)]
    return probes


def _per_record(records: Sequence[EvalRecord], probes, values) -> list[dict]:
    grouped = [{role: [] for role in ROLES} for _ in records]
    for (i, role, _, _), value in zip(probes, values):
        grouped[i][role].append(value)
    names = {"rewrite": "efficacy", "paraphrase": "generalization", "neighbourhood": "specificity"}
    return [{names[role]: mean(g[role]) for role in ROLES} for g in grouped]


def _easyedit_accuracies(records: Sequence[EvalRecord], probes, top1: Sequence[torch.Tensor]) -> list[dict]:
    """EasyEdit's rewrite_acc and rephrase_acc: the fraction of the new object's tokens that are the
    teacher-forced argmax after the rewrite prompt and after the paraphrases (EasyEdit's
    `compute_rewrite_or_rephrase_quality`). Its locality compares the edited model's argmax with the
    unedited one's, which this evaluation does not keep: that name is not reported."""
    acc = [{"rewrite": [], "paraphrase": []} for _ in records]
    for (i, role, _, _), hits in zip(probes, top1):
        if role in acc[i]:
            acc[i][role].append(hits.float().mean().item())
    return [{"rewrite_acc": mean(a["rewrite"]), "rephrase_acc": mean(a["paraphrase"])} for a in acc]


def counterfact_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[EvalRecord],
                       on_pass: OnPass = None) -> list[dict]:
    """Per record: efficacy, generalization, specificity (CounterFact, §3.3), batched; and
    EasyEdit's token accuracies of the new object, from the same passes.

    Each prompt compares the mean token NLL of the new and the true object; rewrite and
    paraphrase prompts succeed when the new one wins, neighbourhood prompts when it loses.
    """
    probes = [p for p in _probes(records) if records[p[0]].request.target_true]
    prompts = [p[2] for p in probes]
    new = [records[p[0]].request.target_new for p in probes]
    true = [records[p[0]].request.target_true for p in probes]
    scored = teacher_forced(model, tokenizer, prompts + prompts, new + true, on_pass=on_pass)
    nll = torch.stack([-logp.mean() for logp, _ in scored])
    new_wins = (nll[: len(prompts)] < nll[len(prompts) :]).tolist()
    values = [float(w if p[1] != "neighbourhood" else not w) for p, w in zip(probes, new_wins)]
    accuracies = _easyedit_accuracies(records, probes, [top1 for _, top1 in scored[: len(prompts)]])
    return [{**scores, **acc} for scores, acc in zip(_per_record(records, probes, values), accuracies)]


def zsre_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[EvalRecord],
                on_pass: OnPass = None) -> list[dict]:
    """Per record: teacher-forced token accuracy of each prompt's expected answer (§3.4); on
    rewrite and paraphrase prompts that is EasyEdit's rewrite_acc and rephrase_acc."""
    probes = _probes(records)
    accuracy = continuation_accuracy(model, tokenizer, [p[2] for p in probes], [p[3] for p in probes], on_pass=on_pass)
    per_record = _per_record(records, probes, accuracy)
    return [{**r, "rewrite_acc": r["efficacy"], "rephrase_acc": r["generalization"]} for r in per_record]


def generative_success(model, tokenizer, records: Sequence[EvalRecord], on_pass: OnPass = None) -> list[bool]:
    """Does the greedy continuation of the rewrite prompt begin with the new object?"""
    prompts = [r.request.text() for r in records]
    lengths = max(len(target_ids(tokenizer, r.request.target_new)) for r in records)
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens=lengths + 1, on_pass=on_pass)
    return [c.strip().startswith(r.request.target_new.strip()) for c, r in zip(completions, records)]


def _question_prompt(tokenizer, question: str, chat: bool) -> str:
    """A question as a user asks it: in the chat template, or else as "Question: ...\nAnswer:"."""
    return chat_prompt(tokenizer, question) if chat else f"Question: {question}\nAnswer:"


def chat_answers(model, tokenizer, questions: Sequence[str], max_new_tokens: int = 32, on_pass: OnPass = None) -> list[str]:
    """The model's greedy answer to each question, asked as a user would ask it: in the chat
    template when the tokenizer has one (the answer ends at the end of the turn), else as
    "Question: ...\nAnswer:" (the answer ends at the line's end). No cut at any target's length."""
    chat = has_chat_template(tokenizer)
    rows = [prompt_ids(tokenizer, _question_prompt(tokenizer, q, chat)) for q in questions]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    new = generate_rows(model, tokenizer, [rows[i] for i in order], max_new_tokens, rows_per_pass=64, on_pass=on_pass)
    ends = end_of_turn_ids(model, tokenizer)
    answers = [""] * len(rows)
    for i, tokens in zip(order, new):
        text = tokenizer.decode(until_end(tokens, ends)[0], skip_special_tokens=True).strip()
        answers[i] = text if chat else text.split("\n")[0]
    return answers


def own_conversations(model, tokenizer, questions: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """Each question and the model's own free answer (chat_answers), as the text the model reads
    while it answers: what `Editor.hold` keeps when the questions are about subjects nobody edits."""
    chat = has_chat_template(tokenizer)
    answers = chat_answers(model, tokenizer, questions, max_new_tokens)
    return [_question_prompt(tokenizer, q, chat) + (a if chat else f" {a}") for q, a in zip(questions, answers)]


def chat_scores(model, tokenizer, records: Sequence[EvalRecord], max_new_tokens: int = 32, neighbours: int | None = 4,
                judge: AnswerJudge | None = None, on_pass: OnPass = None) -> list[dict]:
    """Generation-based success per record (questions.py): does the free answer to the edited
    fact's question state the new object (chat_success), do the answers to its paraphrased
    questions (chat_paraphrase), and do the neighbours' answers still state their own object
    (chat_locality; the first `neighbours` of each record, all with None), and how often do they
    state the edit's new object instead (chat_leak)? Records without questions get no value. Free
    answers cost a decoding step per token: ~12 questions a record with every CounterFact
    neighbour, 6 with four. With a `judge` (judge.py), each answer's verdict too: the three
    metrics as the judge counts them (…_judged) and the share of answers where it agrees with
    the match (judge_agreement)."""
    asked = []  # (record index, role, question, object the answer should state)
    for i, rec in enumerate(records):
        if rec.chat is None:
            continue
        new = rec.request.target_new
        asked.append((i, "chat_success", rec.chat.question, new))
        asked += [(i, "chat_paraphrase", q, new) for q in rec.chat.paraphrases]
        asked += [(i, "chat_locality", q, a) for q, a in list(zip(rec.chat.neighbours, rec.chat.neighbour_answers))[:neighbours]]
    answers = chat_answers(model, tokenizer, [a[2] for a in asked], max_new_tokens, on_pass) if asked else []
    verdicts = judge.verdicts([(q, answer, obj) for (_, _, q, obj), answer in zip(asked, answers)]) if judge else None
    return score_chat_answers(records, asked, answers, verdicts)


def score_chat_answers(records: Sequence[EvalRecord], asked: Sequence[tuple[int, str, str, str]],
                       answers: Sequence[str], verdicts: Sequence[bool] | None = None) -> list[dict]:
    """chat_scores' tally, given the free answer to each asked question. Besides the three
    metrics, chat_leak: the share of a record's neighbour answers that state the record's *new*
    object (the edit carried over to other subjects asked the same question), and the answers
    themselves (chat_answer, chat_neighbour_answers) for a reader of records.jsonl."""
    hits: list[dict[str, list[float]]] = [{} for _ in records]
    out: list[dict] = [{} for _ in records]
    for k, ((i, role, _, obj), answer) in enumerate(zip(asked, answers)):
        stated = states(answer, obj)
        hits[i].setdefault(role, []).append(float(stated))
        if verdicts is not None:
            hits[i].setdefault(f"{role}_judged", []).append(float(verdicts[k]))
            hits[i].setdefault("judge_agreement", []).append(float(verdicts[k] == stated))
        if role == "chat_success":
            out[i]["chat_answer"] = answer
        elif role == "chat_locality":
            hits[i].setdefault("chat_leak", []).append(float(states(answer, records[i].request.target_new)))
            out[i].setdefault("chat_neighbour_answers", []).append(answer)
    for row, h in zip(out, hits):
        row.update({role: mean(values) for role, values in h.items()})
    return out


def sample_texts(model, tokenizer, prompts: Sequence[str], max_length: int = 100, seed: int = 0, on_pass: OnPass = None) -> list[str]:
    """Each prompt continued by top-5 sampling to `max_length` tokens in all, seeded: ROME's
    generate_fast (util/generate.py), which the authors' fluency and consistency use.

    As theirs: the budget is per text (prompt included), generation goes on past the end-of-sequence
    token, and the text is NFKD-normalised with blank lines joined. Theirs deletes GPT-2's
    "<|endoftext|>" from the text; we delete every special token of the model's own tokenizer (its
    EOS, chat markers), the same rule for any model.
    """
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    with seeded(model, seed):
        # wide passes: on a CPU a decoding step costs about as much for 64 rows as for 16
        new = generate_rows(model, tokenizer, [rows[i] for i in order], max_length, TOP5, rows_per_pass=64, total_length=max_length,
                            on_pass=on_pass)
    texts = [""] * len(rows)
    for i, tokens in zip(order, new):
        text = tokenizer.decode(rows[i] + tokens, skip_special_tokens=True)
        texts[i] = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    return texts


def generation_scores(model, tokenizer, records: Sequence[EvalRecord], tfidf: TfIdf, seed: int = 0,
                      references: Sequence[list[str]] | None = None, on_pass: OnPass = None) -> list[dict]:
    """Fluency (n-gram entropy ×1, scaled later) and consistency (TF-IDF cosine of the texts with
    the record's references: `references`, else its own stand-in texts) per record."""
    prompts = [p for r in records for p in r.generation_prompts]
    texts = sample_texts(model, tokenizer, prompts, seed=seed, on_pass=on_pass)
    references = references if references is not None else [r.reference_texts for r in records]
    out, k = [], 0
    for rec, refs in zip(records, references):
        own = texts[k : k + len(rec.generation_prompts)]
        k += len(rec.generation_prompts)
        out.append({
            "fluency": mean(ngram_entropy(t) for t in own),
            "consistency": tfidf.cosine(" ".join(own), " ".join(refs)) if refs else None,
        })
    return out


def wikitext_perplexity(model, tokenizer, windows: Sequence[list[int]], on_pass: OnPass = None) -> float:
    """exp(mean token NLL) over held-out token windows."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for k, window in enumerate(windows):
            ids = torch.tensor([window], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()  # on the head's device
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="sum").item()
            count += len(window) - 1
            if on_pass is not None:
                on_pass(k + 1, len(windows))
    return perplexity(total, count)
