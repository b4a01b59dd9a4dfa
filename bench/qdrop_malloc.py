"""Cost of a fixed glibc mmap threshold on QDrop reconstruction (one SmolLM2-shaped block).

Usage: .venv/bin/python bench/qdrop_malloc.py [--iters 30] [--threads 1]

glibc keeps freed buffers in its heap once its dynamic mmap threshold has grown, so QDrop's
resident memory creeps up block after block. ``MALLOC_MMAP_THRESHOLD_=1048576`` fixes the threshold
at 1 MiB: every freed activation goes straight back to the system, at the price of page faults on
every large allocation. This script times ``reconstruct_block`` (W3 g128 asymmetric weights, A8
per-token, 8 sequences of 512 tokens, random weights of the embedded model's shapes) in two fresh
processes, with and without the variable.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CHILD = "--child"


def child(iters: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tersa.calib.blockwise import BlockCache, first_output
    from tersa.quant.qdrop import QDropConfig, reconstruct_block
    from tersa.quant.replace import find_linears
    from tersa.quant.scheme import ActivationScheme, WeightScheme

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=1000)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    block = model.model.layers[0]
    x = [torch.randn(8, 512, 576)]
    positions = torch.arange(512)[None]
    kwargs = [{"position_embeddings": model.model.rotary_emb(x[0], positions),
               "attention_mask": None, "position_ids": positions}]  # fmt: skip
    with torch.no_grad():
        y = [first_output(block(x[0], **kwargs[0]))]
    weights = WeightScheme(bits=3, granularity="group", group_size=128, symmetric=False)
    acts = ActivationScheme(bits=8, granularity="token", symmetric=True)
    t0 = time.perf_counter()
    reconstruct_block(block, list(find_linears(block)), BlockCache(x, kwargs), x, y, weights,
                      acts, QDropConfig(iters=iters), seed=0)  # fmt: skip
    print(f"{time.perf_counter() - t0:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.iters)
        return
    base = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    base.pop("MALLOC_MMAP_THRESHOLD_", None)
    for label, env in (("glibc default", base),
                       ("MALLOC_MMAP_THRESHOLD_=1048576", {**base, "MALLOC_MMAP_THRESHOLD_": "1048576"})):  # fmt: skip
        cmd = [sys.executable, __file__, CHILD, "--iters", str(args.iters)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        print(f"{label:32s} {args.iters} steps: {out.stdout.strip().splitlines()[-1]} s")


if __name__ == "__main__":
    main()
