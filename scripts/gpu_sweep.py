"""A time-boxed GPU sweep: one feature cache, then many one-rung training runs side by side on one GPU.

    python scripts/gpu_sweep.py sweep --data DIR --init DIR --jobs JOBS.json --work DIR --seconds S [--deliver DIR]

JOBS.json is ``{"commit": "...", "jobs": [{"name", "split", "views", "mixup"?, "lambda", "init", "batch",
"refine_blocks"?, "config"}, ...]}``: each job trains one BU with :func:`featcodec.train.train_ladder`, starting
from the one-rung ladder ``init`` (under ``--init``; make it with ``scripts/join_ladders.py LADDER:K -o FILE``),
with the FLAGS below and the job's ``config`` overrides (``{"kd_weight": 100}``, ``{"decoder_only": true}``, say);
``refine_blocks`` gives the BU that many refiner blocks (as ``featcodec train --refine-blocks``). It was written
for a GPU lent for minutes:

- the cache of every (split, views, mixup) is built once, before the jobs, with 15 loader workers; it is
  stored under the name ``featcodec train`` looks for, and view v of image i is augmented with a generator
  seeded by (seed, v, i), so its views differ from those of the built-in (serial) cache builder (with mixup,
  views after the first blend in a view of a random other image, as there);
- every job sets its step count from its own speed after ``--probe`` steps (again after 4x that, and later
  only shortens it), so that it ends its training ``--margin`` seconds before ``--seconds`` have passed
  (the cosine learning-rate schedule follows the new count); jobs left running at the end are killed;
- ``--deliver`` copies each finished ladder there as soon as it is written, so that a call cut short
  still returns what finished;
- the training records name ``commit`` as the git commit, since a copy of the repository may lack .git.

``SWEEP_DEVICE=cpu`` runs it on the CPU (to try a JOBS file on a few images first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEVICE = os.environ.get("SWEEP_DEVICE", "cuda")
FLAGS = dict(distortion="mse+kd", kd_weight=30.0, learning_rate=3e-4, rounded_decoder_input=True, seed=0)


def _config(split, views, lam=1.0, mixup=0.0, **kw):
    from featcodec.train import TrainConfig

    args = dict(FLAGS)
    args.update(kw)
    return TrainConfig("efficientnet_lite0", split, [lam], views=views, mixup=mixup, **args)


def build_cache(args):
    """The feature cache `featcodec train` looks for (same folder), built with parallel workers on the GPU."""
    from featcodec.backbones import load_split_model
    from featcodec.feature_cache import ViewDataset, build_cache as build_shards, finish_cache
    from featcodec.train import cache_dir_for, list_images

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    config = _config(args.split, args.views, mixup=args.mixup)
    files = list_images(args.data)
    directory = cache_dir_for(config, files, Path(args.work) / "cache", with_logits=True)
    started = time.time()
    model = load_split_model("efficientnet_lite0", args.split, None, False).to(DEVICE).eval()
    views = ViewDataset(files, "efficientnet_lite0", args.views, config.seed, args.mixup)
    build_shards(model, views, directory, True, batch_size=256, device=DEVICE, workers=15)
    finish_cache(directory, len(views), True)
    print(f"cache of {len(views)} views in {time.time() - started:.0f} s -> {directory.name}", flush=True)


def run_job(args):
    """One rung: train_ladder from the job's init ladder; steps re-set from the measured speed."""
    import featcodec.train as train

    spec = json.loads(args.spec)
    deadline = spec["deadline"]
    train._git_commit = lambda: spec["commit"]  # the device copy's .git is not this repository's
    config = _config(spec["split"], spec["views"], spec["lambda"], mixup=spec.get("mixup", 0.0),
                     steps=spec["max_steps"], batch_size=spec.get("batch", 64), **spec.get("config", {}))
    log = open(spec["out"] + ".log", "w")
    marks = {}

    def report(event):
        if event.get("phase") != "train" or event.get("rung") == "pre":
            return
        step, now = event["step"], time.time()
        if step == 10:
            marks["t10"] = now
        check = step in (spec["probe"], spec["probe"] * 4) or (step > spec["probe"] * 4 and step % 500 == 0)
        if check and "t10" in marks:
            speed = (step - 10) / (now - marks["t10"])
            left = deadline - spec["margin"] - now
            new = min(spec["max_steps"], max(step + 50, step + int(0.95 * speed * left)))
            if step <= spec["probe"] * 4 or new < config.steps:  # later checks only shorten the run
                config.steps = new
            print(f"step {step}: {speed:.1f} steps/s, steps -> {config.steps}", file=log, flush=True)
        if step % 100 == 0 or step == config.steps:
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in event.items()}),
                  file=log, flush=True)

    init, bu_config = spec.get("init"), None
    if "refine_blocks" in spec:
        from featcodec.ladder import load_ladder

        init = load_ladder(init)
        bu_config = train.start_config(init, refine_blocks=spec["refine_blocks"])
    train.train_ladder(config, spec["data"], spec["out"], bu_config, cache_dir=spec["cache"], device=DEVICE,
                       init_from=init, reporter=report)
    print("done", file=log, flush=True)


def sweep(args):
    started = time.time()
    deadline = started + args.seconds
    work = Path(args.work)
    (work / "out").mkdir(parents=True, exist_ok=True)
    jobs = json.loads(Path(args.jobs).read_text())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for split, views, mixup in sorted({(j["split"], j["views"], j.get("mixup", 0.0)) for j in jobs["jobs"]}):
        subprocess.run([sys.executable, __file__, "cache", "--data", args.data, "--work", args.work, "--split", split,
                        "--views", str(views), "--mixup", str(mixup)], check=True, env=dict(env, OMP_NUM_THREADS="4"))
    print(f"caches ready at {time.time() - started:.0f} s", flush=True)
    procs = []
    for job in jobs["jobs"]:
        spec = dict(job, deadline=deadline, margin=args.margin, probe=args.probe, data=args.data,
                    cache=str(work / "cache"), out=str(work / "out" / f"{job['name']}.safetensors"),
                    max_steps=job.get("max_steps", 20000), commit=jobs["commit"])
        if job.get("init"):
            spec["init"] = str(Path(args.init) / job["init"])
        procs.append((job["name"], subprocess.Popen([sys.executable, __file__, "job", "--spec", json.dumps(spec)],
                                                    env=env, stderr=open(spec["out"] + ".err", "w"),
                                                    stdout=subprocess.DEVNULL)))
    hard = deadline - args.kill_before
    delivered = set()

    def deliver():  # finished outputs go out at once, so a cut-short call still returns them
        for name, p in procs:
            if args.deliver and name not in delivered and p.poll() == 0:
                shutil.copy(work / "out" / f"{name}.safetensors", Path(args.deliver) / f"{name}.safetensors")
                lines = (work / "out" / f"{name}.safetensors.log").read_text().splitlines()
                print(name, time.time() - started, lines[1] if len(lines) > 1 else "", lines[-2][:230], flush=True)
                delivered.add(name)

    while any(p.poll() is None for _, p in procs) and time.time() < hard:
        deliver()
        time.sleep(2)
    deliver()
    for name, p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            print(f"{name}: killed at the deadline", flush=True)
        else:
            print(f"{name}: exit {p.returncode}", flush=True)
    print(f"sweep ended at {time.time() - started:.0f} s", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sweep", "cache", "job"])
    parser.add_argument("--data")
    parser.add_argument("--init")
    parser.add_argument("--jobs")
    parser.add_argument("--work")
    parser.add_argument("--split")
    parser.add_argument("--views", type=int)
    parser.add_argument("--mixup", type=float, default=0.0)
    parser.add_argument("--spec")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--margin", type=float, default=40.0)
    parser.add_argument("--kill-before", type=float, default=12.0)
    parser.add_argument("--probe", type=int, default=150)
    parser.add_argument("--deliver", help="copy each finished job's ladder here")
    args = parser.parse_args()
    {"sweep": sweep, "cache": build_cache, "job": run_job}[args.mode](args)


if __name__ == "__main__":
    main()
