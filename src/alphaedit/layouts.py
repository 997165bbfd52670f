"""Where a causal LM keeps the modules that knowledge editing touches.

AlphaEdit (like ROME/MEMIT) edits one dense MLP output projection ``W_out`` per
transformer block and reads predictions through the final norm and the LM head.
Every Hugging Face architecture names these modules differently
(``model.layers.5.mlp.down_proj``, ``transformer.h.5.mlp.c_proj``, ...), and
GPT-2 even stores its projections transposed (``Conv1D``, weight ``[in, out]``).

Rather than keeping a table keyed by model name, a :class:`Layout` is *data*
detected *structurally* from the loaded model: the blocks are the homogeneous
``nn.ModuleList`` whose length is the configured layer count, ``W_out`` is the
linear map in a block that goes from the MLP intermediate width back to the
residual width, the final norm is the norm sitting next to the blocks, and the
LM head is whatever ``get_output_embeddings()`` returns. The result is
validated against every block, can be partly overridden by the user, and
round-trips through JSON so that an edit records exactly which modules it
changed. Models that do not fit the one-dense-``W_out``-per-layer picture
(mixture of experts, quantized weights) are refused with an explanation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "Layout",
    "ModulePathError",
    "OVERRIDE_KEYS",
    "UnsupportedModelError",
    "detect_layout",
    "get_module",
    "mlp_out_weight",
    "output_logits",
    "weight_delta_as_stored",
]

OVERRIDE_KEYS = ("blocks", "mlp_out", "final_norm", "lm_head", "mlp_out_norm")

# Parent names that mark a linear map as part of the MLP rather than attention;
# only consulted to break ties between equally shaped candidates.
_MLP_HINTS = ("mlp", "feed_forward", "ffn")
# Conventional names of the norm after the last block, in order of preference.
_FINAL_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f")
# Names of a block's norm on the MLP output, before the residual add (Gemma-2/3, OLMo-2).
_MLP_OUT_NORM_NAMES = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_ffw_norm")
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
# Python packages whose modules/tensors only appear in quantized models.
_QUANT_PACKAGES = (
    "bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "torchao", "optimum.quanto",
    "compressed_tensors", "aqlm", "eetq", "fbgemm_gpu",
)


class UnsupportedModelError(ValueError):
    """The model's structure does not fit what AlphaEdit can edit (or could not be detected)."""


class ModulePathError(KeyError):
    """A dotted module path does not name a submodule; a KeyError with a readable message."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Layout:
    """Paths and sizes of the modules AlphaEdit reads and edits in one model."""

    blocks: str
    mlp_out: str
    # No computation reads the final norm (base_model applies it before the head), but finding it
    # is part of checking that a model is built the standard way (blocks, then a norm beside
    # them, then the head): a model where it cannot be found is refused rather than mis-edited.
    final_norm: str
    lm_head: str
    weight_transposed: bool
    num_layers: int
    hidden_size: int
    key_size: int
    # The norm a block applies to the MLP output before adding it to the residual stream, relative
    # to the block (Gemma-2/3, OLMo-2: "post_feedforward_layernorm"); None where it is added as is.
    # residual.py turns MEMIT's residual targets into W_out output targets through it.
    mlp_out_norm: str | None = None

    def block(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def mlp_out_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp_out}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        names = [f.name for f in dataclasses.fields(cls)]
        optional = {"mlp_out_norm"}  # absent from layouts recorded before it existed
        missing = [n for n in names if n not in d and n not in optional]
        unknown = sorted(set(d) - set(names))
        if missing or unknown:
            raise ValueError(f"not a Layout dict: missing keys {missing}, unknown keys {unknown}")
        return cls(
            blocks=str(d["blocks"]),
            mlp_out=str(d["mlp_out"]),
            final_norm=str(d["final_norm"]),
            lm_head=str(d["lm_head"]),
            weight_transposed=bool(d["weight_transposed"]),
            num_layers=int(d["num_layers"]),
            hidden_size=int(d["hidden_size"]),
            key_size=int(d["key_size"]),
            mlp_out_norm=None if d.get("mlp_out_norm") is None else str(d["mlp_out_norm"]),
        )


# --------------------------------------------------------------------------- paths


def get_module(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule at dotted ``path`` ("" is the model itself).

    Integer parts index ``ModuleList``/``Sequential`` (negative ones too).
    Raises :class:`ModulePathError` (a ``KeyError``) naming the path and the
    children available where the lookup failed.
    """
    module = model
    walked: list[str] = []
    for part in path.split(".") if path else []:
        child = _child(module, part)
        if child is None:
            where = ".".join(walked) or "<model>"
            children = ", ".join(module._modules) or "none"
            raise ModulePathError(
                f"no module at {path!r}: {where} ({type(module).__name__}) has no submodule {part!r} "
                f"(its children: {children})"
            )
        module = child
        walked.append(part)
    return module


def _child(module: nn.Module, part: str) -> nn.Module | None:
    if isinstance(module, (nn.ModuleList, nn.Sequential)) and part.lstrip("-").isdigit():
        index = int(part)
        return module[index] if -len(module) <= index < len(module) else None
    child = module._modules.get(part)
    return child if isinstance(child, nn.Module) else None


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


# --------------------------------------------------------------------------- config


def _text_config(model: nn.Module) -> Any | None:
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    if not callable(get_text):
        return config
    try:
        return get_text()
    except ValueError:  # several text sub-configs (encoder-decoder): nothing better to pick
        return config


def _configs(model: nn.Module) -> list[Any]:
    """The top-level config and its text sub-config (multimodal wrappers keep MoE/quant flags in either)."""
    found = [getattr(model, "config", None), _text_config(model)]
    return [c for i, c in enumerate(found) if c is not None and all(c is not o for o in found[:i])]


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _hidden_size(model: nn.Module, config: Any) -> int | None:
    size = _config_int(config, "hidden_size", "n_embd", "d_model")
    if size is not None:
        return size
    get_in = getattr(model, "get_input_embeddings", None)
    embeddings = get_in() if callable(get_in) else None
    return getattr(embeddings, "embedding_dim", None)


def _intermediate_size(config: Any, hidden: int | None) -> int | None:
    size = _config_int(config, "intermediate_size", "ffn_dim")
    if size is not None:
        return size
    if config is not None and hasattr(config, "n_inner"):
        # GPT-2/GPT-J convention: n_inner=None means the classic 4x expansion.
        n_inner = _config_int(config, "n_inner")
        return n_inner if n_inner is not None else (4 * hidden if hidden else None)
    return None


# --------------------------------------------------------------------------- refusals


def _refuse_quantized(model: nn.Module) -> None:
    reasons = _quantization_flags(model)
    bad = _quantized_parameter(model)
    if bad:
        reasons.append(bad)
    if reasons:
        raise UnsupportedModelError(
            f"refusing a quantized model ({'; '.join(reasons)}): AlphaEdit computes and adds a dense "
            "floating-point update to W_out, which quantized weights cannot hold. Load the model "
            "unquantized first (e.g. from_pretrained(..., dtype=torch.float32 or torch.bfloat16), "
            "without quantization_config)."
        )


def _quantization_flags(model: nn.Module) -> list[str]:
    """Quantizer/config markers, unless they say the weights were dequantized while loading."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not _declares_dequantized(getattr(quantizer, "quantization_config", None)):
        return [f"model.hf_quantizer is a {type(quantizer).__name__}"]
    for config in _configs(model):
        qconfig = getattr(config, "quantization_config", None)
        if qconfig and not _declares_dequantized(qconfig):
            return [f"config.quantization_config is set ({_quant_method(qconfig)})"]
    return []


def _quant_method(qconfig: Any) -> str:
    method = qconfig.get("quant_method") if isinstance(qconfig, Mapping) else getattr(qconfig, "quant_method", None)
    return str(getattr(method, "value", method))


def _declares_dequantized(qconfig: Any) -> bool:
    # A GGUF file loaded through transformers keeps its quantizer and config even when the
    # weights were unpacked to float (the bundled SmolLM2 is loaded so). Weights that stay
    # packed are uint8 and the parameter scan still refuses them.
    if qconfig is None:
        return False
    dequantize = qconfig.get("dequantize") if isinstance(qconfig, Mapping) else getattr(qconfig, "dequantize", False)
    return bool(dequantize) or _quant_method(qconfig) == "gguf"


def _quantized_parameter(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if _is_quant_type(type(module)):
            return f"module {name!r} is a {type(module).__name__}"
    for name, param in model.named_parameters():
        # int8/uint8 and the 1-byte float8/float4 formats are storage formats of quantizers.
        if not param.dtype.is_floating_point or param.dtype.itemsize < 2:
            return f"parameter {name!r} has dtype {param.dtype}"
        if _is_quant_type(type(param)) or _is_quant_type(type(param.data)):
            return f"parameter {name!r} is a {type(param).__name__}"
    return None


def _is_quant_type(cls: type) -> bool:
    module, name = cls.__module__, cls.__name__
    from_quant_package = any(module == p or module.startswith(p + ".") for p in _QUANT_PACKAGES)
    return from_quant_package or "4bit" in name or "8bit" in name


def _refuse_moe_config(model: nn.Module) -> None:
    settings = [s for config in _configs(model) for s in _expert_settings(config)]
    if settings:
        key, value = settings[0]
        raise UnsupportedModelError(
            f"refusing a mixture-of-experts model (config.{key}={value}): AlphaEdit edits one dense "
            "MLP output projection W_out per layer, and routed experts are not supported. "
            "Use a dense model."
        )


def _expert_settings(config: Any) -> list[tuple[str, int]]:
    keys = list(_EXPERT_COUNT_KEYS)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        keys += [k for k in to_dict() if k.startswith("moe_")]
    values = [(k, _config_int(config, k)) for k in keys]
    return [(k, v) for k, v in values if v is not None and v > 1]


def _refuse_moe_blocks(blocks: nn.ModuleList, blocks_path: str) -> None:
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            leaf = name.rpartition(".")[2]
            # transformers 5 fuses experts into one module named "experts"; older code used a ModuleList.
            if leaf == "experts" or (isinstance(module, nn.ModuleList) and "expert" in leaf):
                raise UnsupportedModelError(
                    f"refusing a mixture-of-experts model: {blocks_path}.{i}.{name} is a "
                    f"{type(module).__name__} of experts. AlphaEdit edits one dense MLP output "
                    "projection W_out per layer, and routed experts are not supported. Use a dense model."
                )


# --------------------------------------------------------------------------- detection


def _override(override: Mapping[str, Any] | None) -> dict[str, str]:
    given = {k: v for k, v in (override or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OVERRIDE_KEYS))
    if unknown:
        raise UnsupportedModelError(f"unknown layout override keys {unknown}; allowed: {list(OVERRIDE_KEYS)}")
    bad = {k: v for k, v in given.items() if not isinstance(v, str) or not v}
    if bad:
        raise UnsupportedModelError(f"layout overrides must be non-empty dotted paths, got {bad}")
    return dict(given)


def _resolve(model: nn.Module, path: str, role: str) -> nn.Module:
    try:
        return get_module(model, path)
    except KeyError as err:
        raise UnsupportedModelError(
            f"layout {role}={path!r} does not exist in {type(model).__name__}: {err}. "
            f"Pass a valid path for {role!r} in the layout override."
        ) from None


def _find_blocks(model: nn.Module, config: Any) -> str:
    num_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    if num_layers is None:
        raise UnsupportedModelError(
            f"cannot find the transformer blocks of {type(model).__name__}: its config gives no layer "
            "count (num_hidden_layers / n_layer / num_layers). Pass override={'blocks': 'path.to.layers'}."
        )
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and len({type(m) for m in module}) == 1
    ]
    if not lists:
        raise UnsupportedModelError(
            f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList of "
            f"{num_layers} modules of one class (config layer count). Hybrid stacks with different "
            "block classes are not supported; otherwise pass override={'blocks': 'path.to.layers'}."
        )
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))[0]


def _math_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear map, whichever way round it stores its weight."""
    weight = getattr(module, "weight", None)
    if isinstance(module, Conv1D):
        return int(weight.shape[1]), int(weight.shape[0])
    if isinstance(module, nn.Linear):
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def _looks_like_mlp(path: str) -> bool:
    parents = path.split(".")[:-1]
    return any(hint in part.lower() for part in parents for hint in _MLP_HINTS)


def _find_mlp_out(block: nn.Module, config: Any, hidden: int | None) -> str:
    if hidden is None:
        raise UnsupportedModelError(
            "cannot find W_out: the config gives no hidden size. Pass override={'mlp_out': 'mlp.<proj>'}."
        )
    linears = [(name, _math_shape(m)) for name, m in block.named_modules()]
    candidates = [(name, shape[1]) for name, shape in linears if shape is not None and shape[0] == hidden]
    described = ", ".join(f"{n} (in={i})" for n, i in candidates) or "none"
    intermediate = _intermediate_size(config, hidden)
    if intermediate is not None:
        chosen = [name for name, size in candidates if size == intermediate]
    else:  # the MLP usually expands the most; attention outputs rarely exceed it
        largest = max((size for _, size in candidates), default=None)
        chosen = [name for name, size in candidates if size == largest]
    if not chosen:
        raise UnsupportedModelError(
            f"cannot find W_out in {type(block).__name__}: no Linear/Conv1D maps the MLP width "
            f"({intermediate}) to the hidden size ({hidden}); linear maps into the hidden size: {described}. "
            "Pass override={'mlp_out': 'mlp.<proj>'}."
        )
    if len(chosen) > 1:
        mlp_like = [name for name in chosen if _looks_like_mlp(name)]
        if len(mlp_like) != 1:
            raise UnsupportedModelError(
                f"ambiguous W_out in {type(block).__name__}: {chosen} all map {intermediate or 'the widest input'} "
                f"-> {hidden}, and not exactly one sits under an MLP-like parent {_MLP_HINTS}. "
                "Pass override={'mlp_out': '<one of them>'}."
            )
        chosen = mlp_like
    return chosen[0]


def _check_mlp_out(blocks: nn.ModuleList, blocks_path: str, mlp_out: str) -> tuple[bool, int, int]:
    """Every block must have ``mlp_out`` as the same kind of linear map of the same shape."""
    first: tuple[type, tuple[int, int]] | None = None
    for i, block in enumerate(blocks):
        path = f"{blocks_path}.{i}.{mlp_out}"
        try:
            module = get_module(block, mlp_out)
        except KeyError as err:
            raise UnsupportedModelError(f"layout mlp_out={mlp_out!r} is missing in block {i}: {err}") from None
        shape = _math_shape(module)
        if shape is None:
            raise UnsupportedModelError(
                f"{path} is a {type(module).__name__}, not an nn.Linear or transformers Conv1D; "
                "AlphaEdit can only edit a plain dense W_out."
            )
        kind = (Conv1D if isinstance(module, Conv1D) else nn.Linear, shape)
        if first is None:
            first = kind
        elif kind != first:
            raise UnsupportedModelError(
                f"W_out differs across blocks: {blocks_path}.0.{mlp_out} is {first[0].__name__} (out, in)={first[1]} "
                f"but {path} is {kind[0].__name__} (out, in)={kind[1]}; per-layer widths are not supported."
            )
    assert first is not None  # blocks is non-empty, checked by the caller
    return first[0] is Conv1D, first[1][0], first[1][1]


def _is_norm(module: nn.Module, hidden: int) -> bool:
    if "Norm" in type(module).__name__:
        return True
    weight = getattr(module, "weight", None)
    has_children = next(module.children(), None) is not None
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == hidden and not has_children


def _find_final_norm(model: nn.Module, blocks_path: str, hidden: int) -> str:
    parent_path, _, list_name = blocks_path.rpartition(".")
    parent = get_module(model, parent_path)
    norms = [name for name, child in parent.named_children() if name != list_name and _is_norm(child, hidden)]
    preferred = [name for name in _FINAL_NORM_NAMES if name in norms]
    if preferred:
        return _join(parent_path, preferred[0])
    if len(norms) == 1:
        return _join(parent_path, norms[0])
    where = parent_path or "<model>"
    raise UnsupportedModelError(
        f"cannot find the final norm: {where} ({type(parent).__name__}), the parent of the blocks, has "
        f"{'no norm layer' if not norms else f'several norm layers {norms}'} next to {list_name!r}. "
        "Pass override={'final_norm': 'path.to.norm'}."
    )


def _find_lm_head(model: nn.Module) -> str:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None); load the "
            "model with AutoModelForCausalLM, or pass override={'lm_head': 'path.to.head'}."
        )
    # Tied heads share their weight with the input embedding, but the head module is its own object.
    for name, module in model.named_modules(remove_duplicate=False):
        if module is head:
            return name
    raise UnsupportedModelError(
        f"get_output_embeddings() of {type(model).__name__} returned a {type(head).__name__} that is not "
        "registered as a submodule; pass override={'lm_head': 'path.to.head'}."
    )


def _mlp_out_norm(blocks: nn.ModuleList, given: str | None, hidden: int) -> str | None:
    """The norm each block applies to its MLP output, by name (override "none" for none)."""
    if given is not None:
        if given.lower() == "none":
            return None
        for i, block in enumerate(blocks):
            try:
                get_module(block, given)
            except KeyError as err:
                raise UnsupportedModelError(f"layout mlp_out_norm={given!r} is missing in block {i}: {err}") from None
        return given
    found = [name for name in _MLP_OUT_NORM_NAMES if isinstance(blocks[0]._modules.get(name), nn.Module)]
    if found and all(_is_norm(block._modules.get(found[0]) or nn.Identity(), hidden) for block in blocks):
        return found[0]
    return None


def _check_sizes(model: nn.Module, layout: Layout, config_hidden: int | None) -> None:
    if config_hidden is not None and layout.hidden_size != config_hidden:
        raise UnsupportedModelError(
            f"W_out {layout.mlp_out!r} writes {layout.hidden_size} features but the hidden size is "
            f"{config_hidden}; W_out must map the MLP width back into the residual stream."
        )
    head = get_module(model, layout.lm_head)
    head_in = _math_shape(head)
    if head_in is not None and head_in[1] != layout.hidden_size:
        raise UnsupportedModelError(
            f"lm_head {layout.lm_head!r} reads {head_in[1]} features, not the hidden size {layout.hidden_size}."
        )


def detect_layout(model: nn.Module, override: Mapping[str, str | None] | None = None) -> Layout:
    """Detect (and validate) where ``model`` keeps its blocks, W_out, final norm and LM head.

    ``override`` may give any of :data:`OVERRIDE_KEYS` explicitly (``mlp_out``
    relative to a block, the others from the model root); the rest is detected.
    Raises :class:`UnsupportedModelError` for MoE or quantized models and for
    anything that cannot be detected or does not validate.
    """
    given = _override(override)
    _refuse_quantized(model)
    _refuse_moe_config(model)
    config = _text_config(model)

    blocks_path = given.get("blocks") or _find_blocks(model, config)
    blocks = _resolve(model, blocks_path, "blocks")
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedModelError(
            f"layout blocks={blocks_path!r} is a {type(blocks).__name__}, not a non-empty nn.ModuleList of blocks."
        )
    _refuse_moe_blocks(blocks, blocks_path)

    config_hidden = _hidden_size(model, config)
    mlp_out = given.get("mlp_out") or _find_mlp_out(blocks[0], config, config_hidden)
    transposed, hidden, key_size = _check_mlp_out(blocks, blocks_path, mlp_out)

    mlp_out_norm = _mlp_out_norm(blocks, given.get("mlp_out_norm"), hidden)
    final_norm = given.get("final_norm") or _find_final_norm(model, blocks_path, hidden)
    lm_head = given.get("lm_head") or _find_lm_head(model)
    _resolve(model, final_norm, "final_norm")
    _resolve(model, lm_head, "lm_head")

    layout = Layout(
        blocks=blocks_path,
        mlp_out=mlp_out,
        final_norm=final_norm,
        lm_head=lm_head,
        weight_transposed=transposed,
        num_layers=len(blocks),
        hidden_size=hidden,
        key_size=key_size,
        mlp_out_norm=mlp_out_norm,
    )
    _check_sizes(model, layout, config_hidden)
    return layout


# --------------------------------------------------------------------------- using a layout


def mlp_out_weight(model: nn.Module, layout: Layout, layer: int) -> nn.Parameter:
    """The W_out weight of ``layer`` as stored ([d0, d] if ``layout.weight_transposed``, else [d, d0])."""
    return get_module(model, layout.mlp_out_path(layer)).weight


def weight_as_math(layout: Layout, weight: torch.Tensor) -> torch.Tensor:
    """A W_out as stored, seen in math orientation ``[d, d0]`` (out x in): a view, the inverse of
    :func:`weight_delta_as_stored` (GPT-2's Conv1D stores ``[d0, d]``, nn.Linear ``[d, d0]``)."""
    return weight.T if layout.weight_transposed else weight


def weight_delta_as_stored(layout: Layout, delta: torch.Tensor) -> torch.Tensor:
    """Turn an update in math orientation ``[d, d0]`` (out x in) into the weight's stored orientation."""
    expected = (layout.hidden_size, layout.key_size)
    if tuple(delta.shape) != expected:
        raise ValueError(
            f"W_out delta must have math shape (hidden_size, key_size)={expected}, got {tuple(delta.shape)}"
        )
    return delta.T if layout.weight_transposed else delta


def output_logits(model: nn.Module, layout: Layout, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for final hidden states ``[..., d]`` (already through the final norm), as ``model(...)`` computes them."""
    head = get_module(model, layout.lm_head)
    weight = next(head.parameters(), None)
    if weight is not None:  # with device_map the head may live on another device than the last block
        hidden = hidden.to(weight.device)
    logits = head(hidden)
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
