"""How much faster could stage3's tail run on the CPU: as it is, in channels_last, or traced, frozen and
optimized for inference with TorchScript (batch norm folded)? Written for issue 30's server
throughput; prints the largest logit difference and ms per record at batch 1, 4 and 8:

    python experiments/tail_speed_probe.py 1      # torch threads (the server's decoding threads use 1)

A traced tail bakes in the split tensor's shape (Lite0 at 224: 80x14x14).
"""

import copy
import sys
import time

from _bootstrap import ROOT  # noqa: F401

import torch

from featcodec.backbones import load_split_model
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
m = load_split_model("efficientnet_lite0", "stage3", None, False)
tail = m.tail.eval()
variants = {"plain": (tail, lambda x: x)}
cl = copy.deepcopy(tail).to(memory_format=torch.channels_last)
variants["channels_last"] = (cl, lambda x: x.contiguous(memory_format=torch.channels_last))
x8 = torch.randn(8, 80, 14, 14)
with torch.no_grad():
    try:
        fr = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(copy.deepcopy(tail), x8[:1], check_trace=False)))
        variants["jit_frozen"] = (fr, lambda x: x)
    except Exception as e:
        print("jit failed", repr(e)[:200])
    ref = tail(x8)
    for k, (f, xf) in variants.items():
        print(k, "maxdiff", (f(xf(x8)) - ref).abs().max().item(), "top1 same", bool((f(xf(x8)).argmax(1) == ref.argmax(1)).all()))
    res = {}
    for rnd in range(5):
        for k, (f, xf) in variants.items():
            for b in (1, 4, 8):
                xx = xf(torch.randn(b, 80, 14, 14)); f(xx)
                s = time.perf_counter()
                for _ in range(8): f(xx)
                res.setdefault((k, b), []).append((time.perf_counter() - s) / 8 / b * 1000)
    for (k, b), v in sorted(res.items()):
        print(f"{k:14s} batch {b}: min {min(v):.2f} median {sorted(v)[2]:.2f} ms/record")
