"""The CLI, through the real console script (subprocess) or its in-process entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CHELSEA, COFFEE, make_tiny_ladder
from featcodec import bitstream
from featcodec.cli import main

FEATCODEC = str(Path(sys.executable).with_name("featcodec"))


@pytest.fixture(autouse=True)
def tiny_weights(weights_dir, monkeypatch):
    monkeypatch.setenv("FEATCODEC_WEIGHTS", str(weights_dir))


def run_cli(capsysbinary, *args):
    """Run the CLI in-process; returns (exit code, stdout bytes, stderr text)."""
    code = main([str(a) for a in args])
    captured = capsysbinary.readouterr()
    return code, captured.out, captured.err.decode()


@pytest.fixture(scope="module")
def coffee_stream(tmp_path_factory, weights_dir):
    path = tmp_path_factory.mktemp("streams") / "coffee.fcb"
    env = {**os.environ, "FEATCODEC_WEIGHTS": str(weights_dir)}
    subprocess.run([FEATCODEC, "encode", str(COFFEE), "--rate", "1", "-o", str(path)], check=True, env=env)
    return path


def test_encode_then_decode_json(capsysbinary, coffee_stream):
    code, out, err = run_cli(capsysbinary, "decode", coffee_stream, "--json", "--top", "3")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 1
    row = rows[0]
    assert isinstance(row["rank1_label"], int) and row["rank1_label"] == row["top"][0]["label"]
    assert [set(t) for t in row["top"]] == [{"label", "name", "prob"}] * 3
    assert row["rate"] == 1 and row["bytes"] == coffee_stream.stat().st_size
    assert row["backbone"] == "efficientnet_lite0" and row["split"] == "stage3"


def test_decode_table_goes_to_stdout(capsysbinary, coffee_stream):
    code, out, err = run_cli(capsysbinary, "decode", coffee_stream)
    assert code == 0
    assert b"record 0" in out and b"rank" in out
    assert err == ""


def test_pipeline_encode_stdin_to_decode_stdin(weights_dir):
    env = {**os.environ, "FEATCODEC_WEIGHTS": str(weights_dir)}
    encode = subprocess.run(
        [FEATCODEC, "encode", "-", "--rate", "0"], input=COFFEE.read_bytes(), capture_output=True, env=env
    )
    assert encode.returncode == 0, encode.stderr
    assert encode.stdout.startswith(bitstream.PREAMBLE)
    assert b"encoded 1 image" in encode.stderr
    decode = subprocess.run([FEATCODEC, "decode", "-", "--json"], input=encode.stdout, capture_output=True, env=env)
    assert decode.returncode == 0, decode.stderr
    assert json.loads(decode.stdout)[0]["rate"] == 0
    shell = subprocess.run(
        f"'{FEATCODEC}' encode '{COFFEE}' --rate 0 | '{FEATCODEC}' decode - --json",
        shell=True, capture_output=True, env=env,
    )
    assert shell.returncode == 0, shell.stderr
    assert json.loads(shell.stdout) == json.loads(decode.stdout)


def test_several_images_make_one_multi_record_stream(capsysbinary, tmp_path):
    out = tmp_path / "two.fcb"
    code, _, err = run_cli(capsysbinary, "encode", COFFEE, CHELSEA, "--rate", "0", "-o", out)
    assert code == 0, err
    code, info_out, _ = run_cli(capsysbinary, "info", out, "--json")
    summary = json.loads(info_out)
    assert summary["bytes"] == out.stat().st_size
    assert [r["image_size"] for r in summary["records"]] == [[600, 400], [451, 300]]
    assert all(r["header_bytes"] <= 24 for r in summary["records"])
    code, decoded, _ = run_cli(capsysbinary, "decode", out, "--json")
    assert len(json.loads(decoded)) == 2


def test_features_are_saved(capsysbinary, coffee_stream, tmp_path):
    from safetensors.torch import load_file

    target = tmp_path / "f.safetensors"
    code, _, err = run_cli(capsysbinary, "decode", coffee_stream, "--features", target)
    assert code == 0, err
    assert load_file(str(target))["record0"].shape == (80, 14, 14)


def test_refuses_binary_on_a_terminal(capsysbinary, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = run_cli(capsysbinary, "encode", COFFEE)
    assert code == 2 and out == b""
    assert "terminal" in err and "-o" in err


def test_models_lists_splits_and_rungs(capsysbinary):
    code, out, _ = run_cli(capsysbinary, "models", "--json")
    assert code == 0
    listed = json.loads(out)
    lite0 = [e for e in listed if e["backbone"] == "efficientnet_lite0"]
    entries = {e["split"]: e for e in lite0 if e["ladder"] == "featcodec"}
    assert set(entries) == {"stage2", "stage3", "stage5"}
    assert entries["stage3"]["shape"] == [80, 14, 14]
    anchors = [e for e in lite0 if e["ladder"] == "huffman-bu"]  # the shipped stage3 anchor
    assert [e["split"] for e in anchors] == ["stage3"] and len(anchors[0]["rungs"]) == 6
    assert [r["lambda"] for r in entries["stage3"]["rungs"]] == [0.5, 4.0]
    assert entries["stage3"]["weights_dtype"] == "float32"
    resnet50 = {e["split"]: e for e in listed if e["backbone"] == "resnet50"}
    assert resnet50["layer3.4"]["shape"] == [1024, 14, 14] and resnet50["layer3.4"]["rungs"] == []
    assert {e["backbone"] for e in listed} >= {"resnet18", "mobilenet_v3_large", "efficientnet_lite2"}


def test_info_and_help_do_not_import_torch(coffee_stream):
    script = (
        "import sys; from featcodec.cli import main; "
        f"code = main(['info', {str(coffee_stream)!r}, '--json']); "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "code2 = main(['--help']); assert 'torch' not in sys.modules; sys.exit(code or code2)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["records"][0]["rate"] == 1


def _corrupt(data: bytes, position: int) -> bytes:
    flipped = bytearray(data)
    flipped[position] ^= 0x10
    return bytes(flipped)


BAD_STREAMS = {
    "empty": (lambda d: b"", "empty stream"),
    "truncated": (lambda d: d[:-5], "truncated"),
    "flipped payload byte": (lambda d: _corrupt(d, len(d) - 10), "CRC-32"),
    "flipped header byte": (lambda d: _corrupt(d, 9), "CRC-32"),
    "unknown version": (lambda d: d[:2] + b"\x07" + d[3:], "unsupported bitstream version 7.2"),
    "not a stream": (lambda d: COFFEE.read_bytes(), "not a featcodec stream"),
}


@pytest.mark.parametrize("case", sorted(BAD_STREAMS))
@pytest.mark.parametrize("command", ["decode", "info"])
def test_bad_streams_fail_with_one_line(capsysbinary, coffee_stream, tmp_path, case, command):
    mutate, message = BAD_STREAMS[case]
    bad = tmp_path / "bad.fcb"
    bad.write_bytes(mutate(coffee_stream.read_bytes()))
    code, out, err = run_cli(capsysbinary, command, bad)
    assert code == 2
    assert out == b""
    assert err.count("\n") == 1 and err.startswith("featcodec: error:") and message in err
    assert "Traceback" not in err


def test_bad_inputs_fail_with_one_line(capsysbinary, coffee_stream, tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    other = make_tiny_ladder("efficientnet_lite0", "stage3", tmp_path / "other.safetensors", seed=3)
    cases = [
        (["encode", tmp_path / "missing.jpg", "-o", tmp_path / "x.fcb"], "no such file"),
        (["encode", not_image, "-o", tmp_path / "x.fcb"], "not a readable image"),
        (["decode", tmp_path / "missing.fcb"], "no such file"),
        (["decode", coffee_stream, "--weights", other], "other weights"),
        (["decode", coffee_stream, "--weights", not_image], "not a featcodec ladder"),
        (["encode", COFFEE, "--rate", "9", "-o", tmp_path / "x.fcb"], "rate 9 is out of range"),
        (["encode", COFFEE, "--backbone", "vgg", "-o", tmp_path / "x.fcb"], "unknown backbone 'vgg'"),
        (["encode", COFFEE, "--split", "stage9", "-o", tmp_path / "x.fcb"], "unknown split 'stage9'"),
        (["encode", COFFEE, "--bogus"], "No such option: --bogus"),
        (["decode"], "Missing argument"),
        (["decode", coffee_stream, "--top", "0"], "Invalid value for '--top'"),
    ]
    for args, message in cases:
        code, out, err = run_cli(capsysbinary, *args)
        assert code == 2, (args, err)
        assert out == b"", args
        assert err.count("\n") == 1 and message in err, (args, err)
    assert not (tmp_path / "x.fcb").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unknown_weights_for_a_stream_from_the_shipped_table(capsysbinary, coffee_stream, monkeypatch, tmp_path):
    monkeypatch.setenv("FEATCODEC_WEIGHTS", str(tmp_path))  # a folder without this ladder
    monkeypatch.setattr("featcodec.ladder.weights_dirs", lambda: [tmp_path])
    code, out, err = run_cli(capsysbinary, "decode", coffee_stream)
    assert code == 2 and "no trained ladder for efficientnet_lite0/stage3" in err
