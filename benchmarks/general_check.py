"""Cost and pre-edit scores of the six-task general-capability check (eval/general.py).

Runs the check on a model as it is (SmolLM2-135M by default) twice: with each label word's
probability read off the generation's first step (what `alphaedit eval --general` does when every
label is one token), and with one teacher-forced pass per label word (the general path); the
scores must agree, the seconds show what the first path saves. Prints the six tasks' F1 (of the
generated answer and of the most probable label), MCC and invalid answers.

    python benchmarks/general_check.py [--model smollm2-135m] [--glue DIR] [--tests 100] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

from alphaedit.eval.general import GeneralCheck, mean_f1
from alphaedit.models import load_model

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue_eval"


def _timed(check: GeneralCheck) -> tuple[dict, float]:
    start = time.perf_counter()
    scores, _ = check.run()
    return scores, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--glue", default=str(GLUE))
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device=args.device)
    fast, fast_s = _timed(GeneralCheck(model, tokenizer, Path(args.glue), args.tests))
    slow, slow_s = _timed(GeneralCheck(model, tokenizer, Path(args.glue), args.tests, teacher_forced_labels=True))
    agree = all(fast[t][k] == slow[t][k] for t in fast for k in ("f1", "f1_label", "invalid"))
    result = {"model": args.model, "tests_per_task": args.tests, "device": args.device, "machine": platform.processor() or platform.machine(),
              "date": date.today().isoformat(), "seconds_first_step_labels": fast_s, "seconds_teacher_forced_labels": slow_s,
              "scores_agree": agree, "scores": fast, "mean_f1_label": mean_f1(fast), "mean_f1": mean_f1(fast, "f1")}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}, {args.tests} records per task, {args.device}: {fast_s:.0f} s (labels from the first step) vs "
          f"{slow_s:.0f} s (teacher-forced labels); scores agree: {agree}")
    print("| task | F1 (generated) | invalid | MCC | F1 (most probable label) |\n|---|---|---|---|---|")
    for task, s in fast.items():
        print(f"| {task} | {100 * s['f1']:.1f} | {s['invalid']} | {s['mcc']:.3f} | {100 * s['f1_label']:.1f} |")
    print(f"| mean | {100 * mean_f1(fast, 'f1'):.1f} | | | {100 * mean_f1(fast):.1f} |")


if __name__ == "__main__":
    main()
