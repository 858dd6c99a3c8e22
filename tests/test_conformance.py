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
        whole = meta["bu"].get("rates") or len(meta["rungs"])  # a variable-rate BU: rates 0..rates-1
        rates = list(range(whole)) + ([rate + 0.5 for rate in range(whole - 1)] if meta["bu"].get("rates") else [])
        shipped |= {(meta["backbone"], meta["split"], rate) for rate in rates}
    assert shipped and listed == shipped
    assert any(isinstance(rate, float) for _, _, rate in listed)  # a fractional rate header is covered


def test_every_conformance_stream_verifies():
    checks, _ = conformance.verify(BITSTREAMS, photo=COFFEE)
    assert checks
    failed = [c for c in checks if not c.passed]
    assert not failed, failed
    assert all(c.stream_ok and c.latent_ok and c.top5_ok and c.features_close for c in checks)


def _edited_copy(tmp_path, edit) -> Path:
    """bitstreams/ copied with ``edit(manifest)`` applied to its manifest, recorded on this platform."""
    copy = tmp_path / "bitstreams"
    shutil.copytree(BITSTREAMS, copy)
    manifest = json.loads((copy / conformance.MANIFEST).read_text())
    manifest["platform"] = conformance.platform_fingerprint()
    manifest["streams"] = manifest["streams"][:2]  # two streams keep the test short
    edit(manifest)
    (copy / conformance.MANIFEST).write_text(json.dumps(manifest))
    return copy


def test_other_cpu_model_passes_unless_strict(tmp_path):
    """Same fingerprint, other tensor hashes (as on another CPU model): a pass, but not a strict one."""

    def other_tensor_bits(manifest):
        for entry in manifest["streams"]:
            entry["features_sha256"] = "0" * 64

    copy = _edited_copy(tmp_path, other_tensor_bits)
    checks, same_platform = conformance.verify(copy, photo=COFFEE)
    assert same_platform and all(c.passed and not c.features_exact and c.features_close for c in checks)
    strict, _ = conformance.verify(copy, photo=COFFEE, strict=True)
    assert not any(c.passed for c in strict)
    assert main(["verify", str(copy)]) == 0
    assert main(["verify", str(copy), "--strict", "--photo", str(COFFEE)]) == 1


@pytest.mark.parametrize("field, value", [("latent_sha256", "0" * 64), ("top5", [0, 1, 2, 3, 4])])
def test_wrong_latent_or_top5_fails_strict_or_not(tmp_path, field, value):
    copy = _edited_copy(tmp_path, lambda manifest: manifest["streams"][0].update({field: value}))
    checks, _ = conformance.verify(copy, photo=COFFEE)
    assert [c.passed for c in checks] == [False, True]
    strict, _ = conformance.verify(copy, photo=COFFEE, strict=True)
    assert not strict[0].passed and strict[0].stream_ok and strict[0].features_close


def test_tensor_off_the_probe_fails(tmp_path):
    def moved_probe(manifest):
        entry = manifest["streams"][0]
        entry["features_sha256"] = "0" * 64
        entry["features_probe"][3] += 10 * conformance.FEATURES_ATOL

    checks, _ = conformance.verify(_edited_copy(tmp_path, moved_probe), photo=COFFEE)
    assert [c.passed for c in checks] == [False, True]


def test_strict_needs_the_photo(tmp_path, capsys):
    copy = _edited_copy(tmp_path, lambda manifest: manifest.update(photo="elsewhere.jpg"))
    assert main(["verify", str(copy), "--strict"]) == 2
    assert "--photo" in capsys.readouterr().err


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
