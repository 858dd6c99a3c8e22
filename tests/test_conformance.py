"""The committed conformance streams in bitstreams/ decode bit-exactly; `featcodec verify` reports failures."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import COFFEE, ROOT
from featcodec import conformance
from featcodec.cli import main

BITSTREAMS = ROOT / "bitstreams"


def test_one_stream_per_shipped_ladder_and_rung():
    from featcodec.ladder import read_ladder_metadata

    manifest = json.loads((BITSTREAMS / conformance.MANIFEST).read_text())
    listed = {(e["backbone"], e["split"], e["rate"]) for e in manifest["streams"]}
    shipped = set()
    for path in sorted((ROOT / "weights").glob("*/*.safetensors")):
        meta = read_ladder_metadata(path)
        shipped |= {(meta["backbone"], meta["split"], rate) for rate in range(len(meta["rungs"]))}
    assert shipped and listed == shipped


def test_every_conformance_stream_verifies():
    checks, same_platform = conformance.verify(BITSTREAMS, photo=COFFEE)
    assert checks
    failed = [c for c in checks if not c.passed]
    assert not failed, failed
    assert all(c.stream_ok and c.latent_ok and c.top5_ok for c in checks)
    if same_platform:  # bit-exact float reconstruction and re-encoding are promised on the manifest's platform
        assert all(c.features_exact and c.reencode_ok for c in checks)


def test_verify_cli_flags_a_tampered_stream(tmp_path, capsysbinary):
    copy = tmp_path / "bitstreams"
    shutil.copytree(BITSTREAMS, copy)
    manifest = json.loads((copy / conformance.MANIFEST).read_text())
    first = copy / manifest["streams"][0]["stream"]
    data = bytearray(first.read_bytes())
    data[-6] ^= 0x01  # a payload bit: the CRC refuses the record
    first.write_bytes(bytes(data))
    code = main(["verify", str(copy), "--json"])
    captured = capsysbinary.readouterr()
    report = json.loads(captured.out)
    assert code == 1
    assert [c["passed"] for c in report["checks"]] == [False] + [True] * (len(report["checks"]) - 1)
    assert "crc" in report["checks"][0]["error"].lower()
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
