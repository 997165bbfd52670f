"""Where an eval run's generalization comes from: its post-edit records split by how each record's
paraphrases word what follows the subject, and by whether a later record of the run edits the
same subject again (issue 18).

An edit is written at the subject's last token and read after the rest of the prompt. A
paraphrase that keeps the words after the subject asks for the answer where the edit was
trained; one that rewords them, or ends at the subject, asks somewhere else. Each record falls in
one group when all its paraphrases do (CounterFact has two), else in "mixed". A record whose
subject a later record edits again is split off by whether that later edit asks for the same
answer (zsRE re-asks a fact in other words) or another one.

    python benchmarks/paraphrase_split.py RUN_DIR [--dataset SPEC] [--json]

RUN_DIR is an `alphaedit eval --out` folder (its run.json names the dataset and the number of
records, its records.jsonl holds each record's pre- and post-edit scores); `--dataset` overrides
the dataset spec when run.json's relative path does not resolve from here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alphaedit.eval.datasets import EvalRecord, load_dataset

METRICS = ("efficacy", "generalization", "specificity", "generative_success")
KEEPS, REWORDS, ENDS, ELSEWHERE = ("keeps the words after the subject", "rewords the words after the subject",
                                   "the subject ends the paraphrase", "the subject is not in the paraphrase verbatim")


def wording(paraphrase: str, prompt: str, subject: str) -> str:
    """How a paraphrase words what follows the subject, against the edited prompt ("... {} ...")."""
    if subject not in paraphrase:
        return ELSEWHERE
    after = paraphrase.split(subject, 1)[1]
    if after.strip() == prompt.split("{}", 1)[1].strip():
        return KEEPS
    return ENDS if not after.strip(" ?.!,'s\u2019") else REWORDS


def groups(records: list[EvalRecord]) -> tuple[list[str], list[str]]:
    """Per record: its paraphrases' wording group, and whether its subject is edited again later."""
    by_wording = []
    for rec in records:
        kinds = {wording(p, rec.request.prompt, rec.request.subject) for p in rec.paraphrases}
        by_wording.append(kinds.pop() if len(kinds) == 1 else "mixed")
    later: dict[str, list[str]] = {}
    by_sequence = []
    for rec in reversed(records):  # what the records after each one ask of its subject
        answers = later.setdefault(rec.request.subject, [])
        if not answers:
            by_sequence.append("the last edit of its subject")
        elif all(a == rec.request.target_new for a in answers):
            by_sequence.append("its subject edited again later, the same answer")
        else:
            by_sequence.append("its subject edited again later, another answer")
        answers.append(rec.request.target_new)
    return by_wording, by_sequence[::-1]


def split(run_dir: str, dataset: str | None = None) -> dict:
    args = json.loads((Path(run_dir) / "run.json").read_text())["args"]
    rows = [json.loads(line) for line in (Path(run_dir) / "records.jsonl").read_text().splitlines() if line.strip()]
    records = load_dataset(dataset or args["dataset"])[: args["n"]]
    if [r.case_id for r in records] != [row["case_id"] for row in rows]:
        raise SystemExit(f"{run_dir}/records.jsonl does not list the first {args['n']} records of {dataset or args['dataset']} "
                         "in order; pass the run's dataset with --dataset")
    by_wording, by_sequence = groups(records)
    out = {}
    for name, labels in (("wording", by_wording), ("sequence", by_sequence)):
        table = {}
        for label in dict.fromkeys(labels):
            posts = [row["post"] for row, l in zip(rows, labels) if l == label]
            table[label] = {"records": len(posts), **{m: 100 * sum(p[m] for p in posts) / len(posts)
                                                      for m in METRICS if all(p.get(m) is not None for p in posts)}}
        out[name] = table
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--dataset", default=None, help="the run's dataset spec, if run.json's does not resolve from here")
    parser.add_argument("--json", action="store_true", help="print only JSON")
    args = parser.parse_args()
    result = split(args.run_dir, args.dataset)
    if args.json:
        print(json.dumps(result))
        return
    for name, table in result.items():
        print(f"\nby {name}:")
        print(f"{'group':<50} {'records':>7} " + " ".join(f"{m[:8]:>8}" for m in METRICS))
        for label, row in table.items():
            print(f"{label:<50} {row['records']:>7} " + " ".join(f"{row[m]:8.1f}" if m in row else f"{'–':>8}" for m in METRICS))


if __name__ == "__main__":
    main()
