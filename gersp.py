"""GeRSP: Generic Knowledge Boosted Remote Sensing Pre-training.

Huang, Zhang, Gong, Liu, Wang, "Generic Knowledge Boosted Pre-training for Remote Sensing Images", IEEE TGRS 2024.
A student ResNet learns from unlabeled remote-sensing images by momentum contrast against an EMA teacher (RSCL) and,
in the same step, from labeled natural images by supervised classification (NIAL); the student is the result.

    python gersp.py --arch resnet18 --img-size 64 --batch-size 64 --queue 4096   # smoke run: built-in textures
    python gersp.py --data /data/million_aid --natural /data/imagenet/train          # one GPU
    torchrun --nproc_per_node=8 gersp.py --data /data/million_aid --natural /data/imagenet/train   # the paper's run
    python gersp.py --data /data/million_aid --alpha 0          # Table V's ablation: GeRSP's recipe without NIAL

Paper -> code
    Sec. III-A  equal numbers of RS and natural images per iteration ... NaturalPairs, WithNatural (cycles --natural)
    Sec. III-B  strong augmentation, both branches ........................ augmentation("gersp")
    Sec. III-C  student = ResNet + projector (FC-ReLU-FC, 128) + predictor (one FC to the natural classes);
                teacher = EMA copy of backbone + projector; shuffling BN .. Student, GeRSP.keys(), SplitBatchNorm2d
    Eq. 1  L_ce, cross-entropy of the predictor on natural images ...... nial_loss()
    Eq. 2  L_ct, InfoNCE of student queries against the teacher key and the queue ... info_nce() (float32)
    Eq. 3  L = L_ct + alpha L_ce ........................................ train_step()
    Eq. 4  W_t <- m W_t + (1 - m) W_s, m = 0.996 ........................ GeRSP.momentum_update()
    Sec. III-E  FIFO queue of 65,536 teacher keys from all processes .... GeRSP.enqueue()
    Eq. 5  cosine annealing with warm restarts every 20 epochs .......... lr_at()
    the run: data, model, resume, the epoch / batch loop, log, save .... train()

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
    - The natural data is cycled, reshuffled every pass, its augmentation seeded by (seed + 1, pass, image index);
      with --alpha 0 it is never read, and the step is MoCo's.
The file reads top to bottom: flags, the method, train(); below the HELPERS banner, what train() calls (processes,
loader, gather, checkpoints, signals, the log, main), the same text in moco.py, gersp.py, pera.py and preco.py.
"""

import copy
import json
import math
import os
import resource
import signal
import sys
import time
from collections import OrderedDict, namedtuple
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import ImageFilter
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler

import data
from data import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
LOGGED = ("loss", "loss_ct", "loss_ce", "nial_acc")  # what train_step() returns, in log.jsonl
RESUME_MUST_MATCH = ("arch", "dim", "queue", "batch_size", "data", "natural", "img_size", "seed", "alpha")


def get_args(argv=None):
    p = data.ArgumentParser(prog=SCRIPT, description="GeRSP pre-training (see the module docstring).")
    p.add_argument(
        "--data",
        action="append",
        help="folder of unlabeled images (any nesting); repeat to mix "
        "datasets; 'synthetic' = built-in generated images. Default: synthetic",
    )
    p.add_argument(
        "--natural",
        help="labeled natural images, one folder per class (ImageNet's train/); needed with "
        "a real --data unless --alpha 0; 'synthetic' = built-in (the default with --data synthetic)",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="weight of L_ce (Eq. 3); 0 = no NIAL (Table V)")
    p.add_argument(
        "--nial-forward",
        choices=("joint", "separate"),
        default="joint",
        help="RS queries and natural images through the student in one forward (BN sees both: authors' code) or in two",
    )
    p.add_argument(
        "--aug",
        choices=("gersp", "moco_v1"),
        default="gersp",
        help="augmentation of both branches: Sec. III-B's, or MoCo v1's (the authors' code)",
    )
    p.add_argument("--arch", choices=ARCHS, default="resnet50", help="torchvision backbone (resnet18 for CPU)")
    p.add_argument("--dim", type=int, default=128, help="feature dimension of the projector output")
    p.add_argument("--queue", type=int, default=65536, help="K, keys in the queue (a multiple of --batch-size)")
    p.add_argument("--teacher-m", type=float, default=0.996, help="EMA momentum m of the teacher (Eq. 4)")
    p.add_argument("--temperature", type=float, default=0.07, help="InfoNCE temperature (Eq. 2; authors' code)")
    p.add_argument(
        "--bn-group",
        type=int,
        default=16,
        help="samples per BatchNorm group (shuffle-BN, Sec. 3.3); "
        "one process keeps at least 2 groups, so keys never share their queries' statistics",
    )
    p.add_argument("--epochs", type=int, default=100, help="epochs over the RS data")
    p.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="TOTAL RS images per step over all processes; as many natural images join them",
    )
    p.add_argument("--lr", type=float, default=0.007, help="lr_max of Eq. 5 (authors' code)")
    p.add_argument("--lr-min", type=float, default=0.001, help="lr_min of Eq. 5 (authors' code)")
    p.add_argument("--restart-every", type=int, default=20, help="T_max of Eq. 5: epochs per cosine cycle")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    p.add_argument("--img-size", type=int, default=224, help="crop size of the augmented views")
    p.add_argument("--workers", type=int, help="loader processes per process (default: CPUs / processes, at most 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (offset by rank for the training randomness)")
    p.add_argument("--out", default=f"runs/{METHOD}", help="output folder; a checkpoint there is resumed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke runs, curves)")
    p.add_argument("--log-every", type=int, default=20, help="log and progress line every N steps")
    p.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        default="auto",
        help="autocast: auto = bf16 on CUDA, off on CPU",
    )
    p.add_argument(
        "--knn-monitor",
        metavar="DIR",
        help="class-per-folder images (e.g. EuroSAT, or 'synthetic'): "
        "rank 0 logs knn_top1, a weighted kNN (k 20, cosine, T 0.07) on the backbone's frozen features",
    )
    p.add_argument(
        "--knn-every", type=int, default=1, help="epochs between kNN measurements (and at the start and the end)"
    )
    args = p.parse_args(argv)
    args.data = args.data or [data.SYNTHETIC]
    if args.natural is None and set(args.data) == {data.SYNTHETIC}:
        args.natural = data.SYNTHETIC  # a synthetic run keeps its smoke-test default; a real one must choose
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
    if args.natural is None and args.alpha > 0:
        raise UserError(
            "a real --data needs --natural, labeled natural images in ImageNet's train/ layout (one "
            "folder per class); --alpha 0 trains without them, and --natural synthetic uses the built-in "
            "textures, for smoke runs only."
        )
    if not 0 <= args.teacher_m < 1:
        raise UserError(f"--teacher-m must be in [0, 1) (got {args.teacher_m}).")
    if args.img_size < 32:
        raise UserError(f"--img-size {args.img_size} is too small: a ResNet downsamples by 32.")
    if args.queue % args.batch_size:
        raise UserError(
            f"--queue {args.queue} is not a multiple of --batch-size {args.batch_size} (the queue takes whole batches)."
        )
    local = args.batch_size // world
    if local > args.bn_group and local % args.bn_group:
        raise UserError(f"the per-process batch {local} is not a multiple of --bn-group {args.bn_group}.")
    if world == 1 and local % 2:
        raise UserError(f"--batch-size {local} is odd: one process splits it into at least 2 BatchNorm groups.")


# ------------------------------------------------------------------------------------------------ augmentation
class RandomGaussianBlur:
    """Gaussian blur with sigma drawn from [0.1, 2.0]: PIL's filter, as in MoCo v2's official code."""

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(1).uniform_(0.1, 2.0))))


def augmentation(name, size):
    """Sec. III-B's pipeline 'gersp', the same for both branches, or 'moco_v1' (the authors' code)."""
    crop = T.RandomResizedCrop(size, scale=(0.2, 1.0))
    if name == "moco_v1":
        steps = [crop, T.RandomGrayscale(p=0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip()]
    else:  # gersp: crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.16) p=0.8, gray 0.2, flip 0.5, blur 0.5
        steps = [
            crop,
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.16)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomHorizontalFlip(),
            T.RandomApply([RandomGaussianBlur()], p=0.5),
        ]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def two_views(transform, img):
    """A positive pair: two independent augmentations of one image, the query's and the key's."""
    return [transform(img), transform(img)]


# ------------------------------------------------------------------------------------------------ natural images
class NaturalPairs(Sampler):
    """Sec. III-A: as many natural images as RS ones per step. For each RS index of the sampler `rs` it yields the
    item (rs_index, natural_epoch, natural_index): step s reads batch s of the natural data cycled pass after pass
    (natural_epoch counts the passes; each reshuffled), so a resumed run draws the natural images of an
    uninterrupted one. The loop sees the RS sampler's size, set_epoch() and batches_per_epoch()."""

    def __init__(self, rs, natural):
        self.rs, self.natural, self.size = rs, natural, rs.size
        self.set_epoch, self.batches_per_epoch = rs.set_epoch, rs.batches_per_epoch

    def __iter__(self):
        step = self.rs.epoch * self.rs.batches_per_epoch() + self.rs.start_batch  # the loop's next step
        cycled = self.cycled(*divmod(step, self.natural.batches_per_epoch()))
        for rs_index, (natural_epoch, natural_index) in zip(self.rs, cycled):
            yield rs_index, natural_epoch, natural_index

    def cycled(self, natural_epoch, batch):
        """(natural_epoch, natural_index) from batch `batch` of pass `natural_epoch` on, pass after pass."""
        while True:
            self.natural.set_epoch(natural_epoch, start_batch=batch)
            for natural_index in self.natural:
                yield natural_epoch, natural_index
            natural_epoch, batch = natural_epoch + 1, 0


class WithNatural(Dataset):
    """NaturalPairs' items as ((RS query, RS key, natural image), natural label, files skipped): the RS pair for the
    epoch of the RS dataset's set_epoch(), the natural image seeded by (seed + 1, natural_epoch, natural_index)."""

    def __init__(self, rs, natural):
        self.rs, self.natural = rs, natural

    def __getitem__(self, item):
        rs_index, natural_epoch, natural_index = item
        (rs_q, rs_k), _, rs_skipped = self.rs[rs_index]
        image, label, natural_skipped = self.natural.load(natural_index, natural_epoch)
        return (rs_q, rs_k, image), label, rs_skipped + natural_skipped


def natural_data(args, augment):
    """--natural, augmented like the RS images but seeded apart from them: (the dataset, the number of classes)."""
    paths, labels, classes = data.labeled_images(args.natural)
    data.check_readable(paths, seed=args.seed)
    if len(paths) < args.batch_size:
        raise UserError(f"--natural has {len(paths)} images, fewer than one batch of {args.batch_size}.")
    return data.ImageDataset(paths, labels, augment, seed=args.seed + 1), len(classes)


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
        y = F.batch_norm(
            x.reshape(n // s, c * s, h, w),
            mean,
            var,
            self.weight.repeat(s),
            self.bias.repeat(s),
            True,
            self.momentum,
            self.eps,
        )
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
                [len(rs_images), len(natural_images)]
            )
        else:
            rs_features, natural_features = self.backbone(rs_images), self.backbone(natural_images)
        return self.projector(rs_features), self.predictor(natural_features)


class GeRSP(nn.Module):
    """Student, EMA teacher (backbone + projector) and the FIFO queue of teacher keys (K x dim, unit vectors)."""

    def __init__(self, student, queue_size, dim, momentum, temperature):
        super().__init__()
        self.student = student
        self.teacher = nn.Sequential(
            OrderedDict(backbone=copy.deepcopy(student.backbone), projector=copy.deepcopy(student.projector))
        ).requires_grad_(False)
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
        self.queue[self.queue_ptr : self.queue_ptr + len(keys)] = keys
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
        k = F.normalize(self.teacher(all_images[perm[rank * b : (rank + 1) * b]]).float(), dim=1)
        shuffled = gather(k)
        all_keys = torch.empty_like(shuffled)
        all_keys[perm] = shuffled  # un-shuffle: all_keys[i] is the key of global sample i
        return all_keys[rank * b : (rank + 1) * b], all_keys


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
    zero = torch.zeros((), device=rs_q.device)
    loss_ce, accuracy = (zero, zero) if natural is None else nial_loss(natural_logits.float(), labels)
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


# ------------------------------------------------------------------------------------------------ the run
def train(args):
    """Data, model, optimiser and resume; then the epoch / batch loop: train_step(), log, save. SIGTERM or Ctrl-C
    stop it cleanly at a step."""
    ctx = setup(args)
    paths = data.list_images(args.data)
    data.check_readable(paths, seed=args.seed)
    augment = augmentation(args.aug, args.img_size)  # Sec. III-B: the same pipeline for both branches
    dataset = data.ImageDataset(paths, transform=partial(two_views, augment), seed=args.seed)
    if args.alpha > 0:  # alpha = 0 never reads --natural
        natural, num_classes = natural_data(args, augment)
        pairs = NaturalPairs(
            data.EpochSampler(len(dataset), args.batch_size, ctx.rank, ctx.world, args.seed),
            data.EpochSampler(len(natural), args.batch_size, ctx.rank, ctx.world, args.seed + 1),
        )
        loader = make_loader(WithNatural(dataset, natural), args, ctx, sampler=pairs)
        summary = f"{len(paths)} RS images, {len(natural)} natural images in {num_classes} classes"
    else:
        num_classes, loader, summary = 1, make_loader(dataset, args, ctx), f"{len(paths)} RS images, NIAL off"
    steps_per_epoch = loader.sampler.batches_per_epoch()
    last_step = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    torch.manual_seed(args.seed)  # the same initial weights and queue on every process
    local_batch = args.batch_size // ctx.world
    student = Student(
        args.arch,
        args.dim,
        bn_groups(local_batch, args.bn_group, ctx.world),
        num_classes,
        joint=args.nial_forward == "joint",
    )
    student.predictor.requires_grad_(args.alpha > 0)  # alpha = 0: NIAL is off, the predictor never changes
    model = GeRSP(student, args.queue, args.dim, args.teacher_m, args.temperature).to(ctx.device)
    ddp_student = ddp(model.student)  # the same weights; a backward through it averages the gradients
    backbone = model.student.backbone  # exported as backbone.pth, probed by --knn-monitor
    optimizer = torch.optim.SGD(
        [p for p in model.student.parameters() if p.requires_grad],
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.wd,
        fused=ctx.device.type == "cuda",
    )
    torch.manual_seed(args.seed + ctx.rank)  # shuffle-BN permutations: each process its own
    step = resume(args, ctx, model, optimizer)  # 0 when --out holds no checkpoint

    images_per_step = args.batch_size * (2 if args.alpha > 0 else 1)  # RS images, and as many natural ones
    log = Log(args, ctx, "gersp", images_per_step, last_step, step)
    log(
        f"{summary}, {steps_per_epoch} steps/epoch, {ctx.world} process(es) on {ctx.device.type}, "
        f"{f'resuming at step {step}' if step else 'starting'}"
    )
    monitor = data.KnnMonitor(args.knn_monitor, args.img_size, args.seed) if args.knn_monitor and not ctx.rank else None
    if monitor and step == 0:
        knn(log, monitor, backbone, 0, 0)  # random init: where the curve starts
    stop_requests, stopping = catch_stop_signals(), False
    while step < last_step and not stopping:
        epoch, first_step, skipped = step // steps_per_epoch, step, torch.zeros((), dtype=torch.long)
        lr = lr_at(args, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        dataset.set_epoch(epoch)  # augmentations are seeded by (seed, epoch, image index): resumes are exact
        loader.sampler.set_epoch(epoch, start_batch=step % steps_per_epoch)
        for images, labels, n_skipped in loader:  # images: RS query, RS key and, if alpha > 0, the natural image
            rs_q, rs_k, *natural = [x.to(ctx.device, non_blocking=True) for x in images]
            natural, labels = (natural[0], labels.to(ctx.device)) if args.alpha > 0 else (None, None)
            log.add(
                train_step(
                    model, ddp_student, rs_q, rs_k, natural, labels, optimizer, ctx.scaler, ctx.amp_dtype, args.alpha
                )
            )
            step, skipped = step + 1, skipped + n_skipped.sum()
            signalled = ctx.world == 1 and stop_requests  # one process stops at once; several at a log step
            if step % args.log_every == 0 or step % steps_per_epoch == 0 or step == last_step or signalled:
                stopping = log.window(step, epoch, LOGGED, {"lr": lr}, bool(stop_requests))
                if stopping or step == last_step:
                    break
        seen, skipped = (step - first_step) * images_per_step, log.skipped(skipped, step, epoch)
        if skipped > seen // 2:
            raise UserError(
                f"{skipped} of the {seen} images read in epoch {epoch + 1} could not be opened; check the dataset."
            )
        if monitor and not stopping and (step == last_step or (epoch + 1) % args.knn_every == 0):
            knn(log, monitor, backbone, step, epoch)
        save(args, ctx, log, model, optimizer, backbone, step, epoch)
    log.finish(step, stopping)


# =================================================================================================================
# HELPERS: from here to the end the text is the same in moco.py, gersp.py, pera.py and preco.py (a test holds them
# equal: a fix lands in all four). train() above calls them: processes, the loader, the gather, stop signals,
# checkpoints, the log and main. A reader who knows one method file can stop here.
# =================================================================================================================
SCRIPT = os.path.basename(__file__)
METHOD = SCRIPT.removesuffix(".py")  # "method" in checkpoints and backbone.pth
Context = namedtuple("Context", "rank world device amp_dtype scaler")  # this process; amp_dtype None: no autocast


def setup(args):
    """nanoGPT-style: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (one process without them); NCCL on CUDA, gloo on
    CPU. Every check of the flags comes first, before anything runs or is written."""
    rank, world, cuda = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    for name in ("epochs", "batch_size", "lr", "img_size", "log_every", "max_steps", "knn_every"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes.")
    data.check_out_dir(args.out)
    if args.knn_monitor:
        data.labeled_images(args.knn_monitor)  # on every process: a bad folder stops them all
    check_args(args, world)
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1:  # a timeout, so that one failed process does not leave the others waiting forever
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    amp = {"auto": torch.bfloat16 if cuda else None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return Context(rank, world, device, amp, torch.amp.GradScaler(device.type, enabled=amp == torch.float16))


def autocast(device, amp_dtype):  # amp_dtype None: none
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def ddp(module, **kwargs):
    """`module` wrapped for data parallelism (its backward averages the gradients over processes), else itself."""
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
        dist.all_reduce(grad := grad.contiguous())  # every process's loss sends gradient to every process's features
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(x):
    """`x` of every process along dim 0 in rank order; differentiable, so DDP's average of the gradients equals one
    process's gradient on the whole batch. Identity on one process."""
    return Gather.apply(x) if dist.is_initialized() else x


def make_loader(dataset, args, ctx, sampler=None):
    """This process's share of each global batch (data.EpochSampler's by default). The workers start afresh each
    epoch, so they see the dataset's set_epoch(); they ignore SIGTERM / Ctrl-C, which the main process handles."""
    sampler = (
        sampler
        if sampler is not None
        else data.EpochSampler(len(dataset), args.batch_size, ctx.rank, ctx.world, args.seed)
    )
    if sampler.batches_per_epoch() == 0:
        raise UserError(f"the dataset has {sampler.size} images, fewer than one batch of {args.batch_size}.")
    workers = (
        args.workers
        if args.workers is not None
        else min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    )
    return DataLoader(
        dataset,
        args.batch_size // ctx.world,
        sampler=sampler,
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        worker_init_fn=data.ignore_stop_signals,
        generator=torch.Generator().manual_seed(args.seed),
    )


def catch_stop_signals():
    """SIGTERM (a scheduler's notice) or Ctrl-C: the loop finishes its step, saves and stops; a second one: at once."""
    received = []

    def request_stop(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, request_stop)
    return received


def resume(args, ctx, model, optimizer):
    """The checkpoint under --out into the model and optimiser, or nothing; returns the step to continue from. Each
    process continues its own random stream (same world size). weights_only: a checkpoint never runs code."""
    path = os.path.join(args.out, "checkpoint.pth")
    if not os.path.exists(path):
        return 0
    ckpt = data.load_weights_only(path, fix="move it away to start afresh")
    if not isinstance(ckpt, dict) or ckpt.get("method") != METHOD:
        raise UserError(f"{path} is not a {SCRIPT} checkpoint; use another --out.")
    changed = [k for k in RESUME_MUST_MATCH if ckpt["args"].get(k) != vars(args)[k]]
    if changed:
        raise UserError(
            f"{path} was written with other --{', --'.join(changed).replace('_', '-')}; use the same "
            "values to resume, or another --out."
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    ctx.scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == ctx.world:
        torch.set_rng_state(ckpt["rng"][ctx.rank]["cpu"])
        if "cuda" in ckpt["rng"][ctx.rank] and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"][ctx.rank]["cuda"], ctx.device)
    return ckpt["step"]


def save(args, ctx, log, model, optimizer, backbone, step, epoch, config=None):
    """checkpoint.pth (the whole state, every process's RNG) and backbone.pth (torchvision's keys: the file users
    share), written atomically by rank 0 once one pass over the weights finds them finite (else both stay as they
    were: the run stops like the NaN stop)."""
    state = model.state_dict()
    weights = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    finite = torch.stack([v.isfinite().all() for v in weights.values()]).float()
    if ctx.world > 1:
        dist.all_reduce(finite, dist.ReduceOp.MIN)  # every process stops, or none
    if not all(finite.tolist()):
        bad = next(name for name, ok in zip(weights, finite.tolist()) if not ok)
        raise nan_stop(f"{bad} became non-finite", step, args, log.last_saved)
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if ctx.device.type == "cuda" else {})}
    rngs = [rng] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(rngs, rng)
    if ctx.rank == 0:
        prefix = next(name for name, module in model.named_modules() if module is backbone) + "."
        mine = {"arch": args.arch, "method": METHOD, "config": config or {}}
        data.save_atomic(
            {
                "model": state,
                "optimizer": optimizer.state_dict(),
                "scaler": ctx.scaler.state_dict(),
                "step": step,
                "epoch": epoch,
                "args": vars(args),
                "rng": rngs,
                "backbone_prefix": prefix,
                **mine,
            },
            os.path.join(args.out, "checkpoint.pth"),
        )
        data.save_atomic({**mine, "state_dict": backbone.state_dict()}, os.path.join(args.out, "backbone.pth"))
    if ctx.world > 1:
        dist.barrier()
    log.last_saved = step


class Log:
    """args.json, log.jsonl and the progress line, by rank 0: window means of the step's values over all processes
    (read back at log steps only: the loop's one host-device sync), images/s, peak memory, ETA, skipped files."""

    def __init__(self, args, ctx, name, images_per_step, last_step, step):
        self.args, self.ctx, self.name, self.images_per_step = args, ctx, name, images_per_step
        self.last_step = last_step
        self.sums, self.steps, self.start_step, self.last_saved, self.total_skipped = 0, 0, step, step or None, 0
        self.start = self.window_start = time.time()
        if ctx.rank == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
            self.file = open(os.path.join(args.out, "log.jsonl"), "a", buffering=1)  # a line is written at once

    def __call__(self, text, **record):
        if self.ctx.rank == 0:  # the progress line after the run's name; the record in log.jsonl
            print(f"{self.name} | {text}", flush=True)
            self.file.write(json.dumps(record) + "\n" if record else "")

    def add(self, values):
        self.sums, self.steps = self.sums + values.float(), self.steps + 1

    def window(self, step, epoch, names, schedule, stop_requested):
        """Log the window's means; returns whether any process was asked to stop. A non-finite loss raises."""
        stats = torch.cat([self.sums / self.steps, torch.tensor([float(stop_requested)], device=self.ctx.device)])
        if self.ctx.world > 1:
            dist.all_reduce(stats)
            stats /= self.ctx.world
        *values, stop_votes = stats.tolist()
        if not math.isfinite(values[0]):
            raise nan_stop(f"the loss became {values[0]}", step, self.args, self.last_saved, self.steps)
        now, cuda = time.time(), self.ctx.device.type == "cuda"
        memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(0).ru_maxrss / 2**20
        speed, values = self.steps * self.images_per_step / (now - self.window_start), dict(zip(names, values))
        eta = timedelta(seconds=int((now - self.start) / max(step - self.start_step, 1) * (self.last_step - step)))
        self(
            f"ep {epoch + 1}/{self.args.epochs} | step {step}/{self.last_step} | "
            + " | ".join([f"{k} {v:.5g}" for k, v in values.items()] + [f"{k} {v:.4g}" for k, v in schedule.items()])
            + f" | {speed:.1f} img/s | mem {memory:.2f} GB | eta {eta}",
            epoch=epoch,
            step=step,
            **schedule,
            **{k: round(v, 5) for k, v in values.items()},
            images_per_s=round(speed, 1),
            peak_mem_gb=round(memory, 3),
        )
        self.sums, self.steps, self.window_start = 0, 0, time.time()
        return stop_votes > 0

    def skipped(self, skipped, step, epoch):
        """Unreadable images of the epoch, summed over processes (NCCL reduces CUDA tensors only)."""
        if self.ctx.world > 1:
            dist.all_reduce(skipped := skipped.to(self.ctx.device))
        if skipped := int(skipped):
            self(
                f"epoch {epoch + 1}: skipped {skipped} unreadable image(s)",
                epoch=epoch,
                step=step,
                skipped_images=skipped,
            )
        self.total_skipped += skipped
        return skipped

    def finish(self, step, stopping):
        skipped = f"; {self.total_skipped} unreadable image(s) were skipped in this run" if self.total_skipped else ""
        self(
            (
                f"stopped by a signal at step {step}; {self.args.out}/checkpoint.pth resumes it"
                if stopping
                else f"done at step {step}: backbone in {self.args.out}/backbone.pth"
            )
            + skipped
        )
        if self.ctx.rank == 0:
            self.file.close()


def knn(log, monitor, backbone, step, epoch):
    """--knn-monitor: the backbone's kNN top-1 now, logged (eval mode, no random draw: the training is unchanged)."""
    start, top1 = time.time(), monitor.top1(backbone, log.ctx.device, log.ctx.amp_dtype)
    log(
        f"step {step} | knn_top1 {top1:.2f}% on {monitor.description} ({time.time() - start:.1f} s)",
        epoch=epoch,
        step=step,
        knn_top1=round(top1, 2),
        knn_s=round(time.time() - start, 1),
    )


def nan_stop(what, step, args, last_saved, steps=1):
    """The error that stops a run whose loss or weights are no longer finite; exit code 1."""
    where = f"at step {step}" if steps == 1 else f"in steps {step - steps + 1}-{step}"
    saved = f"{os.path.join(args.out, 'checkpoint.pth')} (step {last_saved})" if last_saved else "none"
    return FloatingPointError(
        f"{what} {where}; the last good checkpoint is {saved}, left as it was. Lower --lr or use --amp off."
    )


def main(argv=None):
    """Bad input: one sentence and exit code 2; non-finite loss or weights: exit code 1. Whatever happens, the signal
    handlers are restored and the process group is closed."""
    args = get_args(argv)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # train() replaces them
    try:
        train(args)
    except (UserError, FloatingPointError) as err:
        if int(os.environ.get("RANK", 0)) == 0 or isinstance(err, FloatingPointError):
            print(f"{SCRIPT}: error: {err}", file=sys.stderr)
        sys.exit(1 if isinstance(err, FloatingPointError) else 2)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
