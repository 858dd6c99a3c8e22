"""The CLI's allocator setting: large freed blocks are reused, not faulted in anew."""

import subprocess
import sys

import pytest

# In a fresh process (a clean heap): page faults while two 40 MB tensors, above glibc's largest
# default mmap threshold, come and go: three rounds summed, after five that let the heap grow.
_PROBE = """
import resource, sys, torch
from featcodec.allocator import reuse_freed_memory
if sys.argv[1] == "reuse" and not reuse_freed_memory():
    print("refused"); sys.exit()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(10 << 20); y = x * 2; del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(5):
    faults()
print(sum(faults() for _ in range(3)))
"""


def _faults(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_are_reused_after_the_setting():
    reused = _faults("reuse")
    if reused == "refused":
        pytest.skip("this C library does not take glibc's mallopt thresholds")
    assert int(reused) < 20_480  # under one round's pages in three rounds (mostly none)
    assert int(_faults("default")) > 60_000  # glibc's defaults: all 20,480 pages faulted in every round
