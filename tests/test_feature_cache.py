"""The sharded, memory-mapped feature cache: the same views as the in-memory cache, in any build order."""

import json

import numpy as np
import pytest
import torch

from conftest import make_image_folder
from featcodec.backbones import load_split_model
from featcodec.errors import FeatcodecError
from featcodec.feature_cache import FeatureCache, ViewDataset, build_cache, finish_cache
from featcodec.train import build_feature_cache, list_images

SHARD = 4  # views per shard: 2 views of 7 images make 4 shards, the last one short


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return list_images(make_image_folder(tmp_path_factory.mktemp("cache-images"), 7))


@pytest.fixture(scope="module")
def model():
    return load_split_model("efficientnet_lite0", "stage5").eval()


def _sharded(model, files, directory, **kwargs):
    dataset = ViewDataset(files, "efficientnet_lite0", 2, 0, mixup=1.0)
    build_cache(model, dataset, directory, True, batch_size=4, shard_views=SHARD, **kwargs)
    finish_cache(directory, len(dataset), True, shard_views=SHARD)
    return FeatureCache(directory)


def test_sharded_cache_gives_the_in_memory_caches_batches(model, files, tmp_path):
    memory = build_feature_cache(model, "efficientnet_lite0", files, 2, 0, True, batch_size=4, mixup=1.0)
    cache = _sharded(model, files, tmp_path / "c", workers=2)
    assert len(cache) == 14 and cache.shape == (192, 7, 7) and len(list((tmp_path / "c").glob("features-*.npy"))) == 4
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        index = torch.randint(len(cache), (6,), generator=generator)
        assert torch.equal(cache.features(index), memory["features"][index])
        assert torch.equal(cache.logits(index), memory["logits"][index])
    assert torch.equal(torch.cat(list(cache.chunks(4))), memory["features"])
    assert torch.equal(cache.load_all()["features"], memory["features"])


def test_a_stopped_build_resumes_with_the_missing_shards(model, files, tmp_path):
    whole = _sharded(model, files, tmp_path / "whole", workers=0).load_all()
    partial = tmp_path / "partial"
    _sharded(model, files, partial, workers=0)
    (partial / "features-00001.npy").unlink()
    (partial / "index.json").unlink()
    with pytest.raises(FeatcodecError, match="incomplete"):
        FeatureCache(partial)
    before = (partial / "features-00000.npy").stat().st_mtime_ns
    done = []
    again = _sharded(model, files, partial, workers=0, progress=lambda d, t: done.append((d, t)))
    assert (partial / "features-00000.npy").stat().st_mtime_ns == before  # kept, not rebuilt
    assert done[0] == (10, 14) and done[-1] == (14, 14)  # shard 1 (4 views) was missing
    assert torch.equal(again.load_all()["features"], whole["features"])


def test_ranks_build_disjoint_shares(model, files, tmp_path):
    directory = tmp_path / "ranks"
    dataset = ViewDataset(files, "efficientnet_lite0", 2, 0, mixup=1.0)
    build_cache(model, dataset, directory, True, batch_size=4, shard_views=SHARD, rank=1, world_size=2, workers=0)
    assert sorted(p.name for p in directory.glob("features-*.npy")) == ["features-00001.npy", "features-00003.npy"]
    build_cache(model, dataset, directory, True, batch_size=4, shard_views=SHARD, rank=0, world_size=2, workers=0)
    finish_cache(directory, len(dataset), True, shard_views=SHARD)
    whole = _sharded(model, files, tmp_path / "whole", workers=0)
    assert torch.equal(FeatureCache(directory).load_all()["features"], whole.load_all()["features"])


def test_shards_are_plain_npy_files_read_without_pickles(model, files, tmp_path):
    _sharded(model, files, tmp_path / "c", workers=0)
    shard = np.load(tmp_path / "c" / "features-00000.npy", allow_pickle=False, mmap_mode="r")
    assert shard.dtype == np.float16 and shard.shape == (SHARD, 192, 7, 7)
    assert json.loads((tmp_path / "c" / "index.json").read_text())["views"] == 14
