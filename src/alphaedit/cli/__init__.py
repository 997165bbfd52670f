"""The `alphaedit` command line.

    edit      apply edit requests in sequential batches to a state folder (journal)
    ask       complete prompts with the edited (or an unedited) model
    stats     compute or import the preserved-knowledge statistics C0 (cached, resumable)
    log       list a state's batches          revert   undo one batch
    export    write the edited model or just its updates
    recover   rebuild a lost or damaged journal.json from the batch folders
    apply     replay a state onto a fresh copy of the base model
    methods   the editing methods and their options
    compare   runs side by side: one table per model, dataset and number of edits, and plots
    eval      the paper's protocol: edit N records in batches, evaluate before and after (resumable)
    multihop  MQuAKE portability: edit single hops, ask the multi-hop question
    serve     a local workbench: HTTP API, web page and OpenAI-compatible endpoint for the edited model
    demo      ten edits to the bundled SmolLM2, before/after

Each group of commands is a module of this package (common.py holds what they share); importing
them registers their commands on the app, in the order `--help` lists them.
"""

from __future__ import annotations

from . import editing, statistics, states, evaluation, service  # noqa: F401  (registers the commands)
from .common import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
