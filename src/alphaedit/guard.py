"""A collapse guard for long sequences (issue 14): refuse a batch that disturbs the model too much.

Long sequences of edits fail by growth: the edited matrices' norms climb batch after batch until
the edits overwrite each other and unrelated answers drift (the lifelong-editing papers all name
this). The guard checks two things after a batch is applied and before it is committed:

- growth: σ_max(W_out) of every edited layer against the base model's, at most `max_growth`;
- drift: the share of probe prompts whose greedy next token this batch changed, at most
  `max_drift`. The probes are general-knowledge cloze prompts (`DEFAULT_PROBES`, or the user's);
  a probe that names a subject the batch edits is left out, since its answer may rightly change.

A batch that trips it is taken back exactly (the weights and C_p as they were before it) and
the error says what tripped and by how much; the journal never sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .generate import generate_rows, prompt_ids
from .requests import EditRequest

DEFAULT_PROBES = (
    "The capital of France is", "The capital of Japan is", "The capital of Italy is", "The capital of Germany is",
    "The largest ocean on Earth is the", "Water is made of hydrogen and", "The Eiffel Tower is located in",
    "The Great Wall is located in", "The Statue of Liberty is located in", "The Colosseum is located in",
    "Albert Einstein was born in", "William Shakespeare was born in", "Barack Obama was born in",
    "The official language of Brazil is", "The official language of Mexico is", "The official language of Egypt is",
    "The currency of Japan is the", "The currency of the United Kingdom is the", "Mount Everest is located in",
    "The Amazon River flows through", "The iPhone is made by", "Windows is developed by", "The Mona Lisa was painted by",
    "The Beatles were a band from", "The Nile flows through", "Toyota is headquartered in", "The sun rises in the",
    "Paris is the capital of", "Tokyo is the capital of", "Berlin is the capital of", "Madrid is the capital of",
    "The chemical symbol for gold is", "The first man on the Moon was", "Football is also known as",
    "The Taj Mahal is located in", "Sydney is a city in", "Toronto is a city in", "Lionel Messi plays",
    "The author of Harry Potter is", "The President of the United States lives in the",
)


class GuardTripped(ValueError):
    """A batch the guard refused; the editor has taken it back."""


@dataclass
class Guard:
    max_growth: float = 1.5  # σ_max(W) / σ_max(W_base), any edited layer, after the batch
    max_drift: float = 0.10  # share of probes whose greedy next token the batch changed
    probes: Sequence[str] = field(default_factory=lambda: list(DEFAULT_PROBES))

    def usable_probes(self, requests: Sequence[EditRequest]) -> list[str]:
        subjects = [r.subject.lower() for r in requests]
        return [p for p in self.probes if not any(s in p.lower() for s in subjects)]

    def next_tokens(self, model, tokenizer, prompts: Sequence[str]) -> list[int]:
        if not prompts:
            return []
        rows = [prompt_ids(tokenizer, p) for p in prompts]
        return [t[0] for t in generate_rows(model, tokenizer, rows, 1, rows_per_pass=64)]  # greedy

    def verdict(self, growth: dict[str, dict[str, float]], prompts: Sequence[str], before: Sequence[int], after: Sequence[int],
                tokenizer) -> str | None:
        """Why the batch must not be committed, or None."""
        problems = []
        worst = max(growth.items(), key=lambda item: item[1]["spectral"], default=None)
        if worst is not None and worst[1]["spectral"] > self.max_growth:
            problems.append(f"σ_max of layer {worst[0]}'s W_out would be {worst[1]['spectral']:.3f}× the base model's "
                            f"(limit {self.max_growth:g})")
        changed = [(p, b, a) for p, b, a in zip(prompts, before, after) if a != b]
        if prompts and len(changed) / len(prompts) > self.max_drift:
            shown = "; ".join(f"{p!r}: {tokenizer.decode([b])!r} → {tokenizer.decode([a])!r}" for p, b, a in changed[:3])
            problems.append(f"{len(changed)} of {len(prompts)} probe prompts ({100 * len(changed) / len(prompts):.0f}%) changed their "
                            f"next token (limit {100 * self.max_drift:.0f}%): {shown}")
        return "; ".join(problems) or None
