"""GeRSP: Generic Knowledge Boosted Remote Sensing Pre-training.

Huang, Zhang, Gong, Liu, Wang, "Generic Knowledge Boosted Pre-training for Remote Sensing Images", IEEE TGRS 2024.
A student ResNet learns from unlabeled remote-sensing images by momentum contrast against an EMA teacher (RSCL) and,
in the same step, from labeled natural images by supervised classification (NIAL); the student is the result.

    python gersp.py --data synthetic --natural synthetic --arch resnet18 --img-size 64 --batch-size 64 --queue 4096
    python gersp.py --data /data/million_aid --natural /data/imagenet/train          # one GPU
    torchrun --nproc_per_node=8 gersp.py --data /data/million_aid --natural /data/imagenet/train   # the paper's run
    python gersp.py --data /data/million_aid --alpha 0          # Table V's ablation: GeRSP's recipe without NIAL

Paper -> code
    Sec. III-A  equal numbers of RS and natural images per iteration ... NaturalPairs, WithNatural (cycles --natural)
    Sec. III-B  strong augmentation, both branches ........................ data.augmentation("gersp")
    Sec. III-C  student = ResNet + projector (FC-ReLU-FC, 128) + predictor (one FC to the natural classes);
                teacher = EMA copy of backbone + projector; shuffling BN .. Student, GeRSP.keys(), SplitBatchNorm2d
    Eq. 1  L_ce, cross-entropy of the predictor on natural images ...... nial_loss()
    Eq. 2  L_ct, InfoNCE of student queries against the teacher key and the queue ... info_nce() (float32)
    Eq. 3  L = L_ct + alpha L_ce ........................................ train_step()
    Eq. 4  W_t <- m W_t + (1 - m) W_s, m = 0.996 ........................ GeRSP.momentum_update()
    Sec. III-E  FIFO queue of 65,536 teacher keys from all processes .... GeRSP.enqueue()
    Eq. 5  cosine annealing with warm restarts every 20 epochs .......... lr_at()

Defaults: stated by the paper: ResNet-50, m = 0.996, queue 65,536, total batch 128 (RS images; as many natural ones
join each step), 100 epochs, SGD, restarts every 20 epochs, alpha = 1. Where the paper has typos or is silent, the
authors' code (floatingstarZ/GeRSP): momentum 0.9 and weight decay 5e-4 (the paper's "weight decay 0.90, momentum
0.00005" is a swap); lr 0.007 annealed to 0.001 within each cycle (its "lr_min 0.10, lr_max 0.01" cannot be right, nor
its "initial lr 0.05", commented out in the code); temperature 0.07; RS queries and natural images through the
student in ONE forward pass, so BatchNorm sees both domains (--nial-forward separate: one pass each).
Where the code differs from the paper, the paper is taken: m 0.996 (code 0.999); the teacher's projector follows the
EMA (code: never updated); Sec. III-B's augmentation (code: MoCo v1's, --aug moco_v1); a total batch of 128 (code:
32 RS + 32 natural images per GPU on 8 GPUs, --batch-size 256 --bn-group 32, for which its lr 0.007 was tuned); an
epoch is a pass over the RS data (code: over the natural set; scale --epochs and --restart-every by |natural| / |RS|,
128 and 26 for ImageNet with Million-AID). --alpha 0 is Table V's row as a recipe: GeRSP's step without NIAL, not
Table I's MoCo-MAID, which GeRSP trained as MoCo v1 (moco.py's docstring gives that command). Choices of this file:
    - The lr is stepped once per epoch, as in the official code; it is not rescaled when --batch-size changes.
    - BatchNorm statistics come from groups of --bn-group samples whatever the number of processes (16: the paper's
      128 / 8 GPUs): the key batch is shuffled over all processes, then split into those groups, so a query's and
      its key's statistics come from different random subsets (MoCo Sec. 3.3). One process keeps at least two
      groups: with one, keys would be normalised over exactly their queries' samples.
    - The momentum update runs after the optimiser step instead of before the key forward of the next step:
      the key encoder sees exactly the same weights, and the queue needs no clone for autograd.
    - Keys are constants (no gradient), so gathering them from other processes loses nothing.
    - Augmentations are seeded by (seed, epoch, image index), so a resumed run continues bit-for-bit.
    - The natural data is cycled, reshuffled every pass; with --alpha 0 it is never read, and the step is MoCo's.
Everything below the PLUMBING banner (flags every script shares, processes, the loop, checkpoints, --benchmark,
--knn-monitor) is the same text in moco.py, gersp.py, pera.py and preco.py.
"""
import copy
import itertools
import json
import math
import os
import resource
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Callable, Iterable, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler

import data
from data import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
RESUME_MUST_MATCH = ("arch", "dim", "queue", "batch_size", "data", "natural", "img_size", "seed", "alpha")


def get_args(argv=None):
    p = data.ArgumentParser(prog=SCRIPT, description="GeRSP pre-training (see the module docstring).")
    p.add_argument("--data", action="append", help="folder of unlabeled RS images (any nesting); repeat to mix "
                   "datasets; 'synthetic' = built-in generated images. Default: synthetic")
    p.add_argument("--natural", default=data.SYNTHETIC, help="labeled natural images, one folder per class "
                   "(ImageNet's train/); 'synthetic' = built-in")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of L_ce (Eq. 3); 0 = no NIAL (Table V)")
    p.add_argument("--nial-forward", choices=("joint", "separate"), default="joint", help="RS queries and natural "
                   "images through the student in one forward (BN sees both: authors' code) or in two")
    p.add_argument("--aug", choices=("gersp", "moco_v1"), default="gersp", help="augmentation of both branches: "
                   "Sec. III-B's, or MoCo v1's (the authors' code)")
    p.add_argument("--arch", choices=ARCHS, default="resnet50", help="torchvision backbone (resnet18 for CPU)")
    p.add_argument("--dim", type=int, default=128, help="feature dimension of the projector output")
    p.add_argument("--queue", type=int, default=65536, help="K, keys in the queue (a multiple of --batch-size)")
    p.add_argument("--teacher-m", type=float, default=0.996, help="EMA momentum m of the teacher (Eq. 4)")
    p.add_argument("--temperature", type=float, default=0.07, help="InfoNCE temperature (Eq. 2; authors' code)")
    p.add_argument("--bn-group", type=int, default=16, help="samples per BatchNorm group (shuffle-BN, Sec. 3.3); "
                   "one process keeps at least 2 groups, so keys never share their queries' statistics")
    p.add_argument("--epochs", type=int, default=100, help="epochs over the RS data")
    p.add_argument("--batch-size", type=int, default=128, help="TOTAL RS images per step over all processes; as "
                   "many natural images join them")
    p.add_argument("--lr", type=float, default=0.007, help="lr_max of Eq. 5 (authors' code)")
    p.add_argument("--lr-min", type=float, default=0.001, help="lr_min of Eq. 5 (authors' code)")
    p.add_argument("--restart-every", type=int, default=20, help="T_max of Eq. 5: epochs per cosine cycle")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    p.add_argument("--img-size", type=int, default=224, help="crop size of the augmented views")
    add_run_flags(p)
    args = p.parse_args(argv)
    args.data = args.data or [data.SYNTHETIC]
    return args


def check_args(args, world):
    """Every impossible setting of the method is one sentence before anything runs or is written."""
    for name in ("queue", "dim", "temperature", "bn_group", "lr_min", "restart_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if args.lr_min > args.lr:
        raise UserError(f"--lr-min {args.lr_min} is above --lr {args.lr}: Eq. 5 would anneal upwards.")
    if args.alpha < 0:
        raise UserError(f"--alpha must be 0 or more (got {args.alpha}).")
    if not 0 <= args.teacher_m < 1:
        raise UserError(f"--teacher-m must be in [0, 1) (got {args.teacher_m}).")
    if args.img_size < 32:
        raise UserError(f"--img-size {args.img_size} is too small: a ResNet downsamples by 32.")
    if args.queue % args.batch_size:
        raise UserError(f"--queue {args.queue} is not a multiple of --batch-size {args.batch_size} (the queue "
                        "takes whole batches).")
    local = args.batch_size // world
    if local > args.bn_group and local % args.bn_group:
        raise UserError(f"the per-process batch {local} is not a multiple of --bn-group {args.bn_group}.")
    if world == 1 and local % 2:
        raise UserError(f"--batch-size {local} is odd: one process splits it into at least 2 BatchNorm groups.")


# ------------------------------------------------------------------------------------------------ model
def bn_groups(local_batch, bn_group, world):
    """Sec. 3.3: BatchNorm groups per process. With several processes the key batch is shuffled across them, so one
    group is enough; one process needs at least two, or keys are normalised over exactly their queries' samples."""
    return max(local_batch // bn_group, 1 if world > 1 else 2)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from `splits` interleaved sub-batches (samples i, i+s, i+2s...),
    so one process normalises like `splits` GPUs of the official code. Same parameters and state-dict keys."""

    def __init__(self, num_features, splits=1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def forward(self, x):
        if not self.training or self.splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.splits
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        y = F.batch_norm(x.reshape(n // s, c * s, h, w), mean, var, self.weight.repeat(s), self.bias.repeat(s),
                         True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
        return y.view(n, c, h, w)


class Student(nn.Module):
    """Sec. III-C: ResNet backbone (torchvision keys, fc removed) + projector for RSCL + predictor for NIAL."""

    def __init__(self, arch, dim, bn_splits, num_classes, joint=True):
        super().__init__()
        self.backbone = torchvision.models.get_model(arch, norm_layer=partial(SplitBatchNorm2d, splits=bn_splits))
        width = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))
        self.predictor = nn.Linear(width, num_classes)  # distinct from the projector, to ease branch conflicts
        self.joint = joint

    def forward(self, rs_images, natural_images=None):
        """RSCL projections of the RS queries, and NIAL logits of the natural images (None when not given)."""
        if natural_images is None:
            return self.projector(self.backbone(rs_images)), None
        if self.joint:  # one pass: BatchNorm statistics mix both domains, as in the authors' code
            rs_features, natural_features = self.backbone(torch.cat([rs_images, natural_images])).split(
                [len(rs_images), len(natural_images)])
        else:
            rs_features, natural_features = self.backbone(rs_images), self.backbone(natural_images)
        return self.projector(rs_features), self.predictor(natural_features)


class GeRSP(nn.Module):
    """Student, EMA teacher (backbone + projector) and the FIFO queue of teacher keys (K x dim, unit vectors)."""

    def __init__(self, student, queue_size, dim, momentum, temperature):
        super().__init__()
        self.student = student
        self.teacher = nn.Sequential(OrderedDict(backbone=copy.deepcopy(student.backbone),
                                                 projector=copy.deepcopy(student.projector))).requires_grad_(False)
        self.momentum, self.temperature = momentum, temperature
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.queue_ptr = 0  # a Python int: no host-device sync to read it; saved through get_extra_state

    def get_extra_state(self):
        return {"queue_ptr": self.queue_ptr}

    def set_extra_state(self, state):
        self.queue_ptr = state["queue_ptr"]

    @torch.no_grad()
    def momentum_update(self):
        """Eq. 4: W_t <- m W_t + (1 - m) W_s over the backbone and the projector (the predictor has no twin)."""
        student = list(self.student.backbone.parameters()) + list(self.student.projector.parameters())
        torch._foreach_lerp_(list(self.teacher.parameters()), student, 1 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys):
        """Sec. III-E: the newest keys replace the oldest; K is a multiple of the global batch, so no wrap inside."""
        self.queue[self.queue_ptr:self.queue_ptr + len(keys)] = keys
        self.queue_ptr = (self.queue_ptr + len(keys)) % len(self.queue)

    @torch.no_grad()
    def keys(self, im_k):
        """Sec. III-C shuffling BN: the teacher normalises a random subset of the global RS batch, so the BN statistics
        of a query and of its key come from different subsets. Returns (local keys, all keys in global order)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        all_images = gather(im_k)
        perm = torch.randperm(len(all_images), device=im_k.device)
        if dist.is_initialized():
            dist.broadcast(perm, 0)
        b = len(im_k)
        k = F.normalize(self.teacher(all_images[perm[rank * b:(rank + 1) * b]]).float(), dim=1)
        shuffled = gather(k)
        all_keys = torch.empty_like(shuffled)
        all_keys[perm] = shuffled  # un-shuffle: all_keys[i] is the key of global sample i
        return all_keys[rank * b:(rank + 1) * b], all_keys


def info_nce(q, k, queue, temperature):
    """Eq. 2: L_ct = -log exp(s(q,k+)/T) / (exp(s(q,k+)/T) + sum_k- exp(s(q,k-)/T)); q, k, queue unit vectors.
    In float32 even under autocast: at 1/T = 14 bf16 rounding would show in the logits."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.float(), k.float()
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.float().T], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device)), logits


def nial_loss(logits, labels):
    """Eq. 1: L_ce = -sum_i y_i log softmax(z_s)_i, averaged over the natural images; also the batch accuracy."""
    return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean() * 100


# ------------------------------------------------------------------------------------------------ training
def train_step(model, student, rs_q, rs_k, natural, labels, optimizer, scaler, amp_dtype, alpha):
    """One iteration (Fig. 2): student on RS queries and natural images, teacher keys, Eq. 3, SGD, Eq. 4, enqueue.
    `natural` is None when alpha = 0: NIAL is then not computed at all. Returns (L, L_ct, L_ce, NIAL accuracy)."""
    with autocast(rs_q.device, amp_dtype):
        z_q, natural_logits = student(rs_q, natural)
        k, all_keys = model.keys(rs_k)
    loss_ct, _ = info_nce(F.normalize(z_q.float(), dim=1), k, model.queue, model.temperature)
    if natural is None:
        loss_ce = accuracy = torch.zeros((), device=rs_q.device)
    else:
        loss_ce, accuracy = nial_loss(natural_logits.float(), labels)
    loss = loss_ct + alpha * loss_ce
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.momentum_update()
    model.enqueue(all_keys)
    return torch.stack([loss, loss_ct, loss_ce, accuracy]).detach()


def lr_at(args, epoch):
    """Eq. 5: lr = lr_min + (lr_max - lr_min)(1 + cos(pi T_cur / T_max)) / 2, T_cur = epoch mod T_max (per epoch)."""
    t_cur = epoch % args.restart_every
    return args.lr_min + 0.5 * (args.lr - args.lr_min) * (1 + math.cos(math.pi * t_cur / args.restart_every))


class NaturalPairs(Sampler):
    """Sec. III-A: every RS sample of the sampler `rs` is paired with a natural one, and step s reads batch s of the
    cycled natural data (reshuffled every pass): a resumed run draws the natural images of an uninterrupted one.
    The loop sees the RS sampler's size, set_epoch() and batches_per_epoch()."""

    def __init__(self, rs, natural):
        self.rs, self.natural, self.size = rs, natural, rs.size
        self.set_epoch, self.batches_per_epoch = rs.set_epoch, rs.batches_per_epoch

    def __len__(self):
        return len(self.rs)

    def __iter__(self):
        step = self.rs.epoch * self.rs.batches_per_epoch() + self.rs.start_batch
        return zip(self.rs, self.cycled(*divmod(step, self.natural.batches_per_epoch())))

    def cycled(self, epoch, batch):
        while True:
            self.natural.set_epoch(epoch, start_batch=batch)
            yield from self.natural
            epoch, batch = epoch + 1, 0


class WithNatural(Dataset):
    """Items (RS query, RS key, natural image, its label) of the index pairs that NaturalPairs draws."""

    def __init__(self, rs, natural):
        self.rs, self.natural = rs, natural

    def __len__(self):
        return len(self.rs)

    def __getitem__(self, items):
        (rs_q, rs_k), _, rs_skipped = self.rs[items[0]]
        image, label, natural_skipped = self.natural[items[1]]
        return (rs_q, rs_k, image, label), label, rs_skipped + natural_skipped


def wire(args, ctx):
    """GeRSP on the loop below: student and teacher, SGD, RS pairs joined by natural images; a step logs L, L_ct,
    L_ce and NIAL's accuracy; the student's backbone is exported; the floor: the student's and the teacher's passes."""
    paths = data.list_images(args.data)
    data.check_readable(paths, seed=args.seed)
    local_batch = args.batch_size // ctx.world
    natural_paths, natural_labels, classes = [], [], []
    if args.alpha > 0:  # alpha = 0 never reads --natural
        natural_paths, natural_labels, classes = data.labeled_images(args.natural)
        data.check_readable(natural_paths, seed=args.seed)
        if len(natural_paths) < args.batch_size:
            raise UserError(f"--natural has {len(natural_paths)} images, fewer than one batch of {args.batch_size}.")
    student = Student(args.arch, args.dim, bn_groups(local_batch, args.bn_group, ctx.world), max(1, len(classes)),
                      joint=args.nial_forward == "joint")
    student.predictor.requires_grad_(args.alpha > 0)  # alpha = 0: NIAL is off, the predictor never changes
    model = GeRSP(student, args.queue, args.dim, args.teacher_m, args.temperature).to(ctx.device)
    ddp_student = ddp(model.student)
    optimizer = torch.optim.SGD([p for p in model.student.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.wd, fused=ctx.device.type == "cuda")
    augment = data.augmentation(args.aug, args.img_size)  # Sec. III-B: the same pipeline for both branches
    dataset = data.ImageDataset(paths, transform=data.TwoViews(augment), seed=args.seed)
    if args.alpha > 0:
        natural = data.ImageDataset(natural_paths, natural_labels, augment, seed=args.seed + 1)
        pairs = NaturalPairs(data.EpochSampler(len(dataset), args.batch_size, ctx.rank, ctx.world, args.seed),
                             data.EpochSampler(len(natural), args.batch_size, ctx.rank, ctx.world, args.seed + 1))
        loader = make_loader(WithNatural(dataset, natural), args, ctx, args.seed, sampler=pairs)
    else:
        loader = make_loader(dataset, args, ctx, args.seed)
    images_per_step = args.batch_size * (2 if args.alpha > 0 else 1)

    def schedule(step):
        return {"lr": lr_at(args, step // loader.sampler.batches_per_epoch())}

    def step(inputs, step):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)["lr"]
        rs_q, rs_k, natural, labels = inputs if len(inputs) == 4 else (*inputs, None, None)
        return train_step(model, ddp_student, rs_q, rs_k, natural, labels, optimizer, ctx.scaler, ctx.amp_dtype,
                          args.alpha)

    def synthetic():
        images = [torch.randn(local_batch, 3, args.img_size, args.img_size, device=ctx.device) for _ in range(3)]
        labels = torch.randint(max(1, len(classes)), (local_batch,), device=ctx.device)
        return [*images, labels] if args.alpha > 0 else images[:2]

    def floor(inputs):
        with autocast(ctx.device, ctx.amp_dtype):
            z, logits = model.student(inputs[0], inputs[2] if args.alpha > 0 else None)
            (z.float().sum() + (0 if logits is None else logits.float().sum())).backward()
            with torch.no_grad():
                model.teacher(inputs[1])

    natural_text = f"{len(natural_paths)} natural images in {len(classes)} classes" if args.alpha > 0 else "NIAL off"
    return Wiring(name="gersp", summary=f"{len(paths)} RS images, {natural_text}", model=model, optimizer=optimizer,
                  loader=loader, step=step, logged=("loss", "loss_ct", "loss_ce", "nial_acc"), schedule=schedule,
                  backbone=model.student.backbone, images_per_step=images_per_step, synthetic=synthetic, floor=floor)


# =================================================================================================================
# PLUMBING: from here to the end the text is the same in moco.py, gersp.py, pera.py and preco.py (a test holds them
# equal: a fix lands in all four). The method above meets it in wire(); below are the shared flags, processes, the
# loop (log, ETA, NaN, unreadable images, kNN monitor), checkpoints and exact resume, signals, --benchmark, main.
# =================================================================================================================
SCRIPT = os.path.basename(__file__)
METHOD = SCRIPT.removesuffix(".py")  # "method" in checkpoints and backbone.pth


@dataclass
class Wiring:
    """What a method's wire() hands to the loop."""
    name: str  # the run's name in the progress line and the benchmark report
    summary: str  # what it trains on, for the start line
    model: nn.Module  # its state_dict is the checkpoint's "model": every network, queue, centre
    optimizer: torch.optim.Optimizer
    loader: Iterable  # (inputs, labels, unreadable files skipped) batches; loader.sampler is a data.EpochSampler
    step: Callable  # step(inputs, step) -> 1-D tensor of the `logged` values, loss first; no host-device sync
    logged: tuple  # the names of those values in log.jsonl
    schedule: Callable  # schedule(step) -> {name: value}, logged beside them
    backbone: nn.Module  # exported as backbone.pth (torchvision's keys) and probed by --knn-monitor
    images_per_step: int  # for images/s
    synthetic: Callable  # --benchmark: synthetic() -> the inputs of one step, made on the device
    floor: Callable  # --benchmark: floor(inputs) runs the backbone passes of a step and nothing else
    config: dict = field(default_factory=dict)  # what data.build_model needs besides the arch (a ViT's sizes)
    finish: Optional[Callable] = None  # rank 0, after the last step (--vis); returns a line to print


class Context(NamedTuple):
    """This process: its rank among `world` processes, its device, the autocast dtype (None: off) and the scaler."""
    rank: int
    world: int
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    scaler: torch.amp.GradScaler


def add_run_flags(p):
    """The flags every pre-training script shares (../shared/CONVENTIONS.md), after the method's own."""
    p.add_argument("--workers", type=int, help="data-loading processes per process (default: CPUs / processes, "
                   "at most 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (offset by rank for the training randomness)")
    p.add_argument("--out", default=f"runs/{METHOD}", help="output folder; a checkpoint there is resumed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke runs, curves)")
    p.add_argument("--log-every", type=int, default=20, help="log and progress line every N steps")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="autocast: auto = bf16 "
                   "on CUDA, off on CPU")
    p.add_argument("--knn-monitor", metavar="DIR", help="class-per-folder images (e.g. EuroSAT, or 'synthetic'): "
                   "rank 0 logs knn_top1, a weighted kNN (k 20, cosine, T 0.07) on the backbone's frozen features")
    p.add_argument("--knn-every", type=int, default=1, help="epochs between kNN measurements (and at the start "
                   "and the end)")
    p.add_argument("--benchmark", type=int, metavar="N", help="time N steps on synthetic tensors, the compute floor "
                   "and N steps with the real loader; print one JSON line and exit (nothing is written)")


def check_run_args(args, world):
    """The shared flags, one sentence each, before anything runs; check_args() above checks the method's."""
    for name in ("epochs", "batch_size", "lr", "img_size", "log_every", "max_steps", "benchmark", "knn_every"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes.")
    data.check_out_dir(args.out)
    if args.knn_monitor:
        data.labeled_images(args.knn_monitor)  # on every process: a bad folder stops them all


# ------------------------------------------------------------------------------------------------ processes
def setup(args):
    """nanoGPT-style: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (one process without them). Every check and the
    checkpoint to resume come before the process group (NCCL on CUDA, gloo on CPU) and before any file is written."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    check_run_args(args, world)
    check_args(args, world)
    ckpt = None if args.benchmark else load_checkpoint(args)
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1:  # a timeout, so that one failed process does not leave the others waiting forever
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    amp_dtype = {"auto": torch.bfloat16 if cuda else None, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "off": None}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Context(rank, world, device, amp_dtype, scaler), ckpt


def autocast(device, amp_dtype):
    """bf16 / fp16 autocast on `device`, or none (amp_dtype None)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def ddp(module, **kwargs):
    """`module` wrapped for data parallelism when several processes run, else itself."""
    return DDP(module, **kwargs) if dist.is_initialized() else module


class Gather(torch.autograd.Function):
    """all_gather; backward: each process gets the sum over processes of its slice's gradient."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's loss sends gradient to every process's features
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(x):
    """`x` of every process along dim 0 in rank order; differentiable, so DDP's average of the gradients equals one
    process's gradient on the whole batch. Identity on one process."""
    return Gather.apply(x) if dist.is_initialized() else x


def make_loader(dataset, args, ctx, seed, sampler=None):
    """Batches of this process's share of each global batch (by default data.EpochSampler's: a permutation per
    epoch, the last incomplete batch dropped)."""
    sampler = sampler or data.EpochSampler(len(dataset), args.batch_size, ctx.rank, ctx.world, seed)
    workers = args.workers if args.workers is not None else min(
        8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return DataLoader(dataset, batch_size=args.batch_size // ctx.world, sampler=sampler, num_workers=workers,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=quiet_worker,
                      generator=torch.Generator().manual_seed(seed))  # leaves the global RNG to the model


def quiet_worker(worker_id):
    """Data workers ignore SIGTERM / Ctrl-C sent to the whole process group (schedulers, a terminal), so the main
    process can finish its step and save a checkpoint before it shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def to_device(batch, device):
    """A tensor, or lists and tuples of them, on `device` (copied asynchronously from pinned memory)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(x, device) for x in batch)


# ------------------------------------------------------------------------------------------------ checkpoints
def load_checkpoint(args):
    """The checkpoint under --out, or None. weights_only=True: it can hold tensors and plain values, never code."""
    path = os.path.join(args.out, "checkpoint.pth")
    if not os.path.exists(path):
        return None
    ckpt = data.load_weights_only(path, fix="move it away to start afresh")
    if not isinstance(ckpt, dict) or ckpt.get("method") != METHOD:
        raise UserError(f"{path} is not a {SCRIPT} checkpoint; use another --out.")
    changed = [k for k in RESUME_MUST_MATCH if ckpt["args"].get(k) != vars(args)[k]]
    if changed:
        raise UserError(f"{path} was written with other --{', --'.join(changed).replace('_', '-')}; use the same "
                        "values to resume, or another --out.")
    return ckpt


def restore(run, ckpt, ctx):
    """The checkpoint's state in the wired run; each process continues its own random stream (same world size)."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    ctx.scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == ctx.world:
        torch.set_rng_state(ckpt["rng"][ctx.rank]["cpu"])
        if "cuda" in ckpt["rng"][ctx.rank] and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"][ctx.rank]["cuda"], ctx.device)
    return ckpt["step"]


def save(run, args, ctx, step, epoch):
    """checkpoint.pth (the whole state, every process's RNG included) and backbone.pth (torchvision's keys: the file
    users share), written atomically by rank 0."""
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(ctx.device)} if
                                             ctx.device.type == "cuda" else {})}
    rngs = [rng] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(rngs, rng)
    if ctx.rank == 0:
        prefix = next(name for name, module in run.model.named_modules() if module is run.backbone) + "."
        save_atomic({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                     "scaler": ctx.scaler.state_dict(), "step": step, "epoch": epoch, "args": vars(args),
                     "rng": rngs, "arch": args.arch, "method": METHOD, "config": run.config,
                     "backbone_prefix": prefix}, os.path.join(args.out, "checkpoint.pth"))
        save_atomic({"arch": args.arch, "method": METHOD, "config": run.config,
                     "state_dict": run.backbone.state_dict()}, os.path.join(args.out, "backbone.pth"))
    if ctx.world > 1:
        dist.barrier()


def save_atomic(obj, path):
    """Write to a temp file, fsync, rename: a kill at any moment leaves the old file or the new one, never half."""
    with open(f"{path}.tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)


# ------------------------------------------------------------------------------------------------ the loop
def train(args):
    """Wire the method, resume it, run it to the last step; SIGTERM / Ctrl-C stop it cleanly at a step."""
    ctx, ckpt = setup(args)
    torch.manual_seed(args.seed)  # the same initial weights (and queue) on every process
    run = wire(args, ctx)
    sampler, steps_per_epoch = run.loader.sampler, run.loader.sampler.batches_per_epoch()
    if steps_per_epoch == 0:
        raise UserError(f"the dataset has {sampler.size} images, fewer than one batch of {args.batch_size}.")
    torch.manual_seed(args.seed + ctx.rank)  # masks, shuffles, drop path: each process its own
    step = restore(run, ckpt, ctx) if ckpt else 0
    if args.benchmark:
        return benchmark(run, args, ctx)
    run.model.train()
    watch = args.knn_monitor and ctx.rank == 0
    monitor = data.KnnMonitor(args.knn_monitor, args.img_size, args.seed) if watch else None
    stop_signal, progress = catch_stop_signals(), Progress(run, args, ctx, step, resumed=ckpt is not None)
    if monitor and step == 0:
        progress.knn(monitor, 0, 0)  # random init: where the curve starts
    stopping = False
    while step < progress.last_step and not stopping:
        epoch, first_step, skipped = step // steps_per_epoch, step, torch.zeros((), dtype=torch.long)
        sampler.set_epoch(epoch, start_batch=step % steps_per_epoch)
        for inputs, _, n_skipped in run.loader:
            progress.add(run.step(to_device(inputs, ctx.device), step))
            step, skipped = step + 1, skipped + n_skipped.sum()
            signalled = ctx.world == 1 and stop_signal  # one process stops at once; DDP at a log step
            if step % args.log_every and step % steps_per_epoch and step < progress.last_step and not signalled:
                continue
            stopping = progress.report(step, epoch, bool(stop_signal))
            if stopping or step >= progress.last_step:
                break
        progress.count_skipped(skipped, step, epoch, first_step)
        if monitor and not stopping and (step >= progress.last_step or (epoch + 1) % args.knn_every == 0):
            progress.knn(monitor, step, epoch)
        save(run, args, ctx, step, epoch)
        progress.last_saved = step
    progress.finish(step, stopping)
    if ctx.world > 1:
        dist.destroy_process_group()


def catch_stop_signals():
    """SIGTERM (a scheduler's notice) or Ctrl-C: the loop finishes its step, saves and exits; a second one: at once.
    Returns the list the signals are appended to."""
    received = []

    def request_stop(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return received


class Progress:
    """args.json, log.jsonl and the progress line, by rank 0: window means of the step's values (read back at log
    steps only: the loop's one host-device sync) checked for NaN, images/s, peak memory, ETA; kNN; unreadable files."""

    def __init__(self, run, args, ctx, step, resumed):
        self.run, self.args, self.ctx, self.last_saved = run, args, ctx, step if resumed else None
        total = args.epochs * run.loader.sampler.batches_per_epoch()
        self.last_step = total if args.max_steps is None else min(total, args.max_steps)
        self.sums, self.steps, self.skipped, self.start_step = 0, 0, 0, step
        self.start = self.window_start = time.time()
        if ctx.rank == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
            self.log = open(os.path.join(args.out, "log.jsonl"), "a")
        self.say(f"{run.summary}, {run.loader.sampler.batches_per_epoch()} steps/epoch, {ctx.world} process(es) on "
                 f"{ctx.device.type}, {'resuming at step %d' % step if step else 'starting'}", sep=": ")

    def say(self, text, sep=" | "):
        if self.ctx.rank == 0:
            print(f"{self.run.name}{sep}{text}", flush=True)

    def record(self, **fields):
        if self.ctx.rank == 0:
            self.log.write(json.dumps(fields) + "\n")
            self.log.flush()

    def add(self, values):
        self.sums, self.steps = self.sums + values.detach().float(), self.steps + 1

    def report(self, step, epoch, stop_requested):
        """Log the window's means; True when any process was asked to stop."""
        stats = torch.cat([self.sums / self.steps, torch.tensor([float(stop_requested)], device=self.ctx.device)])
        if self.ctx.world > 1:
            dist.all_reduce(stats)
            stats /= self.ctx.world
        *values, stop_votes = stats.tolist()
        if not math.isfinite(values[0]):
            where = f"at step {step}" if self.steps == 1 else f"in steps {step - self.steps + 1}-{step}"
            saved = os.path.join(self.args.out, "checkpoint.pth") + f" (step {self.last_saved})"
            raise FloatingPointError(f"the loss became {values[0]} {where}; the last good checkpoint is "
                                     f"{saved if self.last_saved else 'none'}, left as it was. Lower --lr or use "
                                     "--amp off.")
        now, memory = time.time(), peak_memory_gb(self.ctx.device)
        images_per_s = self.steps * self.run.images_per_step / (now - self.window_start)
        eta = (now - self.start) / max(step - self.start_step, 1) * (self.last_step - step)
        logged, schedule = dict(zip(self.run.logged, values)), self.run.schedule(step - 1)
        self.record(epoch=epoch, step=step, **{k: round(v, 5) for k, v in logged.items()}, **schedule,
                    images_per_s=round(images_per_s, 1), peak_mem_gb=round(memory, 3))
        self.say(f"ep {epoch + 1}/{self.args.epochs} | step {step}/{self.last_step} | " + " | ".join(
            [f"{k} {v:.5g}" for k, v in logged.items()] + [f"{k} {v:.4g}" for k, v in schedule.items()]) +
            f" | {images_per_s:.1f} img/s | mem {memory:.2f} GB | eta {format_eta(eta)}")
        self.sums, self.steps, self.window_start = 0, 0, time.time()
        return stop_votes > 0

    def count_skipped(self, skipped, step, epoch, first_step):
        """Unreadable images of the epoch, summed over processes; more than half of those read is an error."""
        if self.ctx.world > 1:
            skipped = skipped.to(self.ctx.device)  # NCCL reduces CUDA tensors only
            dist.all_reduce(skipped)
        skipped, seen = int(skipped), (step - first_step) * self.run.images_per_step
        self.skipped += skipped
        if skipped:
            self.record(epoch=epoch, step=step, skipped_images=skipped)
            self.say(f"epoch {epoch + 1}: skipped {skipped} unreadable image(s)")
        if skipped > seen // 2:
            raise UserError(f"{skipped} of the {seen} images read in epoch {epoch + 1} could not be opened; check the "
                            "dataset.")

    def knn(self, monitor, step, epoch):
        """--knn-monitor: the backbone's kNN top-1 now (rank 0; eval mode, no random draw: training is unchanged)."""
        start = time.time()
        top1 = monitor.top1(self.run.backbone, self.ctx.device, self.ctx.amp_dtype)
        self.record(epoch=epoch, step=step, knn_top1=round(top1, 2), knn_s=round(time.time() - start, 1))
        self.say(f"step {step} | knn_top1 {top1:.2f}% on {monitor.description} ({time.time() - start:.1f} s)")

    def finish(self, step, stopping):
        checkpoint, backbone = (os.path.join(self.args.out, f) for f in ("checkpoint.pth", "backbone.pth"))
        if stopping:
            self.say(f"stopped by a signal at step {step}; {checkpoint} resumes it")
        if self.skipped:
            self.say(f"{self.skipped} unreadable image(s) were skipped in this run")
        if not stopping and self.run.finish and self.ctx.rank == 0:
            self.say(self.run.finish())
        if not stopping:
            self.say(f"done at step {step}: backbone in {backbone}")
        if self.ctx.rank == 0:
            self.log.close()


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def format_eta(seconds):
    days, rest = divmod(int(seconds), 86400)
    return (f"{days}d " if days else "") + f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


# ------------------------------------------------------------------------------------------------ benchmark
def benchmark(run, args, ctx):
    """--benchmark N: N steps on synthetic inputs already on the device, N of their compute floor (the backbone
    passes alone), then N steps fed by the real loader; rank 0 prints one JSON line. Nothing is written."""
    inputs = run.synthetic()
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    step_s = timed(lambda: run.step(inputs, 0), args.benchmark, ctx.device)
    peak = peak_memory_gb(ctx.device)
    floor_s = timed(lambda: run.floor(inputs), args.benchmark, ctx.device)
    batches = itertools.chain.from_iterable(itertools.repeat(run.loader))  # as many epochs as the timing needs
    loader_s = timed(lambda: run.step(to_device(next(batches)[0], ctx.device), 0), args.benchmark, ctx.device)
    if ctx.rank == 0:
        print(json.dumps({"method": run.name, "arch": args.arch, "img_size": args.img_size,
                          "batch_size": args.batch_size, "processes": ctx.world, "device": ctx.device.type,
                          "amp": str(ctx.amp_dtype).replace("torch.", "") if ctx.amp_dtype else "off",
                          "images_per_s": round(run.images_per_step / step_s, 1), "step_s": round(step_s, 4),
                          "floor_s": round(floor_s, 4), "step_over_floor": round(step_s / floor_s, 3),
                          "peak_mem_gb": round(peak, 3), "workers": run.loader.num_workers,
                          "loader_images_per_s": round(run.images_per_step / loader_s, 1)}), flush=True)


def timed(fn, steps, device):
    """Seconds per call of fn: 3 warm-up calls, then `steps` timed calls between two synchronisations."""
    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if dist.is_initialized():
            dist.barrier()

    for _ in range(3):
        fn()
    synchronise()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronise()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    """Bad input: one sentence and exit code 2; a non-finite loss: exit code 1; the signal handlers are restored."""
    args = get_args(argv)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # train() replaces them
    try:
        train(args)
    except UserError as err:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{SCRIPT}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:
        print(f"{SCRIPT}: error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
