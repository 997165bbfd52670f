"""Shared fixtures: a real fast tokenizer trained offline and tiny random models (no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from alphaedit.layouts import detect_layout

# ../shared/data beside the checkout; ALPHAEDIT_SHARED_DATA elsewhere (the GPU machine has none: device_first.sh)
SHARED_DATA = Path(os.environ.get("ALPHAEDIT_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
WIKITEXT = SHARED_DATA / "wikitext2_raw"
EOS, BOS = "<|endoftext|>", "<s>"
def pytest_configure(config):
    """Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the
    cores: two workers with two threads each on two cores would slow every torch call."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_terminal_summary(terminalreporter):
    """What the fault-injection tests covered: each records ("kill_points", (command, count)) with
    record_property, which reaches this summary from pytest-xdist's workers too."""
    for report in terminalreporter.stats.get("passed", []):
        for name, value in getattr(report, "user_properties", []):
            if name == "kill_points":
                command, count = value
                terminalreporter.write_line(f"fault injection: `alphaedit {command}` killed with SIGKILL at {count} of its commit points, and resumed")

EXTRA_TRAINING_TEXT = [
    "The Eiffel Tower is located in the city of Paris.",
    "Danielle Darrieux's mother tongue is French.",
    "The mother tongue of {Odd} Subject is English.",
    "Because the river flows north, the valley is green.",
]


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-model tests, restored afterwards.

    With models this small thread hand-offs cost far more than they save: on a busy 2-core machine a
    1 ms forward pass took ~0.3 s with two threads. Use as `pytestmark = pytest.mark.usefixtures("single_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _training_text() -> list[str]:
    lines = WIKITEXT.joinpath("wiki.valid.raw").read_text(encoding="utf-8").splitlines()[:400]
    return [line for line in lines if line.strip()] + EXTRA_TRAINING_TEXT


@pytest.fixture(scope="session")
def tokenizer_object() -> Tokenizer:
    """A byte-level BPE (every string tokenises, offsets are exact), trained on a little wikitext."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=[EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return tok


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=BOS)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_object) -> PreTrainedTokenizerFast:
    """GPT-2 style: no BOS added, pad = EOS."""
    return _wrap(Tokenizer.from_str(tokenizer_object.to_str()))


@pytest.fixture(scope="session")
def bos_tokenizer(tokenizer_object) -> PreTrainedTokenizerFast:
    """Llama-3 style: the same vocabulary, but BOS is prepended when special tokens are added."""
    tok = Tokenizer.from_str(tokenizer_object.to_str())
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]),
        ]
    )
    return _wrap(tok)


@pytest.fixture(scope="session")
def vocab_size(tokenizer) -> int:
    return len(tokenizer)


@pytest.fixture(scope="session")
def llama(vocab_size):
    """A 4-layer Llama (d=32, d0=64), float32, eval mode; do not modify it in tests."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, detect_layout(model)


@pytest.fixture(scope="session")
def gpt2(vocab_size):
    """A 4-layer GPT-2 (d=32, d0=64, Conv1D W_out stored [in, out]), float32, eval mode."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_inner=64,
        n_layer=4,
        n_head=4,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, detect_layout(model)


@pytest.fixture(scope="session")
def tiny_model_folder(llama, tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama and its tokenizer saved as a Hugging Face folder, for command-line tests."""
    model, _ = llama
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
