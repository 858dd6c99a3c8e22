"""Training with torch.distributed: 2 CPU processes over gloo, started by `featcodec train --nproc 2`."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import COFFEE, make_image_folder
from featcodec.bottleneck import make_unit
from featcodec.codec import Codec
from featcodec.distributed import Context
from featcodec.ladder import load_ladder

ARGS = ["--split", "stage5", "--lambdas", "30", "--distortion", "mse", "--steps", "25", "--batch-size", "8",
        "--views", "1", "--lr", "0.01", "--latent-channels", "8", "--hidden-channels", "16"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), 12, spread=80)


def _featcodec(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "featcodec", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_shard_splits_one_global_batch_between_ranks():
    batch = torch.arange(10, 18)
    shares = [Context(rank=r, world_size=2).shard(batch) for r in (0, 1)]
    assert sorted(torch.cat(shares).tolist()) == batch.tolist() and all(len(s) == 4 for s in shares)
    assert torch.equal(Context().shard(batch), batch)


def test_two_gloo_processes_train_a_ladder_that_matches_a_single_process(image_folder, tmp_path):
    cache = tmp_path / "cache"
    single, double = tmp_path / "single.safetensors", tmp_path / "double.safetensors"
    common = ["train", "--data", str(image_folder), *ARGS, "--cache-dir", str(cache)]
    one = _featcodec(*common, "--out", str(single), cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = _featcodec(*common, "--out", str(double), "--nproc", "2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert "starting 2 training processes" in two.stderr
    assert two.stderr.count("wrote 1-rung ladder") == 1  # rank 0 alone writes and reports

    ladder = load_ladder(double)
    assert ladder.extra["training"]["processes"] == 2
    codec = Codec.load("efficientnet_lite0", "stage5", weights=double)
    assert codec.decode(codec.encode([COFFEE], rate=0))[0].features.shape == (192, 7, 7)

    # same loss as the single-process run within noise: much closer to it than to the untrained start
    from featcodec.backbones import load_split_model
    from featcodec.train import TrainConfig, load_or_build_cache, list_images

    config = TrainConfig("efficientnet_lite0", "stage5", [30.0], distortion="mse", views=1)
    model = load_split_model("efficientnet_lite0", "stage5")
    features = load_or_build_cache(config, model, list_images(image_folder), cache, "cpu").load_all()["features"].float()

    def loss(unit) -> float:
        with torch.no_grad():
            output = unit.eval()(features)
            return output["bits"].item() + 30.0 * torch.mean((output["x_hat"] - features) ** 2).item()

    torch.manual_seed(0)  # rung 0 starts from the BU that seed 0 gives
    untrained = make_unit(ladder.config)
    start, reference, distributed = loss(untrained), loss(load_ladder(single).rungs[0]), loss(ladder.rungs[0])
    assert reference < 0.8 * start
    assert abs(distributed - reference) < 0.1 * (start - reference), (start, reference, distributed)


def test_nproc_refuses_a_batch_it_cannot_split(image_folder, tmp_path):
    result = _featcodec("train", "--data", str(image_folder), *ARGS[:-2], "--batch-size", "5", "--nproc", "2",
                        "--out", str(tmp_path / "x.safetensors"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "featcodec: error: --batch-size 5 must be a multiple of --nproc 2"


def test_a_failing_worker_gives_one_error_line_and_its_exit_code(image_folder, tmp_path, stage3_weights):
    # --init-from a 2-rung ladder with 3 lambdas: every rank refuses it after launch
    result = _featcodec("train", "--data", str(image_folder), *ARGS, "--lambdas", "1,2,3", "--split", "stage3",
                        "--init-from", str(stage3_weights), "--nproc", "2", "--out", str(tmp_path / "x.safetensors"),
                        cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"featcodec: error: --init-from {stage3_weights} has 2 rungs, --lambdas gives 3"], result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
