"""Reworded prompts (EditConfig.reworded_prompts; not in the paper): copies of a request's prompt
with some of the words around the subject left out, that its δ is trained on as well.

An edit is written at the subject's last token and read after the rest of the prompt. δ trained
on one wording learns the answer after those words, and a question worded differently reads less
of it: on SmolLM2 a zsRE paraphrase that rewords the question kept about two thirds of its
answer's tokens (BENCHMARKS.md, issue 18). Leaving words out is the rewording that needs no
model and no extra data: it shows δ the same subject and answer with the question only partly
there, so the answer comes to rest on the subject rather than on the exact words.

Each copy leaves out every word (a run of non-spaces) before and after the subject with
probability `drop`; the copies are drawn from a generator seeded by the request's subject and
prompt, so the same request always gets the same copies (a rerun of a run, or a request rehearsed
later, trains on what it trained on before). Copies equal to the prompt or to an earlier copy are
drawn again, at most 5·count draws in all.
"""

from __future__ import annotations

import random
import zlib

from .requests import PLACEHOLDER, EditRequest


def reworded_prompts(request: EditRequest, count: int, drop: float) -> list[str]:
    """Up to `count` prompts ('{}' where the subject goes), each `request.prompt` with some words
    left out; none for a chat turn (its prompt is a rendered conversation, not words to drop)."""
    if count <= 0 or request.chat_turn:
        return []
    before, after = request.prompt.split(PLACEHOLDER, 1)
    rng = random.Random(zlib.crc32((request.subject + request.prompt).encode()))

    def leave_out(text: str) -> str:
        # splitting on single spaces keeps the empty pieces at the ends, and with them the space
        # between the words and the subject; only words draw, so the draws depend on the words alone
        return " ".join(w for w in text.split(" ") if not w.strip() or rng.random() > drop)

    copies: list[str] = []
    for _ in range(5 * count):
        if len(copies) == count:
            break
        copy = leave_out(before).lstrip() + PLACEHOLDER + leave_out(after)
        if copy != request.prompt and copy not in copies:
            copies.append(copy)
    return copies
