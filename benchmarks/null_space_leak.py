"""How much of the preserved knowledge AlphaEdit's "null space" really leaves alone, per projector
rule, and what a run's edits did to it (issues 10 and 14: why the projection preserves less on a
small model than in the paper).

An update projected onto P (the eigen-directions of C0 = E[k kᵀ] that the projector rule keeps)
changes the MLP output at a key k only through P k. For each edited layer and each rule: the rank
of P, the share of C0's trace inside P (the corpus keys' energy the projection does not protect),
and the same share, ‖K P‖²_F / ‖K‖²_F, for the keys of sample texts: the statistics' own windows,
held-out text and edit-like prompts (CounterFact neighbourhood prompts). With --state, the
relative change of the MLP output that the journal's summed update makes at those keys, the
mean over tokens of ‖(ΣΔ) k‖ / ‖W0 k‖, keys read on the unedited model; and the mean energy
‖Pk‖² of the first batch's edited keys inside each projector's range, the scale that AlphaEdit's
α (`--l2`) is weighed against in the solve (the paper's 10 is small next to SmolLM2's 30–48).
With --room K, how full the null space gets over a long run (issue 14): every K batches, the
directions of the null space in which the earlier batches' keys weigh more than α in the solve
(eigenvalues of Uᵀ C_p U, U the null space's basis, C_p = Σ K_pᵀ K_p), and the share of the next
batch's keys' null-space energy that falls in them: an edit there can only be written by moving
what the earlier ones wrote.

    python benchmarks/null_space_leak.py --state RUN/state [--batches N] [--held-out FILE] [--dataset counterfact:FILE] [--json]
    python benchmarks/null_space_leak.py --state RUN/state --room 10 [--rules absolute:0.02]
    python benchmarks/null_space_leak.py --model smollm2-135m --corpus FILE --tokens 100000 [--rules absolute:0.02,energy:0.9]
"""

from __future__ import annotations

import argparse
import json

import torch

from alphaedit.config import config_for_model
from alphaedit.eval.datasets import load_dataset
from alphaedit.hooks import trace
from alphaedit.journal import Journal
from alphaedit.layouts import Layout, detect_layout, mlp_out_weight, weight_as_math
from alphaedit.models import load_model
from alphaedit.prompts import bos_prefix
from alphaedit.stats import CorpusSpec, StatsCache, second_moments
from alphaedit.stats.corpus import file_windows
from alphaedit.updates import null_space_mask, null_space_projector, update_from_tensors

DEFAULT_RULES = "absolute:0.02,energy:0.8,energy:0.9,energy:0.99"


def parse_rules(text: str) -> list[tuple[str, float]]:
    rules = []
    for item in text.split(","):
        rule, _, value = item.partition(":")
        if not value:
            raise SystemExit(f"--rules: {item!r} is not RULE:VALUE (e.g. absolute:0.02 or energy:0.9)")
        rules.append((rule.strip(), float(value)))
    return rules


def read_keys(model, layout: Layout, rows: list[list[int]], layers: list[int]) -> dict[int, torch.Tensor]:
    """The keys (W_out's inputs) of every token of `rows`, one row per pass: {layer: [tokens, d0]} float64."""
    paths = {l: layout.mlp_out_path(l) for l in layers}
    keys: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    device = next(model.parameters()).device
    with torch.no_grad():
        for ids in rows:
            with trace(model, inputs_of=list(paths.values())) as recording:
                model(torch.tensor([ids], device=device))
            for l, path in paths.items():
                keys[l].append(recording.inputs[path][0].double().cpu())
    return {l: torch.cat(k) for l, k in keys.items()}


def summed_updates(state: str, layers: list[int], batches: int | None = None) -> dict[int, torch.Tensor]:
    """Σ of the applied (not reverted) batches' updates per layer, [d, d0] float64; of the first
    `batches` of them when given."""
    journal = Journal.open(state)
    total: dict[int, torch.Tensor] = {}
    for batch_id in journal.applied_batch_ids()[:batches]:
        tensors = journal.batch(batch_id).tensors()
        for l in layers:
            delta = update_from_tensors(tensors, f"layer.{l}").dense().double()
            total[l] = total[l] + delta if l in total else delta
    return total


def first_batch_keys(state: str, layers: list[int]) -> dict[int, torch.Tensor]:
    """The edited keys of the journal's first applied batch, {layer: [u, d0]} float64."""
    return batch_keys(state, layers, batches=1)[0]


def batch_keys(state: str, layers: list[int], batches: int | None = None) -> list[dict[int, torch.Tensor]]:
    """The edited keys of every applied batch (of the first `batches` when given), in order:
    [{layer: [u, d0]}] float64."""
    journal = Journal.open(state)
    return [{l: tensors[f"layer.{l}.keys"].double() for l in layers}
            for tensors in (journal.batch(b).tensors() for b in journal.applied_batch_ids()[:batches])]


def room(moment: torch.Tensor, rule: tuple[str, float], keys: list[torch.Tensor], alpha: float, every: int = 10) -> dict:
    """How full one layer's null space gets as batches accumulate. `keys`: each batch's edited keys
    [u, d0]. Before every `every`-th batch (and the last): how many null-space directions the
    earlier keys weigh more than α (and 10 α) in the projected solve, and the share of that batch's
    keys' null-space energy falling in the first kind."""
    values, vectors = torch.linalg.eigh(moment.double())
    basis = vectors[:, null_space_mask(values, rule[1], rule[0])]  # U [d0, r]
    earlier = torch.zeros(basis.shape[1], basis.shape[1], dtype=torch.float64)  # Uᵀ C_p U  [r, r]
    rows, edits_before = [], 0
    for index, k in enumerate(keys):
        inside = k.double() @ basis  # [u, r]: the keys' coordinates in the null space
        if index % every == 0 or index == len(keys) - 1:
            weights, directions = torch.linalg.eigh(earlier)
            crowded = directions[:, weights > alpha]
            rows.append({"batch": index, "edits_before": edits_before,
                         "above_alpha": int((weights > alpha).sum()), "above_10_alpha": int((weights > 10 * alpha).sum()),
                         "share": float((inside @ crowded).norm() ** 2 / inside.norm() ** 2)})
        earlier += inside.T @ inside
        edits_before += len(k)
    return {"rank": basis.shape[1], "alpha": alpha, "rows": rows}


def leak(model, layout: Layout, moments: dict[int, torch.Tensor], rules: list[tuple[str, float]],
         texts: dict[str, list[list[int]]], updates: dict[int, torch.Tensor] | None = None,
         edited: dict[int, torch.Tensor] | None = None) -> dict:
    """Per layer: for each rule the rank of P, C0's trace share in P and each text kind's key
    energy share in P; with `updates` (Σ Δ per layer, math orientation [d, d0]) the mean relative
    output change ‖ΣΔ k‖ / ‖W0 k‖ per text kind; with `edited` (keys [u, d0] per layer) their mean
    ‖Pk‖² per rule (absolute, to compare with α)."""
    layers = sorted(moments)
    keys = {name: read_keys(model, layout, rows, layers) for name, rows in texts.items()}
    out = {"layers": layers, "rules": [f"{r}:{v:g}" for r, v in rules], "texts": {n: sum(map(len, rows)) for n, rows in texts.items()},
           "projection": {}, "output_change": {}}
    for l in layers:
        c0 = moments[l].double()
        total = float(c0.trace())
        per_rule = {}
        for rule, value in rules:
            projector, rank = null_space_projector(c0, value, rule)
            projector = projector.double()
            row = {"rank": rank, "corpus_trace_share": float((projector @ c0).trace()) / total}
            for name, per_layer in keys.items():
                row[name] = float((per_layer[l] @ projector).norm() ** 2 / per_layer[l].norm() ** 2)
            if edited is not None:
                row["edited_energy"] = float(((edited[l] @ projector) ** 2).sum(-1).mean())
            per_rule[f"{rule}:{value:g}"] = row
        out["projection"][str(l)] = per_rule
        if updates is not None:
            weight = weight_as_math(layout, mlp_out_weight(model, layout, l).detach().double().cpu())  # [d, d0]
            out["output_change"][str(l)] = {name: float(((k[l] @ updates[l].T).norm(dim=-1) / (k[l] @ weight.T).norm(dim=-1)).mean())
                                            for name, k in keys.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", help="a journal folder: its model, layers and statistics corpus, and its summed update")
    parser.add_argument("--model", help="without --state: the model (a bundled alias or a folder)")
    parser.add_argument("--corpus", help="without --state: the statistics corpus (as alphaedit --corpus)")
    parser.add_argument("--tokens", type=int, default=100_000, help="without --state: the statistics' token budget")
    parser.add_argument("--rules", default=DEFAULT_RULES, help=f"projector rules RULE:VALUE, comma-separated (default {DEFAULT_RULES})")
    parser.add_argument("--texts", type=int, default=40, help="windows of 64 tokens per text kind")
    parser.add_argument("--held-out", help="a text file the statistics did not read (e.g. WikiText-2 test)")
    parser.add_argument("--dataset", help="edit-like prompts: the neighbourhood prompts of this dataset's first records")
    parser.add_argument("--batches", type=int, help="with --state: the first N applied batches only (default all)")
    parser.add_argument("--room", type=int, metavar="K", help="with --state: how full the null space gets, every K batches "
                        "(the first rule's projector, α from the journal)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.room and not args.state:
        raise SystemExit("--room reads a journal: give --state")
    if args.state:
        header = Journal.open(args.state).header
        model_spec, layers, spec = header["model"], header["config"]["layers"], CorpusSpec(**header["corpus"])
    elif args.model and args.corpus:
        model_spec, layers, spec = args.model, None, CorpusSpec(args.corpus, tokens=args.tokens)
    else:
        raise SystemExit("give --state, or --model and --corpus")
    model, tokenizer = load_model(model_spec)
    layout = detect_layout(model)
    layers = layers or config_for_model(model.config).layers
    moments = {l: m.moment for l, m in second_moments(model, layout, tokenizer, layers, spec, StatsCache(), show_progress=False).items()}
    if args.room:
        rule, alpha = parse_rules(args.rules)[0], float(header["config"]["l2_alpha"])
        keys = batch_keys(args.state, layers)
        result = {"state": args.state, "rule": f"{rule[0]}:{rule[1]:g}",
                  "layers": {str(l): room(moments[l], rule, [k[l] for k in keys], alpha, args.room) for l in layers}}
        if args.json:
            print(json.dumps(result))
            return
        print(f"{args.state}: null-space directions the earlier keys weigh more than α = {alpha:g} (10 α), and the share of "
              f"the next batch's null-space key energy in them ({result['rule']})")
        print(" | ".join(["edits before", *[f"layer {l} (rank {result['layers'][str(l)]['rank']})" for l in layers]]))
        for i, row in enumerate(result["layers"][str(layers[0])]["rows"]):
            cells = [result["layers"][str(l)]["rows"][i] for l in layers]
            print(" | ".join([str(row["edits_before"]), *[f"{c['above_alpha']} ({c['above_10_alpha']}), {c['share']:.3f}" for c in cells]]))
        return
    texts = {"corpus": file_windows(spec.corpus, tokenizer, args.texts * 63, 64)}
    if args.held_out:
        texts["held-out"] = file_windows(args.held_out, tokenizer, args.texts * 63, 64)
    if args.dataset:
        prompts = [p for r in load_dataset(args.dataset)[: args.texts] for p in r.neighbourhood[:1]]
        texts["prompts"] = [bos_prefix(tokenizer) + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    result = leak(model, layout, moments, parse_rules(args.rules), texts, summed_updates(args.state, layers, args.batches) if args.state else None,
                  first_batch_keys(args.state, layers) if args.state else None)
    result["model"], result["state"] = model_spec, args.state
    if args.json:
        print(json.dumps(result))
        return
    kinds = list(texts)
    print(f"{model_spec}: share of key energy inside the projector's range (what an update may change), per layer and rule")
    edited = ["edited keys' ‖Pk‖² (vs α)"] if args.state else []
    print(" | ".join(["layer", "rule", "rank", "C0 trace", *kinds, *edited]))
    for l in result["layers"]:
        for rule, row in result["projection"][str(l)].items():
            print(" | ".join([str(l), rule, str(row["rank"]), f"{row['corpus_trace_share']:.3f}", *[f"{row[k]:.3f}" for k in kinds],
                              *([f"{row['edited_energy']:.1f}"] if args.state else [])]))
    if result["output_change"]:
        print(f"\n{args.state}: mean ‖(ΣΔ) k‖ / ‖W0 k‖ per token")
        print(" | ".join(["layer", *kinds]))
        for l in result["layers"]:
            print(" | ".join([str(l), *[f"{result['output_change'][str(l)][k]:.3f}" for k in kinds]]))


if __name__ == "__main__":
    main()
