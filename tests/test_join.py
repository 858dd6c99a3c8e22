"""Ladders whose rungs have BUs of different sizes: join, save, load, code at every rung."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import COFFEE, ROOT
from featcodec.bottleneck import BottleneckConfig
from featcodec.codec import Codec
from featcodec.ladder import (LADDER_FORMAT, MIXED_LADDER_FORMAT, LadderError, join_ladders, load_ladder,
                              read_ladder_metadata, save_ladder, select_rungs, untrained_ladder)
from featcodec.train import TrainConfig, TrainError, train_ladder

STRIDE2 = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=8, hidden_channels=16)
STRIDE1 = replace(STRIDE2, stride=1, latent_channels=12)


@pytest.fixture
def parts(tmp_path):
    lower = tmp_path / "lower.safetensors"
    upper = tmp_path / "upper.safetensors"
    save_ladder(untrained_ladder("efficientnet_lite0", "stage5", STRIDE2, [1.0, 2.0]), lower)
    upper_ladder = untrained_ladder("efficientnet_lite0", "stage5", STRIDE1, [8.0], seed=1)
    upper_ladder.extra = {"training": {"seconds": 12.5}}
    save_ladder(upper_ladder, upper)
    return lower, upper


def test_joined_ladder_round_trips_and_codes_at_every_rung(parts, tmp_path):
    lower, upper = parts
    assert read_ladder_metadata(lower)["format"] == LADDER_FORMAT
    joined_path = tmp_path / "joined.safetensors"
    save_ladder(join_ladders(load_ladder(lower), load_ladder(upper)), joined_path)
    meta = read_ladder_metadata(joined_path)
    assert meta["format"] == MIXED_LADDER_FORMAT
    assert [("bu" in rung) for rung in meta["rungs"]] == [False, False, True]
    assert meta["rungs"][2]["training"] == {"seconds": 12.5} and meta["rungs"][2]["lambda"] == 8.0

    joined = load_ladder(joined_path)
    assert [unit.config for unit in joined.rungs] == [STRIDE2, STRIDE2, STRIDE1]
    assert joined.is_mixed() and joined.config == STRIDE2
    assert all("bu" not in info for info in joined.rung_info)
    upper_unit = load_ladder(upper).rungs[0]
    for (key, a), b in zip(joined.rungs[2].state_dict().items(), upper_unit.state_dict().values()):
        assert a.equal(b), key

    codec = Codec.load("efficientnet_lite0", "stage5", weights=joined_path)
    for rate, latent in [(0, (4, 4)), (1, (4, 4)), (2, (7, 7))]:
        stream = codec.encode([COFFEE], rate=rate)
        (decoded,) = codec.decode(stream)
        assert decoded.record.rate == rate and tuple(decoded.record.latent_shape) == latent
        assert decoded.features.shape == (192, 7, 7)
    # re-saving (as eval --record does) keeps every rung's own config
    save_ladder(joined, tmp_path / "again.safetensors")
    assert [u.config for u in load_ladder(tmp_path / "again.safetensors").rungs] == [STRIDE2, STRIDE2, STRIDE1]


def test_join_refuses_ladders_that_do_not_fit_together(parts, tmp_path):
    lower, _ = parts
    other_split = untrained_ladder("efficientnet_lite0", "stage3", replace(STRIDE2, in_channels=80, out_size=(14, 14)), [1.0])
    with pytest.raises(LadderError, match="stage5 ladder with a efficientnet_lite0/stage3"):
        join_ladders(load_ladder(lower), other_split)
    huffman = untrained_ladder("efficientnet_lite0", "stage5", replace(STRIDE2, entropy="huffman", stride=1), [1.0])
    with pytest.raises(LadderError, match="huffman entropy coder"):
        join_ladders(load_ladder(lower), huffman)


def test_a_rung_config_that_does_not_fit_is_refused_on_load(parts, tmp_path):
    from safetensors.torch import load_file, save_file

    lower, upper = parts
    joined_path = tmp_path / "joined.safetensors"
    save_ladder(join_ladders(load_ladder(lower), load_ladder(upper)), joined_path)
    meta = read_ladder_metadata(joined_path)
    tensors = load_file(str(joined_path))
    for change, message in [({"in_channels": 80}, "codes split tensors of 80x"),
                            ({"latent_channels": 9}, "rung 2 does not fit its config"),
                            ({"stride": 3}, "bad bottleneck config")]:
        bad = json.loads(json.dumps(meta))
        bad["rungs"][2]["bu"].update(change)
        path = tmp_path / "bad.safetensors"
        save_file(tensors, str(path), metadata={"featcodec": json.dumps(bad)})
        with pytest.raises(LadderError, match=message):
            load_ladder(path)


def test_init_from_a_mixed_ladder_is_refused(parts, tmp_path):
    from conftest import make_image_folder

    lower, upper = parts
    joined_path = tmp_path / "joined.safetensors"
    save_ladder(join_ladders(load_ladder(lower), load_ladder(upper)), joined_path)
    config = TrainConfig("efficientnet_lite0", "stage5", [1.0, 2.0, 3.0], steps=1, batch_size=2, views=1)
    with pytest.raises(TrainError, match="different BU configs"):
        train_ladder(config, make_image_folder(tmp_path / "img", 2), tmp_path / "x.safetensors", STRIDE2,
                     cache_dir=tmp_path / "cache", init_from=joined_path)


def test_join_script(parts, tmp_path):
    lower, upper = parts
    out = tmp_path / "out.safetensors"
    script = [sys.executable, str(ROOT / "scripts" / "join_ladders.py")]
    done = subprocess.run(script + [str(lower), str(upper), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote 3-rung ladder" in done.stderr and done.stdout == ""
    assert len(load_ladder(out).rungs) == 3
    failed = subprocess.run(script + [str(lower), str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "y")],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "not found" in failed.stderr
    assert not (tmp_path / "y").exists()


def test_join_script_takes_chosen_rungs_of_several_ladders(parts, tmp_path):
    lower, upper = parts
    out = tmp_path / "out.safetensors"
    script = [sys.executable, str(ROOT / "scripts" / "join_ladders.py")]
    done = subprocess.run(script + [f"{lower}:1", str(upper), f"{lower}:0-1", "-o", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    joined, first = load_ladder(out), load_ladder(lower)
    assert [info["lambda"] for info in joined.rung_info] == [2.0, 8.0, 1.0, 2.0]
    assert [unit.config for unit in joined.rungs] == [STRIDE2, STRIDE1, STRIDE2, STRIDE2]
    for (key, a), b in zip(joined.rungs[0].state_dict().items(), first.rungs[1].state_dict().values()):
        assert a.equal(b), key
    for bad, message in [(f"{lower}:2", "out of range"), (f"{lower}:1-0", "bad rung range")]:
        failed = subprocess.run(script + [bad, str(upper), "-o", str(tmp_path / "z")], capture_output=True, text=True)
        assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and message in failed.stderr, failed.stderr
        assert not (tmp_path / "z").exists()


def test_rungs_picked_from_a_mixed_ladder_that_share_a_config_make_a_plain_ladder(parts, tmp_path):
    lower, upper = parts
    joined = join_ladders(load_ladder(lower), load_ladder(upper))
    top = select_rungs(joined, [2])  # the stride-1 rung of a stride-2 ladder
    assert top.config == STRIDE1 and not top.is_mixed()
    save_ladder(top, tmp_path / "top.safetensors")
    assert read_ladder_metadata(tmp_path / "top.safetensors")["format"] == LADDER_FORMAT
    assert select_rungs(joined, [1, 2]).is_mixed()


def test_picked_rungs_keep_the_training_record_of_their_own_run(parts):
    lower, upper = parts
    base = load_ladder(lower)
    base.extra = {"training": {"seconds": 99.0}}
    joined = join_ladders(base, load_ladder(upper))  # rung 2 came from the upper run (12.5 s)
    top = select_rungs(joined, [2])
    assert top.extra["training"] == {"seconds": 12.5} and "training" not in top.rung_info[0]
    mixed = select_rungs(joined, [2, 0])
    assert mixed.extra["training"] == {"seconds": 12.5} and mixed.rung_info[1]["training"] == {"seconds": 99.0}
    assert select_rungs(joined, [0, 1]).extra["training"] == {"seconds": 99.0}
    assert all("training" not in info for info in select_rungs(joined, [0, 1]).rung_info)


def test_joining_picked_rungs_keeps_each_rungs_own_training_record(parts):
    lower, upper = parts
    base = load_ladder(lower)
    base.extra = {"training": {"seconds": 99.0}}
    joined = join_ladders(base, load_ladder(upper))  # rungs 0-1: 99 s, rung 2: 12.5 s
    # picked rungs [2, 0] carry two records; joining them above another ladder must keep both
    again = join_ladders(select_rungs(load_ladder(lower), [0]), select_rungs(joined, [2, 0]))
    assert [info["training"] for info in again.rung_info[1:]] == [{"seconds": 12.5}, {"seconds": 99.0}]
