"""On a CUDA GPU: step time and host syncs per optimizer step, gradaccum against the plain loop.

A GPT-2-small-sized model (12 layers x 768, vocabulary 50,257) built from its config
(random weights, nothing downloaded), bf16 autocast, AdamW (fused), k = 8 micro-batches
of 8 sequences with lengths drawn from 64-512 tokens. The plain loop is the seeds' loop
(``loss / k``, step every k micro-batches); gradaccum runs ``window.autocast()`` and
``window.backward(loss, num_items=<tensor count>)``, with its counts on the device. The two
alternate optimizer step by optimizer step. Host syncs are counted with
``torch.cuda.set_sync_debug_mode("warn")`` (each synchronising call warns once per call).

    python benchmarks/gpu.py [--steps 20] [--layers 12] [--micro 8] [--k 8]

Prints ms per step for both, their ratio, and syncs per step for both.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import gradaccum


def build(layers: int, device: torch.device) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device)


def batches(n: int, micro: int, device: torch.device, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(64, 513, (micro,), generator=g)
        ids = torch.randint(0, 50257, (micro, int(lengths.max())), generator=g)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        out.append((ids.to(device), mask.to(device)))
    return out


def loss_and_count(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    valid = mask[:, 1:].reshape(-1).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    count = valid.sum()
    return (ce * valid).sum() / count, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    device = torch.device("cuda")
    k = args.k
    data = batches(k * 4, args.micro, device)
    plain_model = build(args.layers, device)
    ours_model = build(args.layers, device)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-5, fused=True)
    ours_opt = torch.optim.AdamW(ours_model.parameters(), lr=1e-5, fused=True)
    acc = gradaccum.Accumulator(ours_model, ours_opt, steps=k, precision="bf16", max_grad_norm=1.0)

    def plain_step(i: int) -> None:
        for j in range(k):
            ids, mask = data[(i * k + j) % len(data)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = loss_and_count(plain_model, ids, mask)
            (loss / k).backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    stream = (data[i % len(data)] for i in range(10**9))
    windows = acc.windows(stream)

    def ours_step(i: int) -> None:
        window = next(windows)
        for ids, mask in window:
            with window.autocast():
                loss, count = loss_and_count(ours_model, ids, mask)
            window.backward(loss, num_items=count)
        window.step()

    def timed(fn, i: int) -> tuple[float, int]:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            t0 = time.perf_counter()
            fn(i)
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        return time.perf_counter() - t0, syncs

    for i in range(3):  # warm-up
        plain_step(i)
        ours_step(i)
    times: dict[str, list[float]] = {"plain": [], "gradaccum": []}
    syncs: dict[str, list[int]] = {"plain": [], "gradaccum": []}
    for i in range(args.steps):
        order = [("plain", plain_step), ("gradaccum", ours_step)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            seconds, count = timed(fn, i)
            times[name].append(seconds)
            syncs[name].append(count)
    p, g = statistics.median(times["plain"]), statistics.median(times["gradaccum"])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.layers} layers, "
          f"micro-batch {args.micro} x k {k}, bf16")
    print(f"plain {p * 1e3:.1f} ms/step, gradaccum {g * 1e3:.1f} ms/step, ratio {g / p:.3f}")
    print(f"host syncs per step: plain {statistics.median(syncs['plain']):.0f}, "
          f"gradaccum {statistics.median(syncs['gradaccum']):.0f} (max {max(syncs['gradaccum'])})")


if __name__ == "__main__":
    main()
