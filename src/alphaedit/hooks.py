"""One small hook utility, reused by every pass that reads or edits activations.

`trace` records the inputs or outputs of named modules during a forward pass, can edit a
module's output on the fly, and can stop the pass right after a module so that work above
the deepest layer of interest is never done. Everything else in the package (keys, target
values, statistics) is a `trace` plus some indexing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .layouts import get_module

OutputEdit = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; `trace` swallows it."""


@dataclass
class Recording:
    """What a traced forward pass saw, keyed by module path."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def _main_tensor(value: object) -> torch.Tensor:
    # Blocks of some architectures return tuples (hidden, attn weights, cache); the residual stream is first.
    return value[0] if isinstance(value, tuple) else value  # type: ignore[return-value]


def _replace_main_tensor(value: object, tensor: torch.Tensor) -> object:
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor


@contextmanager
def trace(
    model: nn.Module,
    inputs_of: Sequence[str] = (),
    outputs_of: Sequence[str] = (),
    edit_outputs: Mapping[str, OutputEdit] | None = None,
    stop_after: str | None = None,
    detach: bool = True,
) -> Iterator[Recording]:
    """Hook the named modules for the duration of the `with` block.

    inputs_of / outputs_of: record the first positional input / the main output tensor.
    edit_outputs: path -> function replacing the module's main output tensor (applied before
    recording, so a recorded output includes the edit).
    stop_after: raise `StopForward` once this module has run; wrap the forward call in
    `run_forward` (or catch `StopForward`) to use it.
    """
    recording = Recording()
    edits = dict(edit_outputs or {})
    handles = []

    def record_input(path: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            recording.inputs[path] = x.detach() if detach else x

        return hook

    def record_output(path: str) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: object) -> object | None:
            new_output = None
            if path in edits:
                new_output = _replace_main_tensor(output, edits[path](_main_tensor(output)))
                output = new_output
            if path in outputs_of:
                main = _main_tensor(output)
                recording.outputs[path] = main.detach() if detach else main
            if path == stop_after:
                raise StopForward
            return new_output

        return hook

    try:
        for path in inputs_of:
            handles.append(get_module(model, path).register_forward_pre_hook(record_input(path)))
        for path in {*outputs_of, *edits, *([stop_after] if stop_after else [])}:
            handles.append(get_module(model, path).register_forward_hook(record_output(path)))
        yield recording
    finally:
        for handle in handles:
            handle.remove()


def run_forward(module: nn.Module, **inputs: torch.Tensor) -> object | None:
    """Call `module(**inputs)`; return None instead of raising when a hook stopped the pass."""
    try:
        return module(**inputs)
    except StopForward:
        return None


@contextmanager
def replay_blocks(blocks: Sequence[nn.Module], output: torch.Tensor) -> Iterator[None]:
    """Run a forward pass as if `blocks` (the first blocks of the model, in order) had
    produced `output`, without computing them: all but the last pass their input through,
    the last returns `output`. Hooks on the blocks still fire.

    For passes whose change starts above these blocks (the z optimisation adds δ to the last
    one's output), their result is the same every time and is read from a cache instead.
    Blocks must return their hidden state as a plain tensor (transformers ≥ 5 layers do).
    """

    def passthrough(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states

    def replay(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return output

    # accelerate (device_map="auto") keeps its own wrapped forward on the instance: put it back
    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for block in blocks[:-1]:
            block.forward = passthrough  # an instance attribute shadows the class's forward
        blocks[-1].forward = replay
        yield
    finally:
        for block, previous in zip(blocks, saved):
            if previous is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off requires_grad on every parameter for the duration, restoring each flag after.

    Passes that differentiate only with respect to an activation (δ) would otherwise also
    compute, and leave behind, a gradient for every weight they pass through.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
