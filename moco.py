"""MoCo v1 / v2: Momentum Contrast pre-training on remote-sensing images.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020 (v1), and
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv:2003.04297 (v2). MoCo is the baseline
of the three remote-sensing papers of this project (GeRSP Table I: MoCo-MAID, MoCo-IN-MAID, MoCov2).

    python moco.py --arch resnet18 --img-size 32 --batch-size 64 --queue 256 --lr 0.015 --moco-m 0.99 --epochs 10 \
        --knn-monitor synthetic     # the README's first command: built-in textures, 2 CPU minutes, kNN rising
    python moco.py --data /data/million_aid                                    # one GPU, MoCo v2 recipe
    torchrun --nproc_per_node=8 moco.py --data /data/million_aid               # MoCo v2 on 8 GPUs
    torchrun --nproc_per_node=8 moco.py --data /data/million_aid --version v1 --epochs 100 --batch-size 128 \
        --lr-steps 30 60 90 --out runs/moco_maid     # GeRSP's MoCo-MAID (with --data /data/imagenet/train: -IN-MAID)

Paper -> code
    Eq. 1  InfoNCE, the positive key at index 0, temperature T ........ info_nce() (float32, outside autocast)
    Eq. 2  momentum update  theta_k <- m theta_k + (1 - m) theta_q ..... MoCo.momentum_update() (projector included)
    Sec. 3.2  the dictionary as a queue: newest keys in, oldest out .... MoCo.enqueue() (keys of all processes)
    Sec. 3.3  shuffling BN .............................................. MoCo.keys() across processes, and
              SplitBatchNorm2d within one (one GPU or CPU process normalises like --bn-group-sized GPUs)
    Algorithm 1  one training step ...................................... train_step()
    v2: MLP projector, blur augmentation, cosine lr ..................... Encoder, augmentation(), lr_at()
    the run: data, model, resume, the epoch / batch loop, log, save .... train()

Defaults are those of the official code (facebookresearch/moco): ResNet-50, 200 epochs, total batch 256, SGD lr 0.03
momentum 0.9 weight decay 1e-4, K = 65,536, m = 0.999, feature dim 128; v1: linear head, T = 0.07, jitter
(0.4, 0.4, 0.4, 0.4) every time, lr x0.1 at epochs 120 and 160; v2 (default): 2048-2048-128 MLP head, T = 0.2,
jitter p=0.8 + blur, cosine lr. GeRSP's MoCo baselines (its Table I) are v1 for 100 epochs at a total batch of 128
with lr x0.1 every 30 epochs: the command above (GeRSP states lr 0.05 for all its runs, a value its code contradicts
for GeRSP itself; add --lr 0.05 to follow it). Choices of this file, where the papers are silent:
    - The lr is stepped once per epoch, as in the official code; it is not rescaled when --batch-size changes.
    - BatchNorm statistics come from groups of --bn-group samples whatever the number of processes (32: the official
      256 / 8 GPUs): the key batch is shuffled over all processes, then split into those groups, so a query's and
      its key's statistics come from different random subsets (MoCo Sec. 3.3). One process keeps at least two
      groups: with one, keys would be normalised over exactly their queries' samples.
    - The momentum update runs after the optimiser step instead of before the key forward of the next step:
      the key encoder sees exactly the same weights, and the queue needs no clone for autograd.
    - Keys are constants (no gradient), so gathering them from other processes loses nothing.
    - Augmentations are seeded by (seed, epoch, image index), so a resumed run continues bit-for-bit.
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
from collections import namedtuple
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
from torch.utils.data import DataLoader

import data
from data import UserError

VERSIONS = {  # what --version switches (Sec. 2 of the MoCo v2 report)
    "v1": dict(head="linear", temperature=0.07, aug="moco_v1", schedule="step"),
    "v2": dict(head="mlp", temperature=0.2, aug="moco_v2", schedule="cosine"),
}
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
LOGGED = ("loss", "acc")  # what train_step() returns, in log.jsonl
RESUME_MUST_MATCH = ("arch", "head", "dim", "queue", "batch_size", "data", "img_size", "seed")


def get_args(argv=None):
    p = data.ArgumentParser(prog=SCRIPT, description="MoCo v1/v2 pre-training (see the module docstring).")
    p.add_argument(
        "--data",
        action="append",
        help="folder of unlabeled images (any nesting); repeat to mix "
        "datasets; 'synthetic' = built-in generated images. Default: synthetic",
    )
    p.add_argument("--version", choices=VERSIONS, default="v2", help="recipe: head, temperature, augmentation, lr")
    p.add_argument("--head", choices=("linear", "mlp"), help="projector (default: from --version)")
    p.add_argument("--temperature", type=float, help="InfoNCE temperature T (default: 0.07 v1, 0.2 v2)")
    p.add_argument("--aug", choices=("moco_v1", "moco_v2", "gersp"), help="augmentation (default: from --version)")
    p.add_argument("--schedule", choices=("step", "cosine"), help="lr schedule (default: from --version)")
    p.add_argument(
        "--lr-steps", type=int, nargs="+", help="epochs of lr x0.1 under the step schedule (default: 120 160)"
    )
    p.add_argument("--arch", choices=ARCHS, default="resnet50", help="torchvision backbone (resnet18 for CPU)")
    p.add_argument("--dim", type=int, default=128, help="feature dimension of the projector output")
    p.add_argument("--queue", type=int, default=65536, help="K, keys in the queue (a multiple of --batch-size)")
    p.add_argument("--moco-m", type=float, default=0.999, help="momentum m of the key encoder (Eq. 2)")
    p.add_argument(
        "--bn-group",
        type=int,
        default=32,
        help="samples per BatchNorm group (shuffle-BN, Sec. 3.3); "
        "one process keeps at least 2 groups, so keys never share their queries' statistics",
    )
    p.add_argument("--epochs", type=int, default=200, help="training epochs")
    p.add_argument("--batch-size", type=int, default=256, help="TOTAL batch over all processes")
    p.add_argument("--lr", type=float, default=0.03, help="base learning rate (SGD)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay")
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
    for key, value in VERSIONS[args.version].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr_steps is not None and args.schedule != "step":
        p.error("--lr-steps applies to the step schedule only; add --schedule step or drop --lr-steps")
    args.lr_steps = args.lr_steps or [120, 160]
    return args


def check_args(args, world):
    """Every impossible setting of the method is one sentence before anything runs or is written."""
    for name in ("queue", "dim", "temperature", "bn_group"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if not 0 <= args.moco_m < 1:
        raise UserError(f"--moco-m must be in [0, 1) (got {args.moco_m}).")
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
    """The official pipelines 'moco_v1' and 'moco_v2', or GeRSP Sec. III-B's 'gersp' (for its baselines)."""
    crop = T.RandomResizedCrop(size, scale=(0.2, 1.0))
    if name == "moco_v1":
        steps = [crop, T.RandomGrayscale(p=0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip()]
    elif name == "moco_v2":
        steps = [
            crop,
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([RandomGaussianBlur()], p=0.5),
            T.RandomHorizontalFlip(),
        ]
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


class Encoder(nn.Module):
    """torchvision ResNet (fc removed: its keys stay torchvision's) + projector: linear (v1) or 2-layer MLP (v2)."""

    def __init__(self, arch, dim, bn_splits, head="mlp"):
        super().__init__()
        self.backbone = torchvision.models.get_model(arch, norm_layer=partial(SplitBatchNorm2d, splits=bn_splits))
        width = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))
        if head == "linear":
            self.projector = nn.Linear(width, dim)

    def forward(self, images):
        return self.projector(self.backbone(images))


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and the queue of keys (K x dim, unit vectors)."""

    def __init__(self, encoder, queue_size, dim, momentum, temperature):
        super().__init__()
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder).requires_grad_(False)
        self.momentum, self.temperature = momentum, temperature
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.queue_ptr = 0  # a Python int: no host-device sync to read it; saved through get_extra_state

    def get_extra_state(self):
        return {"queue_ptr": self.queue_ptr}

    def set_extra_state(self, state):
        self.queue_ptr = state["queue_ptr"]

    @torch.no_grad()
    def momentum_update(self):
        """Eq. 2: theta_k <- m theta_k + (1 - m) theta_q, over every parameter (projector included)."""
        torch._foreach_lerp_(list(self.encoder_k.parameters()), list(self.encoder_q.parameters()), 1 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys):
        """Sec. 3.2: the newest keys replace the oldest; K is a multiple of the global batch, so no wrap inside."""
        self.queue[self.queue_ptr : self.queue_ptr + len(keys)] = keys
        self.queue_ptr = (self.queue_ptr + len(keys)) % len(self.queue)

    @torch.no_grad()
    def keys(self, im_k):
        """Sec. 3.3 shuffling BN: the key encoder normalises a random subset of the global batch, so the BN statistics
        of a query and of its key come from different subsets. Returns (local keys, all keys in global order)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        all_images = gather(im_k)
        perm = torch.randperm(len(all_images), device=im_k.device)
        if dist.is_initialized():
            dist.broadcast(perm, 0)
        b = len(im_k)
        k = F.normalize(self.encoder_k(all_images[perm[rank * b : (rank + 1) * b]]).float(), dim=1)
        shuffled = gather(k)
        all_keys = torch.empty_like(shuffled)
        all_keys[perm] = shuffled  # un-shuffle: all_keys[i] is the key of global sample i
        return all_keys[rank * b : (rank + 1) * b], all_keys


def info_nce(q, k, queue, temperature):
    """Eq. 1: L = -log exp(q.k+/T) / (exp(q.k+/T) + sum_i exp(q.k_i/T)); the positive is class 0 of N x (1+K).
    In float32 even under autocast: at 1/T = 14 bf16 rounding would show in the logits."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.float(), k.float()
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.float().T], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device)), logits


# ------------------------------------------------------------------------------------------------ training
def train_step(model, query_encoder, im_q, im_k, optimizer, scaler, amp_dtype):
    """Algorithm 1 of the paper: queries with gradient, keys without, InfoNCE, SGD, momentum update, enqueue.
    Returns (loss, top-1 of the positive key among the queue's in %)."""
    with autocast(im_q.device, amp_dtype):
        q = F.normalize(query_encoder(im_q).float(), dim=1)
        k, all_keys = model.keys(im_k)
    loss, logits = info_nce(q, k, model.queue, model.temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.momentum_update()
    model.enqueue(all_keys)
    return torch.stack([loss, (logits.argmax(1) == 0).float().mean() * 100]).detach()


def lr_at(args, epoch):
    """Official schedule, stepped per epoch: cosine (v2) or x0.1 at --lr-steps (v1)."""
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    return args.lr * 0.1 ** sum(epoch >= milestone for milestone in args.lr_steps)


# ------------------------------------------------------------------------------------------------ the run
def train(args):
    """Data, model, optimiser and resume; then the epoch / batch loop: train_step(), log, save. SIGTERM or Ctrl-C
    stop it cleanly at a step."""
    ctx = setup(args)
    paths = data.list_images(args.data)
    data.check_readable(paths, seed=args.seed)
    dataset = data.ImageDataset(
        paths, transform=partial(two_views, augmentation(args.aug, args.img_size)), seed=args.seed
    )
    loader = make_loader(dataset, args, ctx)
    steps_per_epoch = loader.sampler.batches_per_epoch()
    last_step = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    torch.manual_seed(args.seed)  # the same initial weights and queue on every process
    local_batch = args.batch_size // ctx.world
    encoder = Encoder(args.arch, args.dim, bn_groups(local_batch, args.bn_group, ctx.world), args.head)
    model = MoCo(encoder, args.queue, args.dim, args.moco_m, args.temperature).to(ctx.device)
    query_encoder = ddp(model.encoder_q)  # the same weights; a backward through it averages the gradients
    backbone = model.encoder_q.backbone  # exported as backbone.pth, probed by --knn-monitor
    optimizer = torch.optim.SGD(
        model.encoder_q.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.wd,
        fused=ctx.device.type == "cuda",
    )  # one kernel for the update
    torch.manual_seed(args.seed + ctx.rank)  # shuffle-BN permutations: each process its own
    step = resume(args, ctx, model, optimizer)  # 0 when --out holds no checkpoint

    log = Log(args, ctx, f"moco {args.version}", args.batch_size, last_step, step)
    log(
        f"{len(paths)} images, {steps_per_epoch} steps/epoch, {ctx.world} process(es) on {ctx.device.type}, "
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
        for (im_q, im_k), _, n_skipped in loader:
            log.add(
                train_step(
                    model,
                    query_encoder,
                    im_q.to(ctx.device, non_blocking=True),
                    im_k.to(ctx.device, non_blocking=True),
                    optimizer,
                    ctx.scaler,
                    ctx.amp_dtype,
                )
            )
            step, skipped = step + 1, skipped + n_skipped.sum()
            signalled = ctx.world == 1 and stop_requests  # one process stops at once; several at a log step
            if step % args.log_every == 0 or step % steps_per_epoch == 0 or step == last_step or signalled:
                stopping = log.window(step, epoch, LOGGED, {"lr": lr}, bool(stop_requests))
                if stopping or step == last_step:
                    break
        seen, skipped = (step - first_step) * args.batch_size, log.skipped(skipped, step, epoch)
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
