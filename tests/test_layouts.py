"""Layout detection on tiny random models of every supported family (no hub access)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from families import FAMILIES, MLP_OUT_NORM, VOCAB, build_family

from alphaedit.layouts import (
    Layout,
    UnsupportedModelError,
    detect_layout,
    get_module,
    mlp_out_weight,
    output_logits,
    weight_delta_as_stored,
)

def _build(model_type: str, **kwargs) -> nn.Module:
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> tuple[str, nn.Module, Layout]:
    model_type = request.param
    model = build_family(model_type)
    return model_type, model, detect_layout(model)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- per family


def test_detected_paths(family):
    model_type, _, layout = family
    expected, key_size = FAMILIES[model_type][1:]
    got = (layout.blocks, layout.mlp_out, layout.final_norm, layout.lm_head, layout.weight_transposed)
    assert got == expected
    assert (layout.num_layers, layout.hidden_size, layout.key_size) == (2, 32, key_size)
    assert layout.block(1) == f"{expected[0]}.1"
    assert layout.mlp_out_path(1) == f"{expected[0]}.1.{expected[1]}"


def test_the_norm_on_the_mlp_output_is_found_where_the_family_has_one(family):
    model_type, model, layout = family
    assert layout.mlp_out_norm == MLP_OUT_NORM.get(model_type)
    assert Layout.from_dict(layout.to_dict()) == layout
    if layout.mlp_out_norm:
        assert detect_layout(model, {"mlp_out_norm": "none"}).mlp_out_norm is None
        with pytest.raises(UnsupportedModelError, match="mlp_out_norm='nowhere' is missing in block 0"):
            detect_layout(model, {"mlp_out_norm": "nowhere"})


def test_sizes_match_stored_weight(family):
    model_type, model, layout = family
    for layer in range(layout.num_layers):
        weight = mlp_out_weight(model, layout, layer)
        assert weight is get_module(model, layout.mlp_out_path(layer)).weight
        math = (layout.hidden_size, layout.key_size)
        stored = math[::-1] if model_type == "gpt2" else math
        assert tuple(weight.shape) == stored
    assert layout.weight_transposed == isinstance(get_module(model, layout.mlp_out_path(0)), Conv1D)


def test_output_logits_match_forward(family, ids):
    model_type, model, layout = family
    with torch.no_grad():
        hidden = model.base_model(ids).last_hidden_state
        expected = model(ids).logits
        got = output_logits(model, layout, hidden)
        single = output_logits(model, layout, hidden[0, 3])  # any leading shape, here none
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, expected[0, 3], atol=1e-5, rtol=1e-5)
    if model_type == "gemma2":  # the soft cap must actually matter, or this test proves nothing about it
        raw = get_module(model, layout.lm_head)(hidden)
        assert model.config.final_logit_softcapping
        assert not torch.allclose(raw, expected, atol=1e-2)


def test_final_norm_is_what_base_model_applies(family, ids):
    _, model, layout = family
    captured = {}
    norm = get_module(model, layout.final_norm)
    handle = norm.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        with torch.no_grad():
            hidden = model.base_model(ids).last_hidden_state
    finally:
        handle.remove()
    torch.testing.assert_close(captured["out"], hidden)


def test_delta_in_math_orientation(family):
    _, model, layout = family
    module = get_module(model, layout.mlp_out_path(1))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, layout.key_size, generator=gen)
    delta = torch.randn(layout.hidden_size, layout.key_size, generator=gen)
    original = module.weight.detach().clone()
    try:
        with torch.no_grad():
            before = module(x)
            module.weight += weight_delta_as_stored(layout, delta)
            after = module(x)
    finally:
        with torch.no_grad():
            module.weight.copy_(original)
    torch.testing.assert_close(after, before + x @ delta.T, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- overrides


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return build_family("llama")


def test_override_valid_path(llama):
    detected = detect_layout(llama)
    assert detect_layout(llama, {"mlp_out": "mlp.down_proj", "lm_head": None}) == detected
    everything = {"blocks": "model.layers", "final_norm": "model.norm", "lm_head": "lm_head"}
    assert detect_layout(llama, everything) == detected


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"mlp_out": "mlp.nope"}, r"mlp\.nope.*missing in block 0.*no submodule 'nope'"),
        ({"mlp_out": "mlp.up_proj"}, r"writes 48 features but the hidden size is 32"),
        ({"mlp_out": "mlp.act_fn"}, r"not an nn\.Linear or transformers Conv1D"),
        ({"blocks": "model.nope"}, r"blocks='model\.nope' does not exist"),
        ({"blocks": "model.norm"}, r"not a non-empty nn\.ModuleList"),
        ({"final_norm": "model.final"}, r"final_norm='model\.final' does not exist"),
        ({"lm_head": "head"}, r"lm_head='head' does not exist"),
        ({"lm_head": "model.embed_tokens.weight"}, r"lm_head=.*does not exist"),
        ({"mlp": "mlp.down_proj"}, r"unknown layout override keys \['mlp'\]"),
        ({"mlp_out": ""}, r"non-empty dotted paths"),
    ],
)
def test_override_bad_path(llama, override, match):
    with pytest.raises(UnsupportedModelError, match=match):
        detect_layout(llama, override)


class _ToyBlock(nn.Module):
    """A block whose config says nothing about its MLP width."""

    def __init__(self, hidden: int, wide: int, other: int, other_parent: str) -> None:
        super().__init__()
        self.add_module(other_parent, nn.ModuleDict({"proj": nn.Linear(other, hidden)}))
        self.block_ff = nn.ModuleDict({"up": nn.Linear(hidden, wide), "down": nn.Linear(wide, hidden)})


class _ToyLM(nn.Module):
    def __init__(self, wide: int, other: int, other_parent: str = "attn") -> None:
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=2, hidden_size=8)
        self.embed = nn.Embedding(10, 8)
        self.stack = nn.ModuleList(_ToyBlock(8, wide, other, other_parent) for _ in range(2))
        self.out_ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def test_fallback_to_widest_input_without_config_width():
    layout = detect_layout(_ToyLM(wide=24, other=16))
    paths = (layout.blocks, layout.mlp_out, layout.final_norm, layout.lm_head)
    assert paths == ("stack", "block_ff.down", "out_ln", "head")
    assert (layout.hidden_size, layout.key_size, layout.weight_transposed) == (8, 24, False)


def test_ambiguous_w_out_asks_for_override():
    model = _ToyLM(wide=16, other=16, other_parent="side")  # two 16 -> 8 maps, neither under an MLP-like name
    with pytest.raises(UnsupportedModelError, match=r"ambiguous W_out.*block_ff\.down.*override"):
        detect_layout(model)
    assert detect_layout(model, {"mlp_out": "block_ff.down"}).mlp_out == "block_ff.down"


def test_mlp_like_parent_breaks_tie():
    model = _ToyLM(wide=16, other=16, other_parent="ffn")
    assert detect_layout(model).mlp_out == "ffn.proj"


def test_inconsistent_blocks_refused():
    model = _ToyLM(wide=24, other=16)
    model.stack[1].block_ff["down"] = nn.Linear(20, 8)
    with pytest.raises(UnsupportedModelError, match=r"W_out differs across blocks.*stack\.1\.block_ff\.down"):
        detect_layout(model)


def test_missing_final_norm_refused():
    model = _ToyLM(wide=24, other=16)
    del model.out_ln
    with pytest.raises(UnsupportedModelError, match=r"cannot find the final norm.*final_norm"):
        detect_layout(model)


def test_missing_blocks_refused():
    model = _ToyLM(wide=24, other=16)
    model.config.num_hidden_layers = 5
    with pytest.raises(UnsupportedModelError, match=r"no nn\.ModuleList of 5 modules"):
        detect_layout(model)


# --------------------------------------------------------------------------- serialisation


def test_layout_json_round_trip(family):
    _, _, layout = family
    again = Layout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout


def test_layout_from_dict_rejects_bad_keys(llama):
    d = detect_layout(llama).to_dict()
    with pytest.raises(ValueError, match=r"missing keys \['key_size'\]"):
        Layout.from_dict({k: v for k, v in d.items() if k != "key_size"})
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        Layout.from_dict({**d, "extra": 1})


# --------------------------------------------------------------------------- refusals


_MOE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(
    ("model_type", "kwargs"),
    [
        ("mixtral", dict(_MOE, num_local_experts=4, num_experts_per_tok=2)),
        (
            "qwen2_moe",
            dict(_MOE, moe_intermediate_size=16, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2),
        ),
    ],
)
def test_moe_refused(model_type, kwargs):
    model = _build(model_type, **kwargs)
    with pytest.raises(UnsupportedModelError, match=r"mixture-of-experts.*one dense.*W_out per layer"):
        detect_layout(model)


def test_moe_refused_from_structure_alone():
    model = _ToyLM(wide=24, other=16)
    for block in model.stack:
        block.block_ff["experts"] = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
    with pytest.raises(UnsupportedModelError, match=r"mixture-of-experts.*stack\.0\.block_ff\.experts"):
        detect_layout(model)


def test_quantizer_refused():
    model = build_family("llama")
    model.hf_quantizer = object()
    with pytest.raises(UnsupportedModelError, match=r"quantized.*hf_quantizer.*unquantized"):
        detect_layout(model)


def test_quantization_config_refused():
    model = build_family("llama")
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(UnsupportedModelError, match=r"quantization_config.*dtype=torch.float32"):
        detect_layout(model)


def test_dequantized_gguf_accepted():
    # transformers loads a GGUF file dequantized to float yet keeps its quantizer and config;
    # the project's bundled SmolLM2 is loaded this way.
    model = build_family("llama")
    model.config.quantization_config = {"quant_method": "gguf"}
    model.hf_quantizer = type("GgufHfQuantizer", (), {"quantization_config": model.config.quantization_config})()
    assert detect_layout(model) == detect_layout(build_family("llama"))


def test_packed_gguf_still_refused():
    model = _ToyLM(wide=24, other=16)
    model.config.quantization_config = {"quant_method": "gguf"}
    model.stack[0].block_ff["down"].weight = nn.Parameter(torch.zeros(8, 6, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match=r"quantized.*torch\.uint8"):
        detect_layout(model)


def test_integer_parameter_refused():
    model = _ToyLM(wide=24, other=16)
    model.stack[0].block_ff["down"].weight = nn.Parameter(torch.zeros(8, 24, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match=r"quantized.*stack\.0\.block_ff\.down\.weight.*torch\.int8"):
        detect_layout(model)


def test_bitsandbytes_like_module_refused():
    class Linear4bit(nn.Linear):
        pass

    model = _ToyLM(wide=24, other=16)
    model.stack[1].block_ff["up"] = Linear4bit(8, 24)
    with pytest.raises(UnsupportedModelError, match=r"quantized.*Linear4bit"):
        detect_layout(model)


# --------------------------------------------------------------------------- helpers


def test_get_module(llama):
    assert get_module(llama, "model.layers.1.mlp") is llama.model.layers[1].mlp
    assert get_module(llama, "model.layers.-1") is llama.model.layers[1]
    assert get_module(llama, "") is llama
    for bad in ("model.layers.2.mlp", "model.nope", "model.layers.0.mlp.down_proj.weight", "config"):
        with pytest.raises(KeyError, match=f"no module at '{bad}'"):
            get_module(llama, bad)
    with pytest.raises(KeyError, match=r"model\.layers \(ModuleList\) has no submodule '2'"):
        get_module(llama, "model.layers.2.mlp")


def test_mlp_out_weight_out_of_range(llama):
    with pytest.raises(KeyError, match="model.layers.2.mlp.down_proj"):
        mlp_out_weight(llama, detect_layout(llama), 2)


def test_delta_shape_checked(family):
    _, _, layout = family
    wrong = torch.zeros(layout.key_size + 1, layout.hidden_size)
    with pytest.raises(ValueError, match=r"math shape \(hidden_size, key_size\)"):
        weight_delta_as_stored(layout, wrong)
