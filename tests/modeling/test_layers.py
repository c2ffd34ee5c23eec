"""The hidden-state convention (SPEC section 2) for every supported architecture, plain and under LoRA."""

from __future__ import annotations

import pytest
import torch

from lensunlearn.modeling.layers import capture_streams, check_layers, forward_streams, model_parts

from ..conftest import make_tiny_model


def _inputs(tokenizer):
    batch = tokenizer(["the capital of france is paris .", "gold is an element ."], padding=True,
                      return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def _lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "lora"])
def test_captured_stream_equals_hidden_states(arch, wrap):
    model, tokenizer = make_tiny_model(arch)
    if wrap:
        model = _lora(model)
    ids, mask = _inputs(tokenizer)
    num_layers = model_parts(model).num_layers
    assert num_layers == 4
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with capture_streams(model, range(num_layers)) as captured:
            model(input_ids=ids, attention_mask=mask)
    for layer in range(num_layers):
        torch.testing.assert_close(captured[layer], reference[layer], rtol=0, atol=0)
    # An early-stopped pass gives the same streams and never runs the later blocks.
    calls = []
    handle = model_parts(model).blocks[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            stopped = forward_streams(model, [0, 2], ids, mask)
    finally:
        handle.remove()
    assert calls == []
    torch.testing.assert_close(stopped[2], reference[2], rtol=0, atol=0)


def test_final_stream_gives_model_logits(arch):
    model, tokenizer = make_tiny_model(arch)
    ids, mask = _inputs(tokenizer)
    parts = model_parts(model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        final = forward_streams(model, [], ids, mask, final=True)[parts.num_layers]
        torch.testing.assert_close(parts.unembed(parts.final_norm(final)), logits, rtol=1e-5, atol=1e-5)


def test_hooks_removed_even_on_error():
    model, tokenizer = make_tiny_model("llama")
    ids, mask = _inputs(tokenizer)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_streams(model, [1, 3]):
            raise RuntimeError("boom")
    assert all(not block._forward_pre_hooks for block in model_parts(model).blocks)


def test_layer_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"out of range.*0\.\.3"):
        check_layers([1, 4], 4)
    model, _ = make_tiny_model("gpt2")
    with pytest.raises(ValueError, match="out of range"):
        with capture_streams(model, [7]):
            pass


def test_layer_L_is_the_final_stream_and_the_lens_reads_it_as_the_model_output(arch):
    from lensunlearn.lens.tuned_lens import TunedLens

    model, tokenizer = make_tiny_model(arch)
    ids, mask = _inputs(tokenizer)
    top = model_parts(model).num_layers
    streams = forward_streams(model, [1, top], ids, mask)
    assert sorted(streams) == [1, top]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        lens = TunedLens.from_model(model)
        torch.nn.init.normal_(lens.translators[top - 1].weight)  # translators never touch the output
        assert torch.allclose(lens(streams[top], top), logits, atol=1e-5)
    with pytest.raises(ValueError, match=r"0\.\.4 \(4 is the model's output\)"):
        check_layers([5], top, allow_output=True)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "lora"])
def test_blocks_rerun_from_a_recorded_call_give_the_plain_forward(arch, wrap):
    """`run_blocks_from` (the sequential objective's probe) on block l's own input is the model's final
    stream, from every block, for every architecture; on another input it differs."""
    from lensunlearn.modeling.layers import call_of_block, run_blocks_from

    model, tokenizer = make_tiny_model(arch)
    if wrap:
        model = _lora(model)
    ids, mask = _inputs(tokenizer)
    parts = model_parts(model)
    with torch.no_grad():
        final = forward_streams(model, (), ids, mask, final=True)[parts.num_layers]
        for layer in range(parts.num_layers):
            call = call_of_block(model, layer, ids, mask)
            assert torch.equal(call.hidden, forward_streams(model, (layer,), ids, mask)[layer])
            rerun = run_blocks_from(model, layer, call.hidden, call)
            torch.testing.assert_close(rerun[mask.bool()], final[mask.bool()], rtol=1e-5, atol=1e-5)
        other = run_blocks_from(model, 1, call.hidden + 1.0, call_of_block(model, 1, ids, mask))
        assert not torch.allclose(other[mask.bool()], final[mask.bool()])
