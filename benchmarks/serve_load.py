"""Load and faults for `featcodec serve`: concurrent clients against one-at-a-time `Codec.decode`.

Encodes the example photos (or ``--images``) at every whole rate of the shipped
ladder of ``--split`` (each rung, or a variable-rate BU's rates 0, 1, ...) into
one-record streams, times ``Codec.decode`` on them one at a time in this process
(with torch's default threads and with one), then starts ``featcodec serve`` on
127.0.0.1 and drives it with N concurrent clients (async httpx, one connection
each), spread over ``--client-processes`` (one Python process turning answers
into new requests one after another left the server idle a third of the time:
docs/serve.md). Per phase it prints records/s and p50/p99 latency, and checks
every answer: a valid stream must give the top-1 of ``Codec.decode`` with
probabilities within 1e-4, a corrupt or truncated one a 4xx with a JSON error.
The server's RSS is read from /proc at the start and after each phase, and the
cores the server and the client processes kept busy over the phase, from their
CPU seconds. For reference it also times ``Codec.decode`` with the tail in the
server's form (batch norms folded, channels_last): what batching alone gains.

The machine's speed can drift by more than the goal's margin within a minute,
so each phase runs in ``--chunks`` parts with ``Codec.decode`` timed again
after each, and "x decode" is each part's records/s over the faster of the two
timings around it (each the better of the two thread counts): the median over
the parts, then the lowest and highest.

    python benchmarks/serve_load.py                        # stage3: 32 and 8 clients, then 10,000 requests, 10 % bad
    python benchmarks/serve_load.py --split stage5 --faults-requests 2000
    python benchmarks/serve_load.py --tail-batches         # ms/image of the tail at batch 1..32
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import multiprocessing
import os
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _bootstrap import ROOT  # quiets compressai's import warning, finds featcodec

import httpx
import torch

from featcodec.batch_decode import TAIL_LAYOUT, server_tail
from featcodec.backbones import SplitModel
from featcodec.codec import Codec

TOLERANCE = 1e-4


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bad_variants(data: bytes, rng: random.Random) -> bytes:
    """A corrupt or truncated copy of a stream (each is refused by the parser or the record checks)."""
    kind = rng.choice(["truncated", "flipped", "empty", "not a stream", "cut preamble"])
    if kind == "truncated":
        return data[: rng.randrange(1, len(data))]
    if kind == "flipped":
        flipped = bytearray(data)
        flipped[rng.randrange(4, len(data))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if kind == "empty":
        return b""
    if kind == "not a stream":
        return rng.randbytes(len(data))
    return data[2:]


class Server:
    """``featcodec serve`` in a subprocess, its stderr in a temporary file."""

    def __init__(self, args: list[str]):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        command = [sys.executable, "-m", "featcodec", "serve", "--port", "0", *args]
        self.process = subprocess.Popen(command, stderr=self.log, cwd=ROOT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.process.poll() is None:
            text = Path(self.log.name).read_text()
            if "listening on http://" in text:
                self.url = text.split("listening on ")[1].split()[0]
                return
            time.sleep(0.2)
        raise SystemExit("the server did not start:\n" + Path(self.log.name).read_text())

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(120)


async def drive(url: str, work: list[tuple[bytes, object]], clients: int) -> tuple[list, float]:
    """Send ``work`` (stream, expected answer or None for a bad one) with ``clients`` concurrent clients.

    Returns ((latency s, status, expected, answer body, records in its batch), ...) and the wall time,
    from the first request (the clients are made before: each would load the CA certificates).
    """
    queue = list(reversed(work))
    results = []
    context = ssl.create_default_context()  # plain HTTP here, but every client would make its own
    sessions = [httpx.AsyncClient(timeout=120, verify=context) for _ in range(clients)]

    async def client(session: httpx.AsyncClient) -> None:
        async with session:
            while queue:
                data, expected = queue.pop()
                started = time.perf_counter()
                batch = 0
                try:
                    answer = await session.post(f"{url}/v1/decode", content=data)
                    status, body = answer.status_code, answer.content
                    batch = int(answer.headers.get("featcodec-batch-records", 0))
                except httpx.HTTPError as exc:
                    status, body = 0, repr(exc).encode()
                results.append((time.perf_counter() - started, status, expected, body, batch))

    started = time.perf_counter()
    await asyncio.gather(*(client(session) for session in sessions))
    return results, time.perf_counter() - started


def drive_share(url: str, work: list[tuple[bytes, object]], clients: int) -> tuple[list, float, float]:
    """:func:`drive` in this process: its results and wall time, and the CPU seconds this process spent."""
    cpu = time.process_time()
    results, wall = asyncio.run(drive(url, work, clients))
    return results, wall, time.process_time() - cpu


def drive_all(url: str, work: list[tuple[bytes, object]], clients: int, pool, count: int) -> tuple[list, float, float]:
    """:func:`drive_share` here, or with ``pool`` the work and the clients shared among its ``count``
    processes (the wall time then from before the first share starts to after the last ends)."""
    if pool is None:
        return drive_share(url, work, clients)
    shares = [work[i::count] for i in range(count)]
    per_process = [clients // count + (i < clients % count) for i in range(count)]
    started = time.perf_counter()
    parts = list(pool.map(drive_share, [url] * count, shares, per_process))
    wall = time.perf_counter() - started
    return [result for results, _, _ in parts for result in results], wall, sum(cpu for _, _, cpu in parts)


def failures(results: list) -> list[str]:
    """What went wrong, per answer: a valid stream must give decode's top-1 and probabilities, a bad one a 4xx."""
    problems = []
    for _, status, expected, body, _ in results:
        if expected is None:
            if not (400 <= status < 500 and set(json.loads(body)) == {"error"}):
                problems.append(f"bad stream answered {status}: {body[:200]!r}")
            continue
        if status != 200:
            problems.append(f"valid stream answered {status}: {body[:200]!r}")
            continue
        (row,) = json.loads(body)
        label, probs = expected
        top = {entry["label"]: entry["prob"] for entry in row["top"]}
        worst = max(abs(top[k] - p) for k, p in probs.items() if k in top)
        if row["rank1_label"] != label or worst > TOLERANCE:
            problems.append(f"wrong answer: top-1 {row['rank1_label']} (decode: {label}), probabilities {worst:.2g} apart")
    return problems


@torch.no_grad()
def tail_batches(split: str, sizes=(1, 2, 4, 8, 12, 16, 24, 32), repeats: int = 20) -> None:
    """Median ms per image of the tail at each batch size: as ``Codec.decode`` runs it, in channels_last,
    and as the server runs it (batch norms folded, channels_last), on torch's default threads and on
    one (what the server's COMPUTE_CHUNK, tail form and one-torch-thread decoding threads rest on);
    the three alternate."""
    codec = Codec.load("efficientnet_lite0", split)
    (result,) = codec.decode(codec.encode([ROOT / "examples" / "coffee.jpg"], rate=3))
    tails = {
        "default": codec.model.tail,
        "channels_last": copy.deepcopy(codec.model.tail).to(memory_format=TAIL_LAYOUT),
        "server": server_tail(codec.model.tail),
    }
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        print(f"efficientnet_lite0/{split} tail, {threads} thread(s), median of {repeats}, ms/image "
              f"(default / channels_last / folded and channels_last, as the server):")
        for size in sizes:
            batch = result.features.expand(size, *result.features.shape).contiguous()
            inputs = {name: batch if name == "default" else batch.contiguous(memory_format=TAIL_LAYOUT)
                      for name in tails}
            times = {name: [] for name in tails}
            for name, tail in tails.items():
                tail(inputs[name])
            for _ in range(repeats):
                for name, tail in tails.items():
                    started = time.perf_counter()
                    tail(inputs[name])
                    times[name].append(time.perf_counter() - started)
            print(f"  batch {size:>2}: " + " / ".join(
                f"{1000 * statistics.median(times[name]) / size:.2f}" for name in tails))


def time_one_at_a_time(codec: Codec, order: list[bytes], say: bool = False) -> float:
    """Records/s of ``Codec.decode`` on ``order`` one at a time: the better of torch's default threads and one."""
    rates = []
    default = torch.get_num_threads()
    for threads in sorted({default, 1}, reverse=True):
        torch.set_num_threads(threads)
        started = time.perf_counter()
        for data in order:
            codec.decode(data)
        seconds = time.perf_counter() - started
        rates.append(len(order) / seconds)
        if say:
            print(f"Codec.decode one at a time, {threads} thread(s): {len(order)} records in {seconds:.2f} s = "
                  f"{rates[-1]:.1f} records/s ({1000 * seconds / len(order):.1f} ms/record)")
    torch.set_num_threads(default)
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="stage3")
    parser.add_argument("--images", nargs="*", type=Path, default=sorted((ROOT / "examples").glob("*.jpg")))
    parser.add_argument("--clients", default="32,8", help="Concurrent clients of the throughput phases.")
    parser.add_argument("--requests", type=int, default=2000, help="Requests per throughput phase.")
    parser.add_argument("--sequential", type=int, default=96,
                        help="Records decoded one at a time for each timing of the baseline.")
    parser.add_argument("--chunks", type=int, default=4, help="Parts of each phase, the baseline timed after each.")
    parser.add_argument("--client-processes", type=int, default=2,
                        help="Processes the clients are spread over (1: all in this one, which starved the server).")
    parser.add_argument("--faults-requests", type=int, default=10000, help="Requests of the last phase (0: skip).")
    parser.add_argument("--faults-clients", type=int, default=32)
    parser.add_argument("--bad-fraction", type=float, default=0.10)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tail-batches", action="store_true", help="Only time the tail at batch 1..32.")
    args = parser.parse_args()
    if args.tail_batches:
        return tail_batches(args.split)
    rng = random.Random(args.seed)

    codec = Codec.load("efficientnet_lite0", args.split)
    streams = [codec.encode([image], rate=rate) for rate in range(codec.num_rates) for image in args.images]
    expected = []
    for data in streams:
        (result,) = codec.decode(data)
        probs = result.logits.softmax(-1)
        values, labels = probs.topk(5)
        expected.append((int(labels[0]), {int(k): float(v) for k, v in zip(labels, values)}))
    print(f"efficientnet_lite0/{args.split}: {len(streams)} one-record streams ({len(args.images)} images x "
          f"{codec.num_rates} whole rates, {min(map(len, streams))}-{max(map(len, streams))} bytes), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    order = [streams[i % len(streams)] for i in range(args.sequential)]
    baseline = time_one_at_a_time(codec, order, say=True)
    served = Codec(codec.spec, codec.split, SplitModel(codec.model.head, server_tail(codec.model.tail)), codec.ladder)
    print(f"Codec.decode one at a time with the server's tails (batch norms folded, channels_last; not the "
          f"baseline of x): {time_one_at_a_time(served, order):.1f} records/s")

    server = Server(["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)])
    pid = server.process.pid
    print(f"featcodec serve --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}: "
          f"RSS {rss_mib(pid):.0f} MiB after start")
    ok, pool = True, None
    if args.client_processes > 1:
        pool = ProcessPoolExecutor(args.client_processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        warm = [(streams[i % len(streams)], expected[i % len(streams)]) for i in range(64)]
        drive_all(server.url, warm, 8, pool, args.client_processes)
        print(f"{'phase':<28} {'requests':>8} {'records/s':>10} {'x decode':>17} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'batch':>6} {'failures':>8} {'RSS MiB':>8} {'CPU server/clients':>18}")
        phases = [(f"{c} clients", int(c), args.requests, 0.0) for c in args.clients.split(",")]
        if args.faults_requests:
            phases.append((f"{args.faults_clients} clients, {args.bad_fraction:.0%} bad", args.faults_clients,
                           args.faults_requests, args.bad_fraction))
        for name, clients, count, bad_fraction in phases:
            work = []
            for _ in range(count):
                index = rng.randrange(len(streams))
                if rng.random() < bad_fraction:
                    work.append((bad_variants(streams[index], rng), None))
                else:
                    work.append((streams[index], expected[index]))
            results, wall, server_cpu, client_cpu, ratios = [], 0.0, 0.0, 0.0, []
            for part in range(args.chunks):
                share = work[part * len(work) // args.chunks : (part + 1) * len(work) // args.chunks]
                cpu_before = cpu_seconds(pid)
                part_results, part_wall, part_cpu = drive_all(server.url, share, clients, pool, args.client_processes)
                server_cpu += cpu_seconds(pid) - cpu_before
                client_cpu += part_cpu
                results, wall = results + part_results, wall + part_wall
                after = time_one_at_a_time(codec, order)
                ratios.append(sum(r[2] is not None for r in part_results) / part_wall / max(baseline, after))
                baseline = after
            valid = [r for r in results if r[2] is not None]
            latencies = [1000 * r[0] for r in valid]
            problems = failures(results)
            ok &= not problems
            rate = len(valid) / wall
            batch = statistics.mean(r[4] for r in valid)  # records in the batch of a valid request, on average
            spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            print(f"{name:<28} {count:>8} {rate:>10.1f} {spread:>17} {statistics.median(latencies):>7.1f} "
                  f"{percentile(latencies, 99):>7.1f} {batch:>6.1f} {len(problems):>8} {rss_mib(pid):>8.0f} "
                  f"{server_cpu / wall:>9.2f}/{client_cpu / wall:<8.2f}")
            for problem in problems[:5]:
                print(f"  {problem}")
            if bad_fraction:
                print(f"  {len(results) - len(valid)} bad streams, "
                      f"{sum(400 <= r[1] < 500 for r in results if r[2] is None)} answered 4xx; "
                      f"{len(valid)} valid, {sum(r[1] == 200 for r in valid)} answered 200")
    finally:
        if pool is not None:
            pool.shutdown()
        code = server.stop()
        print(f"server exit code after SIGTERM: {code}; log: {server.log.name}")
    sys.exit(0 if ok and code == 0 else 1)


if __name__ == "__main__":
    main()
