"""Second moments of W_out's input (ALGORITHM.md §1.6): corpus windows, accumulation, on-disk cache."""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file

from alphaedit.layouts import get_module, mlp_out_weight
from alphaedit.stats import CorpusSpec, StatsCache, second_moments
from alphaedit.stats.cache import model_identity
from alphaedit.stats.corpus import file_windows, self_windows
from alphaedit.stats.moments import MomentAccumulator, accumulate_batch, token_batches

from conftest import WIKITEXT

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENS, MAX_LEN = 600, 64


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request):
    return request.getfixturevalue(request.param)


def _reference_moment(model, layout, layer: int, windows: list[list[int]]) -> torch.Tensor:
    """One window at a time, a plain pre-hook on W_out, a float64 sum of x xᵀ, divided by the count."""
    seen = []
    handle = get_module(model, layout.mlp_out_path(layer)).register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=torch.tensor([window]))
    finally:
        handle.remove()
    total = torch.zeros(layout.key_size, layout.key_size, dtype=torch.float64)
    count = 0
    for x in seen:
        x = x.double()
        total += x.T @ x
        count += x.shape[0]
    return total / count


@contextmanager
def _forward_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def _spec(**overrides) -> CorpusSpec:
    return CorpusSpec(**{"corpus": str(WIKITEXT), "tokens": TOKENS, "max_length": MAX_LEN, **overrides})


# --------------------------------------------------------------------------- accumulation


def test_second_moments_match_a_per_window_float64_reference(tiny, tokenizer):
    model, layout = tiny
    spec = _spec(batch_tokens=256)  # several windows per batch, several batches
    result = second_moments(model, layout, tokenizer, [1, 2], spec, show_progress=False)
    windows = file_windows(spec.corpus, tokenizer, TOKENS, MAX_LEN)
    for layer in (1, 2):
        assert result[layer].count == TOKENS
        assert result[layer].moment.dtype == torch.float64
        torch.testing.assert_close(result[layer].moment, _reference_moment(model, layout, layer, windows), rtol=2e-5, atol=1e-10)


def test_padding_is_never_counted(tiny, tokenizer):
    model, layout = tiny
    windows = file_windows(str(WIKITEXT), tokenizer, 256, 64)
    ragged = [windows[0][:17], windows[1], windows[2][:5], windows[3][:40]]
    assert [len(w) for w in ragged] == [17, 64, 5, 40]
    together = MomentAccumulator({1: torch.device("cpu")}, layout.key_size)
    counted = accumulate_batch(model, layout, tokenizer, together, ragged)
    alone = MomentAccumulator({1: torch.device("cpu")}, layout.key_size)
    for window in ragged:
        accumulate_batch(model, layout, tokenizer, alone, [window])
    assert counted == together.count == alone.count == 17 + 64 + 5 + 40
    torch.testing.assert_close(together.result()[1].moment, alone.result()[1].moment, rtol=2e-5, atol=1e-10)
    torch.testing.assert_close(together.result()[1].moment, _reference_moment(model, layout, 1, ragged), rtol=2e-5, atol=1e-10)


def test_one_pass_serves_several_layers_and_stops_after_the_deepest(llama, tokenizer):
    model, layout = llama
    spec = _spec(batch_tokens=10_000)  # all windows in one batch
    with _forward_calls(model.base_model) as passes, _forward_calls(get_module(model, layout.block(3))) as deeper:
        both = second_moments(model, layout, tokenizer, [1, 2], spec, show_progress=False)
    assert len(passes) == 1 and len(deeper) == 0
    for layer in (1, 2):
        alone = second_moments(model, layout, tokenizer, [layer], spec, show_progress=False)[layer]
        torch.testing.assert_close(both[layer].moment, alone.moment, rtol=1e-6, atol=1e-12)


def test_token_batches_bound_padded_size_and_keep_order():
    windows = [[0] * n for n in (5, 9, 3, 12, 12, 1, 7)]
    batches = list(token_batches(windows, batch_tokens=24))
    assert [w for batch in batches for w in batch] == windows
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(map(len, batch)) <= 24


def test_an_empty_corpus_is_an_error(tmp_path):
    acc = MomentAccumulator({0: torch.device("cpu")}, 4)
    with pytest.raises(ValueError, match="no tokens"):
        acc.result()


# --------------------------------------------------------------------------- corpus


def test_file_windows_respect_budget_and_max_length(tokenizer, bos_tokenizer):
    for tok, prefix in ((tokenizer, []), (bos_tokenizer, [bos_tokenizer.bos_token_id])):
        windows = file_windows(str(WIKITEXT), tok, 1000, 48)
        assert all(len(w) <= 48 and w[: len(prefix)] == prefix for w in windows)
        body = [t for w in windows for t in w[len(prefix) :]]
        assert len(body) == 1000
        assert all(len(w) == 48 for w in windows[:-1])


def test_file_windows_are_the_documents_token_stream_in_file_order(tmp_path, tokenizer):
    (tmp_path / "b.txt").write_text("Second file , first paragraph .\n\nSecond file ,\nsecond paragraph .\n")
    (tmp_path / "a.raw").write_text("\n = Title = \n\n First file text .\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "From jsonl ."}) + "\n" + json.dumps({"other": 1}) + "\n")
    (tmp_path / "ignored.csv").write_text("not, read\n")
    docs = ["= Title =", "First file text .", "Second file , first paragraph .", "Second file , second paragraph .", "From jsonl ."]
    stream = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"]]
    windows = file_windows(str(tmp_path), tokenizer, 10_000, 8)
    assert [t for w in windows for t in w] == stream
    assert all(len(w) == 8 for w in windows[:-1])


def test_a_missing_corpus_path_is_a_clear_error(tmp_path, tokenizer):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="nowhere.*neither 'self' nor an existing file or folder"):
        file_windows(str(missing), tokenizer, 100, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        file_windows(str(tmp_path / "empty"), tokenizer, 100, 32)


def test_self_corpus_is_deterministic_for_a_fixed_seed(llama, tokenizer):
    model, _ = llama
    torch.manual_seed(123)
    first = list(self_windows(model, tokenizer, 120, 24, seed=7))
    torch.manual_seed(456)  # the global RNG state must not matter
    second = list(self_windows(model, tokenizer, 120, 24, seed=7))
    other = list(self_windows(model, tokenizer, 120, 24, seed=8))
    assert first == second
    assert first != other
    windows = [w for batch in first for w in batch]
    assert all(len(w) <= 24 for w in windows)
    assert sum(map(len, windows)) >= 120


def test_self_corpus_statistics_are_reproducible(llama, tokenizer):
    model, layout = llama
    spec = CorpusSpec(corpus="self", tokens=100, max_length=24, seed=3)
    a = second_moments(model, layout, tokenizer, [1], spec, show_progress=False)[1]
    b = second_moments(model, layout, tokenizer, [1], spec, show_progress=False)[1]
    c = second_moments(model, layout, tokenizer, [1], CorpusSpec(corpus="self", tokens=100, max_length=24, seed=4), show_progress=False)[1]
    assert a.count == b.count and torch.equal(a.moment, b.moment)
    assert not torch.equal(a.moment, c.moment)


# --------------------------------------------------------------------------- cache


def _refuse_forward(model):
    def hook(*_):
        raise AssertionError("the model ran although the statistics were cached")

    return model.base_model.register_forward_pre_hook(hook)


def test_second_call_loads_the_cached_statistics_without_running_the_model(llama, tokenizer, tmp_path):
    model, layout = llama
    cache = StatsCache(tmp_path)
    first = second_moments(model, layout, tokenizer, [1, 2], _spec(), cache=cache, show_progress=False)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 2 and all(f.parent.parent == tmp_path / "stats" for f in files)
    handle = _refuse_forward(model)
    try:
        second = second_moments(model, layout, tokenizer, [1, 2], _spec(), cache=cache, show_progress=False)
    finally:
        handle.remove()
    for layer in (1, 2):
        assert second[layer].count == first[layer].count
        assert torch.equal(second[layer].moment, first[layer].moment)


def test_only_missing_layers_are_computed(llama, tokenizer, tmp_path):
    model, layout = llama
    cache = StatsCache(tmp_path)
    second_moments(model, layout, tokenizer, [1], _spec(), cache=cache, show_progress=False)
    with _forward_calls(get_module(model, layout.mlp_out_path(2))) as layer2:
        result = second_moments(model, layout, tokenizer, [1, 2], _spec(), cache=cache, show_progress=False)
    assert len(layer2) > 0 and set(result) == {1, 2}
    fresh = second_moments(model, layout, tokenizer, [2], _spec(), show_progress=False)[2]
    torch.testing.assert_close(result[2].moment, fresh.moment)


def test_a_different_corpus_budget_is_a_different_cache_entry(llama, tokenizer, tmp_path):
    model, layout = llama
    cache = StatsCache(tmp_path)
    a = second_moments(model, layout, tokenizer, [1], _spec(), cache=cache, show_progress=False)[1]
    b = second_moments(model, layout, tokenizer, [1], _spec(tokens=TOKENS // 2), cache=cache, show_progress=False)[1]
    assert a.count == TOKENS and b.count == TOKENS // 2
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_changed_weights_get_their_own_cache_entry(llama, tokenizer, tmp_path):
    model, layout = llama
    cache = StatsCache(tmp_path)
    original = second_moments(model, layout, tokenizer, [1], _spec(), cache=cache, show_progress=False)[1]
    edited = copy.deepcopy(model)
    with torch.no_grad():
        mlp_out_weight(edited, layout, 1).mul_(1.5)
    assert model_identity(edited, layout, [1]) != model_identity(model, layout, [1])
    assert model_identity(edited, layout, [1])["config"] == model_identity(model, layout, [1])["config"]
    changed = second_moments(edited, layout, tokenizer, [1], _spec(), cache=cache, show_progress=False)[1]
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2
    # Scaling W_out[1] leaves layer 1's own input unchanged: the statistic is recomputed, and equal.
    torch.testing.assert_close(changed.moment, original.moment)


def test_a_cache_file_with_mismatched_metadata_is_refused(tmp_path):
    cache = StatsCache(tmp_path)
    description = {"config": "abc123", "weights": "w1", "corpus": "self", "tokens": "100", "layer": "3"}
    assert cache.load(description) is None
    moment = torch.eye(4, dtype=torch.float64)
    path = cache.save(description, moment, 42)
    loaded, count = cache.load(description)
    assert count == 42 and torch.equal(loaded, moment)

    # Another model's statistics at this path (e.g. a copied or stale file) must not be used.
    save_file({"moment": moment}, str(path), metadata={**description, "weights": "w2", "count": "42"})
    with pytest.raises(ValueError, match=r"weights: file has 'w2', wanted 'w1'") as err:
        cache.load(description)
    assert str(path) in str(err.value) and "tokens" not in str(err.value)


def test_different_descriptions_get_different_paths_under_the_config_digest(tmp_path):
    cache = StatsCache(tmp_path)
    a = {"config": "abc123", "weights": "w1", "layer": "3"}
    b = {**a, "weights": "w2"}
    assert cache.path(a) != cache.path(b)
    assert cache.path(a).parent == cache.path(b).parent == tmp_path / "stats" / "abc123"
    assert cache.path(a).name.startswith("layer3-")


def test_a_different_tokenizer_is_a_different_cache_entry(llama, tokenizer, bos_tokenizer, tmp_path):
    model, layout = llama
    spec = CorpusSpec(corpus=str(WIKITEXT), tokens=600, max_length=64)
    cache = StatsCache(tmp_path)
    plain = second_moments(model, layout, tokenizer, [1], spec, cache=cache, show_progress=False)[1]
    with_bos = second_moments(model, layout, bos_tokenizer, [1], spec, cache=cache, show_progress=False)[1]
    fresh = second_moments(model, layout, bos_tokenizer, [1], spec, show_progress=False)[1]
    assert torch.equal(with_bos.moment, fresh.moment) and with_bos.count == fresh.count
    assert not torch.equal(plain.moment, with_bos.moment)


def test_hf_corpus_without_the_datasets_package_says_how_to_get_it(monkeypatch, tokenizer):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match=r"alphaedit\[hf\]"):
        file_windows("hf:wikitext:wikitext-103-raw-v1:train", tokenizer, 100, 32)


def test_the_authors_document_sampling_draws_whole_documents_in_a_seeded_order(tokenizer, tmp_path):
    """ROME/MEMIT layer_stats: a random order of documents (seed), each cut to one window."""
    from alphaedit.stats.corpus import CorpusSpec, document_windows, documents, file_windows

    corpus = tmp_path / "corpus.txt"
    paragraphs = [f"Paragraph {i} is about the river number {i} and its valley, which is green and long." * (1 + i % 3) for i in range(12)]
    corpus.write_text("\n\n".join(paragraphs))
    docs = list(documents(str(corpus)))
    assert len(docs) == 12
    windows = document_windows(str(corpus), tokenizer, tokens=10_000, max_length=16, seed=1)
    assert len(windows) == 12 and all(len(w) <= 16 for w in windows)  # one truncated window per document
    starts = {tuple(tokenizer(d, add_special_tokens=False)["input_ids"][:16]): i for i, d in enumerate(docs)}
    order = [starts[tuple(w)] for w in windows]
    assert sorted(order) == list(range(12)) and order != list(range(12))  # every document once, shuffled
    assert order == [starts[tuple(w)] for w in document_windows(str(corpus), tokenizer, 10_000, 16, seed=1)]  # seeded
    assert order != [starts[tuple(w)] for w in document_windows(str(corpus), tokenizer, 10_000, 16, seed=2)]
    budget = document_windows(str(corpus), tokenizer, tokens=40, max_length=16, seed=1)
    assert sum(map(len, budget)) == 40
    assert windows != file_windows(str(corpus), tokenizer, 10_000, 16)  # not the streamed windows
    # the cache key tells them apart, and leaves the default's key as it was
    stream, drawn = CorpusSpec(str(corpus)), CorpusSpec(str(corpus), sampling="documents", seed=1)
    assert "sampling" not in stream.description() and drawn.description()["sampling"] == "documents"
    with pytest.raises(ValueError, match="sampling must be one of stream, documents"):
        CorpusSpec(str(corpus), sampling="random")
