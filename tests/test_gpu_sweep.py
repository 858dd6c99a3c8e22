"""scripts/gpu_sweep.py on the CPU: one cache, one time-boxed job, its ladder delivered as it finishes."""

import json
import os
import subprocess
import sys

from conftest import ROOT, make_image_folder
from featcodec.bottleneck import BottleneckConfig
from featcodec.ladder import load_ladder, save_ladder, untrained_ladder
from featcodec.train import TrainConfig, cache_key, list_images


def test_sweep_trains_a_job_from_its_init_ladder_and_delivers_it(tmp_path):
    data = make_image_folder(tmp_path / "train", count=4)
    (tmp_path / "init").mkdir()
    config = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=8, hidden_channels=16,
                              entropy="hyperprior")
    save_ladder(untrained_ladder("efficientnet_lite0", "stage5", config, [1.0]), tmp_path / "init" / "s5.safetensors")
    job = {"name": "a", "split": "stage5", "views": 1, "lambda": 2.0, "init": "s5.safetensors", "batch": 2,
           "max_steps": 30, "config": {"kd_weight": 5.0}}
    (tmp_path / "jobs.json").write_text(json.dumps({"commit": "abc1234", "jobs": [job]}))
    (tmp_path / "out").mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_sweep.py"), "sweep", "--data", str(data), "--init",
         str(tmp_path / "init"), "--jobs", str(tmp_path / "jobs.json"), "--work", str(tmp_path / "work"),
         "--seconds", "300", "--margin", "5", "--probe", "12", "--deliver", str(tmp_path / "out")],
        capture_output=True, text=True, env=dict(os.environ, SWEEP_DEVICE="cpu"), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a: exit 0" in result.stdout
    ladder = load_ladder(tmp_path / "out" / "a.safetensors")
    assert ladder.config == config and len(ladder.rungs) == 1
    assert ladder.rung_info[0]["lambda"] == 2.0 and ladder.rung_info[0]["steps"] == 30
    training = ladder.extra["training"]
    assert training["git_commit"] == "abc1234" and training["init_from"] == "s5.safetensors"
    assert training["data"] == "4 images under train/, 1 augmented views each" and training["batch_size"] == 2
    # the cache carries the name `featcodec train --views 1 --distortion mse+kd` looks for
    expected = cache_key(TrainConfig("efficientnet_lite0", "stage5", [2.0], views=1), list_images(data), True)
    assert (tmp_path / "work" / "cache" / f"efficientnet_lite0-stage5-{expected}" / "index.json").is_file()


def test_sweep_job_with_mixup_cache_refiner_blocks_and_decoder_only(tmp_path):
    data = make_image_folder(tmp_path / "train", count=4)
    (tmp_path / "init").mkdir()
    config = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=8, hidden_channels=16,
                              entropy="hyperprior")
    start = untrained_ladder("efficientnet_lite0", "stage5", config, [1.0])
    save_ladder(start, tmp_path / "init" / "s5.safetensors")
    job = {"name": "d", "split": "stage5", "views": 2, "mixup": 1.0, "lambda": 1.0, "init": "s5.safetensors",
           "batch": 2, "max_steps": 12, "refine_blocks": 1,
           "config": {"decoder_only": True, "distortion": "kd", "kd_weight": 1.0}}
    (tmp_path / "jobs.json").write_text(json.dumps({"commit": "abc1234", "jobs": [job]}))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_sweep.py"), "sweep", "--data", str(data), "--init",
         str(tmp_path / "init"), "--jobs", str(tmp_path / "jobs.json"), "--work", str(tmp_path / "work"),
         "--seconds", "300", "--margin", "5", "--probe", "6"],
        capture_output=True, text=True, env=dict(os.environ, SWEEP_DEVICE="cpu"), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "d: exit 0" in result.stdout
    ladder = load_ladder(tmp_path / "work" / "out" / "d.safetensors")
    unit, before = ladder.rungs[0], start.rungs[0]
    assert unit.config.refine_blocks == 1 and ladder.rung_info[0]["decoder_only_steps"] == 12
    assert "mixup 1" in ladder.extra["training"]["data"]
    encoder_side = [key for key in before.state_dict() if key.split(".")[0] in ("g_a", "h_a", "h_s")]
    assert encoder_side and all(unit.state_dict()[key].equal(before.state_dict()[key]) for key in encoder_side)
    assert not unit.state_dict()["g_r.0.project.weight"].eq(0).all()  # the new block trained
    # a mixup cache has its own name: the one `featcodec train --views 2 --mixup 1 --distortion kd` looks for
    expected = cache_key(TrainConfig("efficientnet_lite0", "stage5", [1.0], views=2, mixup=1.0), list_images(data),
                         True)
    assert (tmp_path / "work" / "cache" / f"efficientnet_lite0-stage5-{expected}" / "index.json").is_file()
