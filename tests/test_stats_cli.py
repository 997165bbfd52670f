"""Statistics at scale on CPU: kill and resume, two processes, imports, the stats command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from alphaedit.cli import app
from alphaedit.stats import CorpusSpec, StatsCache, second_moments
from alphaedit.stats.importing import import_spec, import_statistics
from conftest import WIKITEXT

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()


def _stats_command(folder: Path, out: Path, tokens: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "alphaedit", "stats", "--model", str(folder), "--corpus", str(WIKITEXT),
            "--tokens", str(tokens), "--layers", "1-2", "--out", str(out), "--json", *extra]


def _moments(out: Path) -> dict[int, torch.Tensor]:
    return {layer: load_file(str(out / f"layer{layer}.safetensors"))["moment"] for layer in (1, 2)}


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "ALPHAEDIT_HOME": str(home), "OMP_NUM_THREADS": "1"}


def test_a_pass_killed_with_sigkill_resumes_and_equals_an_uninterrupted_run(tiny_model_folder, tmp_path):
    tokens = 150_000
    reference = subprocess.run(_stats_command(tiny_model_folder, tmp_path / "reference", tokens), env=_env(tmp_path / "home-a"), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    home = tmp_path / "home-b"
    command = _stats_command(tiny_model_folder, tmp_path / "resumed", tokens, "--checkpoint-every", "4000")
    checkpoints = home / "stats" / "checkpoints"
    process = subprocess.Popen(command, env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("pass-*.safetensors")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (checkpoint,) = checkpoints.glob("pass-*.safetensors")  # killed mid-pass, with progress saved
    done = int(load_file(str(checkpoint))["batches_done"])
    assert done > 0

    resumed = subprocess.run(command, env=_env(home), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not any(checkpoints.glob("pass-*.safetensors"))  # finished passes leave no checkpoint
    for layer, moment in _moments(tmp_path / "reference").items():
        assert torch.equal(_moments(tmp_path / "resumed")[layer], moment)
    assert json.loads(resumed.stdout)["layers"]["1"]["tokens"] == json.loads(reference.stdout)["layers"]["1"]["tokens"]


def test_two_processes_give_the_result_of_one(tiny_model_folder, tmp_path):
    single = subprocess.run(_stats_command(tiny_model_folder, tmp_path / "one", 20_000), env=_env(tmp_path / "home-1"), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517"]
    double = subprocess.run([*launcher, *_stats_command(tiny_model_folder, tmp_path / "two", 20_000)[1:]],
                            env=_env(tmp_path / "home-2"), capture_output=True, text=True)
    assert double.returncode == 0, double.stderr
    for layer, moment in _moments(tmp_path / "one").items():
        torch.testing.assert_close(_moments(tmp_path / "two")[layer], moment, rtol=1e-10, atol=1e-12)


def test_memit_npz_statistics_import_and_are_used(llama, tokenizer, tmp_path):
    model, layout = llama
    spec = CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64)
    measured = second_moments(model, layout, tokenizer, [1], spec, show_progress=False)[1]
    npz = tmp_path / "model.layers.1.mlp.down_proj_float32_mom2_100000.npz"
    np.savez(npz, **{"mom2.mom2": (measured.moment * measured.count).float().numpy(), "mom2.count": np.array(measured.count)})
    cache = StatsCache(tmp_path / "home")
    imported = import_statistics(npz, model, layout, tokenizer, None, cache)  # layer read from the file name
    assert list(imported) == [1]
    again = second_moments(model, layout, tokenizer, [1], CorpusSpec(import_spec(npz)), cache=cache, show_progress=False)[1]
    torch.testing.assert_close(again.moment, measured.moment, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="not imported|no statistics imported"):
        second_moments(model, layout, tokenizer, [2], CorpusSpec(import_spec(npz)), cache=cache, show_progress=False)


def test_npz_with_wrong_shape_or_keys_is_refused(llama, tokenizer, tmp_path):
    model, layout = llama
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{"mom2.mom2": np.eye(10), "mom2.count": np.array(5)})
    with pytest.raises(ValueError, match="shape"):
        import_statistics(wrong, model, layout, tokenizer, [1], StatsCache(tmp_path))
    np.savez(wrong, other=np.eye(3))
    with pytest.raises(ValueError, match="mom2.mom2"):
        import_statistics(wrong, model, layout, tokenizer, [1], StatsCache(tmp_path))


def test_alphaedit_projector_import_is_checked_and_used_by_the_editor(llama, tokenizer, tmp_path):
    from alphaedit.config import EditConfig
    from alphaedit.editor import Editor

    model, layout = llama
    d0 = layout.key_size
    basis = torch.linalg.qr(torch.randn(d0, d0, generator=torch.Generator().manual_seed(0)))[0][:, :40]
    stack = torch.stack([basis @ basis.T, basis @ basis.T])
    path = tmp_path / "null_space_project.pt"
    torch.save(stack, path)
    cache = StatsCache(tmp_path / "home")
    import_statistics(path, model, layout, tokenizer, [1, 2], cache)
    editor = Editor(model, tokenizer, EditConfig(layers=[1, 2]), layout=layout, corpus=CorpusSpec(import_spec(path)), cache=cache, show_progress=False)
    stats = editor.statistics()
    torch.testing.assert_close(stats[1].projector, stack[0])
    assert editor.projector_rank == {1: 40, 2: 40}

    torch.save(torch.randn(2, d0, d0), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an orthogonal projector"):
        import_statistics(tmp_path / "bad.pt", model, layout, tokenizer, [1, 2], cache)
    torch.save({"P": stack}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="expected a tensor"):
        import_statistics(tmp_path / "dict.pt", model, layout, tokenizer, [1, 2], cache)


def test_stats_report_dry_run_and_json(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["stats", "--model", str(tiny_model_folder), "--corpus", str(WIKITEXT), "--tokens", "3000",
                                 "--layers", "1-2", "--report", "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    layer = summary["layers"]["1"]
    assert layer["tokens"] == 3000 and 0 <= layer["null_space_rank"] <= layer["dimension"] == 64
    assert layer["max"] >= layer["median"] >= layer["min"]
    assert (tmp_path / "out" / "spectra.png").read_bytes()[:4] == b"\x89PNG"
    dry = runner.invoke(app, ["stats", "--model", str(tiny_model_folder), "--layers", "1-2", "--dry-run", "--json"])
    assert dry.exit_code == 0 and json.loads(dry.stdout)["total_gib"] > 0


def test_edit_takes_a_layout_override_and_a_projector_rule(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"}))
    common = ["edit", "--model", str(tiny_model_folder), "--requests", str(requests), "--steps", "2", "--corpus", str(WIKITEXT), "--tokens", "2000"]
    bad = runner.invoke(app, [*common, "--state", str(tmp_path / "s1"), "--layout", '{"mlp_out": "mlp.nowhere"}'])
    assert bad.exit_code == 2 and "--layout" in bad.output and "nowhere" in bad.output
    good = runner.invoke(app, [*common, "--state", str(tmp_path / "s2"), "--layout", '{"mlp_out": "mlp.down_proj", "final_norm": "model.norm"}',
                               "--projector-rule", "rank", "--threshold", "20"])
    assert good.exit_code == 0, good.output
    header = json.loads((tmp_path / "s2" / "journal.json").read_text())["header"]
    assert header["config"]["projector_rule"] == "rank" and set(header["projector_rank"].values()) == {20}


def test_a_folder_of_the_authors_per_layer_files_drives_a_five_layer_edit(tokenizer, vocab_size, tmp_path):
    """MEMIT/AlphaEdit keep one layer_stats .npz per layer: --corpus import:FOLDER covers them all."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from alphaedit.config import EditConfig
    from alphaedit.editor import Editor
    from alphaedit.layouts import detect_layout, mlp_out_weight
    from alphaedit.requests import EditRequest

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(config).eval()
    layout = detect_layout(model)
    layers = [1, 2, 3, 4, 5]
    measured = second_moments(model, layout, tokenizer, layers, CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64), show_progress=False)
    folder = tmp_path / "wikipedia_stats"
    folder.mkdir()
    for layer, stat in measured.items():  # the authors' file names and keys
        np.savez(folder / f"model.layers.{layer}.mlp.down_proj_float32_mom2_100000.npz",
                 **{"mom2.mom2": (stat.moment * stat.count).float().numpy(), "mom2.count": np.array(stat.count)})
    cache = StatsCache(tmp_path / "home")
    assert sorted(import_statistics(folder, model, layout, tokenizer, None, cache)) == layers
    before = {l: mlp_out_weight(model, layout, l).detach().clone() for l in layers}
    editor = Editor(model, tokenizer, EditConfig(method="memit", layers=layers, v_num_grad_steps=2, context_template_length=6),
                    layout=layout, corpus=CorpusSpec(import_spec(folder)), cache=cache, show_progress=False)
    for layer, stat in editor.statistics().items():
        torch.testing.assert_close(stat.second_moment.double(), measured[layer].moment, rtol=1e-5, atol=1e-8)
    editor.edit([EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")])
    assert all(not torch.equal(mlp_out_weight(model, layout, l), before[l]) for l in layers)

    (folder / "model.layers.3.copy_mom2.npz").write_bytes((folder / "model.layers.3.mlp.down_proj_float32_mom2_100000.npz").read_bytes())
    with pytest.raises(ValueError, match="are both layer 3; keep one"):
        import_statistics(folder, model, layout, tokenizer, None, cache)
    (folder / "model.layers.3.copy_mom2.npz").unlink()
    with pytest.raises(ValueError, match=r"no file for layers \[0\]"):
        import_statistics(folder, model, layout, tokenizer, [0], cache)


def test_edit_with_the_authors_sampling_records_it_and_keeps_to_it(tiny_model_folder, tmp_path):
    import json

    from typer.testing import CliRunner

    from alphaedit.cli import app

    requests = tmp_path / "edits.jsonl"
    requests.write_text(json.dumps({"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}))
    common = ["edit", "--requests", str(requests), "--state", str(tmp_path / "state")]
    env = {"ALPHAEDIT_HOME": str(tmp_path / "home")}
    done = CliRunner().invoke(app, [*common, "--model", str(tiny_model_folder), "--layers", "1-2", "--steps", "2", "--corpus", str(WIKITEXT),
                                    "--tokens", "2000", "--sampling", "documents"], env=env)
    assert done.exit_code == 0, done.output
    corpus = json.loads((tmp_path / "state" / "header.json").read_text())["corpus"]
    assert corpus["sampling"] == "documents" and corpus["seed"] == 1  # the authors' seed by default
    again = CliRunner().invoke(app, [*common, "--sampling", "stream"], env=env)
    assert again.exit_code == 2 and "was edited with --sampling documents" in again.output
    bad = CliRunner().invoke(app, [*common[:3], "--state", str(tmp_path / "other"), "--model", str(tiny_model_folder), "--sampling", "random"], env=env)
    assert bad.exit_code == 2 and "sampling must be one of stream, documents" in bad.output
