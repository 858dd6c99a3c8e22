"""Interruptions and slow inputs, through the real console script.

SIGTERM makes the CLI unwind like Ctrl-C (``cli._interrupt_on_sigterm``): exit
130, and no output file or temp file left behind. A killed training run leaves
no weights file, and ``--resume`` finishes it. Streams on stdin may trickle in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CHELSEA, COFFEE, make_image_folder
from featcodec import fileio
from featcodec.cli import main
from featcodec.ladder import load_ladder
from featcodec.train import checkpoint_path

FEATCODEC = str(Path(sys.executable).with_name("featcodec"))
WAIT = 180  # seconds before a wait for a child process is given up (a guard, not a timing check)

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/syscall").exists(), reason="needs /proc/<pid>/syscall to see a process block on stdin"
)


@pytest.fixture(scope="module")
def env(weights_dir):
    return {**os.environ, "FEATCODEC_WEIGHTS": str(weights_dir), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def stream_file(codec, tmp_path_factory):
    """A two-record stream made with the tiny stage3 ladder that $FEATCODEC_WEIGHTS also holds."""
    path = tmp_path_factory.mktemp("streams") / "two.fcb"
    path.write_bytes(codec.encode([COFFEE, CHELSEA], rate=0))
    return path


def leftovers(folder: Path) -> list[str]:
    """Temp files of atomic_write_bytes (``.<name>.<random>.tmp``) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def wait_until_reading_stdin(proc: subprocess.Popen) -> None:
    """Wait until the process's main thread is blocked in read(0, ...), i.e. past import and waiting for input."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited early with {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            syscall = Path(f"/proc/{proc.pid}/syscall").read_text().split()
        except OSError:
            syscall = []
        if syscall[:2] == ["0", "0x0"]:  # read() on fd 0
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the process never blocked reading stdin")


def finish(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    try:
        return proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- SIGTERM through the console script ------------------------------------------------------------


@needs_proc
@pytest.mark.parametrize("command", ["encode", "decode"])
def test_sigterm_while_waiting_for_stdin_leaves_no_output(command, env, stream_file, tmp_path):
    target = tmp_path / ("out.fcb" if command == "encode" else "features.safetensors")
    if command == "encode":
        args, partial = ["encode", "-", "-o", str(target)], COFFEE.read_bytes()[:2000]
    else:
        args, partial = ["decode", "-", "--features", str(target)], stream_file.read_bytes()[:100]
    proc = subprocess.Popen([FEATCODEC, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdin.write(partial)  # part of the input; the pipe stays open, so the command waits for the rest
    proc.stdin.flush()
    wait_until_reading_stdin(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == 130, err.decode()  # the handler turned SIGTERM into KeyboardInterrupt
    assert err.decode().split() == ["featcodec:", "interrupted"] and out == b""
    assert list(tmp_path.iterdir()) == []


@needs_proc
def test_sigterm_keeps_an_existing_output_file(env, tmp_path):
    target = tmp_path / "out.fcb"
    target.write_bytes(b"old stream")
    proc = subprocess.Popen([FEATCODEC, "encode", "-", "-o", str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    wait_until_reading_stdin(proc)
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    assert proc.returncode == 130
    assert target.read_bytes() == b"old stream" and leftovers(tmp_path) == []


def test_sigterm_during_an_atomic_write_removes_the_temp_file(tmp_path):
    """The signal arrives between writing and renaming: KeyboardInterrupt, temp file gone, old file kept."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    script = (
        "import os, signal, sys\n"
        "from featcodec import cli, fileio\n"
        "cli._interrupt_on_sigterm()\n"
        "real_fsync = os.fsync\n"
        "def fsync(fd):\n"
        "    real_fsync(fd)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.fsync = fsync\n"
        "try:\n"
        f"    fileio.atomic_write_bytes({str(target)!r}, b'new' * 100000)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 130, result.stderr
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


# -- atomic_write_bytes interrupted in-process --------------------------------------------------------


class _HalfWriter:
    """A file object that writes half of what it is given, then is interrupted."""

    def __init__(self, real):
        self.real = real

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()

    def fileno(self):
        return self.real.fileno()

    def write(self, data):
        self.real.write(data[: len(data) // 2])
        self.real.flush()
        raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_atomic_write_leaves_no_partial_file(where, existing, tmp_path, monkeypatch):
    target = tmp_path / "sub" / "out.fcb"
    if existing:
        target.parent.mkdir()
        target.write_bytes(b"old")
    reached = []

    def interrupt(*args, **kwargs):
        reached.append(where)
        raise KeyboardInterrupt

    if where == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(fileio.os, "fdopen", lambda *a, **k: (reached.append(where), _HalfWriter(real_fdopen(*a, **k)))[1])
    else:
        monkeypatch.setattr(fileio.os, where, interrupt)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write_bytes(target, b"x" * 100_000)
    assert reached == [where]
    assert sorted(p.name for p in target.parent.iterdir()) == (["out.fcb"] if existing else [])
    if existing:
        assert target.read_bytes() == b"old"


def test_cli_reports_an_interrupted_write(capsys, monkeypatch, tmp_path, weights_dir):
    monkeypatch.setenv("FEATCODEC_WEIGHTS", str(weights_dir))

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "replace", interrupt)
    assert main(["encode", str(COFFEE), "--rate", "1", "-o", str(tmp_path / "out.fcb")]) == 130
    assert capsys.readouterr().err.split() == ["featcodec:", "interrupted"]
    assert list(tmp_path.iterdir()) == []


# -- slow pipes ------------------------------------------------------------------------------------------


def trickle(args: list[str], data: bytes, env: dict) -> tuple[int, bytes, bytes]:
    """Run the console script with ``data`` on stdin, written 1..13 bytes at a time with short pauses."""
    proc = subprocess.Popen([FEATCODEC, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, bufsize=0)
    if Path("/proc/self/syscall").exists():
        wait_until_reading_stdin(proc)  # so that the reads really see the small pieces
    position, size = 0, 1
    while position < len(data):
        proc.stdin.write(data[position : position + size])
        position += size
        size = size % 13 + 1
        time.sleep(0.003)
    out, err = finish(proc)  # closes stdin: end of input
    return proc.returncode, out, err


@pytest.mark.parametrize("command", ["decode", "info"])
def test_stdin_trickling_in_small_pieces(command, env, stream_file):
    code, out, err = trickle([command, "-", "--json"], stream_file.read_bytes(), env)
    assert code == 0, err.decode()
    from_file = subprocess.run([FEATCODEC, command, str(stream_file), "--json"], capture_output=True, env=env,
                               timeout=WAIT)
    assert from_file.returncode == 0, from_file.stderr.decode()
    assert json.loads(out) == json.loads(from_file.stdout)
    assert len(json.loads(out)["records"] if command == "info" else json.loads(out)) == 2


# -- training --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Eight small generated images."""
    return make_image_folder(tmp_path_factory.mktemp("images"), 8)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_training_leaves_no_weights_and_resumes(sig, image_folder, tmp_path, env):
    out = tmp_path / "weights" / "stage5.safetensors"
    args = [FEATCODEC, "train", "--data", str(image_folder), "--split", "stage5", "--lambdas", "1,10",
            "--steps", "150", "--batch-size", "2", "--views", "1", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    ckpt = checkpoint_path(out)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + WAIT
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the checkpoint appears when rung 0 is done: kill the run during rung 1
    proc.send_signal(sig)
    _, err = finish(proc)
    assert ckpt.exists(), err.decode()
    assert proc.returncode == (130 if sig == signal.SIGTERM else -signal.SIGKILL), err.decode()
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert err.decode().splitlines()[-1] == "featcodec: interrupted"
        assert leftovers(out.parent) == []

    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env, timeout=WAIT)
    assert resumed.returncode == 0, resumed.stderr
    assert "wrote 2-rung ladder" in resumed.stderr
    assert "rung 1 step 150/150" in resumed.stderr and "rung 0 step" not in resumed.stderr  # went on from rung 1
    assert len(load_ladder(out).rungs) == 2
    assert not ckpt.exists() and leftovers(out.parent) == []


def test_atomic_write_gives_the_usual_file_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        fileio.atomic_write_bytes(tmp_path / "out.bin", b"data")
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644


def test_sigterm_during_eval_leaves_no_outputs_and_keeps_the_weights(env, stage3_weights, tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "coffee.jpg").write_bytes(COFFEE.read_bytes())
    (folder / "labels.csv").write_text("file,label\n" + "coffee.jpg,967\n" * 400)  # long enough to be mid-run
    weights = tmp_path / "ladder.safetensors"
    weights.write_bytes(stage3_weights.read_bytes())
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [FEATCODEC, "eval", "--data", str(folder), "--sweep", "--weights", str(weights), "--record",
         "--csv", str(out / "points.csv"), "--plot", str(out / "curve.png")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert proc.stderr.readline().startswith(b"evaluating 400 images")  # past loading, now measuring
    proc.send_signal(signal.SIGTERM)
    out_bytes, err = finish(proc)
    assert proc.returncode == 130, err.decode()
    assert not out.exists() and out_bytes == b""
    assert weights.read_bytes() == stage3_weights.read_bytes() and leftovers(tmp_path) == []
