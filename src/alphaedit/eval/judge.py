"""An optional judge for the generation-based evaluation (issue 15; `alphaedit eval --chat-judge`).

By default a free answer counts when it *states* the expected object: its normalised words
appear in the answer's (questions.states). That match is strict about wording ("Catholic" does
not state "Catholicism") and blind to sense ("Apple, Apple, Apple, …" states "Apple"). A judge
model reads the question, the answer and the expected object and says yes or no; its verdict is
reported beside the match, never instead of it, with the share of answers on which the two agree,
so that a reader can see whether the judge is worth believing. The judge is any causal LM the
user can load (a stronger model than the one edited, unedited); nothing is downloaded for it.

A verdict is one forward pass: the judge's probability mass on "yes" against "no" as the first
token of its reply (every casing, with and without a leading space), read at the prompt's last
token. Rows are right-padded, so each row's logits are those of the prompt alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..generate import prompt_ids
from ..prompts import batch_rows, chat_text, has_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ASK = ('Question: {question}\nAnswer: {answer}\n\n'
       'Does this answer say that the answer to the question is "{expected}"? Reply with yes or no.')
YES_WORDS = ("yes", "Yes", "YES")
NO_WORDS = ("no", "No", "NO")


def reply_tokens(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """The first token of each word, bare and after a space: how a reply may begin."""
    return sorted({tokenizer(w, add_special_tokens=False)["input_ids"][0] for word in words for w in (word, " " + word)})


class AnswerJudge:
    """Verdicts of a judge model on (question, answer, expected object) triples."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, rows_per_pass: int = 16):
        self.model, self.tokenizer, self.name, self.rows_per_pass = model, tokenizer, name, rows_per_pass
        self.yes, self.no = reply_tokens(tokenizer, YES_WORDS), reply_tokens(tokenizer, NO_WORDS)
        if set(self.yes) & set(self.no):
            raise ValueError(f"the judge's tokenizer ({name}) starts 'yes' and 'no' with a shared token: it cannot tell its verdicts apart")

    def prompt(self, question: str, answer: str, expected: str) -> str:
        """What the judge reads: the question in its chat template when it has one, else as text."""
        ask = ASK.format(question=question, answer=answer, expected=expected)
        return chat_text(self.tokenizer, [{"role": "user", "content": ask}]) if has_chat_template(self.tokenizer) else ask + "\nReply:"

    def log_odds(self, items: Sequence[tuple[str, str, str]]) -> torch.Tensor:
        """log P(yes) − log P(no) of the reply's first token, per (question, answer, expected), [n]."""
        rows = [prompt_ids(self.tokenizer, self.prompt(*item)) for item in items]
        device = next(self.model.parameters()).device
        out = torch.zeros(len(rows))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a pass
        for start in range(0, len(order), self.rows_per_pass):
            chunk = order[start : start + self.rows_per_pass]
            batch = batch_rows(self.tokenizer, [rows[i] for i in chunk], [len(rows[i]) - 1 for i in chunk]).to(device)
            with torch.no_grad():
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            last = logits[batch.rows, batch.lookup].float().log_softmax(-1)  # [chunk, vocab]: each prompt's last token
            odds = torch.logsumexp(last[:, self.yes], -1) - torch.logsumexp(last[:, self.no], -1)
            out[chunk] = odds.cpu()
        return out

    def verdicts(self, items: Sequence[tuple[str, str, str]]) -> list[bool]:
        """Does the judge say yes (more mass on yes than on no) to each?"""
        return [bool(v > 0) for v in self.log_odds(items)]
