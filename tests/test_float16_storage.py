"""Ladders that store their BUs' conv weights in float16: half the file, same coding after a reload."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load, save

from conftest import COFFEE, ROOT
from featcodec.bottleneck import BottleneckConfig
from featcodec.codec import Codec
from featcodec.ladder import (LadderError, conv_weight_keys, join_ladders, load_ladder, read_ladder_metadata,
                              save_ladder, store_weights_as, untrained_ladder)

HYPERPRIOR = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=16, hidden_channels=64,
                              entropy="hyperprior")
FACTORIZED = replace(HYPERPRIOR, entropy="factorized", stride=1)
REFINED = replace(HYPERPRIOR, refine_blocks=2)


def _ladder(config=HYPERPRIOR, seed=0):
    return untrained_ladder("efficientnet_lite0", "stage5", config, [1.0, 2.0], seed=seed)


def test_conv_weight_keys_cover_the_conv_stacks_only():
    unit = _ladder(REFINED).rungs[0]
    keys = conv_weight_keys(unit)
    assert {"g_a.0.weight", "g_a.0.bias", "g_s.0.weight", "h_a.0.weight", "h_s.0.weight",
            "g_r.0.expand.weight", "g_r.1.project.bias"} <= keys
    assert all(key.split(".")[0] in ("g_a", "g_s", "g_r", "h_a", "h_s") for key in keys)
    assert not any("beta" in key or "gamma" in key for key in keys)  # GDN stays float32


@pytest.mark.parametrize("config", [HYPERPRIOR, FACTORIZED, REFINED], ids=["hyperprior", "factorized", "refined"])
def test_float16_ladder_is_smaller_and_codes_as_it_did_before_saving(config, tmp_path):
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_ladder(_ladder(config), full)
    ladder = _ladder(config)
    store_weights_as(ladder, "float16")
    before = ladder.rungs[1].state_dict()
    save_ladder(ladder, half)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert read_ladder_metadata(half)["weights_dtype"] == "float16"

    loaded = load_ladder(half)
    assert loaded.extra["weights_dtype"] == "float16"
    unit = loaded.rungs[1]
    for key, tensor in unit.state_dict().items():
        assert tensor.dtype == before[key].dtype and tensor.equal(before[key]), key  # float32 in memory, exact
    reference = load_ladder(full).rungs[1].state_dict()
    changed = [key for key in conv_weight_keys(unit) if not unit.state_dict()[key].equal(reference[key])]
    assert changed  # the conv weights were rounded ...
    for key, tensor in unit.state_dict().items():
        if key not in conv_weight_keys(unit):
            assert tensor.equal(reference[key]), key  # ... and nothing else (entropy models, CDF tables, GDN)

    # the in-memory ladder (what eval --record measures) and the reloaded file make the same stream
    in_memory = Codec.load("efficientnet_lite0", "stage5", weights=half)
    in_memory.ladder.rungs = ladder.rungs
    stream = in_memory.encode([COFFEE], rate=1)
    assert stream == Codec.load("efficientnet_lite0", "stage5", weights=half).encode([COFFEE], rate=1)
    (decoded,) = Codec.load("efficientnet_lite0", "stage5", weights=half).decode(stream)
    assert decoded.features.shape == (192, 7, 7) and torch.isfinite(decoded.features).all()


def test_resaving_a_float16_ladder_is_lossless(tmp_path):
    ladder = _ladder()
    store_weights_as(ladder, "float16")
    save_ladder(ladder, tmp_path / "a.safetensors")
    save_ladder(load_ladder(tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_join_keeps_float16_only_when_both_parts_store_it():
    half_a, half_b, full = _ladder(), _ladder(seed=1), _ladder(seed=2)
    store_weights_as(half_a, "float16")
    store_weights_as(half_b, "float16")
    assert join_ladders(half_a, half_b).extra["weights_dtype"] == "float16"
    assert "weights_dtype" not in join_ladders(half_a, full).extra


def test_unknown_weights_dtype_is_refused(tmp_path):
    with pytest.raises(LadderError, match="unknown weights dtype"):
        store_weights_as(_ladder(), "int8")
    ladder = _ladder()
    ladder.extra["weights_dtype"] = "bfloat17"
    with pytest.raises(LadderError, match="unknown weights dtype 'bfloat17'"):
        save_ladder(ladder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    good = tmp_path / "good.safetensors"
    save_ladder(_ladder(), good)
    meta = read_ladder_metadata(good)
    meta["weights_dtype"] = "bfloat17"
    (tmp_path / "bad.safetensors").write_bytes(save(load(good.read_bytes()), metadata={"featcodec": json.dumps(meta)}))
    with pytest.raises(LadderError, match="unknown weights dtype 'bfloat17'"):
        load_ladder(tmp_path / "bad.safetensors")


def test_join_script_float16_flag(tmp_path):
    part = tmp_path / "part.safetensors"
    save_ladder(_ladder(), part)
    out = tmp_path / "out.safetensors"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "join_ladders.py"), f"{part}:1", "--float16",
                             "-o", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert read_ladder_metadata(out)["weights_dtype"] == "float16"
    assert len(load_ladder(out).rungs) == 1
