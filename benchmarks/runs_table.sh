# The long sequential-editing runs of BENCHMARKS.md (issues 10 and 14): one table, sourced by
# benchmarks/long_runs.sh (this machine's CPU, one run after another) and
# benchmarks/device_runs.sh (a lent GPU, several side by side). Set `data` (the folder holding
# counterfact/, counterfact_easyedit/, zsre/, wikitext2_raw/ and glue_eval/) before sourcing.
# shellcheck shell=bash disable=SC2034  # the arrays are read by the scripts that source this

cf_stream=counterfact:$data/counterfact_easyedit/counterfact-edit.json,$data/counterfact_easyedit/counterfact-train.json
# The authors' five context-template prefixes and no reworded copies: the SmolLM2 preset until
# 2026-12-05, under which every run recorded in BENCHMARKS.md was made, so that new runs compare
# with them (the preset now trades two prefixes for two reworded copies, issue 18)
protocol=(--batch-size 100 --corpus "$data/wikitext2_raw/wiki.valid.raw" --tokens 100000
          --perplexity-corpus "$data/wikitext2_raw/wiki.test.raw" --general "$data/glue_eval"
          --context-templates The,Therefore,Because,I,You --reworded-prompts 0)
# the 10,000-edit runs: the six tasks and the norms every 1,000 edits, and there a curve point of
# Eff/Gen/Spe over 500 of the records edited so far (does what was edited still hold?)
lifelong="--n 10000 --generation-every 50 --general-every 10 --every 10 --curve-of edited --curve-sample 500"
# name | arguments beyond the protocol's
declare -A args=(
  [cf2000-alphaedit-l2-40]="--dataset counterfact:$data/counterfact/counterfact_test.json --n 2000 --generation-every 50 --general-every 5 --method alphaedit --l2 40"
  [zsre1000-alphaedit-l2-40]="--dataset zsre:$data/zsre/zsre_mend_eval_portability_gpt4.json --n 1000 --general-every 5 --method alphaedit --l2 40"
  # a wider block: eight edited layers instead of the preset's five, more key dimensions for 2,000 edits to share
  [cf2000-alphaedit-l2-40-wide]="--dataset counterfact:$data/counterfact/counterfact_test.json --n 2000 --generation-every 50 --general-every 5 --method alphaedit --l2 40 --layers 3-10"
  # α 40 with norm-anchored values: does NAS add to the strongest lever? (ranks the stabilisers at 2,000)
  [cf2000-alphaedit-l2-40-nas]="--dataset counterfact:$data/counterfact/counterfact_test.json --n 2000 --generation-every 50 --general-every 5 --method alphaedit --l2 40 --anchor-values"
  # MEMIT-seq, the recursive least squares of RLSEdit (arXiv 2601.15686): no projection, every earlier
  # batch's keys in the solve; RLSEdit's Woodbury recursion computes exactly this matrix
  [cf2000-memit-seq]="--dataset counterfact:$data/counterfact/counterfact_test.json --n 2000 --generation-every 50 --general-every 5 --method memit-seq"
  # MEMIT-seq with a fifth of MEMIT's λ: at 15000 it keeps what it writes but writes 82% of each batch
  # (BENCHMARKS.md); does a weaker pull towards C0 write more and still keep it? (needs code of 99427bb or later)
  [cf2000-memit-seq-lam3000]="--dataset counterfact:$data/counterfact/counterfact_test.json --n 2000 --generation-every 50 --general-every 5 --method memit-seq --mom2-weight 3000"
  # α 40 with more margin on each written edit: z optimised until its target NLL is below 0.02 (p ≈ 0.98)
  # instead of the preset's 0.1 (p ≈ 0.9); later batches erode edits, does a firmer start keep more of them?
  [cf2000-alphaedit-l2-40-nll02]="--dataset counterfact:$data/counterfact/counterfact_test.json --n 2000 --generation-every 50 --general-every 5 --method alphaedit --l2 40 --stop-nll 0.02"
  # α 40 with the joint spread: one projected solve over the block instead of the authors' per-layer
  # shares, which leave over half of every update to the last layer (BENCHMARKS.md; code of its commit or later)
  [cf2000-alphaedit-l2-40-joint]="--dataset counterfact:$data/counterfact/counterfact_test.json --n 2000 --generation-every 50 --general-every 5 --method alphaedit --l2 40 --spread joint"
  # C_p rebuilt after every batch from the keys the edited model reads now (--earlier-reread 1, code of
  # 8e2f67e or later): later batches' lower-layer updates move earlier edits' keys (benchmarks/key_drift.py).
  # Measured in BENCHMARKS.md as cf2000-alphaedit-l2-40-refresh and ...-joint-refresh, made with an
  # experimental patch whose updates are bit-identical to this option's
  [cf2000-alphaedit-l2-40-reread]="--dataset counterfact:$data/counterfact/counterfact_test.json --n 2000 --generation-every 50 --general-every 5 --method alphaedit --l2 40 --earlier-reread 1"
  [cf2000-alphaedit-l2-40-joint-reread]="--dataset counterfact:$data/counterfact/counterfact_test.json --n 2000 --generation-every 50 --general-every 5 --method alphaedit --l2 40 --spread joint --earlier-reread 1"
  # both levers the 2,000-edit runs found: a firmer z stop (each batch written more fully) and C_p re-read
  # (earlier batches held where the model reads them)
  [cf2000-alphaedit-l2-40-nll02-reread]="--dataset counterfact:$data/counterfact/counterfact_test.json --n 2000 --generation-every 50 --general-every 5 --method alphaedit --l2 40 --stop-nll 0.02 --earlier-reread 1"
  # α 40 with rehearsal (--rehearse 1, code of 2c9cb53 or later): before every batch the earlier edits
  # are checked and the lapsed ones written again with it (a one-off run kept 97.9% of 2,000, BENCHMARKS.md)
  [cf2000-alphaedit-l2-40-rehearse]="--dataset counterfact:$data/counterfact/counterfact_test.json --n 2000 --generation-every 50 --general-every 5 --method alphaedit --l2 40 --rehearse 1"
  # the same over the 10,000-edit stream: does rehearsal hold where the room runs out? (the check grows
  # with the edits made: ~2 s per 100 earlier ones before every batch, about +2.5 hours over the run)
  [cf10k-alphaedit-l2-40-rehearse]="--dataset $cf_stream $lifelong --method alphaedit --l2 40 --rehearse 1"
  # α 40 with C_p re-read every 10 batches (--earlier-reread 10, code of 8e2f67e or later): at 2,000 edits
  # the re-read held the oldest edits (89.0 against 84.5); at 10,000 the keys drift further. Every 10
  # batches, not every one: the key pass grows with the edits made (about +20 minutes over the run)
  [cf10k-alphaedit-l2-40-reread10]="--dataset $cf_stream $lifelong --method alphaedit --l2 40 --earlier-reread 10"
  # MEMIT-seq (RLSEdit's solve) with a fifth of MEMIT's λ over the 10,000-edit stream: at λ 15000 it kept
  # what it wrote flat over 2,000 edits but wrote only 82% of each batch; a ridge of 3000 should write
  # ~95% of a lone key (f = s / (s + λc)): does it still hold flat where AlphaEdit's loop falls?
  [cf10k-memit-seq-lam3000]="--dataset $cf_stream $lifelong --method memit-seq --mom2-weight 3000"
  [cf10k-alphaedit-l2-40-joint]="--dataset $cf_stream $lifelong --method alphaedit --l2 40 --spread joint"
  [cf10k-alphaedit-l2-40]="--dataset $cf_stream $lifelong --method alphaedit --l2 40"
  # the same with three more layers' null spaces: at 10,000 edits the five layers' room is full (BENCHMARKS.md)
  [cf10k-alphaedit-l2-40-wide]="--dataset $cf_stream $lifelong --method alphaedit --l2 40 --layers 3-10"
  [cf10k-alphaedit]="--dataset $cf_stream $lifelong --method alphaedit"
  [cf10k-alphaedit-nas]="--dataset $cf_stream $lifelong --method alphaedit --anchor-values"
  # one edited layer instead of five: no edited layer lies below another, so no later batch moves the keys
  # by which the model reads an earlier edit, the regime in which the linear replay of the α 40 journal
  # kept every batch (BENCHMARKS.md, "In a linear model nothing collapses"); the price is one layer's room.
  # Measured to 2,100 edits and stopped there on purpose (it falls sooner than the block: BENCHMARKS.md)
  # twice α 40: α was the strongest lever measured (α 10 → 40 moved the point where efficacy falls to 70
  # from ~4,000 edits to ~10,000); does a stronger ridge flatten the curve further, and at what cost to
  # each batch's own write? (measured to 2,100 edits and stopped there on purpose: it writes 73–93% of
  # each batch and falls no slower, BENCHMARKS.md)
  [cf10k-alphaedit-l2-80]="--dataset $cf_stream $lifelong --method alphaedit --l2 80"
  # α 80 with rehearsal: α 80 keeps the model nearly intact over the first 1,000 edits (specificity 67.0
  # against 67.6 unedited, W₇ +16%) but writes only ~85% of each batch; rehearsal writes the edits that did
  # not take (or lapsed) again with later batches. Less drift from smaller updates, and the weak write made up
  [cf10k-alphaedit-l2-80-rehearse]="--dataset $cf_stream $lifelong --method alphaedit --l2 80 --rehearse 1"
  # the same with room to write back every lapsed edit: from about 3,200 edits on more lapse between two
  # checks than the batch's 100 (--rehearse-cap, code of 0b5f02c or later). Does rehearsal hold once none
  # has to wait? Measured as a fork of the run above at 4,000 edits (its folder copied, the cap set in
  # its run.json and journal header; resumed with this table's name): the run started afresh with these
  # arguments is the run above until the cap first binds (3,100 edits), then this one. Measured to 10,000 edits
  # (2026-12-06): 90.2 at 7,000, 73.2 after all 10,000, specificity 54.0 (BENCHMARKS.md)
  [cf10k-alphaedit-l2-80-rehearse-cap300-from4000]="--dataset $cf_stream $lifelong --method alphaedit --l2 80 --rehearse 1 --rehearse-cap 300"
  # and with no cap at all (10,000 cannot bind in a 10,000-edit run): from 5,600 edits on the cap of 300 bound
  # again (313–330 lapsed a batch by 6,000). Does writing back every lapsed edit hold efficacy 90 to 10,000?
  # Forked from the run above at 6,000 edits the same way; against a run started afresh with these
  # arguments it differs only where a cap bound (3,200–4,000 edits: up to ~60 a batch left for later;
  # 5,600–6,000: up to 30)
  [cf10k-alphaedit-l2-80-rehearse-all-from6000]="--dataset $cf_stream $lifelong --method alphaedit --l2 80 --rehearse 1 --rehearse-cap 10000"
  # the same with a wider block (layers 3–10: 8,885 null-space directions against 5,941) and warm-started
  # re-writes (code of 287a0fe or later; a 100-edit smoke run wrote 77% of its batch, the five layers 82%). With every lapsed edit written back, the five-layer block ran out of
  # room past 6,000 edits (BENCHMARKS.md); wider blocks lost to key drift without rehearsal (α 40, layers 3–10:
  # 80.2 at 4,000 against 84.8), but rehearsal re-writes an edit at the keys the model now reads
  # Measured to 3,000 edits and stopped there: efficacy level with the five layers (98.2 against 97.0),
  # as many re-writes a batch (66.5 against 67.7: they hold better, 82% against 65%, but each written column
  # leaves more edits lapsed, 0.34 against 0.29), specificity 2.0 lower and the six tasks' generated answers
  # out of format (BENCHMARKS.md)
  [cf10k-alphaedit-l2-80-rehearse-all-wide-warm]="--dataset $cf_stream $lifelong --method alphaedit --l2 80 --layers 3-10 --rehearse 1 --rehearse-cap 10000 --rehearse-warm"
  # the same five layers with a looser null space (--threshold 0.05: 7,202 directions against 5,941, layer 7's
  # 1,392 against 1,072, but P then holds 52% of layer 7's C0 trace against 27%). The no-cap fork ran away
  # past 7,000 edits (85.8 at 8,000): is the room what sets where, and what does more of it cost the neighbours?
  # Measured to 3,000 edits: it ranks below the strict null space (Eff 93.8 / Spe 55.8 against 97.0 / 60.0,
  # more re-writes from 2,200 edits on): the directions it adds are read by text (BENCHMARKS.md)
  [cf10k-alphaedit-l2-80-rehearse-all-t05-warm]="--dataset $cf_stream $lifelong --method alphaedit --l2 80 --threshold 0.05 --rehearse 1 --rehearse-cap 10000 --rehearse-warm"
  # the five layers with rehearsal and C_p re-read after every batch (code of ac81ccd or later, which counts f and
  # κ in each batch report): rehearsal gives out where f + κ reaches 1, and κ (earlier edits lapsed per column
  # written) grows ~0.07 per 1,000 edits stored. Part of those lapses may be key drift: C_p holds earlier edits at
  # the keys they were written with, 25-39% away from where layer 7 reads them 400-900 edits later (key_drift.py).
  # Re-read, C_p holds them where they are read now (every batch: the only period that measurably held the oldest
  # edits better at α 40; every 10 batches did not). Screened by κ at 2,000 edits against the run above's 0.22:
  # 0.23 (f 0.35, efficacy 97.4 against 97.0), its key pass 0.63 s per edit by then, so stopped at 2,100 (ranked)
  [cf10k-alphaedit-l2-80-rehearse-reread1]="--dataset $cf_stream $lifelong --method alphaedit --l2 80 --rehearse 1 --earlier-reread 1"
  # the five layers with rehearsal and a stricter null space (threshold 0.01, fewer directions): the looser 0.05
  # grew κ faster than 0.02 (0.44 against 0.29 over batches 22-31) though it has more room, its extra directions
  # being read by text; whether fewer, cleaner directions grow κ slower still. Screened by κ at 2,000 against 0.22:
  # at 1,000 f / κ 0.52 / 0.24 against 0.34 / 0.15, a batch's own efficacy 68 (604 directions at layer 7): stopped
  [cf10k-alphaedit-l2-80-rehearse-t01]="--dataset $cf_stream $lifelong --method alphaedit --l2 80 --threshold 0.01 --rehearse 1"
  # rehearsal at α 160: α 40 → 80 moved rehearsal's efficacy at 5,000 edits from 84.4 to 90.2 (smaller updates,
  # fewer earlier edits knocked out, more of a batch's own left to re-write); whether twice again slows κ's
  # growth (0.15 → 0.22 from 1,000 to 2,000 edits at α 80). Screened by κ at 1,000 and 2,000:
  # at 1,000 f / κ 0.52 / 0.23 against 0.34 / 0.15, a batch's own efficacy 69, 98 re-writes by 1,400: stopped
  [cf10k-alphaedit-l2-160-rehearse]="--dataset $cf_stream $lifelong --method alphaedit --l2 160 --rehearse 1"
  # rehearsal whose re-writes replace their hold (--replace-holds; first run with c2addfb's --rehearse-replace, the same
  # rule on this stream, which has no fact twice): C_p held each lapsed edit where it reads the lapsed answer, at
  # (nearly) the key the re-write is written at -- at layer 3 the very same key -- so a re-write was solved against its
  # own hold, and f stayed near a third. Screened by f / κ at 1,000 edits against the plain rehearsal run's 0.34 / 0.15:
  # 0.29 / 0.14, efficacy 97.0 (97.6), on an AMD EPYC at 2.0 s per edit; stopped there (ranked: the hold is small at α 80)
  [cf10k-alphaedit-l2-80-rehearse-replace]="--dataset $cf_stream $lifelong --method alphaedit --l2 80 --rehearse 1 --replace-holds"
  # the same with the re-writes weighed 10 (or 3) times the batch's own in the solve (--rewrite-weight): about a third
  # of the re-writes did not take even in their own batch, and f, the share lapsed again, is half of what bounds
  # rehearsal. Forked from the run above at 1,000 edits (its folder copied, rehearse_replace renamed replace_holds and
  # rewrite_weight set in its run.json and journal header; resumed with these names) and screened to 2,000 edits,
  # by f / κ against the plain rehearsal run's 0.35 / 0.22 there. Measured 2026-12-07: w 10 stopped at 1,700 edits
  # (f 0.09, κ 0.42, 88 re-writes a batch), w 3 at 2,000 (f / κ 0.14 / 0.33, efficacy 95.6, W₇ spectral 2.8-fold)
  [cf10k-alphaedit-l2-80-rehearse-replace-rw10-from1000]="--dataset $cf_stream $lifelong --method alphaedit --l2 80 --rehearse 1 --replace-holds --rewrite-weight 10"
  [cf10k-alphaedit-l2-80-rehearse-replace-rw3-from1000]="--dataset $cf_stream $lifelong --method alphaedit --l2 80 --rehearse 1 --replace-holds --rewrite-weight 3"
  # rehearsal at α 60, the one point of the α axis not yet screened: f + κ at 1,000 edits reads 0.49 at α 80 and
  # 0.75 at α 160; whether between α 40 and 80 it grows slower (κ 0.15 → 0.22 from 1,000 to 2,000 at α 80).
  # Started 2026-12-07 and stopped in its pre-edit evaluation to give the CPU to the screen above; started again
  # from scratch 06:37 UTC that day with code of d0d38e2 (the pre-edit evaluation recomputed: the scoring code had
  # changed since the cached one); measured to 2,200 edits and stopped there (it tracks α 80, BENCHMARKS.md)
  [cf10k-alphaedit-l2-60-rehearse]="--dataset $cf_stream $lifelong --method alphaedit --l2 60 --rehearse 1"
  # a wider model: Gemma-3-270M's keys are 2,048 wide against SmolLM2's 1,536 and its null spaces keep
  # 1,269–1,842 directions per edited layer (SmolLM2's last edited layer 1,072). Does more room slow κ, the
  # earlier edits each written column knocks out? α 50 is SmolLM2's α 80 by strength: an edit key's ‖P k‖²
  # averages 19.5 over Gemma's layers 2–6 against 28.5 over SmolLM2's 3–7 (200 stream records, 2026-12-07).
  # 3,000 edits, not 10,000: the pre-edit evaluation scores every record of the run (~50 minutes for 10,000 on
  # Gemma), and f / κ at 1,000–3,000 edits are what compare with SmolLM2's runs
  # Stopped after its first batch (2026-12-07): it wrote 55 of 100 where SmolLM2 at α 60–80 writes 85–88,
  # though the solve's own write on each key (diag Kᵀ(P K Kᵀ + α I)⁻¹ P K) is alike, 0.24–0.35 against
  # 0.25–0.27: Gemma's edits need more of the residual than the key space's size says
  [cf3000-gemma-alphaedit-l2-50-rehearse]="--model gemma3-270m --dataset $cf_stream ${lifelong/--n 10000/--n 3000} --method alphaedit --l2 50 --rehearse 1"
  # so Gemma at its preset's α (the paper's 10) with rehearsal: batches written about as fully as SmolLM2's α 80
  # writes its own, the regime whose f / κ the comparison needs (the pre-edit evaluation is the α 50 run's, cached)
  [cf3000-gemma-alphaedit-rehearse]="--model gemma3-270m --dataset $cf_stream ${lifelong/--n 10000/--n 3000} --method alphaedit --rehearse 1"
  # At 1,000 edits the run above knocks out 0.21 earlier edits per column (SmolLM2 0.03-0.04) while its keys drift
  # twice as fast, its first layer's summed update 69% one direction (BENCHMARKS.md, "A wider model"). Is it the
  # drift? The last preset layer alone has none (nothing below it is edited): if κ's knock-outs fall to SmolLM2's,
  # the lower layers' updates are what knocks Gemma's edits out. Started 2026-12-07 18:03 UTC and stopped after two
  # batches: alone, layer 6 wrote 53 and 37 of 100 (one W_out behind Gemma's norm cannot carry an edit's residual)
  [cf3000-gemma-alphaedit-l6-rehearse]="--model gemma3-270m --dataset $cf_stream ${lifelong/--n 10000/--n 3000} --method alphaedit --layers 6 --rehearse 1"
  [cf10k-alphaedit-l7]="--dataset $cf_stream $lifelong --method alphaedit --layers 7"
  # BetaEdit's leak penalty (--leak-weight, code of 452f4c6 or later) at its λ₁ 3000 and the paper's α 10:
  # the projection's null space is only approximate on SmolLM2 (it holds 27–52% of the preserved keys'
  # energy), and what the update still changes at preserved keys is what a long sequence's damage follows;
  # λ₁ C0 in the solve penalises it where P carries preserved energy (an anisotropic α)
  [cf10k-alphaedit-leak3000]="--dataset $cf_stream $lifelong --method alphaedit --leak-weight 3000"
  # the leak penalty with rehearsal: a model kept closer to the unedited one (the leak penalised) and the
  # lapsed edits written again, the pair that held longest with α 40 (rehearsal) and α 80
  [cf10k-alphaedit-leak3000-rehearse]="--dataset $cf_stream $lifelong --method alphaedit --leak-weight 3000 --rehearse 1"
)
# what a queue runs when no names are given: the runs BENCHMARKS.md still lacks, the ones in progress
# first (the 2,000- and 1,000-edit runs above and cf10k-alphaedit-l2-40 are measured and recorded there;
# name one to run it again; cf2000-alphaedit-l2-40-joint and the two re-read runs are measured too); the
# wide 10K run (stopped at 4,200 edits), MEMIT-seq at λ 3000 (2,200), layer 7 alone (2,100) and α 80
# (2,100) were stopped on purpose once they had ranked (BENCHMARKS.md) and come last
order=(cf10k-alphaedit-l2-80-rehearse-all-from6000 cf10k-alphaedit-l2-80-rehearse-cap300-from4000 cf10k-alphaedit-l2-80-rehearse cf10k-alphaedit-leak3000 cf10k-alphaedit-leak3000-rehearse cf10k-alphaedit cf10k-alphaedit-l2-40-reread10 cf2000-alphaedit-l2-40-rehearse
       cf10k-alphaedit-l2-40-rehearse cf2000-alphaedit-l2-40-nll02 cf2000-alphaedit-l2-40-nll02-reread cf2000-memit-seq-lam3000
       cf10k-alphaedit-l2-40-joint cf10k-alphaedit-nas cf10k-alphaedit-l2-40-wide cf10k-memit-seq-lam3000 cf10k-alphaedit-l7
       cf10k-alphaedit-l2-80)
