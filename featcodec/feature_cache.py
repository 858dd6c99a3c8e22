"""The training feature cache: the head's split tensors (and teacher logits) of every augmented view,
written in shards as they are computed and read memory-mapped.

View ``v`` of image ``i`` is item ``v * n + i``; its augmentation (and mixup partner) comes from
a generator seeded by (seed, v, i), so any number of DataLoader workers, processes or restarts
gives the same cache. Images are decoded in DataLoader workers; the head runs on batches in
the calling process; each shard (``SHARD_VIEWS`` views) is written to ``features-NNNNN.npy``
(float16) and ``logits-NNNNN.npy`` when complete, by a temporary file and a rename, and
``index.json`` marks the cache complete. A build that stops keeps its finished shards; the
next run builds only the missing ones. Under torchrun, rank r builds shards r, r + W, ...

Reading maps the shards (numpy ``mmap_mode="r"``, .npy files hold no pickles) and gathers
the rows of a batch, so memory holds the batches, not the cache.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .backbones import SplitModel, get_backbone
from .errors import FeatcodecError
from .fileio import atomic_write_bytes
from .images import load_image

SHARD_VIEWS = 2048
INDEX = "index.json"
CACHE_FORMAT = 2  # 2: sharded, per-view seeded augmentation (format 1 was one safetensors file)


def augmentation(backbone: str) -> Callable:
    """The training views' transform: random resized crop (35-100 % of the area), flip, normalise."""
    import torchvision.transforms as T

    prep = get_backbone(backbone).preprocessing
    return T.Compose([
        T.RandomResizedCrop(prep.crop, scale=(0.35, 1.0)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(prep.mean, prep.std),
    ])


class ViewDataset(torch.utils.data.Dataset):
    """Item ``v * n + i`` is view ``v`` of image ``i``, augmented with a generator seeded by (seed, v, i).

    With ``mixup`` > 0, every view after the first blends in a view of a random other image, weight
    ~ Beta(mixup, mixup); the teacher logits are then those of the blend."""

    def __init__(self, files: list[Path], backbone: str, views: int, seed: int, mixup: float = 0.0):
        self.files, self.views, self.seed, self.mixup = list(files), views, seed, mixup
        self.transform = augmentation(backbone)

    def __len__(self) -> int:
        return len(self.files) * self.views

    def __getitem__(self, item: int) -> torch.Tensor:
        view, image = divmod(item, len(self.files))
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
            torch.manual_seed(self.seed * 1_000_003 + view * 100_003 + image)
            x = self.transform(load_image(self.files[image]))
            if self.mixup > 0 and view > 0:
                weight = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
                partner = int(torch.randint(len(self.files), ()))
                x = weight * x + (1 - weight) * self.transform(load_image(self.files[partner]))
        return x


def head_outputs(model: SplitModel, x: torch.Tensor, with_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch's split tensors and (``with_logits``) teacher logits, fp16 on the CPU, as the cache holds them."""
    with torch.no_grad():
        split_tensor = model.head(x)
        logits = model.tail(split_tensor).half().cpu() if with_logits else None
        return split_tensor.half().cpu(), logits


def _shard_path(directory: Path, kind: str, shard: int) -> Path:
    return directory / f"{kind}-{shard:05d}.npy"


def _save_array(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def build_cache(
    model: SplitModel,
    dataset: ViewDataset,
    directory: Path,
    with_logits: bool,
    *,
    batch_size: int = 32,
    device: str = "cpu",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    shard_views: int = SHARD_VIEWS,
) -> None:
    """Write this rank's missing shards of ``dataset``'s cache into ``directory`` (no index: see
    :func:`finish_cache`). ``progress(done, total)`` counts the views of this rank's shards.

    The head runs on batches of ``batch_size`` consecutive views, as :func:`featcodec.train.build_feature_cache`
    runs it in memory: convolutions may round differently at another batch size."""
    if shard_views % batch_size:
        raise ValueError("shard_views must be a multiple of batch_size: the head sees the same batches as an "
                         "in-memory build, and the same batch gives the same bits")
    directory.mkdir(parents=True, exist_ok=True)
    total = len(dataset)
    shards = [s for s in range(math.ceil(total / shard_views)) if s % world_size == rank]
    todo = [s for s in shards if not _shard_path(directory, "features", s).is_file()
            or (with_logits and not _shard_path(directory, "logits", s).is_file())]
    views_of = {s: range(s * shard_views, min(total, (s + 1) * shard_views)) for s in shards}
    mine = sum(len(views_of[s]) for s in shards)
    done = mine - sum(len(views_of[s]) for s in todo)
    if progress:
        progress(done, mine)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    for shard in todo:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, views_of[shard]), batch_size=batch_size, num_workers=workers,
        )
        features, logits = [], []
        for x in loader:
            batch_features, batch_logits = head_outputs(model, x.to(device), with_logits)
            features.append(batch_features.numpy())
            if with_logits:
                logits.append(batch_logits.numpy())
            done += len(x)
            if progress:
                progress(done, mine)
        if with_logits:
            _save_array(_shard_path(directory, "logits", shard), np.concatenate(logits))
        _save_array(_shard_path(directory, "features", shard), np.concatenate(features))


def finish_cache(directory: Path, views: int, with_logits: bool, shard_views: int = SHARD_VIEWS) -> None:
    """Mark a cache complete once every shard is written (one process, after all ranks built theirs)."""
    index = {"format": CACHE_FORMAT, "views": views, "shard_views": shard_views, "logits": with_logits}
    atomic_write_bytes(directory / INDEX, json.dumps(index).encode())


class FeatureCache:
    """A complete cache, memory-mapped: ``features(index)`` and ``logits(index)`` gather a batch."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            index = json.loads((self.directory / INDEX).read_text())
            if index.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {index.get('format')}")
            self.shard_views, count = index["shard_views"], math.ceil(index["views"] / index["shard_views"])
            self._features = [np.load(_shard_path(self.directory, "features", s), mmap_mode="r") for s in range(count)]
            self._logits = [np.load(_shard_path(self.directory, "logits", s), mmap_mode="r")
                            for s in range(count)] if index["logits"] else None
        except (OSError, ValueError, KeyError) as exc:
            raise FeatcodecError(f"feature cache {self.directory} is incomplete or damaged ({exc}): delete it") from None
        self.views = index["views"]
        if sum(len(shard) for shard in self._features) != self.views:
            raise FeatcodecError(f"feature cache {self.directory} holds the wrong number of views: delete it")

    def __len__(self) -> int:
        return self.views

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one split tensor."""
        return tuple(self._features[0].shape[1:])

    @property
    def has_logits(self) -> bool:
        return self._logits is not None

    @staticmethod
    def _gather(shards: list[np.ndarray], shard_views: int, index: torch.Tensor) -> torch.Tensor:
        index = index.cpu().numpy()
        shard, offset = np.divmod(index, shard_views)
        out = np.empty((len(index), *shards[0].shape[1:]), dtype=shards[0].dtype)
        for s in np.unique(shard):
            rows = shard == s
            out[rows] = shards[s][offset[rows]]
        return torch.from_numpy(out)

    def features(self, index: torch.Tensor) -> torch.Tensor:
        """The split tensors (float16) of the views ``index``, in that order."""
        return self._gather(self._features, self.shard_views, index)

    def logits(self, index: torch.Tensor) -> torch.Tensor:
        """The teacher logits (float16) of the views ``index``."""
        if self._logits is None:
            raise FeatcodecError("this feature cache holds no teacher logits")
        return self._gather(self._logits, self.shard_views, index)

    def chunks(self, size: int = 1024) -> Iterator[torch.Tensor]:
        """Every view's split tensor in order, ``size`` at a time."""
        for start in range(0, self.views, size):
            yield self.features(torch.arange(start, min(self.views, start + size)))

    def load_all(self) -> dict[str, torch.Tensor]:
        """The whole cache in memory: ``{"features", "logits"?}``."""
        every = torch.arange(self.views)
        return {"features": self.features(every), **({"logits": self.logits(every)} if self.has_logits else {})}
