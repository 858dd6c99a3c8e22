"""The ``featcodec`` command line: a thin wrapper over :mod:`featcodec.codec`.

Output discipline: data (the bitstream, results, JSON) goes to stdout;
progress and messages go to stderr. Every error is one line on stderr:
exit 2 for bad usage or bad input, 1 for anything else (``--debug`` shows the
traceback). Heavy modules (torch) are imported inside the commands, so
``featcodec --help`` and ``featcodec info`` start fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.exceptions import TyperException

from .allocator import reuse_freed_memory
from .bitstream import format_rate
from .errors import FeatcodecError
from .fileio import STDIO, atomic_write_bytes, read_input

app = typer.Typer(
    name="featcodec",
    help="Codec for the intermediate tensors of split DNNs (rate ladders of bottleneck units).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

DEFAULT_RATE = 3
_state = {"debug": False}


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout():
    from rich.console import Console

    return Console(highlight=False)


def _say(message: str) -> None:
    """A message for the user, on stderr: one unwrapped line, so paths and numbers stay whole."""
    _stderr().print(message, markup=False, soft_wrap=True)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug


BACKBONE_WEIGHTS_OPTION = typer.Option(
    None, "--backbone-weights", help="Backbone weights file (.safetensors, or a torchvision state dict .pth) "
    "instead of the default ImageNet weights."
)
RANDOM_INIT_OPTION = typer.Option(
    False, "--random-init", help="Use a randomly initialised backbone (for tests only: predictions are meaningless)."
)


def _backbone_source(backbone_weights: Optional[Path], random_init: bool) -> dict:
    """The backbone weights arguments of Codec.load / train_ladder, checked."""
    if backbone_weights is not None and random_init:
        raise FeatcodecError("give either --backbone-weights or --random-init, not both")
    if random_init:
        _say("warning: --random-init: the backbone has random weights, its predictions are meaningless")
    return {"backbone_weights": str(backbone_weights) if backbone_weights else None, "random_init": random_init}


@app.command()
def encode(
    images: List[str] = typer.Argument(..., help="Image files, or '-' to read one image from stdin."),
    rate: float = typer.Option(
        DEFAULT_RATE, "--rate", "-r",
        help="Rate: a rung of the ladder (0 = fewest bytes), or any real rate of a variable-rate ladder (2.5).",
    ),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="Backbone id."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split point (default: the backbone's)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output file, or '-' for stdout."),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="Ladder .safetensors file to use (and its split, unless --split names one)."
    ),
    max_bytes: Optional[int] = typer.Option(
        None, "--max-bytes", min=1,
        help="Per image, use the highest rate whose record fits in this many bytes (overrides --rate).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Report the rung and bytes per image as JSON (on stdout with -o FILE, else on stderr)."
    ),
    backbone_weights: Optional[Path] = BACKBONE_WEIGHTS_OPTION,
    random_init: bool = RANDOM_INIT_OPTION,
) -> None:
    """Encode images into one bitstream (one record per image)."""
    if images.count(STDIO) > 1:
        raise FeatcodecError("stdin ('-') can be given only once")
    to_stdout = output in (None, STDIO)
    if to_stdout and sys.stdout.isatty():
        raise FeatcodecError("refusing to write a binary stream to a terminal: use -o FILE or redirect stdout")
    from . import bitstream
    from .codec import Codec
    from .images import load_image

    model_source = _backbone_source(backbone_weights, random_init)
    sources = [load_image(read_input(name), name="<stdin>" if name == STDIO else name) for name in images]
    codec = Codec.load(backbone, split, weights=weights, **model_source)
    if max_bytes is None:
        rate = codec.check_rate(rate)
        data, rates = codec.encode(sources, rate), [rate] * len(sources)
    else:
        data, rates = codec.encode_within(sources, max_bytes)
    rates = [bitstream.format_rate(r) for r in rates]
    if to_stdout:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        atomic_write_bytes(output, data)
    where = "stdout" if to_stdout else output
    if as_json:
        report = {
            "backbone": codec.spec.name,
            "split": codec.split.name,
            "output": where,
            "bytes": len(data),
            "images": [
                {"image": name, "rate": r, "record_bytes": parsed.size}
                for name, r, parsed in zip(images, rates, bitstream.parse_stream(data))
            ],
        }
        print(json.dumps(report), file=sys.stderr if to_stdout else sys.stdout)
    chosen = f"rate {rates[0]}" if max_bytes is None else f"rates {','.join(map(str, rates))} (--max-bytes {max_bytes})"
    _say(f"encoded {len(images)} image(s) with {codec.spec.name}/{codec.split.name} at {chosen}: {len(data)} bytes -> {where}")


def _decoded_to_json(result, top: int) -> dict:
    from .ids import names_for

    record = result.record
    backbone, split = names_for(record.backbone_id, record.split_id)
    ranked = result.top(top)
    return {
        "index": result.index,
        "rank1_label": ranked[0]["label"],
        "rank1_name": ranked[0]["name"],
        "top": ranked,
        "rate": format_rate(record.rate),
        "bytes": result.bytes,
        "payload_bytes": record.payload_bytes,
        "backbone": backbone,
        "split": split,
        "image_size": list(record.image_size),
    }


@app.command()
def decode(
    stream: str = typer.Argument(..., help="Bitstream file, or '-' for stdin."),
    top: int = typer.Option(5, "--top", "-k", min=1, max=1000, help="How many classes to show."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per record."),
    features: Optional[str] = typer.Option(
        None, "--features", help="Save the reconstructed split tensors to this .safetensors file."
    ),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Ladder .safetensors file to use."),
    backbone_weights: Optional[Path] = BACKBONE_WEIGHTS_OPTION,
    random_init: bool = RANDOM_INIT_OPTION,
) -> None:
    """Decode a bitstream: rebuild the split tensors and run the tail."""
    model_source = _backbone_source(backbone_weights, random_init)
    data = read_input(stream)
    from . import bitstream

    bitstream.parse_stream(data)  # refuse a bad stream before loading any model
    from .codec import iter_decode

    rows, kept = [], []  # keep rebuilt tensors only when asked to save them
    for result in iter_decode(data, weights=weights, **model_source):
        rows.append(_decoded_to_json(result, top))
        if features:
            kept.append(result)
    if features:
        _save_features(features, kept)
    if as_json:
        print(json.dumps(rows))
        return
    from rich.table import Table

    console = _stdout()
    for row in rows:
        console.print(f"record {row['index']}: {row['backbone']}/{row['split']} rate {row['rate']}, {row['bytes']} bytes")
        table = Table()
        table.add_column("rank", justify="right")
        table.add_column("label", justify="right")
        table.add_column("class")
        table.add_column("prob", justify="right")
        for rank, entry in enumerate(row["top"], 1):
            table.add_row(str(rank), str(entry["label"]), entry["name"], f"{entry['prob']:.3f}")
        console.print(table)


def _save_features(path: str, results) -> None:
    atomic_write_bytes(path, _features_file(results))
    _say(f"saved {len(results)} split tensor(s) -> {path}")


def _features_file(results) -> bytes:
    """The rebuilt split tensors as ``decode --features`` saves them (and ``serve`` answers ?features=1)."""
    from safetensors.torch import save

    tensors = {f"record{r.index}": r.features.contiguous() for r in results}
    meta = {f"record{r.index}.rate": str(format_rate(r.record.rate)) for r in results}
    return save(tensors, metadata=meta)


def _rate_rows(rungs: list[dict]) -> list[tuple]:
    """(rate, lambda, bytes/image, top-1) per whole rate of a ladder's rung records; a variable-rate
    BU's one record holds its anchors' lambdas and its measured curve."""
    if len(rungs) == 1 and "lambdas" in rungs[0]:
        measured = {point["rate"]: point for point in rungs[0].get("measured", [])}
        return [(rate, lam, measured.get(rate, {}).get("bytes_per_image"), measured.get(rate, {}).get("top1"))
                for rate, lam in enumerate(rungs[0]["lambdas"])]
    return [(k, rung.get("lambda"), rung.get("bytes_per_image"), rung.get("top1")) for k, rung in enumerate(rungs)]


@app.command()
def info(
    stream: str = typer.Argument(..., help="Bitstream file, or '-' for stdin."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show the header fields and sizes of every record (loads no model)."""
    from . import bitstream
    from .ids import names_for

    data = read_input(stream)
    parsed = bitstream.parse_stream(data)
    records = []
    for index, item in enumerate(parsed):
        record = item.record
        backbone, split = names_for(record.backbone_id, record.split_id)
        records.append(
            {
                "index": index,
                "version": item.version,
                "offset": item.offset,
                "bytes": item.size,
                "header_bytes": item.size - record.payload_bytes,
                "payload_bytes": record.payload_bytes,
                "backbone": backbone,
                "split": split,
                "rate": bitstream.format_rate(record.rate),
                "weights_tag": record.weights_tag.hex(),
                "image_size": list(record.image_size),
                "latent_shape": list(record.latent_shape),
            }
        )
    summary = {
        "bytes": len(data),
        "version": parsed[0].version,
        "records": records,
    }
    if as_json:
        print(json.dumps(summary))
        return
    from rich.table import Table

    table = Table(title=f"featcodec stream v{summary['version']}, {len(data)} bytes, {len(records)} record(s)")
    for column in ("#", "backbone", "split", "rate", "image", "latent", "payload", "header", "weights tag"):
        table.add_column(column)
    for r in records:
        table.add_row(
            str(r["index"]), r["backbone"], r["split"], str(r["rate"]), "x".join(map(str, r["image_size"])),
            "x".join(map(str, r["latent_shape"])), str(r["payload_bytes"]), str(r["header_bytes"]), r["weights_tag"],
        )
    _stdout().print(table)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List backbones, split points and the rungs of their shipped ladders."""
    entries = _model_entries()
    if as_json:
        print(json.dumps(entries))
        return
    _print_models_table(entries)


def _model_entries() -> list[dict]:
    """What ``models --json`` prints (and ``serve`` answers on /v1/models)."""
    from .ids import BACKBONE_IDS, SPLITS
    from .ladder import HUFFMAN_VARIANT, LadderError, find_ladder, read_ladder_metadata

    entries = []
    for backbone in BACKBONE_IDS:
        for split, (split_id, shape) in SPLITS[backbone].items():
            for variant in (None, HUFFMAN_VARIANT):
                entry = {"backbone": backbone, "split": split, "split_id": split_id, "shape": list(shape),
                         "ladder": variant or "featcodec", "rungs": []}
                try:
                    path = find_ladder(backbone, split, variant)
                except LadderError:
                    path = None
                if path is not None:
                    entry["weights"] = str(path)
                    meta = read_ladder_metadata(path)
                    entry["rungs"] = meta["rungs"]
                    entry["weights_dtype"] = meta.get("weights_dtype", "float32")
                if path is not None or variant is None:  # list the huffman-bu anchor only where shipped
                    entries.append(entry)
    return entries


def _print_models_table(entries: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="featcodec models")
    for column in ("backbone", "split", "tensor", "rung", "lambda", "bytes/image", "top-1"):
        table.add_column(column)
    for e in entries:
        shape = "x".join(map(str, e["shape"]))
        split_label = e["split"] if e["ladder"] == "featcodec" else f"{e['split']} ({e['ladder']})"
        if not e["rungs"]:
            table.add_row(e["backbone"], split_label, shape, "-", "no ladder shipped", "", "")
        for rate, lam, measured_bytes, top1 in _rate_rows(e["rungs"]):
            table.add_row(
                e["backbone"], split_label, shape, str(rate), f"{lam:g}" if lam is not None else "?",
                f"{measured_bytes:.1f}" if measured_bytes is not None else "-",
                f"{100 * top1:.2f}%" if top1 is not None else "-",
            )
    _stdout().print(table)


@app.command()
def train(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of training images (recursive; no labels needed)."),
    lambdas: Optional[str] = typer.Option(
        None, "--lambdas", help="Comma-separated lambdas, one rung each, low rate first."
    ),
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", help="Train what a recipe file says (settings, BU, data folders and hold-outs; "
        "see recipes/). Only --out, --cache-dir, --resume, --device, --nproc and --data-root go with it."
    ),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder the recipe's data paths are under."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b"),
    split: Optional[str] = typer.Option(None, "--split", "-s"),
    distortion: str = typer.Option("mse", "--distortion", help="mse, kd or mse+kd."),
    kd_weight: float = typer.Option(
        1.0, "--kd-weight", min=0.0, help="Weight of the kd term against mse in mse+kd."
    ),
    penultimate_weight: float = typer.Option(
        0.0, "--penultimate-weight", min=0.0, help="Add this times the MSE between the tail's penultimate "
        "features (the input of its last linear layer) of the rebuilt and the original split tensor (0: off)."
    ),
    steps: int = typer.Option(2000, "--steps", min=1, help="Training steps per rung."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    learning_rate: float = typer.Option(1e-3, "--lr", min=0.0),
    views: int = typer.Option(4, "--views", min=1, help="Augmented views per image in the feature cache."),
    mixup: float = typer.Option(
        0.0, "--mixup", min=0.0, help="Blend every view after the first with another image's view, weight ~ "
        "Beta(a, a); the teacher sees the same blend (0: off)."
    ),
    feature_mixup: float = typer.Option(
        0.0, "--feature-mixup", min=0.0, help="Blend each step's split tensors with others of the batch, weight ~ "
        "Beta(a, a), new every step; the targets are the tail's on the blend (0: off)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Default: weights/<backbone>/<split>.safetensors"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where the feature cache is kept."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed"),
    warm_start: bool = typer.Option(False, "--warm-start", help="Start each rung from the previous rung's weights."),
    pretrain_steps: int = typer.Option(
        0, "--pretrain-steps", min=0, help="mse-only steps that initialise the rungs (helps kd converge)."
    ),
    pretrain_lambda: float = typer.Option(1000.0, "--pretrain-lambda", min=0.0),
    rounded_decoder_input: bool = typer.Option(
        False, "--rounded-decoder-input", help="The BU decoder trains on the latent rounded as the coder sends "
        "it (straight-through gradient), not on the noisy one; the rate still comes from the noisy latent."
    ),
    latent_channels: int = typer.Option(32, "--latent-channels", min=1, help="BU latent channels."),
    hidden_channels: int = typer.Option(128, "--hidden-channels", min=1, help="BU hidden conv width."),
    stride: int = typer.Option(2, "--stride", min=1, max=2, help="BU latent downsampling: 1 or 2."),
    layers: int = typer.Option(2, "--layers", min=2, help="Conv layers in the BU encoder (and decoder)."),
    end_kernel: int = typer.Option(
        3, "--end-kernel", help="Kernel (1 or 3) of the BU encoder's first and decoder's last conv, the ones at "
        "the split tensor's width: 1 pays for a wider latent."
    ),
    hyper_channels: int = typer.Option(
        0, "--hyper-channels", min=0, help="Channels of a hyperprior BU's side latent z (0: as many as the latent)."
    ),
    entropy: Optional[str] = typer.Option(
        None, "--entropy", help="factorized (the default: featcodec's BU, learned entropy model, rANS), "
        "hyperprior (the same BU with a scale hyperprior; two payload strings) or huffman "
        "(the huffman-bu anchor: depthwise + 1x1 conv, uniform quantizer, static Huffman code). With "
        "--init-from, the ladder's own (naming another is refused)."
    ),
    quant_step: float = typer.Option(1.0, "--quant-step", help="Quantizer step qp of the huffman BU."),
    refine_blocks: Optional[int] = typer.Option(
        None, "--refine-blocks", min=0, help="Residual blocks after the BU decoder, on the server side only "
        "(default 0, or the --init-from ladder's); new blocks start as identities."
    ),
    decoder_only: bool = typer.Option(
        False, "--decoder-only", help="Train only the BU decoder (and refiner) of the --init-from ladder, on "
        "the latent as coded: the encoder, the rate and every payload stay as they were (the weights tag is new)."
    ),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="Start rung k from rung k of this ladder (train further or fine-tune; "
        "its BU config is used)."
    ),
    variable_rate: bool = typer.Option(
        False, "--variable-rate", help="Train one hyperprior BU with gain units for every rate: --lambdas are the "
        "lambdas of its whole rates 0, 1, ...; each step draws a real rate and its lambda (then --rate 2.5 works)."
    ),
    backbone_weights: Optional[Path] = BACKBONE_WEIGHTS_OPTION,
    random_init: bool = RANDOM_INIT_OPTION,
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Train with N processes on this machine: starts torchrun (DistributedDataParallel; "
        "gloo on CPU, NCCL with --device cuda). For several machines run torchrun yourself, see docs/training.md."
    ),
) -> Optional[int]:
    """Train a rate ladder (one bottleneck unit per lambda) or a variable-rate BU, backbone frozen."""
    from .backbones import get_backbone
    from .train import TrainConfig, check_decoder_only, initial_ladder, list_images, start_config

    if recipe is not None:
        return _train_recipe(ctx, recipe, data_root, out, cache_dir, resume, device, nproc)
    if data is None or lambdas is None:
        raise FeatcodecError("give --data and --lambdas, or --recipe FILE")
    try:
        lambda_values = [float(v) for v in lambdas.split(",") if v.strip()]
    except ValueError:
        raise FeatcodecError(f"--lambdas must be comma-separated numbers, got '{lambdas}'") from None

    spec = get_backbone(backbone)
    split = spec.split(split or spec.default_split).name
    model_source = _backbone_source(backbone_weights, random_init)
    config = TrainConfig(
        backbone, split, lambda_values, distortion=distortion, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate, views=views, seed=seed, warm_start=warm_start,
        pretrain_steps=pretrain_steps, pretrain_lambda=pretrain_lambda, kd_weight=kd_weight, mixup=mixup,
        feature_mixup=feature_mixup,
        penultimate_weight=penultimate_weight, rounded_decoder_input=rounded_decoder_input, decoder_only=decoder_only,
        variable_rate=variable_rate,
    )
    config.validate()
    check_decoder_only(config, init_from)  # before torchrun starts, in one line
    from .bottleneck import ENTROPY_CODERS, BottleneckConfig
    from .ladder import HUFFMAN_VARIANT

    if entropy is not None and entropy not in ENTROPY_CODERS:
        raise FeatcodecError(f"unknown --entropy '{entropy}' (choose from {', '.join(ENTROPY_CODERS)})")
    if not (quant_step > 0 and quant_step < float("inf")):
        raise FeatcodecError(f"--quant-step must be a positive number, got {quant_step}")
    channels, height, width = spec.split(split).shape
    init_ladder = None
    if variable_rate and entropy not in (None, "hyperprior"):
        raise FeatcodecError("--variable-rate trains a hyperprior BU with gain units: leave out --entropy")
    if init_from is None:
        bu_config = BottleneckConfig(
            in_channels=channels, out_size=(height, width), latent_channels=latent_channels,
            hidden_channels=hidden_channels, stride=stride, layers=layers,
            entropy="hyperprior" if variable_rate else entropy or "factorized",
            quant_step=quant_step, refine_blocks=refine_blocks or 0, rates=len(lambda_values) if variable_rate else 0,
            end_kernel=end_kernel, hyper_channels=hyper_channels,
        )
        if (problem := bu_config.layout_problem()) is not None:
            raise FeatcodecError(problem.replace("end_kernel", "--end-kernel").replace("hyper_channels", "--hyper-channels"))
    else:  # the --init-from ladder's BU, with --entropy/--refine-blocks if given (checked below)
        from .ladder import load_ladder

        init_ladder = load_ladder(init_from)  # read once: train_ladder starts from this copy
        bu_config = start_config(init_ladder, entropy, refine_blocks)
        initial_ladder(init_ladder, spec.name, split, bu_config, config.units())  # refuse early, in one line
    entropy = bu_config.entropy
    files = list_images(data)
    default_name = f"{split}-{HUFFMAN_VARIANT}" if entropy == "huffman" else split
    out = out or Path("weights") / backbone / f"{default_name}.safetensors"
    return _run_training(config, data, out, bu_config, files, resume=resume, cache_dir=cache_dir, device=device,
                         nproc=nproc, init_from=init_ladder, model_source=model_source)


_RECIPE_OPTIONS = {"recipe", "data_root", "out", "cache_dir", "resume", "device", "nproc"}


def _train_recipe(ctx: typer.Context, path: Path, data_root, out, cache_dir, resume, device, nproc):
    """``train --recipe``: the recipe's settings, BU and data; refuses other training options."""
    from .backbones import get_backbone
    from .bottleneck import BottleneckConfig
    from .recipe import load_recipe
    from .train import TrainConfig

    given = [name for name in ctx.params if name not in _RECIPE_OPTIONS
             and getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]  # typer may vendor click
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise FeatcodecError(f"{flags}: the recipe sets these; with --recipe give only --out, --cache-dir, "
                             f"--resume, --device, --nproc or --data-root")
    loaded = load_recipe(path, data_root)
    spec = get_backbone(loaded.backbone)
    split = spec.split(loaded.split)
    try:
        config = TrainConfig(spec.name, split.name, **loaded.train)
        config.validate()
        channels, height, width = split.shape
        variable = {"entropy": "hyperprior", "rates": len(config.lambdas)} if config.variable_rate else {}
        bu_config = BottleneckConfig(in_channels=channels, out_size=(height, width), **{**loaded.bu, **variable})
        if (problem := bu_config.layout_problem()) is not None:
            raise FeatcodecError(f"{path}: [bu] {problem}")
    except TypeError as exc:
        raise FeatcodecError(f"{path}: {exc}") from None
    out = out or loaded.out or Path("weights") / spec.name / f"{split.name}.safetensors"
    record = {"recipe": path.name, "recipe_sha256": loaded.sha256[:16], "data": loaded.describe_data()}
    return _run_training(config, path.parent, out, bu_config, loaded.files, resume=resume, cache_dir=cache_dir,
                         device=device, nproc=nproc, record=record)


def _run_training(config, data, out, bu_config, files, *, resume, cache_dir, device, nproc, init_from=None,
                  model_source=None, record=None):
    """Train (under torchrun with ``nproc`` > 1) with a progress bar on stderr, and say what was written."""
    from .train import train_ladder

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        if config.batch_size % nproc:
            raise FeatcodecError(f"--batch-size {config.batch_size} must be a multiple of --nproc {nproc}")
        from .distributed import launch

        _say(f"starting {nproc} training processes with torchrun")
        return launch(nproc, _without_option(_ARGV, "--nproc"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=_stderr(), disable=not is_main,
    ) as progress:
        task = progress.add_task("feature cache", total=None, status="")

        # A live bar needs a terminal; into a log file, print a plain line now and then instead.
        plain_log = not progress.console.is_terminal

        logged_tenths = [-1]  # of the cache's views, the last tenth a plain line was printed for

        def report(event: dict) -> None:
            if event["phase"] == "cache":
                progress.update(task, completed=event["done"], total=event["total"])
                tenths = 10 * event["done"] // max(1, event["total"])  # the views come 32 at a time
                if plain_log and tenths > logged_tenths[0]:
                    logged_tenths[0] = tenths
                    _say(f"feature cache: {event['done']}/{event['total']} views "
                         f"({progress.tasks[task].elapsed or 0:.0f} s)")
                return
            status = f"loss {event['loss']:.1f} bits {event['bits']:.0f} " + " ".join(
                f"{k} {event[k]:.4g}" for k in ("mse", "kd", "penultimate") if k in event
            )
            description = "pretrain" if event["rung"] == "pre" else f"rung {event['rung']}"
            progress.update(task, description=description, completed=event["step"], total=event["steps"], status=status)
            if plain_log and (event["step"] % 50 == 0 or event["step"] == event["steps"]):
                _say(f"{description} step {event['step']}/{event['steps']}: {status}")

        ladder = train_ladder(
            config, data, out, bu_config, files=files, resume=resume, cache_dir=cache_dir, device=device,
            reporter=report, init_from=init_from, record=record, **(model_source or {}),
        )
    if is_main:
        kind = f"variable-rate BU (rates 0..{ladder.max_rate})" if ladder.is_variable else f"{len(ladder.rungs)}-rung ladder"
        _say(f"wrote {kind} -> {out}")
    return None


@app.command("eval")
def evaluate_command(
    data: Optional[Path] = typer.Option(
        None, "--data", help="labels.csv folder (file,label) or ImageFolder of WNIDs."
    ),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b"),
    split: Optional[str] = typer.Option(None, "--split", "-s"),
    sweep: bool = typer.Option(
        False, "--sweep", help="Evaluate every rung of the ladder (a variable-rate ladder: rates 0, 0.25, 0.5, ...)."
    ),
    rate: Optional[float] = typer.Option(None, "--rate", "-r", help="Evaluate this rate only."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use the first N images only."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="Ladder .safetensors file to use (and its split, unless --split names one)."
    ),
    record: bool = typer.Option(
        False, "--record", help="Store each rung's measured bytes and top-1 in the ladder's metadata (and in the "
        "huffman-bu ladder's, when that baseline is measured)."
    ),
    baselines: str = typer.Option(
        "none", "--baselines", help="Comma-separated baselines to measure too: jpeg, quant8 (quant8-zlib and "
        "fp16-zlib), huffman-bu (the shipped <split>-huffman-bu ladder), or none."
    ),
    huffman_weights: Optional[Path] = typer.Option(
        None, "--huffman-weights", help="Ladder file for the huffman-bu baseline (trained with --entropy huffman)."
    ),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Also write the points to this CSV file."),
    plot_file: Optional[Path] = typer.Option(
        None, "--plot", help="Also plot top-1 against bytes per image into this .png file."
    ),
    all_splits: bool = typer.Option(
        False, "--all-splits", help="Sweep every split that has a ladder (JSON: a list, one object per split; "
        "--plot FILE.png writes FILE-<split>.png)."
    ),
    complexity: bool = typer.Option(
        False, "--complexity", help="Report parameters, MACs and ms/image (batch 1) of head, BU and tail "
        "instead (needs no --data)."
    ),
    max_bytes: Optional[str] = typer.Option(
        None, "--max-bytes", help="Comma-separated record budgets in bytes: for each, also measure every image "
        "at the highest rung whose record fits, as 'encode --max-bytes' picks it (implies --sweep)."
    ),
    backbone_weights: Optional[Path] = BACKBONE_WEIGHTS_OPTION,
    random_init: bool = RANDOM_INIT_OPTION,
) -> None:
    """Measure bytes per image and accuracy per rung (and baselines) on labelled images.

    The table goes to stderr; stdout carries only the --json output.
    """
    model_source = _backbone_source(backbone_weights, random_init)
    if complexity:
        others = {"--data": data is not None, "--sweep": sweep, "--all-splits": all_splits, "--record": record,
                  "--csv": csv_file is not None, "--plot": plot_file is not None, "--baselines": baselines != "none",
                  "--max-bytes": max_bytes is not None}
        given = [flag for flag, present in others.items() if present]
        if given:
            raise FeatcodecError(f"--complexity is a report of its own: leave out {', '.join(given)}")
        _complexity_command(backbone, split, rate, weights, as_json, model_source)
        return
    if data is None:
        raise FeatcodecError("give --data DIR (labelled images), or --complexity for the cost report")
    if all_splits:
        if split is not None or weights is not None or rate is not None:
            raise FeatcodecError("--all-splits sweeps the shipped ladders: leave out --split, --weights and --rate")
        sweep = True
    budgets = _parse_budgets(max_bytes) if max_bytes is not None else []
    if budgets:
        if rate is not None:
            raise FeatcodecError("--max-bytes picks a rung per image: leave out --rate")
        sweep = True
    if sweep == (rate is not None):
        raise FeatcodecError("give exactly one of --sweep or --rate K")
    from .baselines import parse_baselines

    methods = parse_baselines(baselines)
    if huffman_weights is not None and ("huffman-bu" not in methods or all_splits):
        raise FeatcodecError("--huffman-weights needs --baselines with huffman-bu, and one --split")
    for path in (csv_file, plot_file):
        if path is not None and path.is_dir():
            raise FeatcodecError(f"{path}: is a folder, not a file")
    if plot_file is not None and plot_file.suffix.lower() != ".png":
        raise FeatcodecError(f"--plot writes PNG: give a .png file name, not {plot_file.name}")
    from .codec import Codec
    from .evaluate import evaluate, labelled_images

    items = labelled_images(data)[:limit]
    if all_splits:
        splits = _splits_with_ladders(backbone)
        codecs = [Codec.load(backbone, name, **model_source) for name in splits]
    else:
        codecs = [Codec.load(backbone, split, weights=weights, **model_source)]
    from .ladder import HUFFMAN_VARIANT, LadderError, find_ladder, load_ladder

    split_methods = {codec.split.name: list(methods) for codec in codecs}
    anchors = {}  # split -> the huffman-bu ladder measured beside it
    if "huffman-bu" in methods:
        for name, chosen in split_methods.items():
            if huffman_weights is not None:
                anchors[name] = load_ladder(huffman_weights)
                continue
            try:
                anchors[name] = load_ladder(find_ladder(backbone, name, HUFFMAN_VARIANT))
            except LadderError:
                if not all_splits:
                    raise
                chosen.remove("huffman-bu")
                _say(f"{backbone}/{name}: no huffman-bu ladder shipped, that baseline is skipped for it")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    _say(f"evaluating {len(items)} images with {', '.join(f'{backbone}/{c.split.name}' for c in codecs)}")
    results = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=_stderr(),
    ) as progress:
        for codec in codecs:
            tasks: dict[str, int] = {}
            prefix = f"{codec.split.name}: " if all_splits else ""

            def report(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = progress.add_task(prefix + stage, total=total)
                progress.update(tasks[stage], completed=done)

            rates = codec.ladder.sweep_rates() if sweep else [codec.check_rate(rate)]
            results.append(
                evaluate(codec, items, rates, progress=report, baselines=split_methods[codec.split.name],
                         huffman_ladder=anchors.get(codec.split.name), max_bytes=budgets)
            )
    if record:
        for codec, result in zip(codecs, results):
            _record_measurements(codec.ladder, "featcodec", result, data)
            if codec.split.name in anchors:
                _record_measurements(anchors[codec.split.name], "huffman-bu", result, data)
    if csv_file is not None:
        from .evaluate import points_csv

        _write_eval_output(csv_file, points_csv(*results), "points")
    if plot_file is not None:
        from .evaluate import plot_png

        for result in results:
            path = plot_file.with_name(f"{plot_file.stem}-{result['split']}.png") if all_splits else plot_file
            _write_eval_output(path, plot_png(result), "plot")
    for result in results:
        _print_eval_table(result)
    if as_json:
        print(json.dumps(results if all_splits else results[0]))


def _parse_budgets(text: str) -> list[int]:
    """The byte budgets of ``--max-bytes``: positive integers, comma-separated."""
    try:
        budgets = [int(part) for part in text.split(",")]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        raise FeatcodecError(f"--max-bytes takes positive byte counts, comma-separated (got '{text}')")
    return budgets


def _splits_with_ladders(backbone: str) -> list[str]:
    """The split names of ``backbone`` that have a shipped (or $FEATCODEC_WEIGHTS) ladder."""
    from .backbones import get_backbone
    from .ladder import LadderError, find_ladder

    names = []
    for name in get_backbone(backbone).splits:
        try:
            find_ladder(backbone, name)
        except LadderError:
            continue
        names.append(name)
    if not names:
        raise FeatcodecError(f"no trained ladder for any split of {backbone}")
    return names


def _complexity_command(
    backbone: str, split: Optional[str], rate: Optional[int], weights: Optional[Path], as_json: bool,
    model_source: dict,
) -> None:
    """Print the cost report of one split: table on stderr, JSON on stdout with --json."""
    from rich.table import Table

    from .codec import Codec
    from .complexity import cost_report

    from .backbones import get_backbone
    from .complexity import default_ladder
    from .ladder import LadderError, find_ladder

    ladder = None
    if weights is None:
        try:
            find_ladder(backbone, split or get_backbone(backbone).default_split)
        except LadderError:
            ladder = default_ladder(backbone, split)
            _say(f"no trained ladder for {ladder.backbone}/{ladder.split}: the BU figures are those of an "
                 "untrained BU of the default size (the same cost as a trained one)")
    codec = Codec.load(backbone, split, weights=weights, ladder=ladder, **model_source)
    if rate is not None:
        codec.ladder.rung(rate)  # a bad index is a clear error before any timing
    _say("measuring ...")
    report = cost_report(codec, rate)
    variable = codec.ladder.is_variable
    _say(
        f"{report['backbone']}/{report['split']}, {'BU at rate' if variable else 'BU of rung'} {report['rate']}, "
        f"batch 1, {report['threads']} thread(s):"
    )
    table = Table()
    for column in ("part", "params", "MMACs", "ms/image"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part in report["parts"]:
        table.add_row(part["part"], f"{part['params']:,}", f"{part['macs'] / 1e6:.2f}", f"{part['ms']:.2f}")
    _stderr().print(table)
    bus = f"one BU for rates 0..{codec.ladder.max_rate}" if variable else f"{report['ladder_rungs']} BUs"
    _say(
        f"ladder: {bus}, {report['ladder_params']:,} parameters = "
        f"{report['ladder_percent_of_backbone']:.2f}% of the backbone's {report['backbone_params']:,}"
    )
    if as_json:
        print(json.dumps(report))


def _write_eval_output(path: Path, data: bytes, what: str) -> None:
    """Write an eval output file atomically; a write failure is one FeatcodecError line."""
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise FeatcodecError(f"{path}: cannot write ({exc.strerror or exc})") from None
    _say(f"wrote {what} -> {path}")


def _print_eval_table(result: dict) -> None:
    """The eval summary table, then the BD-rates, on stderr."""
    from rich.table import Table

    unc = result["uncompressed"]
    table = Table(
        title=f"{result['backbone']}/{result['split']} on {result['images']} images: "
        f"uncompressed top-1 {100 * unc['top1']:.2f}%, top-5 {100 * unc['top5']:.2f}%"
    )
    table.add_column("method")
    table.add_column("setting")
    for column in ("bytes/image", "payload", "bpp", "top-1", "top-5", "agree", "mse", "enc ms", "dec ms"):
        table.add_column(column, justify="right")
    for p in result["points"]:
        table.add_row(
            p["method"], p["setting"], f"{p['bytes_per_image']:.1f}", f"{p['payload_bytes_per_image']:.1f}",
            f"{p['bpp']:.4f}", f"{100 * p['top1']:.2f}%", f"{100 * p['top5']:.2f}%", f"{100 * p['agreement']:.2f}%",
            f"{p['mse']:.4g}", f"{p['encode_ms']:.2f}", f"{p['decode_ms']:.2f}",
        )
    console = _stderr()
    if not console.is_terminal:
        console.width = 160  # a log file: do not squeeze the columns into 80 characters
    console.print(table)
    undefined = "undefined (a curve with < 2 distinct top-1 values, or no shared top-1 range)"
    for method, value in result.get("bd_rate", {}).items():
        figure = undefined if value is None else f"{value:+.2f}%"
        console.print(f"BD-rate of featcodec against {method}: {figure}", markup=False)
    from .bitstream import PREAMBLE

    for choice in result.get("max_bytes", []):
        used = ", ".join(f"{rate}: {count}" for rate, count in zip(choice["rates"], choice["rungs"]) if count)
        console.print(f"--max-bytes {choice['max_bytes']}: images per rate {{{used}}}, largest stream "
                      f"{choice['largest_stream']} B (record + {len(PREAMBLE)}-byte preamble)", markup=False)


def _record_measurements(ladder, method: str, result: dict, data: Path) -> None:
    """Store the measured bytes and top-1 of ``method``'s points in ``ladder``'s file (new weights tag if changed)."""
    from .ladder import save_ladder

    points = [point for point in result["points"] if point["method"] == method]
    if ladder.is_variable:  # one BU: its measured curve, rate by rate
        ladder.rung_info[0]["measured"] = [
            {"rate": point["rate"], "bytes_per_image": round(point["bytes_per_image"], 4), "top1": round(point["top1"], 6)}
            for point in points
        ]
    for point in points if not ladder.is_variable else []:
        ladder.rung_info[point["rate"]].update(
            bytes_per_image=round(point["bytes_per_image"], 4), top1=round(point["top1"], 6)
        )
    ladder.extra["measured_on"] = f"{result['images']} images of {data.name}/"
    ladder.extra["uncompressed_top1"] = round(result["uncompressed"]["top1"], 6)
    old_tag = ladder.weights_tag
    tag = save_ladder(ladder, ladder.path)
    change = "weights tag unchanged" if tag == old_tag else f"new weights tag {tag.hex()}"
    _say(f"recorded measurements in {ladder.path} ({change})")


@app.command()
def verify(
    directory: Path = typer.Argument(Path("bitstreams"), help="Folder holding manifest.json and the streams."),
    photo: Optional[Path] = typer.Option(None, "--photo", help="The manifest's photo, to check re-encoding."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Ladder .safetensors file to use."),
    strict: bool = typer.Option(
        False, "--strict", help="Also require a bit-exact rebuilt tensor and re-encode (for a pinned platform)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Decode the conformance streams and check them against their manifest (exit 1 on any failure).

    A stream passes when its bytes, decoded latent symbols and top-5 are exact and the rebuilt
    tensor is within 1e-4 of the manifest; whether the tensor and a re-encode are bit-exact is shown."""
    from dataclasses import asdict

    from .conformance import FEATURES_ATOL, verify as verify_streams

    checks, same_platform = verify_streams(directory, photo=photo, weights=weights, strict=strict)
    if as_json:
        print(json.dumps({"same_platform": same_platform, "checks": [{**asdict(c), "passed": c.passed} for c in checks]}))
    else:
        from rich.table import Table

        def mark(value, miss: str = "FAIL") -> str:
            return "-" if value is None else ("ok" if value else miss)

        table = Table(title=f"conformance streams in {directory}", title_justify="left")
        for column in ("stream", "bytes", "latent", "top-5", "tensor", "re-encode", "result"):
            table.add_column(column, no_wrap=column == "stream")
        for c in checks:
            tensor = "exact" if c.features_exact else ("close" if c.features_close else "FAIL")
            reencode = mark(c.reencode_ok, "FAIL" if strict else "differs")
            table.add_row(
                c.stream, mark(c.stream_ok), mark(c.latent_ok), mark(c.top5_ok), tensor, reencode,
                "pass" if c.passed else f"FAIL {c.error}".strip(),
            )
        console = _stdout()
        if not console.is_terminal:
            console.width = 160  # a pipe or file: do not squeeze the columns into 80 characters
        console.print(table)
        exact = sum(c.features_exact for c in checks)
        where = "this" if same_platform else "another"
        _say(f"note: the manifest was made on {where} torch build, CPU capability and thread count; "
             f"{exact}/{len(checks)} rebuilt tensors are bit-exact, the rest are compared within {FEATURES_ATOL:g}")
    failed = sum(not c.passed for c in checks)
    _say(f"{len(checks) - failed}/{len(checks)} conformance streams pass")
    if failed:
        raise typer.Exit(1)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free one, shown at start)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Ladder .safetensors file for every record."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most records decoded together."),
    max_wait_ms: float = typer.Option(
        5.0, "--max-wait-ms", min=0.0, help="How long a record waits for others to batch with."
    ),
    max_body: int = typer.Option(1 << 20, "--max-body", min=1, help="Largest request body in bytes (else 413)."),
    backbone_weights: Optional[Path] = BACKBONE_WEIGHTS_OPTION,
    random_init: bool = RANDOM_INIT_OPTION,
) -> None:
    """Serve decode over HTTP: POST a stream to /v1/decode (needs the 'serve' extra; docs/serve.md)."""
    model_source = _backbone_source(backbone_weights, random_init)
    from .serve import run_server  # imports uvicorn and starlette, or says how to install them

    run_server(host, port, weights=weights, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body=max_body,
               **model_source)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _interrupt_on_sigterm() -> None:
    """Let SIGTERM unwind like Ctrl-C, so temp files are removed and no partial output stays."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


_ARGV: list[str] = []  # the arguments of the running command, for `train --nproc` to pass on to torchrun


def _without_option(args: list[str], option: str) -> list[str]:
    """``args`` without ``option VALUE`` / ``option=VALUE``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point: run the app, turning every error into one line on stderr."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*")
    reuse_freed_memory()
    args = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = args
    debug = "--debug" in args
    if argv is None:  # a real process, not a caller embedding the CLI
        _interrupt_on_sigterm()
    try:
        result = app(args=args, prog_name="featcodec", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        if code == 130:  # typer >= 0.2x turns KeyboardInterrupt (Ctrl-C, SIGTERM) into a silent exit 130
            print("featcodec: interrupted", file=sys.stderr)
        return code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("featcodec: interrupted", file=sys.stderr)
        return 130
    except TyperException as exc:  # bad usage: unknown option, missing or invalid parameter
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "featcodec"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if not message.strip():  # bare 'featcodec': the help was already shown
            return getattr(exc, "exit_code", 2) or 2
        print(f"featcodec: error: {_one_line(Exception(message))} (try '{where} --help')", file=sys.stderr)
        return getattr(exc, "exit_code", 2) or 2
    except FeatcodecError as exc:
        if debug:
            raise
        # Under torchrun every rank checks the same inputs and hits the same error: rank 0 reports it.
        if os.environ.get("RANK", "0") == "0":
            print(f"featcodec: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 1
    except Exception as exc:  # noqa: BLE001  the last line of defence: one line, exit 1
        if debug:
            raise
        print(f"featcodec: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


def run() -> None:
    """Entry point used by ``python -m featcodec``."""
    sys.exit(main())
