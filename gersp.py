"""GeRSP: Generic Knowledge Boosted Remote Sensing Pre-training.

Huang, Zhang, Gong, Liu, Wang, "Generic Knowledge Boosted Pre-training for Remote Sensing Images", IEEE TGRS 2024.
A student ResNet learns from unlabeled remote-sensing images by momentum contrast against an EMA teacher (RSCL) and,
in the same step, from labeled natural images by supervised classification (NIAL); the student is the result.

    python gersp.py --data synthetic --natural synthetic --arch resnet18 --img-size 64 --batch-size 64 --queue 4096
    python gersp.py --data /data/million_aid --natural /data/imagenet/train          # one GPU
    torchrun --nproc_per_node=8 gersp.py --data /data/million_aid --natural /data/imagenet/train   # the paper's run
    python gersp.py --data /data/million_aid --alpha 0          # the ablation of Table V: MoCo on RS images

Paper -> code
    Sec. III-A  equal numbers of RS and natural images per iteration ... natural_batches() (cycles --natural)
    Sec. III-B  strong augmentation, both branches ........................ data.augmentation("gersp")
    Sec. III-C  student = ResNet + projector (FC-ReLU-FC, 128) + predictor (one FC to the natural classes);
                teacher = EMA copy of backbone + projector; shuffling BN .. Student, GeRSP.keys(), SplitBatchNorm2d
    Eq. 1  L_ce, cross-entropy of the predictor on natural images ...... nial_loss()
    Eq. 2  L_ct, InfoNCE of student queries against the teacher key and the queue ... info_nce()
    Eq. 3  L = L_ct + alpha L_ce ........................................ train_step()
    Eq. 4  W_t <- m W_t + (1 - m) W_s, m = 0.996 ........................ GeRSP.momentum_update()
    Sec. III-E  FIFO queue of 65,536 teacher keys from all processes .... GeRSP.enqueue()
    Eq. 5  cosine annealing with warm restarts every 20 epochs .......... lr_at()

Defaults: stated by the paper: ResNet-50, m = 0.996, queue 65,536, total batch 128 (RS images; as many natural ones
join each step), 100 epochs, SGD, restarts every 20 epochs, alpha = 1. Where the paper has typos or is silent, the
authors' code (floatingstarZ/GeRSP) decides:
    - momentum 0.9 and weight decay 5e-4 (the paper's "weight decay 0.90, momentum 0.00005" is a swap);
    - lr 0.007 annealed to 0.001 (--lr, --lr-min) within each 20-epoch cycle, stepped per epoch (the paper's
      "lr_min 0.10, lr_max 0.01" cannot be right);
    - temperature 0.07 (not given in the paper);
    - RS queries and natural images go through the student in ONE forward pass, so BatchNorm sees both domains, as
      in the code (the paper is silent; --nial-forward separate normalises each domain on its own).
Where the code differs from the paper, the paper is taken: EMA momentum 0.996 (code 0.999); the teacher's projector
follows the EMA too (code: a random copy, never updated); the augmentation is Sec. III-B's (code: MoCo v1's).
Choices of this file: BatchNorm groups of --bn-group = 16 RS images (the paper's 128 / 8 GPUs, each with its 16
natural images) whatever the number of processes, as in moco.py; the epoch is one pass over the RS data, and the
natural data is cycled (each natural image once per pass over it, reshuffled every pass); with --alpha 0 the natural
branch is not computed at all, so the step is exactly MoCo's on RS images with this augmentation.
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
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
from data import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
RESUME_MUST_MATCH = ("arch", "dim", "queue", "batch_size", "data", "natural", "img_size", "seed", "alpha")


def get_args(argv=None):
    p = data.ArgumentParser(prog=os.path.basename(__file__),
                            description="GeRSP pre-training (see the module docstring).")
    p.add_argument("--data", action="append", help="folder of unlabeled RS images (any nesting); repeat to mix "
                   "datasets; 'synthetic' = built-in generated images. Default: synthetic")
    p.add_argument("--natural", default=data.SYNTHETIC, help="labeled natural images, one folder per class "
                   "(ImageNet's train/); 'synthetic' = built-in")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of L_ce (Eq. 3); 0 = MoCo on RS images")
    p.add_argument("--nial-forward", choices=("joint", "separate"), default="joint", help="RS queries and natural "
                   "images through the student in one forward (BN sees both: authors' code) or in two")
    p.add_argument("--arch", choices=ARCHS, default="resnet50", help="torchvision backbone (resnet18 for CPU)")
    p.add_argument("--dim", type=int, default=128, help="output dimension of the projector")
    p.add_argument("--queue", type=int, default=65536, help="teacher keys in the queue (a multiple of --batch-size)")
    p.add_argument("--teacher-m", type=float, default=0.996, help="EMA momentum m of the teacher (Eq. 4)")
    p.add_argument("--temperature", type=float, default=0.07, help="InfoNCE temperature (Eq. 2; authors' code)")
    p.add_argument("--bn-group", type=int, default=16, help="RS images per BatchNorm group (shuffle-BN)")
    p.add_argument("--epochs", type=int, default=100, help="epochs over the RS data")
    p.add_argument("--batch-size", type=int, default=128, help="TOTAL RS images per step over all processes; as "
                   "many natural images join them")
    p.add_argument("--lr", type=float, default=0.007, help="lr_max of Eq. 5 (authors' code)")
    p.add_argument("--lr-min", type=float, default=0.001, help="lr_min of Eq. 5 (authors' code)")
    p.add_argument("--restart-every", type=int, default=20, help="T_max of Eq. 5: epochs per cosine cycle")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (authors' code)")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay (authors' code)")
    p.add_argument("--img-size", type=int, default=224, help="crop size of the augmented views (Sec. III-B)")
    p.add_argument("--workers", type=int, help="data-loading processes per loader and process (default: CPUs / "
                   "processes)")
    p.add_argument("--seed", type=int, default=0, help="random seed (offset by rank for the training randomness)")
    p.add_argument("--out", default="runs/gersp", help="output folder; a checkpoint there is resumed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke runs)")
    p.add_argument("--benchmark", type=int, metavar="N", help="time N steps on synthetic tensors, the compute floor "
                   "and N steps with the real loaders; print one JSON line and exit (nothing is written)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="autocast: auto = bf16 "
                   "on CUDA, off on CPU")
    p.add_argument("--log-every", type=int, default=20, help="log and progress line every N steps")
    args = p.parse_args(argv)
    args.data = args.data or [data.SYNTHETIC]
    return args


def check_args(args, world_size):
    """Every impossible setting is one sentence before anything runs or is written."""
    for name in ("epochs", "batch_size", "lr", "lr_min", "queue", "dim", "temperature", "bn_group", "log_every",
                 "restart_every", "max_steps", "benchmark"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if args.alpha < 0:
        raise UserError(f"--alpha must be 0 or more (got {args.alpha}).")
    if not 0 <= args.teacher_m < 1:
        raise UserError(f"--teacher-m must be in [0, 1) (got {args.teacher_m}).")
    if args.img_size < 32:
        raise UserError(f"--img-size {args.img_size} is too small: a ResNet downsamples by 32.")
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes.")
    if args.queue % args.batch_size:
        raise UserError(f"--queue {args.queue} is not a multiple of --batch-size {args.batch_size} (the queue "
                        "takes whole batches).")
    local = args.batch_size // world_size
    if local > args.bn_group and local % args.bn_group:
        raise UserError(f"the per-process batch {local} is not a multiple of --bn-group {args.bn_group}.")
    if os.path.isfile(args.out):
        raise UserError(f"--out {args.out} is a file; give a folder.")


# ------------------------------------------------------------------------------------------------ distributed
def setup_distributed():
    """nanoGPT-style: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them, one process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def init_process_group(world, device):
    if world > 1:  # a timeout, so that one failed process does not leave the others waiting forever
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))


@torch.no_grad()
def gather(x):
    """Concatenate `x` from all processes along dim 0 (rank order); identity on one process."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------ model
class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from `splits` interleaved sub-batches (samples i, i+s, i+2s...),
    so one process normalises like `splits` GPUs. Same parameters and state-dict keys as nn.BatchNorm2d."""

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

    def __init__(self, arch, dim, num_classes, bn_splits, joint=True):
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
        """Sec. III-C shuffling BN: the teacher normalises a random subset of the global RS batch, so a key's BN
        statistics never come from its query's samples. Returns (local keys, all keys in global order)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        all_images = gather(im_k)
        perm = torch.randperm(len(all_images), device=im_k.device)
        if dist.is_initialized():
            dist.broadcast(perm, 0)
        b = len(im_k)
        k = F.normalize(self.teacher(all_images[perm[rank * b:(rank + 1) * b]]), dim=1)
        shuffled = gather(k)
        all_keys = torch.empty_like(shuffled)
        all_keys[perm] = shuffled  # un-shuffle: all_keys[i] is the key of global sample i
        return all_keys[rank * b:(rank + 1) * b], all_keys


# ------------------------------------------------------------------------------------------------ losses
def info_nce(q, k, queue, temperature):
    """Eq. 2: L_ct = -log exp(s(q,k+)/T) / (exp(s(q,k+)/T) + sum_k- exp(s(q,k-)/T)); q, k, queue unit vectors."""
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def nial_loss(logits, labels):
    """Eq. 1: L_ce = -sum_i y_i log softmax(z_s)_i, averaged over the natural images; also the batch accuracy."""
    return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean() * 100


# ------------------------------------------------------------------------------------------------ training
def train_step(model, student, rs_q, rs_k, natural, labels, optimizer, scaler, amp_dtype, alpha):
    """One iteration (Fig. 2): student on RS queries and natural images, teacher keys, Eq. 3, SGD, Eq. 4, enqueue.
    `natural` is None when alpha = 0: NIAL is then not computed at all. Returns (L, L_ct, L_ce, NIAL accuracy)."""
    with torch.autocast(rs_q.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        z_q, natural_logits = student(rs_q, natural)
        k, all_keys = model.keys(rs_k)
        loss_ct = info_nce(F.normalize(z_q.float(), dim=1), k.float(), model.queue, model.temperature)
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


def natural_batches(loader, sampler, start_step):
    """Sec. III-A: endless natural batches, one per step; step s is batch s of the cycled, reshuffled natural data,
    so a resumed run draws the same natural images as an uninterrupted one."""
    epoch, batch = divmod(start_step, sampler.batches_per_epoch())
    while True:
        sampler.set_epoch(epoch, start_batch=batch)
        yield from loader
        epoch, batch = epoch + 1, 0


def quiet_worker(worker_id):
    """Data workers ignore SIGTERM / Ctrl-C sent to the whole process group (schedulers, a terminal), so the main
    process can finish its step and save a checkpoint before it shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def save_atomic(obj, path):
    """Write to a temp file, fsync, rename: a kill at any moment leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)


def load_checkpoint(path):
    """weights_only=True (data.load_weights_only): a checkpoint can hold tensors and plain values, never code."""
    return data.load_weights_only(path, fix="move it away to start afresh")


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


def benchmark(args, model, student, optimizer, scaler, amp_dtype, loader, natural_stream, num_classes, device,
              world):
    """--benchmark N: the training step on synthetic tensors already on the device, against its compute floor (the
    student's forward + backward on the RS queries and the natural images, the teacher's forward on the keys,
    nothing else), then the step fed by the real loaders. Prints one JSON line (rank 0)."""
    local = args.batch_size // world
    rs_q, rs_k, natural = (torch.randn(local, 3, args.img_size, args.img_size, device=device) for _ in range(3))
    labels = torch.randint(num_classes, (local,), device=device)
    if args.alpha == 0:
        natural = labels = None
    autocast = partial(torch.autocast, device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    def floor():
        with autocast():
            z, logits = model.student(rs_q, natural)
            (z.float().sum() + (0 if logits is None else logits.float().sum())).backward()
            with torch.no_grad():
                model.teacher(rs_k)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = timed(lambda: train_step(model, student, rs_q, rs_k, natural, labels, optimizer, scaler, amp_dtype,
                                      args.alpha), args.benchmark, device)
    peak = peak_memory_gb(device)
    floor_s = timed(floor, args.benchmark, device)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # as many epochs as the timing needs

    def loader_step():
        (q, k), _, _ = next(batches)
        x, y = (None, None) if natural_stream is None else next(natural_stream)[:2]
        train_step(model, student, q.to(device, non_blocking=True), k.to(device, non_blocking=True),
                   None if x is None else x.to(device, non_blocking=True),
                   None if y is None else y.to(device, non_blocking=True), optimizer, scaler, amp_dtype, args.alpha)

    loader_s = timed(loader_step, args.benchmark, device)
    images = args.batch_size * (2 if args.alpha > 0 else 1)  # RS + natural images per step
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"method": "gersp", "alpha": args.alpha, "arch": args.arch, "img_size": args.img_size,
                          "batch_size": args.batch_size, "processes": world, "device": device.type,
                          "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
                          "images_per_s": round(images / step_s, 1), "step_s": round(step_s, 4),
                          "floor_s": round(floor_s, 4), "step_over_floor": round(step_s / floor_s, 3),
                          "peak_mem_gb": round(peak, 3), "workers": loader.num_workers,
                          "loader_images_per_s": round(images / loader_s, 1)}), flush=True)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def format_eta(seconds):
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def make_loader(dataset, sampler, local_batch, workers, device, seed):
    return DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=quiet_worker,
                      generator=torch.Generator().manual_seed(seed))  # leaves the global RNG to the model


def train(args):
    rank, world, device = setup_distributed()
    check_args(args, world)
    paths = data.list_images(args.data)
    data.check_readable(paths, seed=args.seed)
    if len(paths) < args.batch_size:
        raise UserError(f"the RS dataset has {len(paths)} images, fewer than one batch of {args.batch_size}.")
    natural_paths, natural_labels, classes = [], [], []
    if args.alpha > 0:  # alpha = 0 never reads --natural
        natural_paths, natural_labels, classes = data.labeled_images(args.natural)
        data.check_readable(natural_paths, seed=args.seed)
        if len(natural_paths) < args.batch_size:
            raise UserError(f"--natural has {len(natural_paths)} images, fewer than one batch of {args.batch_size}.")
    ckpt_path = os.path.join(args.out, "checkpoint.pth")
    ckpt = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) and not args.benchmark else None
    if ckpt is not None:
        changed = [k for k in RESUME_MUST_MATCH if ckpt["args"].get(k) != vars(args)[k]]
        if changed:
            raise UserError(f"{ckpt_path} was written with other --{', --'.join(changed).replace('_', '-')}; "
                            "use the same values to resume, or another --out.")
    init_process_group(world, device)
    amp_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bf16": torch.bfloat16,
                 "fp16": torch.float16, "off": None}[args.amp]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    local_batch = args.batch_size // world
    torch.manual_seed(args.seed)  # the same initial weights and queue on every process
    student = Student(args.arch, args.dim, max(1, len(classes)), max(1, local_batch // args.bn_group),
                      joint=args.nial_forward == "joint")
    student.predictor.requires_grad_(args.alpha > 0)  # alpha = 0: NIAL is off, the predictor never changes
    model = GeRSP(student, args.queue, args.dim, args.teacher_m, args.temperature).to(device)
    ddp_student = DDP(model.student) if world > 1 else model.student
    optimizer = torch.optim.SGD([p for p in model.student.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.wd, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
    torch.manual_seed(args.seed + rank)
    if ckpt is not None and rank == 0:  # rank 0 draws the only model-side randomness: the shuffle permutation
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)

    augment = data.augmentation("gersp", args.img_size)  # Sec. III-B: the same strong pipeline for both branches
    workers = args.workers if args.workers is not None else min(
        8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    sampler = data.EpochSampler(len(paths), args.batch_size, rank, world, args.seed)
    loader = make_loader(data.ImageDataset(paths, transform=data.TwoViews(augment), seed=args.seed), sampler,
                         local_batch, workers, device, args.seed)
    natural_stream = None
    if args.alpha > 0:
        natural_sampler = data.EpochSampler(len(natural_paths), args.batch_size, rank, world, args.seed + 1)
        natural_loader = make_loader(data.ImageDataset(natural_paths, natural_labels, augment, seed=args.seed + 1),
                                     natural_sampler, local_batch, workers, device, args.seed + 1)
        natural_stream = natural_batches(natural_loader, natural_sampler, step)
    steps_per_epoch = sampler.batches_per_epoch()
    total_steps = args.epochs * steps_per_epoch
    last_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    if args.benchmark:
        return benchmark(args, model, ddp_student, optimizer, scaler, amp_dtype, loader, natural_stream,
                         max(1, len(classes)), device, world)

    def save(epoch):
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            rng = {"cpu": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "args": vars(args),
                         "rng": rng, "arch": args.arch, "method": "gersp", "backbone_prefix": "student.backbone.",
                         "classes": classes}, ckpt_path)
            save_atomic({"arch": args.arch, "method": "gersp", "state_dict": model.student.backbone.state_dict()},
                        os.path.join(args.out, "backbone.pth"))
        if world > 1:
            dist.barrier()

    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum  # SIGTERM / Ctrl-C: finish the step, save a checkpoint, exit

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        natural_text = f"{len(natural_paths)} natural images in {len(classes)} classes" if args.alpha > 0 else \
            "NIAL off (alpha = 0)"
        print(f"gersp: {len(paths)} RS images, {natural_text}, {steps_per_epoch} steps/epoch, {world} process(es) "
              f"on {device.type}, {'resuming at step %d' % step if step else 'starting'}", flush=True)
    log_file = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None
    model.train()
    loss_sums, skipped = torch.zeros(4, device=device), torch.zeros((), dtype=torch.long)
    window_start, window_steps, run_start, run_start_step = time.time(), 0, time.time(), step
    last_saved, stopping = (step if ckpt is not None else None), False
    images_per_step = args.batch_size * (2 if args.alpha > 0 else 1)
    while step < last_step and not stopping:
        epoch = step // steps_per_epoch
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args, epoch)
        sampler.set_epoch(epoch, start_batch=step % steps_per_epoch)
        epoch_skipped, epoch_start_step = torch.zeros((), dtype=torch.long), step
        for (rs_q, rs_k), _, n_skipped in loader:
            rs_q, rs_k = rs_q.to(device, non_blocking=True), rs_k.to(device, non_blocking=True)
            natural = labels = None
            if natural_stream is not None:
                natural, labels, natural_skipped = next(natural_stream)
                natural, labels = natural.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                n_skipped = n_skipped + natural_skipped
            loss_sums += train_step(model, ddp_student, rs_q, rs_k, natural, labels, optimizer, scaler, amp_dtype,
                                    args.alpha)
            step += 1
            window_steps += 1
            epoch_skipped += n_skipped.sum()
            end_of_epoch = step % steps_per_epoch == 0
            signalled = world == 1 and stop["signal"] is not None  # one process stops at once; DDP at a log step
            if step % args.log_every and not end_of_epoch and step < last_step and not signalled:
                continue
            # ---- log step: the only host-device sync of the loop
            stats = torch.cat([loss_sums / window_steps,
                               torch.tensor([float(stop["signal"] is not None)], device=device)])
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            loss, loss_ct, loss_ce, nial_acc, stop_votes = stats.tolist()
            if not math.isfinite(loss):
                where = f"at step {step}" if window_steps == 1 else f"in steps {step - window_steps + 1}-{step}"
                raise FloatingPointError(
                    f"the loss became {loss} {where}; the last good "
                    f"checkpoint is {ckpt_path + ' (step %d)' % last_saved if last_saved else 'none'}, left as it "
                    "was. Lower --lr or use --amp off.")
            now = time.time()
            images_per_s = window_steps * images_per_step / (now - window_start)
            if rank == 0:
                eta = (now - run_start) / max(step - run_start_step, 1) * (last_step - step)
                record = {"epoch": epoch, "step": step, "loss": round(loss, 5), "loss_ct": round(loss_ct, 5),
                          "loss_ce": round(loss_ce, 5), "nial_acc": round(nial_acc, 2),
                          "lr": optimizer.param_groups[0]["lr"], "images_per_s": round(images_per_s, 1),
                          "peak_mem_gb": round(peak_memory_gb(device), 3)}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                print(f"gersp | ep {epoch + 1}/{args.epochs} | step {step}/{last_step} | loss {loss:.4f} | "
                      f"L_ct {loss_ct:.4f} | L_ce {loss_ce:.4f} | nial acc {nial_acc:.1f}% | lr {record['lr']:.4g} | "
                      f"{images_per_s:.0f} img/s | mem {record['peak_mem_gb']:.2f} GB | eta {format_eta(eta)}",
                      flush=True)
            loss_sums.zero_()
            window_start, window_steps = time.time(), 0
            stopping = stop_votes > 0
            if stopping or step >= last_step:
                break
        if world > 1:
            epoch_skipped = epoch_skipped.to(device)  # NCCL reduces CUDA tensors only
            dist.all_reduce(epoch_skipped)
        skipped += epoch_skipped.cpu()
        if rank == 0 and epoch_skipped > 0:
            log_file.write(json.dumps({"epoch": epoch, "step": step, "skipped_images": int(epoch_skipped)}) + "\n")
            print(f"gersp | epoch {epoch + 1}: skipped {int(epoch_skipped)} unreadable image(s)", flush=True)
        seen = (step - epoch_start_step) * images_per_step
        if epoch_skipped > seen // 2:
            raise UserError(f"{int(epoch_skipped)} of the {seen} images read in epoch {epoch + 1} could not be "
                            "opened; check the datasets.")
        save(epoch)
        last_saved = step
        if stopping and rank == 0:
            print(f"gersp | stopped by a signal at step {step}; {ckpt_path} resumes it", flush=True)
    if rank == 0:
        if skipped > 0:
            print(f"gersp | {int(skipped)} unreadable image(s) were skipped in this run", flush=True)
        if not stopping:
            print(f"gersp | done at step {step}: backbone in {os.path.join(args.out, 'backbone.pth')}", flush=True)
        log_file.close()
    if world > 1:
        dist.destroy_process_group()


def main(argv=None):
    args = get_args(argv)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # train() replaces them
    try:
        train(args)
    except UserError as err:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"gersp.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:
        print(f"gersp.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
