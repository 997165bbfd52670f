"""Fixtures for end-to-end tests on the real SmolLM2-135M (CPU, minutes).

The converted model is a pure function of the pinned GGUF wheel, so it is shared with the
user's cache; statistics and states go to per-session temporary folders so every run
computes them for real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from alphaedit.models import load_model, smollm2_folder
from alphaedit.stats import CorpusSpec, StatsCache

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
COUNTERFACT = DATA / "counterfact" / "counterfact_test.json"
WIKITEXT = DATA / "wikitext2_raw"
ZSRE = DATA / "zsre" / "zsre_mend_eval_portability_gpt4.json"


@pytest.fixture(scope="session")
def counterfact() -> list[dict]:
    return json.loads(COUNTERFACT.read_text())


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer); tests that edit it must restore it (see `pristine`)."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_base_state(smollm2) -> dict:
    model, _ = smollm2
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def pristine(smollm2, smollm2_base_state):
    """The session's SmolLM2, reset to its unedited weights before and after the test."""
    model, tokenizer = smollm2
    model.load_state_dict(smollm2_base_state)
    yield model, tokenizer
    model.load_state_dict(smollm2_base_state)


@pytest.fixture(scope="session")
def stats_cache(tmp_path_factory) -> StatsCache:
    return StatsCache(tmp_path_factory.mktemp("alphaedit-home"))


@pytest.fixture(scope="session")
def wikitext_corpus() -> CorpusSpec:
    return CorpusSpec(str(WIKITEXT), tokens=20_000)


@pytest.fixture
def isolated_home(tmp_path, monkeypatch) -> Path:
    """An empty $ALPHAEDIT_HOME that still sees the converted model (no second conversion)."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    converted = smollm2_folder()
    os.symlink(converted, home / "models" / converted.name)
    monkeypatch.setenv("ALPHAEDIT_HOME", str(home))
    return home
