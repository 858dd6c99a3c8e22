"""`featcodec serve`: the real server (uvicorn in a subprocess on a free port) against the CLI's answers.

One server per module, on tiny ladders ($FEATCODEC_WEIGHTS), with two decoding
threads and a long batching wait so that concurrent requests land in one batch;
two more servers are stopped by SIGTERM and Ctrl-C while requests are in flight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from conftest import CHELSEA, COFFEE, make_tiny_ladder  # noqa: E402
from featcodec import bitstream  # noqa: E402
from featcodec.cli import main  # noqa: E402

WAIT = 180  # seconds before a wait on the server is given up (a guard, not a timing check)
TOLERANCE = 1e-4  # logits, probabilities and rebuilt tensors against `featcodec decode`


class Server:
    """``featcodec serve --port 0`` in a subprocess; its stderr lines are collected in ``log``."""

    def __init__(self, env: dict, *args: str):
        command = [sys.executable, "-m", "featcodec", "serve", "--port", "0", *args]
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self._url = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.log.append(line.rstrip("\n"))
            if "listening on http://" in line:
                self._url = line.split("listening on ")[1].split()[0]
                self._ready.set()
        self._ready.set()

    @property
    def url(self) -> str:
        """The server's address, once it listens (it starts while the caller does other work)."""
        if not self._ready.wait(WAIT) or self._url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "\n".join(self.log))
        return self._url

    def post(self, data: bytes, **params) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/decode", content=data, params=params, timeout=WAIT)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(WAIT)


@pytest.fixture(scope="module")
def env(weights_dir):
    return {**os.environ, "FEATCODEC_WEIGHTS": str(weights_dir), "OMP_NUM_THREADS": "1"}  # one decoding thread


@pytest.fixture(scope="module")
def server(env):
    server = Server({**env, "OMP_NUM_THREADS": "2"}, "--max-wait-ms", "150", "--max-body", "100000")  # 2 threads
    yield server
    assert server.stop() == 0, server.log
    assert "Traceback" not in "\n".join(server.log)


@pytest.fixture(scope="module")
def stage5(weights_dir):
    from featcodec.codec import Codec

    return Codec.load("efficientnet_lite0", "stage5", weights=weights_dir / "efficientnet_lite0" / "stage5.safetensors")


@pytest.fixture(scope="module")
def streams(server, codec, stage5):
    """One-record streams at both tiny rungs of stage3 and of stage5, and a three-record one."""
    singles = [c.encode([image], rate=r) for c in (codec, stage5) for r in (0, 1) for image in (COFFEE, CHELSEA)]
    return {"singles": singles, "multi": codec.encode([COFFEE, CHELSEA], rate=1) + stage5.encode([CHELSEA], rate=0)}


@pytest.fixture(autouse=True)
def tiny_weights(env, monkeypatch):
    monkeypatch.setenv("FEATCODEC_WEIGHTS", env["FEATCODEC_WEIGHTS"])  # the in-process CLI decodes as the server


def cli(capsysbinary, *args) -> tuple[int, bytes, str]:
    code = main([str(a) for a in args])
    captured = capsysbinary.readouterr()
    return code, captured.out, captured.err.decode()


def cli_rows(capsysbinary, tmp_path, data: bytes, top: int = 5) -> list[dict]:
    path = tmp_path / "stream.fcb"
    path.write_bytes(data)
    code, out, err = cli(capsysbinary, "decode", path, "--json", "--top", top)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def reference(codec, stage5):
    """decode --json's rows of a stream, decoded one record at a time by Codec.decode_parsed (codecs kept)."""
    from featcodec.cli import _decoded_to_json
    from featcodec.codec import _with_sizes

    codecs = {codec.split.id: codec, stage5.split.id: stage5}

    def rows(data: bytes, top: int = 5) -> list[dict]:
        return [
            _decoded_to_json(codecs[parsed.record.split_id].decode_parsed(index, parsed, size), top)
            for index, (parsed, size) in enumerate(_with_sizes(data))
        ]

    return rows


def assert_same_rows(served: list[dict], expected: list[dict]) -> None:
    """The server's rows are decode --json's: same fields and top-1, probabilities within TOLERANCE."""
    assert len(served) == len(expected)
    for got, want in zip(served, expected):
        assert set(got) == set(want)
        assert {k: v for k, v in got.items() if k != "top"} == {k: v for k, v in want.items() if k != "top"}
        probs = {entry["label"]: entry["prob"] for entry in want["top"]}
        for entry in got["top"]:
            if entry["label"] in probs:
                assert abs(entry["prob"] - probs[entry["label"]]) <= TOLERANCE
            else:  # a near tie at the cut-off of the top K may swap
                assert entry["prob"] <= min(probs.values()) + TOLERANCE


def test_a_stream_answers_as_decode_json(server, streams, reference, capsysbinary, tmp_path):
    answer = server.post(streams["multi"], top=3)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    expected = cli_rows(capsysbinary, tmp_path, streams["multi"], top=3)
    assert_same_rows(answer.json(), expected)
    assert_same_rows(reference(streams["multi"], 3), expected)  # what the other tests compare with


def test_concurrent_requests_are_batched_and_equal_sequential(server, streams, reference):
    requests = streams["singles"] * 2 + [streams["multi"]]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(server.post, requests))
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert max(int(a.headers["featcodec-batch-records"]) for a in answers) > 1  # decoded together
    for data, answer in zip(requests, answers):
        assert_same_rows(answer.json(), reference(data))


def test_features_equal_decode_features(server, streams, capsysbinary, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load

    answer = server.post(streams["multi"], features=1)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
    (tmp_path / "stream.fcb").write_bytes(streams["multi"])
    code, _, err = cli(capsysbinary, "decode", tmp_path / "stream.fcb", "--features", tmp_path / "f.safetensors")
    assert code == 0, err
    served, expected = load(answer.content), load((tmp_path / "f.safetensors").read_bytes())
    assert served.keys() == expected.keys() == {"record0", "record1", "record2"}
    for name in expected:
        assert (served[name] - expected[name]).abs().max() <= TOLERANCE
    (tmp_path / "served.safetensors").write_bytes(answer.content)
    with safe_open(tmp_path / "served.safetensors", "pt") as a, safe_open(tmp_path / "f.safetensors", "pt") as b:
        assert a.metadata() == b.metadata()


def _other_weights_stream(codec, tmp_path) -> bytes:
    from featcodec.codec import Codec

    other = make_tiny_ladder("efficientnet_lite0", "stage3", tmp_path / "other.safetensors", seed=3)
    return Codec.load("efficientnet_lite0", "stage3", weights=other).encode([COFFEE], rate=0)


def _out_of_range_rate(data: bytes) -> bytes:
    record = bitstream.read_stream(data)[0]
    fields = {name: getattr(record, name) for name in record.__dataclass_fields__}
    return bitstream.write_stream([bitstream.Record(**{**fields, "rate": 9})])  # valid framing and CRC


def _flip(data: bytes, position: int) -> bytes:
    flipped = bytearray(data)
    flipped[position] ^= 0x10
    return bytes(flipped)


BAD = {
    "empty": lambda d, codec, tmp: b"",
    "truncated": lambda d, codec, tmp: d[:-5],
    "corrupt payload": lambda d, codec, tmp: _flip(d, len(d) - 10),
    "corrupt header": lambda d, codec, tmp: _flip(d, 9),
    "not a stream": lambda d, codec, tmp: COFFEE.read_bytes()[:5000],
    "other weights": lambda d, codec, tmp: _other_weights_stream(codec, tmp),
    "rate out of range": lambda d, codec, tmp: _out_of_range_rate(d),
    "bad second record": lambda d, codec, tmp: d + _out_of_range_rate(d)[4:],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_stream_answers_400_with_the_cli_message(server, streams, codec, capsysbinary, tmp_path, case):
    data = BAD[case](streams["singles"][0], codec, tmp_path)
    answer = server.post(data)
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/json"
    path = tmp_path / "bad.fcb"
    path.write_bytes(data)
    code, out, err = cli(capsysbinary, "decode", path)
    assert code == 2 and out == b""
    assert answer.json() == {"error": err.strip().removeprefix("featcodec: error: ")}


def test_a_bad_request_in_a_batch_does_not_touch_the_others(server, streams, codec, reference, tmp_path):
    bad = [_out_of_range_rate(streams["singles"][0]), _other_weights_stream(codec, tmp_path)]
    requests = [streams["singles"][0], bad[0], streams["singles"][5], bad[1], streams["multi"]]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(server.post, requests))
    assert [a.status_code for a in answers] == [200, 400, 200, 400, 200]
    assert max(int(a.headers.get("featcodec-batch-records", 0)) for a in answers) > 1
    for index in (0, 2, 4):
        assert_same_rows(answers[index].json(), reference(requests[index]))
    assert "rate" in answers[1].json()["error"] and "other weights" in answers[3].json()["error"]


def test_a_body_over_max_body_answers_413(server, streams):
    big = streams["multi"] * 2000  # over the module server's --max-body 100000
    answer = server.post(big)  # with Content-Length: refused before the body is read
    assert answer.status_code == 413 and "100000 bytes" in answer.json()["error"]

    def chunks():
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    answer = httpx.post(f"{server.url}/v1/decode", content=chunks(), timeout=WAIT)  # chunked: refused midway
    assert answer.status_code == 413
    assert server.post(streams["multi"]).status_code == 200  # and the server goes on


def test_bad_requests_answer_json(server, streams):
    assert server.post(streams["multi"], top=0).json() == {"error": "top must be a whole number in 1..1000 (got '0')"}
    assert server.post(streams["multi"], features="maybe").status_code == 400
    for answer, status in [
        (httpx.get(f"{server.url}/v1/decode"), 405),
        (httpx.get(f"{server.url}/nowhere"), 404),
    ]:
        assert answer.status_code == status and set(answer.json()) == {"error"}


def test_models_and_healthz(server, capsysbinary):
    code, out, _ = cli(capsysbinary, "models", "--json")
    assert code == 0
    assert httpx.get(f"{server.url}/v1/models").json() == json.loads(out)
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["status"] == "ok" and "efficientnet_lite0/stage3" in health["loaded"]
    assert any("loaded efficientnet_lite0/stage3" in line for line in server.log)  # models load once, at start


def test_another_ladder_loads_on_first_use(server, capsysbinary, tmp_path):
    shipped = Path(__file__).resolve().parent.parent / "bitstreams" / "efficientnet_lite0-stage5-r1.fcb"
    data = shipped.read_bytes()  # made with the shipped stage5 ladder, not the tiny one the server loaded
    answer = server.post(data)
    assert answer.status_code == 200, answer.text
    assert_same_rows(answer.json(), cli_rows(capsysbinary, tmp_path, data))
    assert sum("loaded efficientnet_lite0/stage5" in line for line in server.log) == 2  # tiny at start, then shipped
    assert server.post(data).status_code == 200
    assert sum("loaded efficientnet_lite0/stage5" in line for line in server.log) == 2  # kept


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_finishes_the_requests_in_flight_and_exits_0(env, weights_dir, streams, sig):
    weights = weights_dir / "efficientnet_lite0" / "stage3.safetensors"
    server = Server(env, "--weights", str(weights), "--max-wait-ms", "1000")  # requests wait in the batcher
    try:
        requests = streams["singles"][:4]
        with ThreadPoolExecutor(len(requests)) as pool:
            pending = [pool.submit(server.post, data) for data in requests]
            while httpx.get(f"{server.url}/healthz", timeout=WAIT).json()["in_flight"] < len(requests):
                assert not any(p.done() for p in pending)
            server.process.send_signal(sig)
            answers = [p.result() for p in pending]
        assert [a.status_code for a in answers] == [200] * len(requests)
        assert server.process.wait(WAIT) == 0
        assert server.log[-1] == "featcodec serve: stopped" and "Traceback" not in "\n".join(server.log)
    finally:
        server.stop()


def test_without_the_extra_the_error_says_how_to_install(capsysbinary, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now fails
    monkeypatch.delitem(sys.modules, "featcodec.serve", raising=False)
    code, out, err = cli(capsysbinary, "serve")
    assert code == 2 and out == b""
    assert err.count("\n") == 1 and "pip install 'featcodec[serve]'" in err
