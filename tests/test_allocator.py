"""The CLI's allocator setting: large freed blocks are reused, not faulted in anew."""

import resource
import sys

import pytest
import torch

from featcodec.allocator import reuse_freed_memory


def _faults_of_large_tensors() -> int:
    """Page faults while two 40 MB tensors (above glibc's largest default mmap threshold) come and go."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(10 << 20)
    y = x * 2
    del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_are_reused_after_the_setting():
    if not reuse_freed_memory():
        pytest.skip("this C library does not take glibc's mallopt thresholds")
    for _ in range(3):  # the heap grows to hold them
        _faults_of_large_tensors()
    # then reuses them; with glibc's defaults every round faults in all 20,480 pages again
    assert _faults_of_large_tensors() < 1000
