"""The benchmarks' random-model paths (the ones meant for a GPU) run end to end on a tiny shape.

They are not exercised anywhere else before a GPU is lent, so a renamed API would otherwise
only show up on the device, where time is scarce.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import WIKITEXT

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
COUNTERFACT = WIKITEXT.parent / "counterfact" / "counterfact_test.json"


def _json_only(stdout: str) -> dict:
    """Under --json a benchmark prints one JSON document and nothing else (no table after it)."""
    return json.loads(stdout)


def _run(*args: str, home: Path) -> dict:
    done = subprocess.run([sys.executable, *args, "--json"], capture_output=True, text=True, timeout=600,
                          env={"ALPHAEDIT_HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return _json_only(done.stdout)


def test_edit_speed_random_model_path(tiny_model_folder, tmp_path):
    result = _run(str(BENCHMARKS / "edit_speed.py"), "--shape", "tiny", "--edits", "4", "--sequential-edits", "2",
                  "--steps", "2", "--requests", str(COUNTERFACT), "--corpus", str(WIKITEXT), "--corpus-tokens", "2000",
                  "--tokenizer", str(tiny_model_folder), home=tmp_path)
    assert [p["edits"] for p in result["paths"]] == [4, 4, 2, 2]
    assert [p["dtype"] for p in result["paths"]] == ["bfloat16", "bfloat16", "float32", "float32"]
    assert all(set(p["phase_s_per_edit"]) == {"z", "keys", "solve", "check"} for p in result["paths"])
    assert result["batched_s_per_edit"] > 0 and result["sequential_s_per_edit"] > 0


def test_stats_speed_random_model_path(tmp_path):
    result = _run(str(BENCHMARKS / "stats_speed.py"), "--shape", "tiny", "--tokens", "4096", home=tmp_path)
    assert result["layers"] == [4, 5, 6, 7, 8] and result["one_pass_tokens_per_s"] > 0


def test_general_check_benchmark_runs_and_both_label_paths_agree(tiny_model_folder, tmp_path):
    result = _run(str(BENCHMARKS / "general_check.py"), "--model", str(tiny_model_folder), "--tests", "3", home=tmp_path)
    assert result["scores_agree"] and set(result["scores"]) == {"sst2", "mrpc", "cola", "rte", "mmlu", "nli"}
    assert result["seconds_first_step_labels"] > 0 and result["seconds_teacher_forced_labels"] > 0


def _benchmark(name: str):
    """A benchmarks/ script as a module (they are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _three_batch_journal(model, layout, tokenizer, tmp_path, config):
    """Four facts edited in three batches (2, 1, 1) into tmp_path/state; returns the editor."""
    import copy

    from alphaedit.editor import Editor
    from alphaedit.requests import EditRequest
    from alphaedit.stats import CorpusSpec, StatsCache

    editor = Editor(copy.deepcopy(model), tokenizer, config, layout=layout, corpus=CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64),
                    cache=StatsCache(tmp_path / "home"), show_progress=False)
    facts = [("{} is located in", "The Eiffel Tower", "Rome"), ("{} speaks", "Danielle Darrieux", "English"),
             ("{} flows through", "The Seine", "Berlin"), ("{} plays", "Lionel Messi", "golf")]
    for batch in ([facts[0], facts[1]], [facts[2]], [facts[3]]):
        editor.edit([EditRequest(p, s, t) for p, s, t in batch])
        editor.save_state(tmp_path / "state")
    return editor


def test_key_interference_reads_what_later_batches_wrote_on_earlier_keys(llama, tokenizer, tmp_path):
    """From a journal of three AlphaEdit batches: each batch's own change on its keys and the
    change the batches after it wrote on them, against the same products from the editor's
    batches in memory; nothing after the last batch."""
    from alphaedit.config import EditConfig

    module = _benchmark("key_interference")
    model, layout = llama
    config = EditConfig(method="alphaedit", layers=[1, 2], v_num_grad_steps=3, v_lr=0.5, nullspace_threshold=0.5, context_template_length=6)
    editor = _three_batch_journal(model, layout, tokenizer, tmp_path, config)
    result = module.interference(str(tmp_path / "state"))
    assert result["edits"] == 4 and [r["edits_after"] for r in result["rows"]] == [2, 1, 0]
    batches = editor.batches
    for k, row in enumerate(result["rows"]):
        for layer in (1, 2):
            keys = batches[k].keys[layer].double()
            later = sum((b.deltas[layer].dense().double() for b in batches[k + 1 :]), torch.zeros(1, dtype=torch.float64))
            assert row[str(layer)]["own"] == pytest.approx(float((batches[k].deltas[layer].dense().double() @ keys.T).norm()), rel=1e-6)
            expected = float((later @ keys.T).norm()) if k < 2 else 0.0
            assert row[str(layer)]["later"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert result["rows"][0]["1"]["later"] > 0 and result["keys_rank"] == {"1": 4, "2": 4}
    for layer in (1, 2):  # the shared direction, from the editor's keys and updates written out plainly
        keys = torch.cat([b.keys[layer].double() for b in batches])
        unit = [k / k.norm() for k in keys]
        pairs = [float(a @ b) for i, a in enumerate(unit) for j, b in enumerate(unit) if i != j]
        top = max(float(sum(float(u @ v) ** 2 for u in unit)) for v in torch.linalg.svd(torch.stack(unit))[2])  # max over directions v
        summed = sum(b.deltas[layer].dense().double() for b in batches)
        sigma = torch.linalg.svdvals(summed)
        shared = result["shared"][str(layer)]
        assert shared["key_mean_cosine"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-9)
        assert shared["key_top_share"] == pytest.approx(top / len(unit), rel=1e-9) and 1 / keys.shape[1] <= shared["key_top_share"] <= 1
        assert shared["update_top_share"] == pytest.approx(float(sigma[0] ** 2 / (summed ** 2).sum()), rel=1e-9)
    # the first two batches alone: what a run had written at an earlier point
    early = module.interference(str(tmp_path / "state"), first=2)
    assert early["edits"] == 3 and early["batches"] == 2 and [r["edits_after"] for r in early["rows"]] == [1, 0]
    assert early["rows"][0]["1"]["own"] == pytest.approx(result["rows"][0]["1"]["own"], rel=1e-9)


def test_key_drift_reads_how_far_later_batches_moved_an_earlier_batchs_keys(llama, tokenizer, tmp_path, monkeypatch):
    """From a journal of three AlphaEdit batches: right after the probe batch its keys are the
    stored ones; after all three the drift equals the keys read on the editor's own edited model
    against the stored ones; the first edited layer never drifts."""
    import copy

    from alphaedit.config import EditConfig
    from alphaedit.keys import compute_keys

    module = _benchmark("key_drift")
    model, layout = llama
    config = EditConfig(method="alphaedit", layers=[1, 2], v_num_grad_steps=3, v_lr=0.5, nullspace_threshold=0.5, context_template_length=6)
    editor = _three_batch_journal(model, layout, tokenizer, tmp_path, config)
    result = module.drift(str(tmp_path / "state"), probe=0, after=[1, 3], model=copy.deepcopy(model), tokenizer=tokenizer)
    assert result["probe_requests"] == 2 and [r["edits_after_probe"] for r in result["rows"]] == [0, 2]
    first, last = result["rows"]
    assert first["1"] == pytest.approx(0.0, abs=1e-7) and first["2"] == pytest.approx(0.0, abs=1e-7)
    stored = editor.batches[0].keys
    now = compute_keys(editor.model, layout, tokenizer, editor.batches[0].requests, editor.context_templates(), [1, 2]).keys
    expected = float(((now[2].double() - stored[2].double()).norm(dim=1) / stored[2].double().norm(dim=1)).mean())
    assert last["2"] == pytest.approx(expected, rel=1e-4) and last["2"] > 100 * max(first["2"], 1e-8)  # the later batches moved them
    assert last["1"] == pytest.approx(0.0, abs=1e-7)  # nothing below layer 1 was edited
    with pytest.raises(SystemExit, match="--after must lie in 1..3"):
        module.drift(str(tmp_path / "state"), probe=0, after=[4], model=model, tokenizer=tokenizer)
    # two probe batches pooled, split by whether each edit holds: per request, from the editor's own model
    from alphaedit.rehearsal import edit_holds

    pooled = module.drift(str(tmp_path / "state"), probe=[0, 1], after=[3], model=copy.deepcopy(model), tokenizer=tokenizer, holds=True)
    requests = editor.batches[0].requests + editor.batches[1].requests
    holds = torch.tensor(edit_holds(editor.model, tokenizer, requests, layout))
    now = compute_keys(editor.model, layout, tokenizer, requests, editor.context_templates(), [1, 2]).keys
    stored = torch.cat([editor.batches[0].keys[2], editor.batches[1].keys[2]]).double()
    moved = (now[2].double() - stored).norm(dim=1) / stored.norm(dim=1)
    (row,) = pooled["rows"]
    assert pooled["probe_requests"] == 3 and row["edits_after_probe"] == 1 and (row["held"], row["lapsed"]) == (int(holds.sum()), int((~holds).sum()))
    assert row["2"] == pytest.approx(float(moved.mean()), rel=1e-4)
    for name, chosen in (("held", holds), ("lapsed", ~holds)):
        assert row[f"2.{name}"] == (pytest.approx(float(moved[chosen].mean()), rel=1e-4) if chosen.any() else None)
    # the tiny model's edits all lapse by then; with a check that finds the middle one holding, the split is by request
    monkeypatch.setattr(module, "edit_holds", lambda model, tokenizer, requests, layout: [False, True, False])
    (split,) = module.drift(str(tmp_path / "state"), probe=[0, 1], after=[3], model=copy.deepcopy(model), tokenizer=tokenizer, holds=True)["rows"]
    assert (split["held"], split["lapsed"]) == (1, 2) and split["2.held"] == pytest.approx(float(moved[1]), rel=1e-4)
    assert split["2.lapsed"] == pytest.approx(float(moved[[0, 2]].mean()), rel=1e-4) and split["1.held"] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(SystemExit, match="--after must lie in 2..3"):
        module.drift(str(tmp_path / "state"), probe=[0, 1], after=[1], model=model, tokenizer=tokenizer)


def test_rehearsal_z_times_the_lapsed_edits_z_from_zero_from_the_journal_and_from_a_working_value(llama, tokenizer, tmp_path):
    """From a journal made with a weak, warm-started rehearsal: the lapsed edits are those the
    check finds on the replayed model; the journal's starts cover the ones it kept values for;
    from the cold result itself every request starts where the cold one ended (with a learning
    rate this weak neither reaches the stop, so both run every step; test_targets.py checks the stop
    after the jump)."""
    import copy

    from alphaedit.config import EditConfig
    from alphaedit.rehearsal import edit_holds, standing_requests
    from alphaedit.stats import StatsCache

    module = _benchmark("rehearsal_z")
    model, layout = llama
    config = EditConfig(method="alphaedit", layers=[1, 2], v_num_grad_steps=4, v_lr=1e-4, rehearse=1, rehearse_warm=True,
                        context_template_length=6)
    editor = _three_batch_journal(model, layout, tokenizer, tmp_path, config)
    standing = standing_requests(editor.batches)
    lapsed = sum(not h for h in edit_holds(editor.model, tokenizer, standing, layout))
    assert lapsed >= 2, "the weak batches should leave edits lapsed"
    result = module.measure(str(tmp_path / "state"), most=3, model=copy.deepcopy(model), tokenizer=tokenizer, cache=StatsCache(tmp_path / "home"))
    assert result["edits standing"] == 4 and result["lapsed"] == min(3, lapsed)
    cold, journal, best = result["runs"]
    assert journal["start"] == f"warm from the journal ({min(3, lapsed)} kept)"
    assert best["mean_steps"] <= cold["mean_steps"] and journal["mean_steps"] <= cold["mean_steps"]
    assert best["mean_target_prob"] >= cold["mean_target_prob"] - 1e-4  # it began at the cold result


def test_update_spectrum_reads_the_summed_update_against_the_unedited_weight(llama, tokenizer, tmp_path):
    """From a journal of three batches: σ_max and the Frobenius norm of the summed updates against
    the unedited W_out's, and the count of singular values above σ_max(W_out), as computed from
    the editor's batches in memory."""
    from alphaedit.config import EditConfig
    from alphaedit.layouts import mlp_out_weight

    module = _benchmark("update_spectrum")
    model, layout = llama
    config = EditConfig(method="memit", layers=[1, 2], v_num_grad_steps=3, v_lr=0.5, mom2_update_weight=1e-3, context_template_length=6)
    editor = _three_batch_journal(model, layout, tokenizer, tmp_path, config)
    result = module.spectrum(str(tmp_path / "state"), every=2, model=model)
    assert [r["edits"] for r in result["rows"]] == [3, 4]  # after the second batch, and the last
    for row, upto in zip(result["rows"], (2, 3)):
        for layer in (1, 2):
            base = mlp_out_weight(model, layout, layer).detach().double()
            total = sum(b.deltas[layer].dense().double() for b in editor.batches[:upto])
            total = total if total.shape == base.shape else total.T
            s, sigma_max = torch.linalg.svdvals(total), torch.linalg.matrix_norm(base, ord=2)
            assert row[str(layer)]["sigma_ratio"] == pytest.approx(float(s[0] / sigma_max), rel=1e-9)
            assert row[str(layer)]["frobenius_ratio"] == pytest.approx(float(total.norm() / base.norm()), rel=1e-9)
            assert row[str(layer)]["above_sigma_max"] == int((s > sigma_max).sum())
    assert result["rows"][-1]["2"]["sigma_ratio"] > 0


def test_null_space_leak_measures_what_the_projector_leaves_and_what_the_edits_changed(llama, tokenizer, tmp_path):
    """On a three-batch AlphaEdit journal: each rule's rank and C0-trace share against an
    eigendecomposition in float64, each text kind's key-energy share and the summed update's
    relative output change against keys read with a plain forward pre-hook."""
    from alphaedit.config import EditConfig
    from alphaedit.layouts import get_module, mlp_out_weight
    from alphaedit.updates import null_space_mask

    module = _benchmark("null_space_leak")
    model, layout = llama
    config = EditConfig(method="alphaedit", layers=[1, 2], v_num_grad_steps=3, v_lr=0.5, nullspace_threshold=0.5, context_template_length=6)
    editor = _three_batch_journal(model, layout, tokenizer, tmp_path, config)
    moments = {l: s.second_moment.cpu() for l, s in editor.statistics().items()}
    texts = {"a": [tokenizer("The Eiffel Tower is in Paris")["input_ids"]],
             "b": [tokenizer("Danielle Darrieux speaks French")["input_ids"], tokenizer("The Seine flows")["input_ids"]]}
    updates = module.summed_updates(str(tmp_path / "state"), [1, 2])
    edited = module.first_batch_keys(str(tmp_path / "state"), [1, 2])
    result = module.leak(model, layout, moments, module.parse_rules("absolute:0.5,energy:0.9"), texts, updates, edited)
    assert result["texts"] == {"a": len(texts["a"][0]), "b": len(texts["b"][0]) + len(texts["b"][1])}
    for layer in (1, 2):
        c0 = moments[layer].double()
        values, vectors = torch.linalg.eigh(c0)
        keys = {}
        for name, rows in texts.items():
            read = []
            handle = get_module(model, layout.mlp_out_path(layer)).register_forward_pre_hook(lambda m, a: read.append(a[0][0].double()))
            with torch.no_grad():
                for ids in rows:
                    model(torch.tensor([ids]))
            handle.remove()
            keys[name] = torch.cat(read)
        for rule, value in (("absolute", 0.5), ("energy", 0.9)):
            mask = null_space_mask(values, value, rule)
            row = result["projection"][str(layer)][f"{rule}:{value:g}"]
            assert row["rank"] == int(mask.sum())
            assert row["corpus_trace_share"] == pytest.approx(float(values[mask].sum() / values.sum()), rel=1e-6, abs=1e-9)
            basis = vectors[:, mask]
            for name, k in keys.items():
                assert row[name] == pytest.approx(float((k @ basis).norm() ** 2 / k.norm() ** 2), rel=1e-6, abs=1e-9)
            first = editor.batches[0].keys[layer].double()  # [u, d0]: one ‖Pk‖² per edited key
            assert row["edited_energy"] == pytest.approx(sum(float((k @ basis).norm() ** 2) for k in first) / len(first), rel=1e-6)
        assert result["projection"][str(layer)]["energy:0.9"]["corpus_trace_share"] <= 0.1 + 1e-9
        total = sum(b.deltas[layer].dense().double() for b in editor.batches)
        weight = mlp_out_weight(model, layout, layer).detach().double()
        weight = weight.T if layout.weight_transposed else weight
        for name, k in keys.items():
            expected = float(((k @ total.T).norm(dim=-1) / (k @ weight.T).norm(dim=-1)).mean())
            assert result["output_change"][str(layer)][name] == pytest.approx(expected, rel=1e-5)
            assert expected > 0
        first_two = module.summed_updates(str(tmp_path / "state"), [1, 2], batches=2)[layer]
        assert torch.allclose(first_two, sum(b.deltas[layer].dense().double() for b in editor.batches[:2]), atol=1e-6)


def test_null_space_room_counts_the_directions_earlier_keys_hold_against_a_full_space_reference(llama, tokenizer, tmp_path):
    """`room` works in the null space's coordinates; the reference in the full key space: the
    eigenvalues of P C_p P above α (P = U Uᵀ, C_p the earlier batches' Σ kkᵀ) and the share of the
    batch's ‖K P‖² along their eigenvectors, one batch at a time in float64."""
    from alphaedit.config import EditConfig
    from alphaedit.updates import null_space_mask

    module = _benchmark("null_space_leak")
    model, layout = llama
    config = EditConfig(method="alphaedit", layers=[1, 2], v_num_grad_steps=3, v_lr=0.5, nullspace_threshold=0.5, context_template_length=6)
    editor = _three_batch_journal(model, layout, tokenizer, tmp_path, config)
    keys = module.batch_keys(str(tmp_path / "state"), [1, 2])
    assert len(keys) == 3 and all(torch.equal(k[2], b.keys[2].double()) for k, b in zip(keys, editor.batches))
    for layer in (1, 2):
        moment = editor.statistics()[layer].second_moment.cpu().double()
        values, vectors = torch.linalg.eigh(moment)
        basis = vectors[:, null_space_mask(values, 0.5, "absolute")]
        projector = basis @ basis.T  # [d0, d0]
        batches = [k[layer] for k in keys]
        alpha = 0.5 * float((batches[0] @ projector).norm() ** 2) / len(batches[0])  # half a first key's energy: some directions cross it
        result = module.room(moment, ("absolute", 0.5), batches, alpha, every=1)
        assert result["rank"] == basis.shape[1] and [r["edits_before"] for r in result["rows"]] == [0, 2, 3]
        for index, row in enumerate(result["rows"]):
            earlier = sum((k.T @ k for k in batches[:index]), torch.zeros_like(moment))
            weights, directions = torch.linalg.eigh(projector @ earlier @ projector)
            assert row["above_alpha"] == int((weights > alpha).sum())
            assert row["above_10_alpha"] == int((weights > 10 * alpha).sum())
            inside = batches[index] @ projector
            expected = float((inside @ directions[:, weights > alpha]).norm() ** 2 / inside.norm() ** 2)
            assert row["share"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert result["rows"][0]["above_alpha"] == 0 and result["rows"][-1]["above_alpha"] >= 1


def test_paraphrase_split_groups_records_by_the_paraphrase_wording_and_later_edits(tmp_path):
    facts = [  # (subject, question, paraphrase, answer); subjects 0/2 and 1/3 are edited twice
        ("Alpha Co", "Who founded Alpha Co?", "Who was the founder of Alpha Co?", "Ann"),      # keeps "?"
        ("Beta", "What country is Beta from?", "Which land is Beta?", "Spain"),                # ends at the subject
        ("Alpha Co", "Which person founded Alpha Co?", "Alpha Co was founded by whom?", "Ann"),  # rewords
        ("Beta", "Where is Beta from?", "Where was Beta from?", "France"),                     # keeps " from?"
        ("Gamma", "Who made Gamma?", "Who built it?", "Bob"),                                  # no subject
    ]
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps([{"subject": s, "src": q, "rephrase": p, "answers": [a], "alt": "x", "loc": "nq question: who?",
                                 "loc_ans": "y"} for s, q, p, a in facts]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"args": {"dataset": f"zsre:{data}", "n": 5}}))
    gens = [1.0, 0.0, 0.5, 0.5, 0.25]
    rows = [{"case_id": i, "pre": {}, "post": {"efficacy": 1.0, "generalization": g, "specificity": 0.5, "generative_success": i % 2}}
            for i, g in enumerate(gens)]
    (run / "records.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = _run(str(BENCHMARKS / "paraphrase_split.py"), str(run), home=tmp_path)
    wording = {label: (row["records"], row["generalization"]) for label, row in result["wording"].items()}
    assert wording == {"keeps the words after the subject": (2, 75.0), "the subject ends the paraphrase": (1, 0.0),
                       "rewords the words after the subject": (1, 50.0), "the subject is not in the paraphrase verbatim": (1, 25.0)}
    sequence = {label: (row["records"], row["generative_success"]) for label, row in result["sequence"].items()}
    assert sequence == {"its subject edited again later, the same answer": (1, 0.0),
                        "its subject edited again later, another answer": (1, 100.0),
                        "the last edit of its subject": (3, 100 / 3)}  # records 2, 3, 4: 0, 1, 0
    # a records.jsonl that is not the dataset's first n records, in order, is refused, not mis-split
    (run / "records.jsonl").write_text("\n".join(json.dumps(r) for r in rows[::-1]) + "\n")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "paraphrase_split.py"), str(run)], capture_output=True, text=True,
                          timeout=300, env={"ALPHAEDIT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "does not list the first 5 records" in done.stderr


def test_plot_curves_reads_unfinished_runs_and_takes_the_blocks_last_layer_by_number(tmp_path):
    """progress.json of runs cut short (no summary.json) plot; the growth follows the highest
    layer as a number ("10" after "9", not "9" as text), relative to its unedited norm."""
    plot_curves = _benchmark("plot_curves")
    runs = []
    for name, growth in (("wide", 1.5), ("short", None)):
        run = tmp_path / name
        run.mkdir()
        layers = [str(layer) for layer in range(3, 11)]
        progress = {
            "curve": [{"edits": 0, "efficacy": 30.0, "generalization": 30.0, "specificity": 70.0, "generative_success": 0.5},
                      {"edits": 100, "efficacy": 90.0, "generalization": 80.0, "specificity": 65.0, "generative_success": None,
                       "of": "edited", "records": 50}],
            "general": [{"edits": 0, "scores": {"sst2": {"f1_label": 0.5}, "rte": {"f1_label": 0.3}}}] if growth else [],
            "norms": [{"edits": 0, **{layer: 100.0 for layer in layers}},
                      {"edits": 100, **{layer: 100.0 for layer in layers}, "10": 100.0 * (growth or 1.2), "9": 300.0}],
        }
        (run / "progress.json").write_text(json.dumps(progress), encoding="utf-8")
        runs.append(run)
    series = plot_curves.series(runs[0])
    assert series["layer"] == "10"
    assert series["growth"] == [(0, 1.0), (100, 1.5)]
    assert series["general"] == [(0, pytest.approx(40.0))]
    out = tmp_path / "figure.png"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "plot_curves.py"), *map(str, runs), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wrong = subprocess.run([sys.executable, str(BENCHMARKS / "plot_curves.py"), *map(str, runs), "--out", str(out), "--label", "one"],
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "one --label per run" in wrong.stderr


def test_plot_curves_reads_a_finished_run_from_its_summary_with_the_final_point(tmp_path):
    """Once a run has its summary.json, the curve ends with the final evaluation (every edited
    record), which progress.json does not hold; a run without one still plots from progress.json."""
    plot_curves = _benchmark("plot_curves")
    point = {"edits": 100, "efficacy": 90.0, "generalization": 80.0, "specificity": 65.0, "generative_success": 10.0}
    progress = {"curve": [{**point, "edits": 0}, {**point, "of": "edited", "records": 50}],
                "general": [], "norms": [{"edits": 0, "3": 10.0}, {"edits": 100, "3": 12.0}]}
    (tmp_path / "progress.json").write_text(json.dumps(progress), encoding="utf-8")
    assert [p["edits"] for p in plot_curves.series(tmp_path)["curve"]] == [0, 100]
    summary = {**progress, "curve": [*progress["curve"], {**point, "edits": 200, "efficacy": 70.0}],
               "norms": [*progress["norms"], {"edits": 200, "3": 15.0}]}
    (tmp_path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    series = plot_curves.series(tmp_path)
    assert [(p["edits"], p["efficacy"]) for p in series["curve"]] == [(0, 90.0), (100, 90.0), (200, 70.0)]
    assert series["growth"][-1] == (200, 1.5)


def test_curve_rows_reads_each_points_batches_checks_and_growth_from_a_run_folder(tmp_path):
    """The rows of a long run's table, from progress.json and the batch reports: the batches' own
    efficacy and z steps weighed by requests over the batches since the previous point, the six
    tasks at that point, the growth and the rehearsal figures of the batch that ends there."""
    curve_rows = _benchmark("curve_rows")
    progress = {"curve": [{"edits": 0, "efficacy": 30.0, "generalization": 31.0, "specificity": 70.0, "generative_success": 0.5},
                          {"edits": 150, "efficacy": 90.0, "generalization": 80.0, "specificity": 65.0, "generative_success": 40.0,
                           "of": "edited", "records": 50}],  # after the two batches' 150 requests
                "general": [{"edits": 0, "scores": {"sst2": {"f1_label": 0.5, "f1": 0.2}, "rte": {"f1_label": 0.3, "f1": 0.1}}},
                            {"edits": 150, "scores": {"sst2": {"f1_label": 0.6, "f1": 0.0}, "rte": {"f1_label": 0.2, "f1": 0.1}}}]}
    (tmp_path / "progress.json").write_text(json.dumps(progress), encoding="utf-8")
    from alphaedit.journal import Journal

    journal = Journal.create(tmp_path / "state", {"config": {}})
    for k, (requests, efficacy, steps, held, rehearsed) in enumerate(((100, 1.0, 8.0, None, 0), (50, 0.7, 11.0, 0.9, 30))):
        # the second report: 20 of 25 re-writes held (a made-up count: the aggregation is what is tested)
        growth = {str(layer): {"frobenius": 1 + layer / 100 + k, "spectral": 1 + layer / 1000 + k} for layer in (3, 7, 10)}
        report = {"requests": requests, "efficacy": efficacy, "z_steps": steps, "weight_growth": growth, "earlier_held": held,
                  "rehearsed": rehearsed, **({"rewrites_counted": 25, "rewrites_lapsed": 5} if k else {})}
        journal.append_batch(2 * k + 1, [], report, {"delta": torch.zeros(1)})  # batches 1 and 3
    # between them, a batch folder a killed run renamed into place but never committed: not one of the run's batches
    stray = tmp_path / "state" / "batches" / "000002"
    stray.mkdir()
    (stray / "report.json").write_text(json.dumps({"requests": 100, "efficacy": 0.0}), encoding="utf-8")
    start, point = curve_rows.rows(tmp_path)
    assert start["batch_efficacy"] is None and start["general_label"] == pytest.approx(40.0)
    assert start["general_generated"] == pytest.approx(15.0)
    assert point["edits"] == 150 and point["efficacy"] == 90.0
    assert point["batch_efficacy"] == pytest.approx((100 * 100 + 70 * 50) / 150)
    assert point["z_steps"] == pytest.approx((8.0 * 100 + 11.0 * 50) / 150)
    assert point["general_label"] == pytest.approx(40.0) and point["general_generated"] == pytest.approx(5.0)
    assert point["last_layer"] == "10" and point["first_layer"] == "3"  # by number, not as text
    assert point["last_frobenius"] == pytest.approx(2.1) and point["last_spectral"] == pytest.approx(2.01)
    assert point["first_frobenius"] == pytest.approx(2.03)
    assert point["earlier_held"] == pytest.approx(90.0) and point["rehearsed_mean"] == 30 and point["rehearsed_most"] == 30
    assert point["rewrites_held"] == pytest.approx(80.0) and start["rewrites_held"] is None
    done = subprocess.run([sys.executable, str(BENCHMARKS / "curve_rows.py"), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 150 | 90.0 | 80.0 | 65.0 | 40.0 | 90.0 | 9.0 | 40.0 / 5.0 | 2.100 / 2.010 | 2.030 | 90.0 | 30.0 / 30 | 80.0 |  |" in done.stdout
    as_json = subprocess.run([sys.executable, str(BENCHMARKS / "curve_rows.py"), str(tmp_path), "--json"], capture_output=True,
                             text=True, timeout=300)
    assert _json_only(as_json.stdout)[1]["edits"] == 150
    empty = subprocess.run([sys.executable, str(BENCHMARKS / "curve_rows.py"), str(tmp_path / "state")], capture_output=True,
                           text=True, timeout=300)
    assert empty.returncode != 0 and "not an `alphaedit eval` run folder" in empty.stderr


def test_curve_rows_gives_rehearsals_outlook_at_each_point(tmp_path):
    """f / κ at a point: rehearsal.outlook over the batches up to it, pooled over --pool re-writes."""
    curve_rows = _benchmark("curve_rows")
    progress = {"curve": [{"edits": 0, "efficacy": 30.0}, {"edits": 200, "efficacy": 90.0}, {"edits": 300, "efficacy": 85.0}]}
    (tmp_path / "progress.json").write_text(json.dumps(progress), encoding="utf-8")
    from alphaedit.journal import Journal

    journal = Journal.create(tmp_path / "state", {"config": {}})
    checks = ({}, {"earlier_held": 0.8, "earlier_lapsed": 20, "rehearsed": 20},
              {"earlier_held": 0.7, "earlier_lapsed": 40, "rehearsed": 30, "rewrites_counted": 20, "rewrites_lapsed": 5})
    for k, check in enumerate(checks):
        journal.append_batch(k, [], {"requests": 100, "efficacy": 0.9, **check}, {"delta": torch.zeros(1)})
    start, first, second = curve_rows.rows(tmp_path, pool=20)
    assert start["f"] is None and first["f"] is None  # one check: no pair of checks yet
    # 5 of 20 re-writes lapsed again; 40 - 5 - (20 - 20) = 35 newly lapsed over the 120 columns between the checks
    assert second["f"] == pytest.approx(0.25) and second["kappa"] == pytest.approx(35 / 120)
    assert second["kappa_own"] == pytest.approx(10 / 120)  # of them, the 10 of its own batch 1 did not write (efficacy 0.9)
    assert curve_rows.rows(tmp_path, pool=21)[2]["f"] is None  # too few re-writes to tell
    done = subprocess.run([sys.executable, str(BENCHMARKS / "curve_rows.py"), str(tmp_path), "--pool", "20"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "| 0.25 / 0.29 (0.08 + 0.21) |" in done.stdout, done.stderr[-3000:] + done.stdout


# (prompt, subject, new object, true object): the facts _rehearsing_journal edits
REHEARSED_FACTS = [("The mother tongue of {} is", "Danielle Darrieux", "English", "French"), ("{} is located in", "The Eiffel Tower", "Rome", "Paris"),
                   ("{} flows through", "The Seine", "Berlin", "Paris"), ("{} plays", "Lionel Messi", "golf", "football")]


def _rehearsing_journal(model, layout, tokenizer, tmp_path):
    """Four facts with true objects edited in three batches (2, 1, 1) into tmp_path/state by a
    rehearsing editor whose small α lets the tiny model's edits lapse; returns the editor."""
    import copy

    from alphaedit.config import EditConfig
    from alphaedit.editor import Editor
    from alphaedit.requests import EditRequest
    from alphaedit.stats import CorpusSpec, StatsCache

    config = EditConfig(method="alphaedit", layers=[1, 2], v_num_grad_steps=4, v_lr=0.5, l2_alpha=1e-4, nullspace_threshold=0.5,
                        rehearse=1, rehearse_cap=4, context_template_length=6)
    editor = Editor(copy.deepcopy(model), tokenizer, config, layout=layout, corpus=CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64),
                    cache=StatsCache(tmp_path / "home"), show_progress=False)
    for batch in ([REHEARSED_FACTS[0], REHEARSED_FACTS[1]], [REHEARSED_FACTS[2]], [REHEARSED_FACTS[3]]):
        editor.edit([EditRequest(*f) for f in batch])
    editor.save_state(tmp_path / "state")
    return editor


def test_batch_ab_solves_one_batch_two_ways_on_the_same_state(llama, tokenizer, tmp_path):
    """A rehearsing journal of three batches; batch 2 edited again from the state before it, with the
    journal's config and with a change: the same rehearsal both ways, and with α small beside the
    tiny model's keys the re-writes are written further without the hold on their own keys
    (replace_holds) and, weighed more in the solve, further still (rewrite_weight)."""
    import copy

    from alphaedit.stats import StatsCache

    module = _benchmark("batch_ab")
    model, layout = llama
    editor = _rehearsing_journal(model, layout, tokenizer, tmp_path)
    assert editor.batches[2].rehearsed, "the tiny model's edits should lapse by the third batch"

    def measure(changes, base=None):
        return module.measure(str(tmp_path / "state"), 2, changes, base, load=lambda: (copy.deepcopy(model), tokenizer),
                              cache=StatsCache(tmp_path / "home"))

    for changes, base in (({"replace_holds": True}, None), ({"rewrite_weight": 4}, {"replace_holds": True})):
        result = measure(changes, base)
        a, b = result["ways"].values()
        assert result["same rehearsal"] and a["rehearsed"] == b["rehearsed"] == len(editor.batches[2].rehearsed)
        assert result["paired"]["rehearsed margin"]["of"] == len(editor.batches[2].rehearsed)
        assert result["paired"]["rehearsed margin"]["mean"] > 0, changes
    assert module.setting("rewrite_weight=4") == ("rewrite_weight", 4) and module.setting("method=memit") == ("method", "memit")


def test_margin_hold_reweighs_each_earlier_keys_row_by_its_facts_margin(llama, tokenizer, tmp_path, monkeypatch):
    """C_p after the re-weighing is Σ w kkᵀ over every applied batch's key rows, w set by the row's
    fact's margin now (comfortable: `weight`, holding by little: `boost`, else 1), computed here
    row by row in float64; weights of 1 leave C_p as the replay built it; and batch_ab runs way B
    on the re-weighed editor, with the same rehearsal both ways; a journal whose C_p is not every
    row's sum (--replace-holds, --earlier-reread) is refused."""
    import copy
    import dataclasses

    from alphaedit.editor import Editor
    from alphaedit.rehearsal import standing_requests
    from alphaedit.stats import StatsCache

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # margin_hold_ab imports batch_ab as its script does
    module = _benchmark("margin_hold_ab")
    model, layout = llama
    layers = _rehearsing_journal(model, layout, tokenizer, tmp_path).config.layers

    def replayed():
        return Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)

    plain = replayed()
    built = {l: c.clone() for l, c in plain.preserved.items()}
    replacing = replayed()
    replacing.config = dataclasses.replace(replacing.config, replace_holds=True)  # its C_p is not every row's sum
    with pytest.raises(ValueError, match="replace-holds"):
        module.reweigh_by_margin(replacing, over=0.0, weight=0.5)
    module.reweigh_by_margin(plain, over=0.0, weight=1.0, under=1e9, boost=1.0)
    for layer in layers:
        torch.testing.assert_close(plain.preserved[layer], built[layer])

    weighed = replayed()
    standing = [r for r in standing_requests(weighed.batches) if r.target_true]
    margin = dict(zip([(r.subject, r.prompt) for r in standing], module.margins(weighed.model, tokenizer, standing).tolist()))
    over = sorted(margin.values())[len(margin) // 2]  # about half the facts comfortable
    seen = module.reweigh_by_margin(weighed, over=over, weight=0.25, under=over, boost=3.0)
    assert seen["earlier"] == len(standing) and 0 < seen["over"] < len(standing)
    for layer in layers:
        expected = torch.zeros_like(built[layer], dtype=torch.float64)
        for applied in weighed.batches:
            for request, key in zip(applied.written, applied.keys[layer].double()):
                m = margin[(request.subject, request.prompt)]
                expected += (0.25 if m > over else 3.0 if 0 < m < over else 1.0) * torch.outer(key, key)
        torch.testing.assert_close(weighed.preserved[layer].double(), expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(weighed.preserved[layer], built[layer])

    calls = []
    result = module.measure(str(tmp_path / "state"), 2, {}, load=lambda: (copy.deepcopy(model), tokenizer), cache=StatsCache(tmp_path / "home"),
                            prepare_b=lambda e: calls.append(module.reweigh_by_margin(e, over, 0.25)), label="re-weighed")
    assert len(calls) == 1 and result["same rehearsal"] and list(result["ways"]) == ["the journal's config", "re-weighed"]


def test_rank_one_held_solve_against_a_dense_least_squares_reference_and_the_full_hold_closed_form(monkeypatch):
    """The conjugate-gradient solve of rank_one_hold_ab equals, in float64: a least-squares solve
    written out entry by entry over Δ = X Qᵀ (Q an orthonormal basis of P's range); with the holds
    as a full basis of outputs for every held key, the closed form Δ = R Kᵀ P (P (KKᵀ + C_p) P + αI)⁻¹;
    and so does `full` = C_p with no rank-1 hold; a heavy rank-1 hold leaves û_iᵀ Δ k_i near 0
    while Δ k_i itself moves."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # rank_one_hold_ab imports batch_ab as its script does
    module = _benchmark("rank_one_hold_ab")
    g = torch.Generator().manual_seed(0)
    d, d0, u, n, alpha, w = 5, 8, 3, 4, 0.3, 2.0
    K, R = torch.randn(d0, u, generator=g, dtype=torch.float64), torch.randn(d, u, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(d0, 6, generator=g, dtype=torch.float64))[0]  # [d0, 6]
    P = Q @ Q.T
    Kh = torch.randn(d0, n, generator=g, dtype=torch.float64)
    Uh = torch.randn(d, n, generator=g, dtype=torch.float64)
    Uh = Uh / Uh.norm(dim=0)
    delta, steps = module.rank_one_held_solve(K, R, P, alpha, Kh, Uh, w, tol=1e-10)
    rows, targets = [], []  # each term of the objective, one row per scalar, over vec(X) of X [d, 6]
    QK, Qk = Q.T @ K, Q.T @ Kh
    for j in range(u):
        for a in range(d):
            row = torch.zeros(d, 6, dtype=torch.float64)
            row[a] = QK[:, j]
            rows.append(row.flatten()), targets.append(R[a, j])
    for index in range(d * 6):
        row = torch.zeros(d * 6, dtype=torch.float64)
        row[index] = alpha ** 0.5
        rows.append(row), targets.append(torch.tensor(0.0, dtype=torch.float64))
    for i in range(n):
        rows.append(w ** 0.5 * torch.outer(Uh[:, i], Qk[:, i]).flatten()), targets.append(torch.tensor(0.0, dtype=torch.float64))
    X = torch.linalg.lstsq(torch.stack(rows), torch.stack(targets)[:, None]).solution.view(d, 6)
    torch.testing.assert_close(delta, X @ Q.T, rtol=1e-8, atol=1e-10)
    assert steps <= n + 2  # the holds are n rank-1 terms beside the preconditioner's equation

    full_keys = Kh.repeat_interleave(d, dim=1)  # every key held along every output direction
    full_dirs = torch.eye(d, dtype=torch.float64).repeat(1, n)
    delta, _ = module.rank_one_held_solve(K, R, P, alpha, full_keys, full_dirs, 1.0, tol=1e-10)
    closed = R @ K.T @ P @ torch.linalg.inv(P @ (K @ K.T + Kh @ Kh.T) @ P + alpha * torch.eye(d0, dtype=torch.float64))
    torch.testing.assert_close(delta, closed, rtol=1e-8, atol=1e-10)
    as_full, _ = module.rank_one_held_solve(K, R, P, alpha, Kh[:, :0], Uh[:, :0], 1.0, full=Kh @ Kh.T, tol=1e-10)  # C_p itself
    torch.testing.assert_close(as_full, closed, rtol=1e-8, atol=1e-10)

    heavy, _ = module.rank_one_held_solve(K, R, P, alpha, Kh, Uh, 1e4, tol=1e-10)
    reads = (Uh * (heavy @ Kh)).sum(0)
    assert reads.abs().max() < 1e-3 * (heavy @ Kh).norm(dim=0).min()


def test_margin_directions_give_each_facts_margin_and_its_first_order_change_with_the_mlp_output(llama, tokenizer, monkeypatch):
    """margin_directions' margins are teacher_forcing.new_margin's, and u predicts by a central
    difference how the margin moves when ε v is added to W_out's output at the subject's last token."""
    from alphaedit.hooks import trace
    from alphaedit.prompts import PLAIN_TEMPLATE, encode, fill
    from alphaedit.requests import EditRequest
    from alphaedit.teacher_forcing import new_margin

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = _benchmark("rank_one_hold_ab")
    model, layout = llama
    requests = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
                EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris"), EditRequest("{} plays", "Lionel Messi", "golf", "football")]
    margin, grads = module.margin_directions(model, tokenizer, layout, requests, [1, 2], facts_per_pass=2)
    expected = new_margin(model, tokenizer, [r.text() for r in requests], [r.target_new for r in requests], [r.target_true for r in requests])
    torch.testing.assert_close(margin, expected, rtol=1e-4, atol=1e-5)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    for i, request in enumerate(requests):
        _, lookup = encode(tokenizer, fill(PLAIN_TEMPLATE, request))
        for layer in (1, 2):
            moved = []
            for eps in (1e-3, -1e-3):
                def push(t, eps=eps):
                    t = t.clone()
                    t[:, lookup] += eps * v
                    return t
                with trace(model, edit_outputs={layout.mlp_out_path(layer): push}):
                    moved.append(new_margin(model, tokenizer, [request.text()], [request.target_new], [request.target_true]))
            slope = (moved[0] - moved[1]).item() / 2e-3
            assert abs(slope - float(grads[layer][i].float() @ v)) < 1e-2 * (1 + abs(slope)), (i, layer)


def test_rank_one_hold_ab_runs_way_b_with_the_holds_and_refuses_what_it_cannot_hold(llama, tokenizer, tmp_path, monkeypatch):
    """On a rehearsing journal: way B solves every layer by conjugate gradients with one hold per
    key row of an edit still standing (a lapsed one gets none), with the same rehearsal both ways;
    a journal with --replace-holds is refused."""
    import copy
    import dataclasses

    from alphaedit.editor import Editor
    from alphaedit.rehearsal import standing_requests
    from alphaedit.stats import StatsCache

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # rank_one_hold_ab imports batch_ab as its script does
    module = _benchmark("rank_one_hold_ab")
    margins = _benchmark("batch_ab").margins
    model, layout = llama
    layers = _rehearsing_journal(model, layout, tokenizer, tmp_path).config.layers
    replacing = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)
    replacing.config = dataclasses.replace(replacing.config, replace_holds=True)
    with pytest.raises(ValueError, match="replace-holds"):
        module.hold_along_margins(replacing, 1.0, [])
    log, seen, expected = [], {}, {}

    def prepare(editor):
        standing = [r for r in standing_requests(editor.batches) if r.target_true]
        margin = dict(zip([module.fact(r) for r in standing], margins(editor.model, tokenizer, standing).tolist()))
        rows = [r for b in editor.batches if not b.reverted for r in b.written]
        expected.update(rows=len(rows), held=sum(margin[module.fact(r)] > 0 for r in rows), lapsed=sum(m <= 0 for m in margin.values()))
        seen.update(module.hold_along_margins(editor, 1.0, log))
        assert {l: h[0].shape[1] for l, h in editor.method.holds.items()} == {l: expected["held"] for l in layers}

    records = [{"case_id": i, "requested_rewrite": {"prompt": p, "subject": s, "target_new": {"str": new}, "target_true": {"str": true}},
                "paraphrase_prompts": [f"Indeed, {p.format(s)}"], "neighborhood_prompts": [p.format("Someone else")]}
               for i, (p, s, new, true) in enumerate(REHEARSED_FACTS)]
    (tmp_path / "cf.json").write_text(json.dumps(records))
    result = module.measure(str(tmp_path / "state"), 2, {}, load=lambda: (copy.deepcopy(model), tokenizer), cache=StatsCache(tmp_path / "home"),
                            prepare_b=prepare, label="rank-1", score=module.record_scores(f"counterfact:{tmp_path / 'cf.json'}", sample=2))
    assert result["same rehearsal"] and [s["layer"] for s in log] == layers
    assert (seen["of rows"], seen["held rows"], seen["lapsed before"]) == (expected["rows"], expected["held"], expected["lapsed"])
    for way in result["ways"].values():  # the batch's one record, two of the three earlier ones
        assert (way["own scored"], way["earlier scored"]) == (1, 2)
        assert way["own Eff"] == 100 * way["own efficacy"] and 0 <= way["earlier Gen"] <= 100


def test_re_edit_pairs_each_fact_with_another_object_of_its_relation():
    """re_edit.py's second edits: the same subject and prompt, the new object of another record of
    the same relation (never either of the fact's own objects), and the first new object as the one
    to beat."""
    from alphaedit.eval.datasets import EvalRecord
    from alphaedit.requests import EditRequest

    module = _benchmark("re_edit")

    def record(i, subject, new, true, relation):
        return EvalRecord("counterfact", i, EditRequest("{} is in", subject, new, true), relation_id=relation)

    records = [record(0, "A", "Rome", "Paris", "P1"), record(1, "B", "Oslo", "Lima", "P2"), record(2, "C", "Rome", "Oslo", "P1"),
               record(3, "D", "Cairo", "Rome", "P1"), record(4, "E", "Lima", "Oslo", "P2")]
    first, second = module.re_edits(records, 2)
    # A: C's Rome is A's own new object, so D's Cairo; B: E's Lima is B's true object and P2 has no
    # other, so B is left out rather than edited to one of its own objects
    assert first == [records[0].request]
    assert [(r.subject, r.prompt, r.target_new, r.target_true) for r in second] == [("A", "{} is in", "Cairo", "Rome")]


def test_layer_groups_writes_batches_by_turns_into_disjoint_blocks_and_resumes_to_the_same_weights(llama, tokenizer, tmp_path):
    """benchmarks/layer_groups.py: batch i goes to block i mod 2 and its journal, only that block's
    W_out moves; a run cut after three batches and resumed ends on the same weights as one straight
    through; journals that are not a turn-by-turn prefix are refused."""
    import copy
    import shutil

    from alphaedit.config import EditConfig
    from alphaedit.journal import Journal
    from alphaedit.layouts import mlp_out_weight
    from alphaedit.requests import EditRequest
    from alphaedit.stats import CorpusSpec, StatsCache

    module = _benchmark("layer_groups")
    model, layout = llama
    corpus, cache = CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64), StatsCache(tmp_path / "home")
    configs = [EditConfig(method="alphaedit", layers=layers, v_num_grad_steps=3, v_lr=0.5, nullspace_threshold=0.5,
                          context_template_length=6, rehearse=1) for layers in ([1], [2])]
    facts = [("{} is located in", "The Eiffel Tower", "Rome"), ("{} speaks", "Danielle Darrieux", "English"),
             ("{} flows through", "The Seine", "Berlin"), ("{} plays", "Lionel Messi", "golf")]
    batches = [[EditRequest(p, s, t)] for p, s, t in facts]

    def run(out, upto):
        edited = copy.deepcopy(model)
        editors, folders = module.open_blocks(edited, tokenizer, configs, corpus, out, cache=cache, layout=layout)
        return edited, module.edit_by_turns(editors, folders, batches[:upto])

    straight, start = run(tmp_path / "straight", 4)
    assert start == 0
    for folder, mine in (("block-1-1", [0, 2]), ("block-2-2", [1, 3])):
        journal = Journal.open(tmp_path / "straight" / folder)
        subjects = [journal.batch(b).requests[0]["subject"] for b in journal.batch_ids()]
        assert subjects == [facts[i][1] for i in mine]
    for layer in range(4):
        moved = not torch.equal(mlp_out_weight(straight, layout, layer), mlp_out_weight(model, layout, layer))
        assert moved == (layer in (1, 2))

    run(tmp_path / "resumed", 3)
    resumed, start = run(tmp_path / "resumed", 4)
    assert start == 3
    for layer in (1, 2):
        torch.testing.assert_close(mlp_out_weight(resumed, layout, layer), mlp_out_weight(straight, layout, layer), rtol=1e-5, atol=1e-6)

    shutil.rmtree(tmp_path / "straight" / "block-1-1")  # block 2's two batches with none of block 1's
    with pytest.raises(ValueError, match="not a turn-by-turn prefix"):
        run(tmp_path / "straight", 4)


def test_one_shot_writes_stored_values_as_the_editors_own_one_batch_edit(llama, tokenizer, tmp_path):
    """Values optimised a chunk at a time and written in one batch give the update the editor's
    own one-batch edit of the same requests gives (a request's z reads only its own rows); a
    second z phase keeps the chunks on disk; values of other requests are refused."""
    import copy

    from alphaedit.config import EditConfig
    from alphaedit.editor import Editor
    from alphaedit.layouts import mlp_out_weight
    from alphaedit.requests import EditRequest
    from alphaedit.stats import CorpusSpec, StatsCache

    module = _benchmark("one_shot")
    model, layout = llama
    config = EditConfig(method="alphaedit", layers=[1, 2], v_num_grad_steps=4, v_lr=0.5, nullspace_threshold=0.5, context_template_length=6)

    def editor():
        return Editor(copy.deepcopy(model), tokenizer, config, layout=layout, corpus=CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64),
                      cache=StatsCache(tmp_path / "home"), show_progress=False)

    facts = [("{} is located in", "The Eiffel Tower", "Rome"), ("{} speaks", "Danielle Darrieux", "English"),
             ("{} flows through", "The Seine", "Berlin"), ("{} plays", "Lionel Messi", "golf"), ("{} was born in", "Marie Curie", "Lyon")]
    requests = [EditRequest(p, s, t) for p, s, t in facts]
    run = tmp_path / "run"
    (run / "z").mkdir(parents=True)
    module.save_values(run, editor(), requests, chunk=2, quiet=True)
    files = sorted((run / "z").iterdir())
    assert [f.name for f in files] == ["000000-000002.safetensors", "000002-000004.safetensors", "000004-000005.safetensors"]
    stamps = [f.stat().st_mtime_ns for f in files]
    module.save_values(run, editor(), requests, chunk=2, quiet=True)  # resumed with nothing left: nothing rewritten
    assert [f.stat().st_mtime_ns for f in files] == stamps

    whole, at_once = editor(), editor()
    whole.templates = at_once.templates = json.loads((run / "templates.json").read_text())
    whole.edit(requests)
    report = module.write_at_once(at_once, requests, module.stored_values(run, requests))
    assert report.requests == 5 and len(at_once.batches) == 1
    for layer in config.layers:
        base = whole._base_weights[layer].double()
        a, b = (mlp_out_weight(e.model, layout, layer).detach().double() for e in (whole, at_once))
        assert float((a - base).norm()) > 0
        assert float((a - b).norm() / (a - base).norm()) < 1e-4
    with pytest.raises(SystemExit, match="other requests"):
        module.stored_values(run, requests[::-1])
