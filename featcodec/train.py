"""Training a rate ladder: one BU per lambda, backbone frozen, loss = bits/image + lambda * D.

The head runs once per augmented view and the split tensors (plus teacher
logits for distillation) are cached on disk, so training the BUs costs only
the BU (and, for ``kd``, the frozen tail). Checkpoints are written atomically
every few hundred steps; ``resume=True`` continues from the last one and
reaches the weights of an uninterrupted run up to float rounding (about 1e-8),
because every batch is drawn from a generator seeded by (seed, rung, step).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from . import distributed
from .backbones import SplitModel, get_backbone, load_split_model
from .bottleneck import BottleneckConfig, bits_per_image, make_unit  # noqa: F401 (bits_per_image: public)
from .errors import FeatcodecError
from .feature_cache import CACHE_FORMAT, FeatureCache, ViewDataset, build_cache, finish_cache, head_outputs
from .fileio import atomic_write_bytes
from .ladder import Ladder, load_ladder, save_ladder

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
DISTORTIONS = ("mse", "kd", "mse+kd")


class TrainError(FeatcodecError):
    """Bad training input: data folder, lambdas, distortion."""


@dataclass
class TrainConfig:
    """Everything that determines a training run's result."""

    backbone: str
    split: str
    lambdas: list[float]
    distortion: str = "mse"
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    aux_learning_rate: float = 1e-3
    views: int = 4  # augmented views per image in the feature cache
    mixup: float = 0.0  # Beta(a, a) mixup of views 2..N with another image's view (0: off)
    feature_mixup: float = 0.0  # Beta(a, a) blend of each step's split tensors with the batch's others, new every step (0: off)
    seed: int = 0
    checkpoint_every: int = 250
    kd_temperature: float = 1.0
    kd_weight: float = 1.0  # weight of the kd term relative to mse in "mse+kd"
    penultimate_weight: float = 0.0  # adds this times the MSE of the tail's penultimate features (0: off)
    warm_start: bool = False  # start rung k from rung k-1's weights instead of from scratch
    pretrain_steps: int = 0  # mse-only steps that initialise the rungs (cheap; helps kd converge)
    pretrain_lambda: float = 1000.0
    rounded_decoder_input: bool = False  # g_s trains on the rounded latent (straight-through), as it decodes
    decoder_only: bool = False  # train only g_s and the refiner, on the coded latent; payloads unchanged
    variable_rate: bool = False  # one gain-unit BU for every rate: each step draws a rate and its lambda

    def units(self) -> int:
        """How many BUs the run trains: one per lambda, or one variable-rate BU."""
        return 1 if self.variable_rate else len(self.lambdas)

    def rate_and_lambda(self, generator: torch.Generator) -> tuple[float, float]:
        """A variable-rate step's rate, uniform over 0..len(lambdas)-1, and its lambda: the anchors'
        lambdas interpolated log-linearly (rate k gives lambdas[k] exactly)."""
        top = len(self.lambdas) - 1
        rate = float(torch.rand((), generator=generator, dtype=torch.float64)) * top
        low = min(int(rate), top - 1)
        weight = rate - low
        return rate, math.exp((1 - weight) * math.log(self.lambdas[low]) + weight * math.log(self.lambdas[low + 1]))

    def validate(self) -> None:
        """Raise TrainError on values that cannot train."""
        if not self.lambdas:
            raise TrainError("give at least one lambda")
        if any(not (lam > 0 and math.isfinite(lam)) for lam in self.lambdas):
            raise TrainError(f"every lambda must be a positive number, got {self.lambdas}")
        if self.distortion not in DISTORTIONS:
            raise TrainError(f"unknown distortion '{self.distortion}' (choose from {', '.join(DISTORTIONS)})")
        if self.steps < 1 or self.batch_size < 1 or self.views < 1:
            raise TrainError("steps, batch size and views must be positive")
        if not (self.mixup >= 0 and math.isfinite(self.mixup)):
            raise TrainError(f"mixup must be a non-negative number, got {self.mixup}")
        if not (self.feature_mixup >= 0 and math.isfinite(self.feature_mixup)):
            raise TrainError(f"feature mixup must be a non-negative number, got {self.feature_mixup}")
        if not (self.penultimate_weight >= 0 and math.isfinite(self.penultimate_weight)):
            raise TrainError(f"the penultimate weight must be a non-negative number, got {self.penultimate_weight}")
        if self.variable_rate and len(self.lambdas) < 2:
            raise TrainError("a variable-rate BU needs at least two lambdas: those of its lowest and highest rate")
        if self.variable_rate and self.decoder_only:
            raise TrainError("--decoder-only trains rungs of a ladder, not a variable-rate BU")


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root``, recursively, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise TrainError(f"data folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise TrainError(f"no images found under {root}")
    return files


def readable_images(files: list[Path]) -> list[Path]:
    """The files whose image header PIL can read (a training folder's other files are skipped)."""
    from PIL import Image, UnidentifiedImageError

    readable = []
    for path in files:
        try:
            with Image.open(path):
                readable.append(path)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
            continue
    if not readable:
        raise TrainError("none of the data folder's images could be read")
    return readable


def build_feature_cache(
    model: SplitModel,
    backbone: str,
    files: list[Path],
    views: int,
    seed: int,
    with_logits: bool,
    batch_size: int = 32,
    device: str = "cpu",
    mixup: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The cache in memory, ``{"features", "logits"?}`` in fp16: the same views, in the same order,
    as the sharded cache on disk (:mod:`featcodec.feature_cache`) holds; for small runs and tests."""
    dataset = ViewDataset(readable_images(files), backbone, views, seed, mixup)
    features, logits = [], []
    for x in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        batch_features, batch_logits = head_outputs(model, x.to(device), with_logits)
        features.append(batch_features)
        if with_logits:
            logits.append(batch_logits)
    return {"features": torch.cat(features), **({"logits": torch.cat(logits)} if with_logits else {})}


def cache_key(config: TrainConfig, files: list[Path], with_logits: bool) -> str:
    """A hash naming the cache: its format, backbone, split, views, mixup, seed, teacher logits and the images.

    Images count by their path below the data folder and their bytes, so a copy of the folder
    elsewhere (or with new mtimes) finds the same cache, and an edited image builds a new one.
    """
    digest = hashlib.sha256()
    settings = [config.backbone, config.split, config.views, config.seed, with_logits, CACHE_FORMAT]
    if config.mixup:
        settings.append(config.mixup)
    digest.update(json.dumps(settings).encode())
    root = Path(os.path.commonpath([str(path.parent) for path in files]))
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.blake2b(path.read_bytes(), digest_size=16).digest())
    return digest.hexdigest()[:16]


def cache_dir_for(config: TrainConfig, files: list[Path], cache_dir: str | Path, with_logits: bool) -> Path:
    """The folder of this run's feature cache (settings and images) in ``cache_dir``."""
    return Path(cache_dir) / f"{config.backbone}-{config.split}-{cache_key(config, files, with_logits)}"


def load_or_build_cache(
    config: TrainConfig, model: SplitModel, files: list[Path], cache_dir: Path, device: str, progress=None,
    context: distributed.Context | None = None,
) -> FeatureCache:
    """This run's feature cache, built once into ``cache_dir`` (each process builds its share of the
    shards), then memory-mapped."""
    with_logits = config.distortion != "mse"
    directory = cache_dir_for(config, files, cache_dir, with_logits)
    if not (directory / "index.json").is_file():
        dataset = ViewDataset(readable_images(files), config.backbone, config.views, config.seed, config.mixup)
        rank, world = (context.rank, context.world_size) if context is not None else (0, 1)
        build_cache(model, dataset, directory, with_logits, device=device, progress=progress, rank=rank,
                    world_size=world)
        if context is not None:
            context.barrier()
        if rank == 0:
            finish_cache(directory, len(dataset), with_logits)
        if context is not None:
            context.barrier()
    return FeatureCache(directory)


def tail_outputs(tail: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail's logits for ``x`` and its penultimate features: the input of its last linear layer
    (the pooled features the classifier sees)."""
    linears = [module for module in tail.modules() if isinstance(module, torch.nn.Linear)]
    if not linears:
        raise TrainError("the penultimate-feature term needs a tail that ends in a linear classifier")
    last, captured = linears[-1], []
    handle = last.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        logits = tail(x)
    finally:
        handle.remove()
    return logits, captured[-1]


@torch.no_grad()
def penultimate_targets(tail: torch.nn.Module, chunks: Iterable[torch.Tensor], device: str = "cpu") -> torch.Tensor:
    """The tail's penultimate features of every cached split tensor, given in ``chunks`` (on ``device``),
    computed once per run: the penultimate term's targets, so that a training step needs no second
    pass through the tail."""
    return torch.cat([tail_outputs(tail, chunk.to(device).float())[1] for chunk in chunks])


@torch.no_grad()
def blend_batch(x: torch.Tensor, alpha: float, generator: torch.Generator, tail: torch.nn.Module | None,
                with_penultimate: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Feature mixup: each split tensor blended with another of the batch, weight ~ Beta(alpha, alpha)
    drawn from ``generator``, so every step sees inputs no step saw before. Returns the blend, and the
    tail's logits and (``with_penultimate``) penultimate features of it as the new targets (None
    without a tail)."""
    count = x.shape[0]
    partner = torch.randperm(count, generator=generator).to(x.device)
    with torch.random.fork_rng(devices=[]):  # Beta drawn from the step's generator, not the global state
        torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
        weight = torch.distributions.Beta(float(alpha), float(alpha)).sample((count,))
    weight = weight.to(x.dtype).to(x.device).view(count, *([1] * (x.dim() - 1)))
    blended = weight * x + (1 - weight) * x[partner]
    if tail is None:
        return blended, None, None
    logits, penultimate = tail_outputs(tail, blended) if with_penultimate else (tail(blended), None)
    return blended, logits, penultimate


def distortion(
    kind: str,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    tail: torch.nn.Module | None,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    penultimate_weight: float = 0.0,
    penultimate_target: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The distortion terms: ``mse`` of the split tensor and/or ``kd`` through the frozen tail, plus,
    with ``penultimate_weight``, the MSE of the tail's penultimate features against ``x``'s
    (``penultimate_target`` when given, as :func:`penultimate_targets` computes them)."""
    terms = {}
    if "mse" in kind:
        terms["mse"] = F.mse_loss(x_hat, x)
    if penultimate_weight:
        student_logits, student_features = tail_outputs(tail, x_hat)
    elif "kd" in kind:
        student_logits = tail(x_hat)
    if "kd" in kind:
        student = student_logits / temperature
        teacher = teacher_logits / temperature
        terms["kd"] = kd_weight * F.kl_div(
            F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean"
        ) * temperature**2
    if penultimate_weight:
        if penultimate_target is None:
            with torch.no_grad():
                penultimate_target = tail_outputs(tail, x)[1]
        terms["penultimate"] = penultimate_weight * F.mse_loss(student_features, penultimate_target)
    terms["total"] = sum(terms.values())
    return terms


def _optimizers(unit: torch.nn.Module, config: TrainConfig):
    """Adam for the BU, and a separate Adam for the entropy model's quantiles (None if it has none).

    With ``config.decoder_only``, Adam for the decoder-side modules only and no aux optimizer: the
    encoder and the entropy models (frozen by :func:`set_training_mode`) and so the coding tables
    stay as they were."""
    if config.decoder_only:
        return torch.optim.Adam([p for p in unit.parameters() if p.requires_grad], lr=config.learning_rate), None
    main = [p for n, p in unit.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in unit.named_parameters() if n.endswith(".quantiles")]
    aux_opt = torch.optim.Adam(aux, lr=config.aux_learning_rate) if aux else None
    return torch.optim.Adam(main, lr=config.learning_rate), aux_opt


def set_training_mode(unit: torch.nn.Module, decoder_only: bool) -> None:
    """Put ``unit`` in training mode; with ``decoder_only``, only its decoder-side modules, and every
    other parameter frozen (no gradient, and normalisation statistics kept)."""
    if not decoder_only:
        unit.train()
        return
    unit.eval()
    trained = set()
    for module in unit.decoder_side_modules():
        module.train()
        trained.update(id(p) for p in module.parameters())
    for parameter in unit.parameters():
        parameter.requires_grad_(id(parameter) in trained)


def check_decoder_only(config: TrainConfig, init_from) -> None:
    """TrainError when a decoder-only run has no ladder to start from."""
    if config.decoder_only and init_from is None:
        raise TrainError("--decoder-only trains the decoder of an existing ladder: give --init-from")


def _learning_rate(config: TrainConfig, step: int) -> float:
    """Cosine decay to 5% of the initial rate."""
    progress = step / max(1, config.steps)
    return config.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train_step(unit, opt, aux_opt, x, teacher, lam, lr, kind, tail, config, forward=None,
                context: distributed.Context | None = None, penultimate_target=None,
                rate: float | None = None) -> dict[str, float]:
    """One optimisation step of loss = bits/image + lam * D, then one aux (quantile) step.

    ``forward`` is the module to run (``unit`` in DistributedDataParallel when distributed);
    ``rate`` is the step's rate for a variable-rate BU (None for a fixed-rate one).
    """
    for group in opt.param_groups:
        group["lr"] = lr
    at_rate = {} if rate is None else {"rate": rate}
    output = (forward or unit)(x, rounded_decoder_input=config.rounded_decoder_input or config.decoder_only, **at_rate)
    bits = output["bits"]
    terms = distortion(kind, x, output["x_hat"], teacher, tail, config.kd_temperature, config.kd_weight,
                       config.penultimate_weight, penultimate_target)
    loss = bits + lam * terms["total"]
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unit.parameters(), 1.0)
    opt.step()
    if aux_opt is not None:
        aux_loss = unit.aux_loss()
        aux_opt.zero_grad()
        aux_loss.backward()
        if context is not None:
            context.average_gradients(p for group in aux_opt.param_groups for p in group["params"])
        aux_opt.step()
    return {"loss": loss.item(), "bits": bits.item(), **{k: v.item() for k, v in terms.items()}}


def _pretrain(bu_config, cache: FeatureCache, config: TrainConfig, device: str, reporter,
              context: distributed.Context) -> dict[str, torch.Tensor]:
    """Deterministic mse-only training that gives every rung a sensible starting point."""
    torch.manual_seed(config.seed - 1)
    unit = make_unit(bu_config).to(device).train()
    forward = distributed.wrap(unit, context, device)
    opt, aux_opt = _optimizers(unit, config)
    for step in range(config.pretrain_steps):
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 - 1 - step)
        index = context.shard(torch.randint(len(cache), (config.batch_size,), generator=generator))
        x = cache.features(index).to(device).float()
        lr = config.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / config.pretrain_steps)))
        stats = _train_step(unit, opt, aux_opt, x, None, config.pretrain_lambda, lr, "mse", None, config,
                            forward, context)
        if reporter:
            reporter({"phase": "train", "rung": "pre", "step": step + 1, "steps": config.pretrain_steps, **stats})
    return {k: v.detach().cpu().clone() for k, v in unit.state_dict().items()}


def initial_ladder(source, backbone: str, split: str, bu_config: BottleneckConfig, rungs: int) -> Ladder | None:
    """The ladder that ``--init-from`` names (a path, or the ladder already loaded; None for none),
    checked against this run; TrainError if it cannot start it."""
    if source is None:
        return None
    ladder = source if isinstance(source, Ladder) else load_ladder(source)
    path = ladder.path or source
    if (ladder.backbone, ladder.split) != (backbone, split):
        raise TrainError(f"--init-from {path} is a {ladder.backbone}/{ladder.split} ladder, not {backbone}/{split}")
    if ladder.is_mixed():
        raise TrainError(f"--init-from {path}: its rungs have different BU configs; start from a ladder with one "
                         f"(scripts/join_ladders.py PATH:RUNGS -o OUT picks rungs)")
    if ladder.config != bu_config and not _adds_refine_blocks(ladder.config, bu_config):
        raise TrainError(f"--init-from {path} has BU config {ladder.config.to_dict()}, this run {bu_config.to_dict()}")
    if len(ladder.rungs) != rungs:
        raise TrainError(f"--init-from {path} has {len(ladder.rungs)} rungs, --lambdas gives {rungs}")
    return ladder


def start_config(ladder: Ladder, entropy: str | None = None, refine_blocks: int | None = None) -> BottleneckConfig:
    """The BU config of a run from ``ladder`` (``--init-from``): the ladder's, with ``entropy`` and
    ``refine_blocks`` in place of its own where given (:func:`initial_ladder` checks the result)."""
    from dataclasses import replace

    config = ladder.config
    if entropy:
        config = replace(config, entropy=entropy)
    if refine_blocks is not None:
        config = replace(config, refine_blocks=refine_blocks)
    return config


def _adds_refine_blocks(start: BottleneckConfig, target: BottleneckConfig) -> bool:
    """True when ``target`` is ``start`` with more refiner blocks (new blocks start as identities)."""
    from dataclasses import replace

    return target.refine_blocks > start.refine_blocks and replace(start, refine_blocks=target.refine_blocks) == target


def load_initial_state(unit: torch.nn.Module, start: torch.nn.Module) -> None:
    """Load rung ``start``'s weights into ``unit``; refiner blocks that ``start`` lacks keep their
    identity initialisation."""
    missing, unexpected = unit.load_state_dict(start.state_dict(), strict=False)
    if unexpected or any(not key.startswith("g_r.") for key in missing):
        raise TrainError(f"--init-from rung does not fit this BU: missing {missing}, unexpected {unexpected}")


def _decoder_only_info(config: TrainConfig, start: dict) -> dict:
    """A decoder-only rung's record: the start rung's (its lambda and distortion set the rate, which
    this run keeps), less its measured figures, plus this run's decoder steps and distortion."""
    info = {k: v for k, v in start.items() if k not in ("bytes_per_image", "top1", "training")}
    info["steps"] = start.get("steps", 0) + config.steps
    info["decoder_only_steps"] = start.get("decoder_only_steps", 0) + config.steps
    info["decoder_distortion"] = config.distortion
    if config.distortion == "mse+kd":
        info["decoder_kd_weight"] = config.kd_weight
    if config.penultimate_weight:
        info["decoder_penultimate_weight"] = config.penultimate_weight
    info["decoder_input"] = "rounded"
    return info


def _loss_info(config: TrainConfig) -> dict:
    """The loss settings a BU's record names beside its distortion, each only when it is in use."""
    return {
        **({"kd_weight": config.kd_weight} if "kd" in config.distortion else {}),
        **({"penultimate_weight": config.penultimate_weight} if config.penultimate_weight else {}),
        **({"decoder_input": "rounded"} if config.rounded_decoder_input else {}),
        **({"feature_mixup": config.feature_mixup} if config.feature_mixup else {}),
    }


def _variable_rate_info(config: TrainConfig, initial: Ladder | None) -> dict:
    """The record of a variable-rate BU: its anchors' lambdas and how it trained."""
    return {
        "lambdas": list(config.lambdas),
        "steps": config.steps + (initial.rung_info[0].get("steps", 0) if initial else 0),
        "distortion": config.distortion,
        **_loss_info(config),
    }


def _flatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    out = {}
    if optimizer is None:
        return out
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{prefix}.{index}.{name}"] = torch.as_tensor(value).clone()
    return out


def _restore_optimizer(prefix: str, optimizer: torch.optim.Optimizer | None, tensors: dict[str, torch.Tensor]) -> None:
    if optimizer is None:
        return
    state = optimizer.state_dict()
    restored: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            restored.setdefault(int(index), {})[name] = value
    state["state"] = restored
    optimizer.load_state_dict(state)


def checkpoint_path(out: Path) -> Path:
    """Where the checkpoint of a run writing ``out`` lives."""
    return out.with_name(out.name + ".ckpt.safetensors")


def _save_checkpoint(path: Path, config: TrainConfig, finished: list[torch.nn.Module], rung: int, step: int,
                     unit=None, opt=None, aux_opt=None) -> None:
    """Finished rungs, plus the rung in progress (weights, optimizers, RNG) when step > 0."""
    from safetensors.torch import save

    tensors = {}
    for index, done in enumerate(finished):
        tensors.update({f"done{index}.{k}": v for k, v in done.state_dict().items()})
    if unit is not None:
        tensors.update({f"current.{k}": v for k, v in unit.state_dict().items()})
        tensors.update(_flatten_optimizer("opt", opt))
        tensors.update(_flatten_optimizer("aux", aux_opt))
        tensors["rng"] = torch.get_rng_state()
    meta = {"rung": rung, "step": step, "config": json.dumps(config.__dict__, sort_keys=True)}
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata={k: str(v) for k, v in meta.items()}))


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        )
        return result.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def train_ladder(
    config: TrainConfig,
    data: str | Path,
    out: str | Path,
    bu_config: BottleneckConfig | None = None,
    *,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    backbone_weights: str | None = None,
    random_init: bool = False,
    reporter: Callable[[dict], None] | None = None,
    files: list[Path] | None = None,
    init_from: str | Path | Ladder | None = None,
    record: dict | None = None,
) -> Ladder:
    """Train one BU per lambda on the images under ``data`` and write the ladder to ``out``.

    ``record`` adds to the training record in the file's metadata (a recipe's name and data, say).

    ``files`` may pass :func:`list_images` of ``data`` when the caller already listed it.
    ``init_from`` names (or is) a ladder whose rung k starts rung k here (to train a ladder further,
    or fine-tune it on other data); it must have the same backbone, split, BU config and rung count.

    Under torchrun (WORLD_SIZE > 1) the BUs train with DistributedDataParallel, see
    :mod:`featcodec.distributed`; only rank 0 reports progress and writes files.
    """
    config.validate()
    check_decoder_only(config, init_from)
    spec = get_backbone(config.backbone)
    point = spec.split(config.split)
    files = files or list_images(data)
    out = Path(out)
    started = time.time()
    context, device = distributed.setup(device)
    try:
        return _train(config, data, out, bu_config, spec, point, files, started, context, resume=resume,
                      cache_dir=cache_dir, device=device, backbone_weights=backbone_weights,
                      random_init=random_init, reporter=reporter if context.is_main else None, init_from=init_from,
                      record=record)
    finally:
        context.close()


def _train(config, data, out, bu_config, spec, point, files, started, context, *, resume, cache_dir, device,
           backbone_weights, random_init, reporter, init_from, record) -> Ladder:
    from safetensors.torch import load_file

    if config.batch_size % context.world_size:
        raise TrainError(f"--batch-size {config.batch_size} must be a multiple of the {context.world_size} processes")
    model = load_split_model(spec.name, point.name, backbone_weights, random_init).to(device)

    cache = load_or_build_cache(  # every process builds its share of the shards, then all map the whole
        config, model, files, Path(cache_dir or out.parent / ".featcodec-cache"), device,
        progress=(lambda done, total: reporter({"phase": "cache", "done": done, "total": total})) if reporter else None,
        context=context,
    )
    channels, height, width = cache.shape

    def batch(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of split tensors and teacher logits on the training device, gathered from the cache."""
        x = cache.features(index).to(device).float()
        return x, cache.logits(index).to(device).float() if cache.has_logits else None
    if init_from is not None and not isinstance(init_from, Ladder):
        init_from = load_ladder(init_from)  # read once
    if bu_config is None and init_from is not None:
        bu_config = init_from.config
    if bu_config is None:
        variable = {"entropy": "hyperprior", "rates": len(config.lambdas)} if config.variable_rate else {}
        bu_config = BottleneckConfig(in_channels=channels, out_size=(height, width), **variable)
    if config.variable_rate != bool(bu_config.rates) or (bu_config.rates and bu_config.rates != len(config.lambdas)):
        raise TrainError(f"a variable-rate run trains a BU with one rate per lambda ({len(config.lambdas)}), "
                         f"a ladder run BUs of one rate; this BU has rates={bu_config.rates}")
    if (bu_config.in_channels, *bu_config.out_size) != (channels, height, width):
        raise TrainError(f"BU config {bu_config} does not fit split tensors of shape {(channels, height, width)}")

    initial = initial_ladder(init_from, spec.name, point.name, bu_config, config.units())
    finished: list[torch.nn.Module] = []
    first_rung, first_step, resumed = 0, 0, None
    ckpt = checkpoint_path(out)
    if resume and ckpt.is_file():
        resumed = load_file(str(ckpt))
        from safetensors import safe_open

        with safe_open(str(ckpt), framework="pt") as handle:
            meta = handle.metadata()
        if json.loads(meta["config"]) != json.loads(json.dumps(config.__dict__, sort_keys=True)):
            raise TrainError(f"checkpoint {ckpt} was made with other settings; delete it or match them")
        first_rung, first_step = int(meta["rung"]), int(meta["step"])
        for index in range(first_rung):
            unit = make_unit(bu_config)
            unit.load_state_dict({k.split(".", 1)[1]: v for k, v in resumed.items() if k.startswith(f"done{index}.")})
            finished.append(unit)

    tail = model.tail if "kd" in config.distortion or config.penultimate_weight else None
    # with feature mixup every step's targets come from its blend, so the cached tensors' are not needed
    device_penultimate = (penultimate_targets(tail, cache.chunks(256), device)
                          if config.penultimate_weight and not config.feature_mixup else None)
    init_state = None
    for rung in range(first_rung, config.units()):
        lam = config.lambdas[rung]
        if initial is None and config.pretrain_steps and init_state is None and not (config.warm_start and finished):
            init_state = _pretrain(bu_config, cache, config, device, reporter, context)
        torch.manual_seed(config.seed + 1000 * rung)
        unit = make_unit(bu_config)
        if initial is not None:
            load_initial_state(unit, initial.rungs[rung])
        elif config.warm_start and finished:
            unit.load_state_dict(finished[-1].state_dict())
        elif init_state is not None:
            unit.load_state_dict(init_state)
        unit = unit.to(device)
        set_training_mode(unit, config.decoder_only)  # before DDP, which registers the trained parameters
        forward = distributed.wrap(unit, context, device)
        opt, aux_opt = _optimizers(unit, config)
        step = 0
        if resumed is not None and rung == first_rung and first_step > 0:
            unit.load_state_dict({k.split(".", 1)[1]: v for k, v in resumed.items() if k.startswith("current.")})
            _restore_optimizer("opt", opt, resumed)
            _restore_optimizer("aux", aux_opt, resumed)
            torch.set_rng_state(resumed["rng"])
            step = first_step
        while step < config.steps:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rung * 100_003 + step)
            index = context.shard(torch.randint(len(cache), (config.batch_size,), generator=generator))
            x, teacher = batch(index)
            target = device_penultimate[index.to(device)] if device_penultimate is not None else None
            kind = config.distortion
            rate = None
            if config.variable_rate:
                rate, lam = config.rate_and_lambda(generator)
            if config.feature_mixup:
                x, blended_teacher, target = blend_batch(
                    x, config.feature_mixup, generator, tail, bool(config.penultimate_weight))
                teacher = blended_teacher if teacher is not None else None
            stats = _train_step(unit, opt, aux_opt, x, teacher, lam, _learning_rate(config, step), kind, tail, config,
                                forward, context, target, rate)
            step += 1
            if reporter:
                reporter({"phase": "train", "rung": rung, "step": step, "steps": config.steps, **stats})
            if step % config.checkpoint_every == 0 and step < config.steps and context.is_main:
                _save_checkpoint(ckpt, config, finished, rung, step, unit, opt, aux_opt)
        unit = unit.cpu().eval()
        if not config.decoder_only:  # a decoder-only run keeps the start's tables, so every stream stays
            # CDF tables, or the Huffman code from the training latents (the only kind that reads them)
            unit.build_coding_tables(cache.load_all()["features"] if bu_config.entropy == "huffman" else None)
        finished.append(unit)
        if rung + 1 < config.units() and context.is_main:
            _save_checkpoint(ckpt, config, finished, rung + 1, 0)

    elapsed = time.time() - started
    ladder = Ladder(
        backbone=spec.name,
        split=point.name,
        config=bu_config,
        rungs=finished,
        rung_info=[
            _decoder_only_info(config, initial.rung_info[k]) if config.decoder_only else
            {
                "lambda": lam,
                "steps": config.steps + (initial.rung_info[k].get("steps", 0) if initial else 0),
                "distortion": config.distortion,
                **_loss_info(config),
            }
            for k, lam in enumerate(config.lambdas)
        ] if not config.variable_rate else [_variable_rate_info(config, initial)],
        extra={
            "training": {
                "data": f"{len(files)} images under {Path(data).name}/, {config.views} augmented views each"
                + (f", mixup {config.mixup:g}" if config.mixup else ""),
                "batch_size": config.batch_size,
                "seconds": round(elapsed + (initial.extra.get("training", {}).get("seconds", 0) if initial else 0), 1),
                **({"init_from": initial.path.name} if initial and initial.path else {}),
                "device": device,
                **({"processes": context.world_size} if context.distributed else {}),
                "git_commit": _git_commit(),
                "seed": config.seed,
                **(record or {}),
            }
        },
    )
    if context.is_main:
        save_ladder(ladder, out)
        ckpt.unlink(missing_ok=True)
    context.barrier()
    return ladder
