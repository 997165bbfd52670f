"""`trace`: recording, editing and early stopping of forward passes, and hook clean-up."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from alphaedit.hooks import StopForward, run_forward, trace
from alphaedit.layouts import get_module, mlp_out_weight

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def ids(vocab_size) -> torch.Tensor:
    return torch.randint(2, vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_trace_records_module_inputs_and_outputs(llama, ids):
    model, layout = llama
    w_out, block = layout.mlp_out_path(1), layout.block(2)
    with torch.no_grad():
        with trace(model, inputs_of=[w_out], outputs_of=[w_out, block]) as rec:
            model(input_ids=ids)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    x = rec.inputs[w_out]
    assert x.shape == (2, 9, layout.key_size)
    torch.testing.assert_close(rec.outputs[w_out], x @ mlp_out_weight(model, layout, 1).T)
    torch.testing.assert_close(rec.outputs[block], hidden[3])  # hidden_states[0] is the embedding
    assert not x.requires_grad


def test_trace_without_detach_keeps_the_graph(llama, ids):
    model, layout = llama
    w_out = layout.mlp_out_path(0)
    with trace(model, inputs_of=[w_out], detach=False) as rec:
        model(input_ids=ids)
    assert rec.inputs[w_out].requires_grad


def test_edit_outputs_of_the_last_block_changes_logits_as_computed_by_hand(gpt2, ids):
    model, layout = gpt2
    last = layout.block(layout.num_layers - 1)
    shift = torch.randn(layout.hidden_size, generator=torch.Generator().manual_seed(1))

    def add_at_position_4(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[:, 4] += shift
        return h

    with torch.no_grad():
        with trace(model, outputs_of=[last]) as clean:
            model(input_ids=ids)
        with trace(model, outputs_of=[last], edit_outputs={last: add_at_position_4}) as edited:
            logits = model(input_ids=ids).logits
        h = clean.outputs[last].clone()
        h[:, 4] += shift
        expected = get_module(model, layout.lm_head)(get_module(model, layout.final_norm)(h))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(edited.outputs[last], h)  # the recorded output includes the edit
    assert (logits[:, 4] - model(input_ids=ids).logits[:, 4]).abs().max() > 1e-3


def test_editing_w_out_output_equals_editing_its_weight(llama, ids):
    model, layout = llama
    w_out = layout.mlp_out_path(1)
    with torch.no_grad():
        with trace(model, edit_outputs={w_out: lambda y: 2 * y}):
            edited = model(input_ids=ids).logits
        doubled = copy.deepcopy(model)
        mlp_out_weight(doubled, layout, 1).mul_(2)
        expected = doubled(input_ids=ids).logits
        original = model(input_ids=ids).logits
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-6)
    assert (edited - original).abs().max() > 1e-4


class _TupleBlock(nn.Module):
    """Returns (hidden, extra) like the blocks of older transformers versions."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x), "extra"


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([_TupleBlock(), _TupleBlock()])

    def forward(self, x):
        for block in self.blocks:
            x, extra = block(x)
            assert extra == "extra"
        return x


def test_tuple_outputs_are_edited_and_recorded_through_their_first_element():
    toy, x = _Toy(), torch.randn(2, 3)
    with torch.no_grad():
        with trace(toy, outputs_of=["blocks.0"], edit_outputs={"blocks.0": lambda h: h + 1}) as rec:
            out = toy(x)
        first = toy.blocks[0].linear(x)
        expected = toy.blocks[1].linear(first + 1)
    torch.testing.assert_close(rec.outputs["blocks.0"], first + 1)
    torch.testing.assert_close(out, expected)


def test_stop_after_ends_the_pass_and_deeper_modules_never_run(llama, ids):
    model, layout = llama
    fired = []
    handles = [
        get_module(model, layout.block(i)).register_forward_pre_hook(lambda *_, i=i: fired.append(i))
        for i in range(layout.num_layers)
    ]
    try:
        with torch.no_grad(), trace(model, outputs_of=[layout.block(1)], stop_after=layout.block(1)) as rec:
            result = run_forward(model, input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    assert result is None
    assert fired == [0, 1]
    assert rec.outputs[layout.block(1)].shape == (2, 9, layout.hidden_size)


def test_stop_after_raises_stop_forward_without_run_forward(llama, ids):
    model, layout = llama
    with torch.no_grad(), trace(model, stop_after=layout.block(0)):
        with pytest.raises(StopForward):
            model(input_ids=ids)


def test_hooks_are_removed_after_the_block(llama, ids):
    model, layout = llama
    before = _hook_count(model)
    paths = [layout.mlp_out_path(0), layout.block(1)]
    with trace(model, inputs_of=paths, outputs_of=paths, edit_outputs={paths[1]: lambda h: h * 0}, stop_after=paths[1]):
        assert _hook_count(model) > before
    assert _hook_count(model) == before


def test_hooks_are_removed_when_the_block_raises(llama, ids):
    model, layout = llama
    before = _hook_count(model)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with trace(model, outputs_of=[layout.block(0)], edit_outputs={layout.block(0): lambda h: h * 0}):
            raise RuntimeError("boom")
    assert _hook_count(model) == before
    with pytest.raises(StopForward):  # an unguarded early stop propagates out of the block
        with torch.no_grad(), trace(model, stop_after=layout.block(0)):
            model(input_ids=ids)
    assert _hook_count(model) == before
    # The model is back to normal: a full pass runs and nothing zeroes block 0 any more.
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)


def test_unknown_module_path_fails_and_leaves_no_hooks(llama):
    model, layout = llama
    before = _hook_count(model)
    with pytest.raises(KeyError, match="nope"):
        with trace(model, inputs_of=[layout.mlp_out_path(0), "model.nope"]):
            pass
    assert _hook_count(model) == before


def test_replay_blocks_skips_the_lower_blocks_and_restores_them(llama):
    from alphaedit.hooks import replay_blocks

    model, layout = llama
    ids = torch.tensor([[5, 17, 42, 7]])
    blocks = [get_module(model, layout.block(i)) for i in range(2)]
    with torch.no_grad(), trace(model, outputs_of=[layout.block(1)]) as rec:
        expected = model(ids).logits
    inner_calls = []  # the replayed blocks' own modules must not run
    handles = [get_module(model, layout.mlp_out_path(i)).register_forward_hook(lambda *a: inner_calls.append(1)) for i in range(3)]
    try:
        with torch.no_grad(), replay_blocks(blocks, rec.outputs[layout.block(1)]):
            replayed = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(replayed, expected)
    assert len(inner_calls) == 1  # only block 2's W_out ran
    assert "forward" not in blocks[0].__dict__ and "forward" not in blocks[1].__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)
