"""`featcodec encode --max-bytes`: the highest rung whose record fits the budget, per image."""

import json

import pytest

from conftest import CHELSEA, COFFEE
from featcodec import bitstream
from featcodec.cli import main


@pytest.fixture(autouse=True)
def tiny_weights(weights_dir, monkeypatch):
    monkeypatch.setenv("FEATCODEC_WEIGHTS", str(weights_dir))


def record_sizes(codec, image) -> list[int]:
    """Record bytes of ``image`` at every rung, measured independently of encode_within."""
    return [bitstream.parse_stream(codec.encode([image], rate=r))[0].size for r in range(codec.num_rates)]


def expected_rung(sizes: list[int], budget: int) -> int | None:
    fitting = [rate for rate, size in enumerate(sizes) if size <= budget]
    return max(fitting) if fitting else None


def test_encode_within_picks_the_highest_fitting_rung(codec):
    sizes = record_sizes(codec, COFFEE)
    for budget in sorted(set(sizes)) + [max(sizes) + 100]:
        data, rates = codec.encode_within([COFFEE], budget)
        assert rates == [expected_rung(sizes, budget)]
        assert data == codec.encode([COFFEE], rate=rates[0])
        assert bitstream.parse_stream(data)[0].size <= budget


def test_cli_max_bytes_reports_rungs_and_fails_when_nothing_fits(codec, tmp_path, capsysbinary):
    sizes = {path: record_sizes(codec, path) for path in (COFFEE, CHELSEA)}
    budget = max(min(s) for s in sizes.values())  # rung 0 fits for both images
    out = tmp_path / "two.fcb"
    code = main(["encode", str(COFFEE), str(CHELSEA), "--max-bytes", str(budget), "-o", str(out), "--json"])
    captured = capsysbinary.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert [item["rate"] for item in report["images"]] == [expected_rung(sizes[p], budget) for p in (COFFEE, CHELSEA)]
    parsed = bitstream.parse_stream(out.read_bytes())
    assert [p.record.rate for p in parsed] == [item["rate"] for item in report["images"]]
    assert all(item["record_bytes"] <= budget for item in report["images"])
    chosen = ",".join(str(item["rate"]) for item in report["images"])
    assert f"rates {chosen} (--max-bytes {budget})" in captured.err.decode()  # said on stderr too

    too_small = min(min(s) for s in sizes.values()) - 1
    missing = tmp_path / "none.fcb"
    code = main(["encode", str(COFFEE), "--max-bytes", str(too_small), "-o", str(missing)])
    err = capsysbinary.readouterr().err.decode()
    assert code == 2 and not missing.exists()
    assert err.count("\n") == 1 and "even rate 0 needs" in err and f"--max-bytes {too_small}" in err
