"""Lens-unlearning and lens-training steps at the seed's scale on one GPU: tokens/s, MFU, peak memory.

A randomly initialised GPT-NeoX of deep-ignorance-unfiltered's shape (hidden 4096, 32 layers, 32
heads, MLP 16384, vocabulary 50304) in bfloat16, LoRA r16 on blocks 0..29, target layers
5,10,...,30, per-device batch 4 x 2048 tokens of forget and of retain text, gradient
checkpointing off and on. No download is needed. MFU divides the model FLOPs the step must do
(forward 2N, backward through frozen weights 2N per token and pass, the lens products, attention)
by the bfloat16 matrix-product rate measured on the same card in the same process.

    python benchmarks/step_gpu.py --quick     # one timed step each, about 2 minutes on an H200
    python benchmarks/step_gpu.py             # three timed steps each
    python benchmarks/step_gpu.py --tiny      # a 4-layer toy on CPU: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lensunlearn.lens.train import lens_streams
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.layers import model_parts
from lensunlearn.modeling.loading import set_checkpointing
from lensunlearn.modeling.losses import lens_kl
from lensunlearn.unlearning.objective import AdapterDisabled, UnlearnObjective

SEED_SHAPE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=16384,
                  vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25)
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                  vocab_size=512, max_position_embeddings=64, rotary_pct=0.25)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Measured dense matrix-product FLOP/s on this device and dtype (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    repeats = 20 if device.type == "cuda" else 3
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - began)


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**shape)).to(dtype)
    lens = TunedLens.from_model(model)
    layers = tuple(l for l in (5, 10, 15, 20, 25, 30) if l < shape["num_hidden_layers"]) or (1, 3)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             layers_to_transform=list(range(max(layers)))))
    return model, lens.requires_grad_(False), layers


def block_params(model) -> int:
    return sum(p.numel() for p in model_parts(model).blocks[0].parameters())


def unlearn_flops(shape: dict, n_block: int, layers, tokens: int, seq: int) -> float:
    """Model FLOPs of one step: forget and retain passes fwd+bwd, original fwd, lens fwd+bwd, attention."""
    depth, d, vocab = max(layers), shape["hidden_size"], shape["vocab_size"]
    dense = 2 * n_block * depth * tokens
    attention = 4 * seq * d * depth * tokens
    lens = 2 * vocab * d * len(layers) * tokens
    return 2 * (dense + attention) + 2 * (dense + attention) + (dense + attention) + 2 * lens


def time_steps(step, device: torch.device, repeats: int) -> tuple[float, float]:
    """(best seconds per step, peak GiB) after one warm-up step."""
    step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        sync(device)
        best = min(best, time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return best, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed step per variant")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer toy model (runs on CPU; a smoke test)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    shape, seq = (TINY_SHAPE, 32) if args.tiny else (SEED_SHAPE, args.seq)
    repeats = 1 if (args.quick or args.tiny) else 3
    peak_rate = matmul_rate(device, dtype, 256 if args.tiny else 8192)
    model, lens, layers = build(shape, device, dtype)
    vocab = shape["vocab_size"]
    forget = {"input_ids": torch.randint(0, vocab, (args.batch, seq), device=device),
              "attention_mask": torch.ones(args.batch, seq, dtype=torch.long, device=device)}
    retain = {k: v.clone() for k, v in forget.items()}
    retain["input_ids"] = torch.randint(0, vocab, (args.batch, seq), device=device)
    objective = UnlearnObjective(model, lens.set_matmul_dtype(dtype), layers, AdapterDisabled(model), chunk=4096)
    tokens = args.batch * seq
    flops = unlearn_flops(shape, block_params(model), layers, tokens, seq)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "matmul_tflops": peak_rate / 1e12, "shape": shape, "tokens_per_pass": tokens, "rows": []}
    print(f"{results['device']}: measured bf16 matmul {peak_rate / 1e12:.1f} TFLOP/s")
    for checkpointing in (False, True):
        if checkpointing:
            set_checkpointing(model, True)
        model.train()

        def step() -> None:
            loss, _, _ = objective(forget, retain, 2.5, 4.375)
            loss.backward()
            model.zero_grad(set_to_none=True)
        seconds, peak = time_steps(step, device, repeats)
        row = {"step": "unlearn LoRA", "checkpointing": checkpointing, "s_per_step": seconds,
               "tokens_per_s": 2 * tokens / seconds, "mfu": flops / seconds / peak_rate, "peak_gib": peak}
        results["rows"].append(row)
        print(json.dumps(row))
    set_checkpointing(model, False)
    trainable = TunedLens.from_model(model).set_matmul_dtype(dtype)
    all_layers = list(range(shape["num_hidden_layers"]))

    def lens_step() -> None:  # what `lens train` does per micro-batch
        streams, final = lens_streams(model, forget, len(all_layers))
        lens_kl(trainable, all_layers, streams, final, chunk=4096, backward_scale=1.0 / tokens)
    seconds, peak = time_steps(lens_step, device, repeats)
    lens_flops = tokens * (2 * block_params(model) * len(all_layers) + 2 * vocab * shape["hidden_size"] *
                           (1 + 2 * len(all_layers)))
    row = {"step": "lens train", "checkpointing": False, "s_per_step": seconds, "tokens_per_s": tokens / seconds,
           "mfu": lens_flops / seconds / peak_rate, "peak_gib": peak}
    results["rows"].append(row)
    print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
