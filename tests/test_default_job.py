"""The README's default job with the shipped ladder: encode the coffee photo at rung 3, decode, get espresso."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import COFFEE, ESPRESSO, ROOT

FEATCODEC = str(Path(sys.executable).with_name("featcodec"))


def shipped_env() -> dict:
    env = dict(os.environ)
    env.pop("FEATCODEC_WEIGHTS", None)  # the shipped weights/, as a user gets them
    return env


def test_default_job_gives_espresso_at_rate_3(tmp_path):
    stream = tmp_path / "coffee.fcb"
    env = shipped_env()
    encode = subprocess.run(
        [FEATCODEC, "encode", str(COFFEE), "--rate", "3", "-o", str(stream)], capture_output=True, text=True, env=env
    )
    assert encode.returncode == 0, encode.stderr
    decode = subprocess.run([FEATCODEC, "decode", str(stream), "--json"], capture_output=True, text=True, env=env)
    assert decode.returncode == 0, decode.stderr
    (row,) = json.loads(decode.stdout)
    assert row["rate"] == 3 and row["split"] == "stage3" and row["bytes"] == stream.stat().st_size
    assert row["rank1_label"] == ESPRESSO and row["rank1_name"].startswith("espresso")


def test_shipped_ladders_carry_their_measurements():
    from featcodec.ladder import load_ladder

    paths = sorted((ROOT / "weights").glob("*/*.safetensors"))
    assert paths
    for path in paths:
        ladder = load_ladder(path)
        assert all(unit.has_coding_tables() for unit in ladder.rungs)
        # a ladder: one measurement per rung; a variable-rate BU: one per swept rate
        measured = ladder.rung_info[0]["measured"] if ladder.is_variable else ladder.rung_info
        assert ladder.max_rate >= 5 and len(measured) >= ladder.max_rate + 1
        sizes = [info["bytes_per_image"] for info in measured]
        assert sizes == sorted(sizes), f"{path}: rate up must mean more bytes"
        assert all(0 <= info["top1"] <= 1 for info in measured)
        assert "val" in ladder.extra["measured_on"] and ladder.extra["training"]["seconds"] > 0
