"""ADQ training: fp32 teacher -> sensitivity -> bit allocation -> distilled QAT -> checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import models
from .allocation import allocate_bits, bits_report, layer_sensitivity, quant_error
from .checkpoint import atomic_torch_save, load_checkpoint, save_checkpoint
from .data import make_loaders
from .quant import N2UQ, QuantConfig, average_bits, quantize_model, summary

ALLOCATIONS = ("sensitivity", "no-hessian", "fixed")


@dataclass
class TrainArgs:
    """Every knob of one adq-train run; stored in the checkpoint's provenance."""

    out: str = "checkpoint.pt"
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    teacher: str | None = None
    fp32_epochs: int = 10
    qat_epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    qat_lr: float = 0.01
    weight_decay: float = 5e-4
    qat_weight_decay: float = 1e-4
    avg_bits: float = 2.81
    w_bits_choices: tuple[int, ...] = (2, 3, 4)
    w_bits: int = 3
    a_bits: int = 2
    act: str = "n2uq"
    w_init: str = "quantile"
    w_form: str = "full"
    ema: bool = True
    ema_beta: float = 0.99
    edge_bits: int | None = None
    input_bits: int | None = None
    allocation: str = "sensitivity"
    sensitivity_batches: int = 4
    hutchinson_probes: int = 8
    kd_weight: float = 1.0
    label_weight: float = 1.0
    kd_temperature: float = 4.0
    augment: bool = True
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    resume: bool = False
    progress: bool = True
    compile: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.w_bits_choices = tuple(int(b) for b in self.w_bits_choices)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation != "fixed" and not min(self.w_bits_choices) <= self.avg_bits:
            raise ValueError(
                f"--avg-bits {self.avg_bits} is below the smallest choice "
                f"{min(self.w_bits_choices)}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["w_bits_choices"] = list(self.w_bits_choices)
        return d


@dataclass
class DistInfo:
    """torch.distributed rank and world size (1 process when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, dist: DistInfo | None = None) -> torch.device:
    """'auto' -> CUDA when present (one GPU per local rank), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local)
        return torch.device("cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch and NumPy so a run is repeatable on the same machine."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation: T^2 * KL(softmax(teacher / T) || softmax(student / T))."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher / t, dim=1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    """Top-1 accuracy in percent over a loader."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was)
    return 100.0 * correct / max(total, 1)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only, not on BN, biases or quantizer parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_weight = name.endswith("weight") and p.ndim > 1
        (decay if is_weight else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, steps: int):
    """SGD (momentum 0.9, Nesterov) with a cosine schedule over `steps` optimizer steps."""
    opt = torch.optim.SGD(_param_groups(model, weight_decay), lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )
    return opt, sched


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    opt: torch.optim.Optimizer,
    sched: Any,
    device: torch.device,
    *,
    teacher: nn.Module | None = None,
    kd_weight: float = 1.0,
    label_weight: float = 1.0,
    kd_temperature: float = 4.0,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """One epoch of (distilled) training; returns the mean loss and the running train accuracy."""
    model.train()
    loss_sum = correct = total = 0.0
    # disable=None: no bar when stderr is not a terminal (CI logs)
    off = None if progress else True
    bar = tqdm(loader, desc=desc, leave=False, disable=off, dynamic_ncols=True)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = label_weight * F.cross_entropy(logits, y) if label_weight else logits.new_zeros(())
        if teacher is not None and kd_weight:
            with torch.no_grad():
                t_logits = teacher(x)
            loss = loss + kd_weight * kd_loss(logits, t_logits, kd_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        n = y.numel()
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        total += n
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{100 * correct / total:.1f}")
    return {"loss": loss_sum / max(total, 1), "train_top1": 100.0 * correct / max(total, 1)}


def allocate(
    teacher: nn.Module, loader: Iterable, args: TrainArgs, base: QuantConfig, device: torch.device
) -> tuple[dict[str, int], dict[str, Any]]:
    """Per-layer weight bits for the body layers under --avg-bits, as --allocation says."""
    if args.allocation == "fixed":
        return {}, {"allocation": "fixed", "w_bits": args.w_bits}
    batches = []
    for i, (x, y) in enumerate(loader):
        if i >= args.sensitivity_batches:
            break
        batches.append((x.to(device), y.to(device)))
    sens = layer_sensitivity(
        teacher,
        lambda logits, y: F.cross_entropy(logits, y),
        batches,
        config=base,
        candidates=args.w_bits_choices,
        probes=args.hutchinson_probes,
        seed=args.seed,
    )
    if args.allocation == "no-hessian":
        # Ablation: the same objective with every Hessian trace set to 1 (perturbation only).
        modules = dict(teacher.named_modules())
        for name, s in sens.items():
            weight = modules[name].weight.detach()
            s.omega = {
                b: quant_error(weight, b, base.w_form, base.w_init) / s.params
                for b in args.w_bits_choices
            }
            s.trace = 1.0
    bits = allocate_bits(sens, args.avg_bits, args.w_bits_choices)
    pw, lm = bits_report(bits, sens)
    info = {
        "allocation": args.allocation,
        "budget": args.avg_bits,
        "traces": {n: s.trace for n, s in sens.items()},
        "omega": {n: {str(b): v for b, v in s.omega.items()} for n, s in sens.items()},
        "bits_param_weighted": pw,
        "bits_layer_mean": lm,
    }
    return bits, info


def set_fused(model: nn.Module, fused: bool) -> None:
    """Use (or not) the torch.compile'd N2UQ backward kernel in every activation quantizer."""
    for m in model.modules():
        if isinstance(m, N2UQ):
            m.fused = fused


def _log(msg: str, dist: DistInfo) -> None:
    if dist.main:
        print(msg, file=sys.stderr, flush=True)


def _wrap_ddp(model: nn.Module, device: torch.device, dist: DistInfo) -> nn.Module:
    if dist.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _fit(
    stage: str,
    model: nn.Module,
    epochs: int,
    lr: float,
    weight_decay: float,
    loaders: tuple[Iterable, Iterable],
    device: torch.device,
    dist: DistInfo,
    args: TrainArgs,
    resume_state: dict[str, Any] | None,
    save_resume: Callable[[dict[str, Any]], None],
    teacher: nn.Module | None = None,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Train `model` for `epochs`, saving a resume point after every epoch."""
    train_loader, test_loader = loaders
    net = _wrap_ddp(model, device, dist)
    opt, sched = make_optimizer(net, lr, weight_decay, epochs * len(train_loader))
    history: list[dict[str, float]] = []
    start = 0
    if resume_state is not None and resume_state.get("stage") == stage:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        history = list(resume_state["history"])
        start = int(resume_state["epoch"])
        _log(f"[{stage}] resumed after epoch {start}", dist)
    for epoch in range(start, epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        stats = train_epoch(
            net,
            train_loader,
            opt,
            sched,
            device,
            teacher=teacher,
            kd_weight=args.kd_weight,
            label_weight=args.label_weight,
            kd_temperature=args.kd_temperature,
            desc=f"{stage} {epoch + 1}/{epochs}",
            progress=args.progress and dist.main,
        )
        stats["epoch"] = epoch + 1
        stats["seconds"] = time.perf_counter() - t0
        if dist.main:
            stats["test_top1"] = evaluate(model, test_loader, device)
        history.append(stats)
        _log(
            f"[{stage}] epoch {epoch + 1}/{epochs} loss {stats['loss']:.4f} "
            f"train {stats['train_top1']:.2f}% test {stats.get('test_top1', float('nan')):.2f}% "
            f"({stats['seconds']:.0f} s)",
            dist,
        )
        if dist.main:
            save_resume(
                {
                    "stage": stage,
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "history": history,
                    **(extra or {}),
                }
            )
    return history


def run(args: TrainArgs, command: str | None = None) -> Path:
    """The whole adq-train pipeline; returns the path of the written checkpoint."""
    device = pick_device(args.device)
    dist = setup_distributed(device)
    if dist.world_size > 1 and device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(args.seed)
    out = Path(args.out)
    teacher_path = out.with_name(out.stem + ".fp32.pt")
    resume_path = out.with_name(out.stem + ".resume.pt")
    resume_state = None
    if args.resume and resume_path.exists():
        resume_state = torch.load(resume_path, map_location=device, weights_only=True)

    def save_resume(state: dict[str, Any]) -> None:
        atomic_torch_save(state, resume_path)

    common = dict(train_limit=args.train_limit, test_limit=args.test_limit, seed=args.seed)
    train_loader, _, info = make_loaders(
        args.dataset,
        args.data_dir,
        args.batch_size,
        augment=args.augment,
        workers=args.workers,
        rank=dist.rank,
        world_size=dist.world_size,
        **common,
    )
    # Rank 0 evaluates on the whole test split, not on its shard.
    _, test_loader, _ = make_loaders(args.dataset, args.data_dir, args.batch_size, **common)
    meta = {
        "input_shape": list(info["input_shape"]),
        "mean": list(info["mean"]),
        "std": list(info["std"]),
        "class_names": list(info["class_names"]),
    }
    kwargs = {"num_classes": len(info["class_names"]), "in_channels": info["input_shape"][0]}
    kwargs.update(args.model_kwargs)

    # Stage 1: the fp32 teacher, trained here or read from a checkpoint.
    if args.teacher:
        teacher = load_checkpoint(args.teacher).model.to(device)
        fp32_history: list[dict[str, float]] = []
        _log(f"[fp32] teacher from {args.teacher}", dist)
    elif args.resume and teacher_path.exists():
        teacher = load_checkpoint(teacher_path).model.to(device)
        fp32_history = []
        _log(f"[fp32] resumed teacher {teacher_path}", dist)
    else:
        teacher = models.get(args.model, **kwargs).to(device)
        fp32_history = _fit(
            "fp32",
            teacher,
            args.fp32_epochs,
            args.lr,
            args.weight_decay,
            (train_loader, test_loader),
            device,
            dist,
            args,
            resume_state,
            save_resume,
        )
    teacher.eval()
    fp32_top1 = evaluate(teacher, test_loader, device)
    if dist.main and not args.teacher:
        save_checkpoint(
            teacher,
            teacher_path,
            metrics={"fp32_top1": fp32_top1, "history": fp32_history},
            command=command,
            train_args=args.to_dict(),
            **meta,
        )
    _log(f"[fp32] test top-1 {fp32_top1:.2f}%", dist)

    # Stage 2: bit allocation on the teacher.
    base = QuantConfig(
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        w_form=args.w_form,
        w_init=args.w_init,
        ema=args.ema,
        ema_beta=args.ema_beta,
        act=args.act,
        edge_bits=args.edge_bits,
        input_bits=args.input_bits,
    )
    if resume_state is not None and resume_state.get("stage") == "qat":
        layer_bits, alloc_info = resume_state["layer_bits"], resume_state["allocation"]
    else:
        layer_bits, alloc_info = allocate(teacher, train_loader, args, base, device)
    if dist.world_size > 1:
        # Every rank must quantize alike: rank 0's allocation wins.
        import torch.distributed as tdist

        shared = [layer_bits, alloc_info]
        tdist.broadcast_object_list(shared, src=0)
        layer_bits, alloc_info = shared
    config = base.replace(layer_bits=layer_bits)

    # Stage 3: QAT with distillation from the teacher.
    student = quantize_model(copy.deepcopy(teacher), config).to(device)
    set_fused(student, args.compile)
    _log(summary(student), dist)
    qat_history = _fit(
        "qat",
        student,
        args.qat_epochs,
        args.qat_lr,
        args.qat_weight_decay,
        (train_loader, test_loader),
        device,
        dist,
        args,
        resume_state,
        save_resume,
        teacher=teacher,
        extra={"layer_bits": layer_bits, "allocation": alloc_info},
    )
    student.eval()
    adq_top1 = evaluate(student, test_loader, device)
    avg = average_bits(student)
    metrics = {
        "fp32_top1": fp32_top1,
        "adq_top1": adq_top1,
        "test_samples": len(test_loader.dataset) if hasattr(test_loader, "dataset") else None,
        "avg_bits_param_weighted": avg.param_weighted,
        "avg_bits_layer_mean": avg.layer_mean,
        "allocation": alloc_info,
        "history": {"fp32": fp32_history, "qat": qat_history},
    }
    if dist.main:
        save_checkpoint(
            student.cpu(), out, metrics=metrics, command=command, train_args=args.to_dict(), **meta
        )
        resume_path.unlink(missing_ok=True)
        _log(
            f"wrote {out}: fp32 {fp32_top1:.2f}% -> ADQ {adq_top1:.2f}% at "
            f"{avg.param_weighted:.3f} bits (parameter-weighted), "
            f"{avg.layer_mean:.3f} (layer mean)",
            dist,
        )
        print(
            json.dumps(
                {
                    "out": str(out),
                    "fp32_top1": fp32_top1,
                    "adq_top1": adq_top1,
                    "avg_bits_param_weighted": avg.param_weighted,
                    "avg_bits_layer_mean": avg.layer_mean,
                }
            )
        )
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return out
