"""Edit hyperparameters and the presets that reproduce the paper's settings.

A preset is recognised from the loaded model's config *shape* (family, depth, widths), never
from its name or path, so a local copy of Llama-3-8B gets the same settings as the hub id.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .methods import DEFAULT_METHOD, get_method
from .updates import PROJECTOR_RULES



RENAMED = {"z_requests_per_pass": "v_requests_per_pass", "z_prefix_cache": "v_prefix_cache"}


CHAT_VALUES = ("own", "shared", "trained")  # EditConfig.chat_values
SPREADS = ("sequential", "joint")  # EditConfig.spread


@dataclass
class EditConfig:
    """Everything that decides what an edit does (ALGORITHM.md §2)."""

    method: str = DEFAULT_METHOD  # a name in methods.METHODS
    # AlphaEdit's null-space projection on the method's closed form: None = the method's default
    # (on for alphaedit, off for the others)
    project: bool | None = None
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own hyperparameters (methods/*.py)
    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    # z (v*) optimisation, §1.4
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    # When a request's z optimisation stops before the step limit:
    #   "loss" (the authors' code): once its total loss, weight decay and KL included, is below
    #          early_stop_loss. On small models the weight-decay term alone sits near 0.05 once δ
    #          is useful, so this rarely fires and the step limit decides (BENCHMARKS.md).
    #   "nll": once the mean NLL of its target tokens (per token, averaged over the prompts) is
    #          below early_stop_nll, i.e. once the target is learnt; the step limit is a cap.
    early_stop_rule: str = "loss"
    early_stop_loss: float = 5e-2
    early_stop_nll: float = 5e-2
    # also stop a request once its new object is the top-1 prediction everywhere (not in the
    # reference code; ENCORE's "most-probable early stopping", arXiv 2502.01636)
    stop_when_most_probable: bool = False
    # reworded prompts (rewording.py; not in the paper, 0 = the authors'): δ also trains on this
    # many copies of the prompt with each word around the subject left out with probability
    # reword_drop, read without a context template, so the answer rests on the subject more than
    # on the prompt's exact words. Each copy is one more row in every z pass (+26% time per
    # CounterFact edit with 2 on top of the five prefixes), so the SmolLM2 preset takes 2 in place
    # of two prefixes: paraphrases hold better at the same cost (BENCHMARKS.md, issue 18)
    reworded_prompts: int = 0
    reword_drop: float = 0.3
    # a z pass holds up to this many requests' worth of tokens, rows of all requests packed by
    # length (1 = each request's rows alone, the authors' loop); lower it if a pass runs out of memory
    v_requests_per_pass: int = 16
    # compute the tokens before δ's position once and cache their attention keys/values (exact;
    # checked against a plain pass on each batch, falling back to plain passes if it differs)
    v_prefix_cache: bool = True
    # NAS (anchor.py; not in the paper, off by default): rescale each target value v* = m + δ to
    # one reference norm measured on the unedited model, against norm growth in long sequences
    value_anchor: bool = False
    # closed-form update, §1.7-1.9
    nullspace_threshold: float = 2e-2  # the value of projector_rule (updates.null_space_mask)
    projector_rule: str = "absolute"
    l2_alpha: float = 10.0  # AlphaEdit's α (hparams "L2")
    mom2_update_weight: float = 15000.0  # MEMIT's λ
    # β, the weight of the earlier batches' keys C_p in every solve that reads them (AlphaEdit,
    # MEMIT-seq, ENCORE; 1 in the authors' code, not in the paper): a soft penalty on moving what
    # earlier edits wrote at their keys. Larger values hold earlier edits more firmly against new
    # ones (an evolving projector that removes their directions is the limit β → ∞) and leave new
    # edits less room; 0 forgets them (each batch solved as if it were the first)
    earlier_weight: float = 1.0
    # λ₁, the weight of the preserved keys' second moment C0 inside the projected solve (BetaEdit,
    # Liu et al., IJCAI 2026; 0 in AlphaEdit, whose projection stands in for MEMIT's λ C0): P spans
    # only an approximate null space (on SmolLM2 C0's spectrum has no gap, and P holds 27–52% of
    # the preserved keys' energy, BENCHMARKS.md), so the update still moves the MLP output at
    # preserved keys; λ₁ ‖ΔK0‖² penalises that leak, the more the more a direction of P carries
    # preserved energy. C0 is the mean k kᵀ, as MEMIT's λ weighs it (BetaEdit's λ₁: 3000)
    leak_weight: float = 0.0
    # every N batches (0: never, the authors' code; not in the paper), C_p is rebuilt from the keys
    # of every applied request as the edited model reads them now. C_p keeps each batch's keys as
    # they were read when it was edited, but later batches' lower-layer updates move them (on
    # SmolLM2 layer 7's by 54% after 2,000 more edits: benchmarks/key_drift.py), so the hold on
    # earlier edits drifts off the directions the model reads them by (BENCHMARKS.md). Costs a key
    # pass over every earlier request each time
    earlier_reread: int = 0
    # every N batches (0: never, the authors' code; not in the paper), rehearsal: before the batch
    # every earlier request still standing (not reverted, not replaced by a later edit of its
    # subject and prompt) is checked with the efficacy test, and the lapsed ones, oldest first and
    # at most as many as the batch has (or rehearse_cap), are written again with it. Later
    # batches undo some of what earlier ones wrote (on SmolLM2 about one edit in ten over 2,000,
    # BENCHMARKS.md); the journal already holds every request, so the editor can find and restore
    # them. Costs a teacher-forced check of every earlier request each time, and the rehearsed
    # requests' z optimisation
    rehearse: int = 0
    # the most lapsed requests one batch writes again (0: as many as the batch has). Over a long
    # sequence more edits lapse between two checks than a batch has (on SmolLM2 from about 3,200
    # edits on, BENCHMARKS.md): the rest wait, oldest first, for the next batch
    rehearse_cap: int = 0
    # a rehearsed request's z optimisation starts from the value it was last written with (its
    # z then, kept in the journal) instead of from δ = 0: after the first iteration, which reads
    # h0 and the loss at δ = 0, δ jumps to z_then − h0 (clamped). The blocks above the z layer
    # are never edited, so z_then still says the new object unless the prompt's other tokens
    # moved; a lapsed edit is restored to its old value in one step or a few, where a fresh start
    # takes three to five (SmolLM2: 1.5 against 4.3 over 1,000 edits, BENCHMARKS.md). Changes
    # what a rehearsed request is written with (its old value, not the nearest one that works
    # now); the batch's own requests and a request whose batch kept no value (an older journal)
    # start from δ = 0
    rehearse_warm: bool = False
    # a batch that writes a (subject, prompt) again -- a new edit of the same fact, or a
    # rehearsal's re-write -- first takes that pair's earlier columns out of C_p, so that C_p holds
    # each fact once, at the keys of its latest write (not in the paper; off: every write stays, as
    # every batch's keys stay in the authors' code). C_p holds W_out's output at each earlier column
    # where it is now -- for a fact written again, the answer being replaced -- so without this the
    # new write is solved against a hold on its own key: at the first edited layer, whose keys never
    # drift, the very same key, where least squares writes about half of what is needed when α is
    # small beside the key (less is lost where α dominates: SmolLM2 at α 80, BENCHMARKS.md), and a
    # request rehearsed m times is held there by m + 1 copies
    replace_holds: bool = False
    # how much a rehearsal's re-written columns weigh in the solve against the batch's own (not
    # in the paper; 1: alike). The least squares then fits Σ w_j ‖Δk_j − r_j‖², w_j this weight
    # for a re-write and 1 for the rest, so a lapsed edit is written further against C_p's hold
    # and α: at α 80 on SmolLM2 a lone column writes only ‖Pk‖² / (‖Pk‖² + α) ≈ 0.3 of its layer's
    # share, and about a third of the re-writes did not take even in their own batch. Measured
    # (BENCHMARKS.md, "What sets where rehearsal gives out"): the re-writes then take, and as many
    # other edits lapse in their place (f down, κ up), with W_out's spectral norm growing faster
    rewrite_weight: float = 1.0
    solve_dtype: str = "float32"  # "float64" for extra stability
    # how a batch's residual is shared among the edited layers: "sequential" (the authors' loop:
    # layer i of L takes 1/(L − i) of what is still missing, on the model the layers below changed)
    # or "joint" (not in the paper; the projected solve only: layer by layer as the authors' loop,
    # each layer's Δ its part of one solve over the layers still to write, so that each takes what
    # its own null-space room allows, methods/projection.py). On SmolLM2 the
    # authors' loop leaves over half of every update to the block's last layer, whose room then
    # runs out first over long sequences (BENCHMARKS.md)
    spread: str = "sequential"
    # chat-aware editing (not in the paper): a request that carries a question is also written in
    # the tokenizer's chat template (question as the user's turn, target_new as the answer), as a
    # column of its own with its own z, when the tokenizer has a chat template
    chat: bool = True
    # what a chat form's column asks of W_out: "own" — a z of its own, optimised on the chat prompt
    # alone; "shared" — its request's δ, optimised on the plain prompts and the chat prompt together
    # (each half of the NLL), added to the chat form's own h0. On SmolLM2 "shared" holds the fact
    # better in conversation and in unedited question forms but costs more of the neighbours'
    # answers (BENCHMARKS.md, issue 15), so the default stays the earlier behaviour. "trained" —
    # the chat prompt trains its request's δ as with "shared", but the chat form gets no column:
    # W_out is asked to change at the plain keys only, and the chat key, close to the plain one,
    # follows from them
    chat_values: str = "own"
    # context templates, §1.2
    context_template_words: list[str] = field(
        default_factory=lambda: ["The", "Therefore", "Because", "I", "You"]
    )
    context_template_length: int = 10
    seed: int = 0
    preset: str = "default"

    def __post_init__(self) -> None:
        # an unknown method or option is refused here; options given as text are kept typed
        options = get_method(self.method).option_values(self)
        self.method_options = {name: getattr(options, name) for name in self.method_options}
        if not self.layers or sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"layers must be a non-empty ascending list without repeats, got {self.layers}")
        if list(self.layers) != list(range(self.layers[0], self.layers[-1] + 1)):
            raise ValueError(f"layers must be contiguous (MEMIT spreads the residual over a block), got {self.layers}")
        if self.projector_rule not in PROJECTOR_RULES:
            raise ValueError(f"projector_rule must be one of {', '.join(PROJECTOR_RULES)}, not {self.projector_rule!r}")
        if self.early_stop_rule not in ("loss", "nll"):
            raise ValueError(f"early_stop_rule must be loss (the authors' code) or nll, not {self.early_stop_rule!r}")
        if self.v_num_grad_steps < 1:
            raise ValueError(f"v_num_grad_steps must be at least 1, got {self.v_num_grad_steps}")
        if self.chat_values not in CHAT_VALUES:
            raise ValueError(f"chat_values must be one of {', '.join(CHAT_VALUES)}, not {self.chat_values!r}")
        if self.spread not in SPREADS:
            raise ValueError(f"spread must be one of {', '.join(SPREADS)}, not {self.spread!r}")
        if self.spread == "joint" and not get_method(self.method).projects(self):
            raise ValueError(f"spread joint shares the projected solve over the block, and {self.method} runs without the "
                             "projection here: add the projection (--project), or keep the sequential spread")
        if not (self.earlier_weight >= 0 and math.isfinite(self.earlier_weight)):
            raise ValueError(f"earlier_weight must be a finite number ≥ 0 (1 is the authors'), got {self.earlier_weight}")
        if not (self.leak_weight >= 0 and math.isfinite(self.leak_weight)):
            raise ValueError(f"leak_weight must be a finite number ≥ 0 (0 is AlphaEdit's), got {self.leak_weight}")
        if self.leak_weight and not get_method(self.method).projects(self):
            raise ValueError(f"leak_weight weighs C0 inside the projected solve, and {self.method} runs without the projection "
                             "here (its own λ C0 does that job: --mom2-weight): add the projection, or leave it at 0")
        if self.earlier_weight != 1.0 and not get_method(self.method).keeps_preserved(self):
            raise ValueError(f"earlier_weight weighs the earlier batches' keys C_p, and {self.method} does not read them here "
                             "(alphaedit, memit-seq, encore or any method with the projection do): leave it at 1")
        if any(not isinstance(w, str) or not w.strip() for w in self.context_template_words):
            raise ValueError(f"context_template_words must be words (each starts one context-template prefix), got {self.context_template_words}")
        if self.reworded_prompts < 0:
            raise ValueError(f"reworded_prompts must be a number of copies ≥ 0 (0: none, the authors'), got {self.reworded_prompts}")
        if not 0.0 <= self.reword_drop < 1.0:
            raise ValueError(f"reword_drop is the chance that a word is left out, in [0, 1), got {self.reword_drop}")
        if self.rehearse < 0:
            raise ValueError(f"rehearse must be a number of batches ≥ 0 (0: never, the authors'), got {self.rehearse}")
        if self.rehearse_cap < 0:
            raise ValueError(f"rehearse_cap must be a number of requests ≥ 0 (0: as many as the batch has), got {self.rehearse_cap}")
        if self.replace_holds and self.earlier_reread:
            raise ValueError("replace_holds takes earlier columns out of C_p by the keys the journal keeps, and earlier_reread "
                             "rebuilds C_p from keys read again: use one of them")
        if self.replace_holds and not get_method(self.method).keeps_preserved(self):
            raise ValueError(f"replace_holds changes which earlier keys C_p holds, and {self.method} does not read them here "
                             "(alphaedit, memit-seq, encore or any method with the projection do): leave it off")
        if not (self.rewrite_weight > 0 and math.isfinite(self.rewrite_weight)):
            raise ValueError(f"rewrite_weight must be a finite number > 0 (1: a re-write weighs as the batch's own), got {self.rewrite_weight}")
        if self.rewrite_weight != 1.0 and not self.rehearse:
            raise ValueError("rewrite_weight weighs a rehearsal's re-writes in the solve, and rehearse is 0 (nothing is re-written): "
                             "set rehearse, or leave rewrite_weight at 1")
        if self.earlier_reread < 0:
            raise ValueError(f"earlier_reread must be a number of batches ≥ 0 (0: never, the authors'), got {self.earlier_reread}")
        if self.earlier_reread and not get_method(self.method).keeps_preserved(self):
            raise ValueError(f"earlier_reread rebuilds the earlier batches' keys C_p, and {self.method} does not read them here "
                             "(alphaedit, memit-seq, encore or any method with the projection do): leave it at 0")
        if self.solve_dtype not in ("float32", "float64"):
            raise ValueError(f"solve_dtype must be float32 or float64, not {self.solve_dtype!r}")

    @property
    def z_layer(self) -> int:
        """The layer whose block output carries the target value z (the last edited one)."""
        return self.layers[-1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditConfig:
        # journals written before 2026-12-02 name two of the v (z) optimisation's settings z_*
        data = {RENAMED.get(k, k): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown edit config fields: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class Preset:
    name: str
    shape: dict[str, Any]  # every key of _shape_of must match: family, depth, widths, vocabulary, context
    settings: dict[str, Any]
    source: str


# The paper's hparams files (hparams/AlphaEdit/*.json, MEMIT λ from hparams/MEMIT/*.json), plus the
# setting measured for the bundled SmolLM2 (see BENCHMARKS.md, "Choosing SmolLM2's layers").
PRESETS: tuple[Preset, ...] = (
    Preset("gpt2-xl", dict(model_type="gpt2", layers=48, hidden=1600, mlp=6400, vocab=50257, context=1024),
           dict(layers=[13, 14, 15, 16, 17], v_num_grad_steps=20, v_lr=0.5, mom2_update_weight=20000.0),
           "paper, hparams/AlphaEdit/gpt2-xl.json"),
    Preset("gpt-j-6b", dict(model_type="gptj", layers=28, hidden=4096, mlp=16384, vocab=50400, context=2048),
           dict(layers=[3, 4, 5, 6, 7, 8], v_num_grad_steps=25, v_lr=0.5, mom2_update_weight=15000.0),
           "paper, hparams/AlphaEdit/EleutherAI_gpt-j-6B.json"),
    # Llama-2-7B (MLP 11008, vocabulary 32000) and Llama-3.1-8B (context 131072) do not match
    Preset("llama3-8b", dict(model_type="llama", layers=32, hidden=4096, mlp=14336, vocab=128256, context=8192),
           dict(layers=[4, 5, 6, 7, 8], v_num_grad_steps=25, v_lr=0.1, mom2_update_weight=15000.0),
           "paper, hparams/AlphaEdit/Llama3-8B.json"),
    # Ours, not the paper's: each request stops once its target is learnt (target NLL < 0.1 nats
    # per token) with 25 steps as a cap, and δ may reach 2·‖h0‖ (the authors' 0.75 held
    # multi-token zsRE answers at ~49% paraphrase accuracy on the tuning slice). Two of the
    # authors' five context-template prefixes (I, You) give way to two reworded copies of the
    # prompt: as many prompts per step, and on 200 + 200 tuning records the edits hold better
    # under other wordings (zsRE paraphrases +3.0, CounterFact +0.4) at the same time per edit.
    Preset("smollm2-135m", dict(model_type="llama", layers=30, hidden=576, mlp=1536, vocab=49152, context=8192),
           dict(layers=[3, 4, 5, 6, 7], v_num_grad_steps=25, v_lr=1.0, mom2_update_weight=15000.0,
                early_stop_rule="nll", early_stop_nll=0.1, clamp_norm_factor=2.0,
                context_template_words=["The", "Therefore", "Because"], reworded_prompts=2),
           "measured on a CounterFact + zsRE tuning slice, see BENCHMARKS.md"),
    # Ours: Gemma-3-270M (base), the same rule; v_lr 1.0 learns where 0.5 ran every request to
    # the cap (BENCHMARKS.md, "Gemma-3-270M's preset")
    Preset("gemma3-270m", dict(model_type="gemma3_text", layers=18, hidden=640, mlp=2048, vocab=262144, context=32768),
           dict(layers=[2, 3, 4, 5, 6], v_num_grad_steps=25, v_lr=1.0, mom2_update_weight=15000.0,
                early_stop_rule="nll", early_stop_nll=0.1, clamp_norm_factor=2.0),
           "measured on a CounterFact + zsRE tuning slice, see BENCHMARKS.md"),
)


def _shape_of(model_config: Any) -> dict[str, Any]:
    """What a preset is matched on: family, depth, widths, vocabulary and context length."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config

    def first(*names: str) -> Any:
        return next((getattr(text_config, n) for n in names if getattr(text_config, n, None) is not None), None)

    hidden = int(first("hidden_size", "n_embd") or 0)
    return {
        "model_type": text_config.model_type,
        "layers": int(first("num_hidden_layers", "n_layer") or 0),
        "hidden": hidden,
        "mlp": int(first("intermediate_size", "n_inner") or 4 * hidden),  # GPT-2/J: n_inner None means 4·d
        "vocab": int(first("vocab_size") or 0),
        "context": int(first("max_position_embeddings", "n_positions") or 0),
    }


def default_layers(num_layers: int) -> list[int]:
    """Five consecutive layers starting at ~1/8 of the depth: where the paper's presets sit."""
    count = min(5, max(1, num_layers - 1))
    first = min(max(1, round(num_layers / 8)), num_layers - count)
    return list(range(first, first + count))


def preset_for(model_config: Any) -> Preset | None:
    shape = _shape_of(model_config)
    for preset in PRESETS:
        if preset.shape == shape:
            return preset
    return None


def describe_preset(model_config: Any) -> str:
    """Which preset a model gets and why, or why none: printed by edit/eval and kept in the journal."""
    shape = _shape_of(model_config)
    preset = preset_for(model_config)
    if preset is not None:
        return f"preset {preset.name} ({preset.source}): the model's shape matches it ({_shape_text(shape)})"
    # a preset "nearly" applies when family, depth and width agree (Llama-2-7B vs Llama-3-8B)
    near = [p for p in PRESETS if all(p.shape[k] == shape[k] for k in ("model_type", "layers", "hidden"))]
    if not near:
        return f"no preset for this shape ({_shape_text(shape)}): the stated default (layers from ~1/8 depth, 25 steps, v_lr 0.5)"
    nearest = near[0]
    differs = ", ".join(f"{k} {shape[k]} vs {nearest.shape[k]}" for k in shape if nearest.shape[k] != shape[k])
    return (f"no preset matches ({_shape_text(shape)}); the nearest, {nearest.name}, differs in {differs}: "
            "the stated default applies (pass --layers/--steps/--lr to choose)")


def _shape_text(shape: dict[str, Any]) -> str:
    return (f"{shape['model_type']}, {shape['layers']} layers, hidden {shape['hidden']}, MLP {shape['mlp']}, "
            f"vocabulary {shape['vocab']}, context {shape['context']}")


def config_for_model(model_config: Any, method: str = DEFAULT_METHOD, **overrides: Any) -> EditConfig:
    """The preset matching this model's shape, or the stated default, with user overrides on top."""
    preset = preset_for(model_config)
    if preset is not None:
        settings = {**copy.deepcopy(preset.settings), "preset": preset.name}  # its lists stay the preset's
    else:
        settings = {"layers": default_layers(_shape_of(model_config)["layers"]), "preset": "default"}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return EditConfig(method=method, **settings)
