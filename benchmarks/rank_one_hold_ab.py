"""Screen (issue 14, not in the paper): hold each earlier edit only along the direction its margin reads.

C_p = Σ_i k_i k_iᵀ asks a batch's update Δ to leave the whole MLP output at every earlier edit's
key unchanged: ‖Δ k_i‖² over all d output directions. What keeps edit i standing is one number,
its margin m_i (NLL of the true object minus NLL of the new one after its prompt, > 0 holds), and
to first order a change δ of layer l's MLP output at the subject's last token moves it by
u_iᵀ δ, u_i = ∂m_i/∂(that output). A hold along û_i = u_i / ‖u_i‖ alone costs the batch one scalar
constraint per earlier edit where C_p's costs d of them, so the room lapses were measured to
run out of (1,072 null-space key directions at layer 7, BENCHMARKS.md) would stop binding.

Way B replaces the β C_p of the projected solve by these rank-1 holds. Per edited layer, over
updates in the projector's row space (Δ = Δ P):

    min_Δ  ‖Δ K − R‖² + α ‖Δ‖² + w Σ_i (û_iᵀ Δ k_i)²        K [d0, u], R [d, u], k_i [d0], û_i [d]

    normal equations:  (Δ K Kᵀ + α Δ + w Σ_i û_i (û_iᵀ Δ k_i) k_iᵀ) P = R Kᵀ P

no longer a d0×d0 solve: preconditioned conjugate gradients over the d·d0 entries of Δ (the
preconditioner is the same equation without the holds, which right-multiplies by
(P K Kᵀ P + α I)⁻¹). With the holds as the full identity (û running over a basis of R^d for
every key) the solution is the closed form Δ = R Kᵀ P (P (K Kᵀ + C_p) P + α I)⁻¹: the test checks
the solver against it. (The authors' code solves (P (K Kᵀ + C_p) + α I) instead, which differs
from this symmetric form; way A below is the run's own solve, theirs.)

An earlier edit lapsed before the batch (m_i ≤ 0) gets no hold: holding its margin where it is
would hold it lapsed, and rehearsal writes it again with this batch. Every copy of an edit's keys
in C_p (first write and re-writes) is held along the same û_i. The rest is
benchmarks/batch_ab.py: batches 0..N-1 of STATE replayed, batch N edited both ways with the same
rehearsal and the same z, so that only the solve differs.

    python benchmarks/rank_one_hold_ab.py STATE N [--weight 1] [--full-weight 0] [--dataset SPEC [--sample 300]] [--json]

With `--dataset` (the run's, e.g. counterfact:FILE,FILE), each way is also scored after its batch
as the evaluation scores a run: efficacy, paraphrase generalisation and neighbourhood specificity
of the batch's own records and of a fixed sample of the earlier ones (a hold along one direction
leaves the others free to move, which a paraphrase or a neighbour may read).
"""

from __future__ import annotations

import json
import random
import time

import torch

from alphaedit.editor import Editor
from alphaedit.eval.datasets import load_dataset
from alphaedit.eval.scoring import counterfact_scores
from alphaedit.hooks import trace
from alphaedit.layouts import output_logits
from alphaedit.prompts import PLAIN_TEMPLATE, batch_rows, encode, fill, target_ids
from alphaedit.rehearsal import standing_requests
from alphaedit.updates import LayerStatistics, LowRankDelta
from batch_ab import fact, measure, print_table, screen_parser


def margin_directions(model, tokenizer, layout, requests, layers, facts_per_pass: int = 16) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Per request: its margin m (NLL true − NLL new, mean over each object's tokens, nats) and,
    per layer, u = ∂m/∂(W_out's output at the subject's last token of the plain prompt) [N, d]."""
    margins, grads = [], {layer: [] for layer in layers}
    paths = {layout.mlp_out_path(layer): layer for layer in layers}
    device = next(model.parameters()).device
    for start in range(0, len(requests), facts_per_pass):
        chunk = requests[start : start + facts_per_pass]
        rows, lookups, spans = [], [], []  # two rows per fact: prompt + new object, prompt + true object
        for request in chunk:
            ids, lookup = encode(tokenizer, fill(PLAIN_TEMPLATE, request))
            for target in (request.target_new, request.target_true):
                tokens = target_ids(tokenizer, target)
                rows.append(ids + tokens)
                lookups.append(lookup)
                spans.append((len(ids), tokens))
        batch = batch_rows(tokenizer, rows, lookups).to(device)
        # each W_out output re-entered as a leaf of the graph: its gradient is what the margin reads
        leaves = {p: (lambda t: t.detach().requires_grad_()) for p in paths}
        with torch.enable_grad(), trace(model, outputs_of=list(paths), edit_outputs=leaves, detach=False) as rec:
            hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
            nll = []
            for row, (begin, tokens) in enumerate(spans):
                logits = output_logits(model, layout, hidden[row, begin - 1 : begin - 1 + len(tokens)]).float()
                nll.append(-logits.log_softmax(-1).gather(1, torch.tensor(tokens, device=logits.device)[:, None]).mean())
            nll = torch.stack(nll).view(len(chunk), 2)
            margin = nll[:, 1] - nll[:, 0]  # [facts]
            outputs = [rec.outputs[p] for p in paths]
            # each fact's margin reads only its own two rows: the gradient of the sum is each one's
            derivative = torch.autograd.grad(margin.sum(), outputs)
        margins.append(margin.detach().cpu())
        for (path, layer), d in zip(paths.items(), derivative):
            at = d[batch.rows, batch.lookup].view(len(chunk), 2, -1).sum(1)  # both rows carry the subject's output
            grads[layer].append(at.detach().double().cpu())
    return torch.cat(margins), {layer: torch.cat(g) for layer, g in grads.items()}


def rank_one_held_solve(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, alpha: float, held_keys: torch.Tensor,
                        held_dirs: torch.Tensor, weight: float = 1.0, full: torch.Tensor | None = None,
                        tol: float = 1e-7, max_steps: int = 5000) -> tuple[torch.Tensor, int]:
    """Δ [d, d0] minimising ‖ΔK − R‖² + α‖Δ‖² + w Σ_i (û_iᵀ Δ k_i)² [+ tr(Δ F Δᵀ)] over Δ = ΔP, by
    preconditioned conjugate gradients (float64). K [d0, u], R [d, u], P [d0, d0], held_keys [d0, N]
    (the k_i), held_dirs [d, N] (the û_i), `full` F [d0, d0] a hold on every output direction (β C_p).
    Returns Δ and the steps taken."""
    K, R, P = K.double(), R.double(), P.double()
    Kh, Uh = held_keys.double(), held_dirs.double()
    KK = K @ K.T  # [d0, d0]
    if full is not None:
        KK = KK + full.double()  # ‖ΔK‖² and tr(ΔFΔᵀ) enter the normal equations alike
    eye = torch.eye(P.shape[0], dtype=torch.float64)
    precondition = torch.linalg.inv(P @ KK @ P + alpha * eye)  # commutes with P: keeps Δ = ΔP

    def apply(D: torch.Tensor) -> torch.Tensor:  # the normal equations' operator on Δ = ΔP
        reads = (Uh * (D @ Kh)).sum(0)  # [N] û_iᵀ Δ k_i
        return (D @ KK + alpha * D + weight * (Uh * reads) @ Kh.T) @ P

    rhs = R @ K.T @ P  # [d, d0]
    D = rhs @ precondition  # the solution without holds, a good start
    resid = rhs - apply(D)
    z = resid @ precondition
    p, rz = z.clone(), (resid * z).sum()
    scale = rhs.norm()
    for step in range(1, max_steps + 1):
        Ap = apply(p)
        curvature = (p * Ap).sum()
        if curvature <= 0:  # p is zero to rounding: the residual cannot fall further
            break
        a = rz / curvature
        D += a * p
        resid -= a * Ap
        if resid.norm() <= tol * scale:
            return D, step
        z = resid @ precondition
        rz_next = (resid * z).sum()
        p = z + (rz_next / rz) * p
        rz = rz_next
    if resid.norm() <= 1e3 * tol * scale:  # stopped at rounding, near enough
        return D, step
    raise RuntimeError(f"conjugate gradients did not reach {tol:g} in {step} steps (residual {resid.norm() / scale:.2e})")


class RankOneHeld:
    """Way B's method: the projected solve with rank-1 holds in place of β C_p; all else the
    editor's method. `holds[layer]` = (keys [d0, N], unit directions [d, N])."""

    def __init__(self, method, statistics: dict[int, LayerStatistics], holds: dict, weight: float, log: list, full_weight: float = 0.0):
        self.method, self.holds, self.weight, self.log, self.full_weight = method, holds, weight, log, full_weight
        self.layer_of = {id(s): layer for layer, s in statistics.items()}

    def __getattr__(self, name):
        return getattr(self.method, name)

    def layer_update(self, keys, resid, stats, config):
        layer = self.layer_of[id(stats)]
        held_keys, held_dirs = self.holds[layer]
        start = time.perf_counter()
        full = self.full_weight * stats.preserved.cpu() if self.full_weight else None
        delta, steps = rank_one_held_solve(keys.cpu(), resid.cpu(), stats.projector.cpu(), config.l2_alpha, held_keys, held_dirs, self.weight, full)
        self.log.append({"layer": layer, "steps": steps, "seconds": round(time.perf_counter() - start, 1)})
        # a dense Δ as factors: left Δ [d, d0], right I [d0, d0]
        return LowRankDelta(delta.float(), torch.eye(delta.shape[1]))


def hold_along_margins(editor: Editor, weight: float, log: list, full_weight: float = 0.0) -> dict:
    """Swap the editor's solve for the rank-1-held one, holds read on the model as it is now
    (`full_weight` β keeps β C_p, the run's hold on every output direction, beside them)."""
    if editor.config.replace_holds or editor.config.earlier_reread or editor.held:
        raise ValueError("rank_one_hold_ab holds the key rows of the applied batches: a journal made without "
                         "--replace-holds, --earlier-reread and held texts")
    if editor.config.spread != "sequential" or not editor.method.projects(editor.config):
        raise ValueError("rank_one_hold_ab replaces the projected solve of the sequential spread")
    standing = [r for r in standing_requests(editor.batches) if r.target_true]
    margin, grads = margin_directions(editor.model, editor.tokenizer, editor.layout, standing, editor.config.layers)
    index = {fact(r): i for i, r in enumerate(standing)}
    rows = [(applied, i) for applied in editor.batches if not applied.reverted for i in range(len(applied.written))]
    which = [index.get(fact(applied.written[i])) for applied, i in rows]
    held = [j is not None and margin[j] > 0 for j in which]  # lapsed (or unknown) edits are not held
    holds = {}
    for layer in editor.config.layers:
        keys = torch.cat([applied.keys[layer] for applied in editor.batches if not applied.reverted]).double()  # [rows, d0]
        if len(keys) != len(rows):
            raise ValueError(f"layer {layer}: {len(keys)} key rows for {len(rows)} written requests (reworded forms?)")
        keep = torch.tensor(held)
        u = grads[layer][torch.tensor([j if j is not None else 0 for j in which])][keep]
        holds[layer] = (keys[keep].T.contiguous(), (u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)).T.contiguous())
    editor.method = RankOneHeld(editor.method, editor.statistics(), holds, weight, log, full_weight)
    return {"earlier": len(standing), "lapsed before": int((margin <= 0).sum()), "held rows": int(sum(held)), "of rows": len(rows),
            "median |u|": {l: grads[l].norm(dim=1).median().item() for l in editor.config.layers}}


def record_scores(dataset: str, sample: int):
    """batch_ab.measure's `score`: Eff / Gen / Spe (CounterFact, in %) of the batch's own records and of
    `sample` of the earlier edits still standing (the same ones both ways), found in `dataset` by fact."""
    by_fact = {fact(r.request): r for r in load_dataset(dataset)}

    def score(editor: Editor, own, earlier) -> dict:
        found = [by_fact[fact(r)] for r in earlier if fact(r) in by_fact]
        chosen = sorted(random.Random(0).sample(range(len(found)), min(sample, len(found))))
        result = {}
        for name, records in (("own", [by_fact[fact(r)] for r in own if fact(r) in by_fact]), ("earlier", [found[i] for i in chosen])):
            scores = counterfact_scores(editor.model, editor.tokenizer, records)
            for metric, key in (("Eff", "efficacy"), ("Gen", "generalization"), ("Spe", "specificity")):
                values = [s[key] for s in scores if s.get(key) is not None]
                result[f"{name} {metric}"] = 100 * sum(values) / max(1, len(values))
            result[f"{name} scored"] = len(records)
        return result

    return score


def main() -> None:
    parser = screen_parser(__doc__)
    parser.add_argument("--weight", type=float, default=1.0, help="w, the weight of each rank-1 hold")
    parser.add_argument("--full-weight", type=float, default=0.0, help="β: keep β C_p (every output direction held) beside the rank-1 holds")
    parser.add_argument("--dataset", help="the run's dataset (counterfact:FILE[,FILE]): also score Eff/Gen/Spe of the batch's records and earlier ones")
    parser.add_argument("--sample", type=int, default=300, help="how many of the earlier edits to score with --dataset")
    args = parser.parse_args()
    seen: dict = {}
    log: list = []

    def prepare(editor: Editor) -> None:
        seen.update(hold_along_margins(editor, args.weight, log, args.full_weight))

    result = measure(args.state, args.n, {}, prepare_b=prepare, label=f"rank-1 holds along each margin, w {args.weight:g}"
                     + (f", with {args.full_weight:g} C_p" if args.full_weight else ""),
                     score=record_scores(args.dataset, args.sample) if args.dataset else None)
    result["holds"], result["solves"] = seen, log
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.state}, batch {args.n}: {seen['earlier']} earlier edits standing, {seen['lapsed before']} lapsed before the batch; "
          f"{seen['held rows']} of {seen['of rows']} key rows held; CG steps per layer: "
          + ", ".join(f"{s['layer']}: {s['steps']} ({s['seconds']} s)" for s in log))
    print_table(result)
    if args.dataset:
        print("| way | own Eff | own Gen | own Spe | earlier Eff | earlier Gen | earlier Spe |\n|---|---|---|---|---|---|---|")
        for name, w in result["ways"].items():
            print(f"| {name} | " + " | ".join(f"{w[f'{who} {m}']:.1f}" for who in ("own", "earlier") for m in ("Eff", "Gen", "Spe")) + " |")


if __name__ == "__main__":
    main()
