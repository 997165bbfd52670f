"""Edit configuration: paper presets by config shape (ALGORITHM.md §2), defaults, overrides, validation."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPTJConfig, LlamaConfig, MistralConfig

from alphaedit.config import EditConfig, config_for_model, default_layers, preset_for


def _llama3_8b(**kwargs) -> LlamaConfig:
    settings = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192)
    return LlamaConfig(**{**settings, **kwargs})


@pytest.mark.parametrize(
    ("model_config", "name", "layers", "steps", "lr", "lam"),
    [
        (GPT2Config(n_layer=48, n_embd=1600, n_positions=1024), "gpt2-xl", [13, 14, 15, 16, 17], 20, 0.5, 20000.0),
        (GPTJConfig(n_layer=28, n_embd=4096, n_positions=2048), "gpt-j-6b", [3, 4, 5, 6, 7, 8], 25, 0.5, 15000.0),
        (_llama3_8b(), "llama3-8b", [4, 5, 6, 7, 8], 25, 0.1, 15000.0),
    ],
    ids=["gpt2-xl", "gpt-j", "llama3-8b"],
)
def test_paper_presets_are_recognised_by_config_shape(model_config, name, layers, steps, lr, lam):
    config = config_for_model(model_config)
    assert config.preset == name
    assert config.method == "alphaedit"
    assert config.layers == layers and config.z_layer == layers[-1]
    assert (config.v_num_grad_steps, config.v_lr, config.mom2_update_weight) == (steps, lr, lam)
    # Shared by all three hparams files.
    assert (config.nullspace_threshold, config.l2_alpha) == (2e-2, 10.0)
    assert (config.v_weight_decay, config.clamp_norm_factor, config.kl_factor) == (0.5, 0.75, 0.0625)


def test_preset_ignores_the_models_name_or_path():
    assert preset_for(_llama3_8b(name_or_path="/models/my-local-copy")).name == "llama3-8b"


@pytest.mark.parametrize(("model_config", "differs"), [
    (_llama3_8b(intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096), "mlp 11008 vs 14336"),  # Llama-2-7B
    (_llama3_8b(max_position_embeddings=131072), "context 131072 vs 8192"),  # Llama-3.1-8B
])
def test_a_model_of_the_same_depth_and_width_but_another_shape_gets_no_preset_and_is_told_why(model_config, differs):
    from alphaedit.config import describe_preset

    assert preset_for(model_config) is None
    assert config_for_model(model_config).preset == "default"
    text = describe_preset(model_config)
    assert "nearest, llama3-8b" in text and differs in text
    assert describe_preset(_llama3_8b()).startswith("preset llama3-8b")


def test_same_depth_and_width_of_another_family_is_not_a_preset():
    mistral = MistralConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336)
    assert preset_for(mistral) is None
    config = config_for_model(mistral)
    assert config.preset == "default" and config.v_lr == 0.5  # not LLaMA3's 0.1


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [(48, [6, 7, 8, 9, 10]), (12, [2, 3, 4, 5, 6]), (6, [1, 2, 3, 4, 5]), (4, [1, 2, 3]), (2, [1]), (1, [0])],
)
def test_default_layers_are_five_consecutive_from_an_eighth_of_the_depth(num_layers, expected):
    assert default_layers(num_layers) == expected


def test_unknown_shape_gets_default_layers():
    config = config_for_model(LlamaConfig(num_hidden_layers=12, hidden_size=256, intermediate_size=512))
    assert config.preset == "default"
    assert config.layers == [2, 3, 4, 5, 6]
    assert config.v_lr == EditConfig().v_lr


def test_overrides_apply_on_top_of_the_preset_and_none_is_ignored():
    config = config_for_model(
        GPT2Config(n_layer=48, n_embd=1600), method="memit", layers=[20, 21], v_lr=0.3, nullspace_threshold=None
    )
    assert config.method == "memit" and config.preset == "gpt2-xl"
    assert config.layers == [20, 21] and config.v_lr == 0.3
    assert config.v_num_grad_steps == 20 and config.mom2_update_weight == 20000.0  # untouched preset values
    assert config.nullspace_threshold == 2e-2


def test_invalid_override_through_config_for_model_is_refused():
    with pytest.raises(ValueError, match="contiguous"):
        config_for_model(_llama3_8b(), layers=[4, 6])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layers=[3, 5, 6]), "contiguous"),
        (dict(layers=[5, 4]), "ascending"),
        (dict(layers=[4, 4, 5]), "ascending"),
        (dict(layers=[]), "non-empty"),
        (dict(method="rome"), "method must be one of alphaedit, emmet, encore, memit, memit-seq, prune, rect"),
        (dict(solve_dtype="float16"), "solve_dtype"),
    ],
)
def test_invalid_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EditConfig(**kwargs)


def test_dict_round_trip_and_unknown_fields():
    config = EditConfig(method="memit-seq", layers=[2, 3], seed=7, solve_dtype="float64")
    assert EditConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown edit config fields: bogus"):
        EditConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_journals_written_with_the_old_z_names_still_load():
    old = {**EditConfig().to_dict(), "z_prefix_cache": False, "z_requests_per_pass": 3}
    del old["v_prefix_cache"], old["v_requests_per_pass"]
    config = EditConfig.from_dict(old)
    assert config.v_prefix_cache is False and config.v_requests_per_pass == 3
    del old["project"], old["method_options"]  # before methods were plug-ins
    assert EditConfig.from_dict(old).method_options == {} and EditConfig.from_dict(old).project is None


def _smollm2_135m(**kwargs) -> LlamaConfig:
    settings = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192)
    return LlamaConfig(**{**settings, **kwargs})


def test_the_smollm2_preset_trades_two_prefixes_for_two_reworded_copies_and_can_be_overridden():
    config = config_for_model(_smollm2_135m())
    assert config.preset == "smollm2-135m"
    assert (config.early_stop_rule, config.early_stop_nll, config.clamp_norm_factor) == ("nll", 0.1, 2.0)
    # as many prompts per z step as the authors' five prefixes: the plain one, three prefixed, two copies
    assert config.context_template_words == ["The", "Therefore", "Because"] and config.reworded_prompts == 2
    # the authors' prompts, on request
    authors = config_for_model(_smollm2_135m(), context_template_words=["The", "Therefore", "Because", "I", "You"], reworded_prompts=0)
    assert authors.context_template_words == EditConfig().context_template_words and authors.reworded_prompts == 0
    # a config's lists are its own: changing one leaves the preset as it was
    config.context_template_words.append("I")
    config.layers.append(8)
    again = config_for_model(_smollm2_135m())
    assert again.context_template_words == ["The", "Therefore", "Because"] and again.layers == [3, 4, 5, 6, 7]
