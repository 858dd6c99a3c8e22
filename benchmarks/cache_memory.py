"""Peak memory and time of building a training feature cache (sharded, memory-mapped), then of reading it.

    python benchmarks/cache_memory.py --data ../shared/data/train ../shared/data/pool --split stage2 --views 8 --limit 15000
    python benchmarks/cache_memory.py --data ../shared/data/train --split stage2 --views 2 --limit 2000

Builds the cache the way `featcodec train` does (images decoded in DataLoader workers, shards
written as they fill) into a temporary folder, then draws 200 training batches of 32 from it.
Prints views, shards, seconds and the peak resident memory (this process, and its worker
processes) after each phase.
"""

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from _bootstrap import ROOT  # noqa: F401

import torch

from featcodec.allocator import reuse_freed_memory
from featcodec.backbones import load_split_model
from featcodec.feature_cache import FeatureCache, ViewDataset, build_cache, finish_cache
from featcodec.train import list_images, readable_images


def peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="image folders, taken in order")
    parser.add_argument("--split", default="stage2")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's thresholds as they are (featcodec's CLI raises them)")
    args = parser.parse_args()
    if not args.default_malloc:
        reuse_freed_memory()  # as `featcodec train` runs

    files = readable_images([file for folder in args.data for file in list_images(folder)][: args.limit])
    model = load_split_model("efficientnet_lite0", args.split).eval()
    dataset = ViewDataset(files, "efficientnet_lite0", args.views, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "cache"
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            if done % 2048 == 0 or done == total:
                print(f"  {done}/{total} views, {time.perf_counter() - started:.0f} s", file=sys.stderr)

        build_cache(model, dataset, directory, True, workers=args.workers, progress=progress)
        finish_cache(directory, len(dataset), True)
        built = time.perf_counter() - started
        on_disk = sum(p.stat().st_size for p in directory.iterdir()) / 2**30
        print(f"efficientnet_lite0/{args.split}: {len(files)} images x {args.views} views = {len(dataset)} views, "
              f"{len(list(directory.glob('features-*.npy')))} shards, {on_disk:.2f} GiB on disk")
        print(f"build: {built:.0f} s, peak RSS {peak_mib(resource.RUSAGE_SELF):.0f} MiB "
              f"(largest worker {peak_mib(resource.RUSAGE_CHILDREN):.0f} MiB)")
        cache = FeatureCache(directory)
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        for _ in range(200):
            index = torch.randint(len(cache), (32,), generator=generator)
            cache.features(index).float(), cache.logits(index).float()
        print(f"read: 200 batches of 32 in {time.perf_counter() - started:.1f} s, "
              f"peak RSS {peak_mib(resource.RUSAGE_SELF):.0f} MiB")


if __name__ == "__main__":
    main()
