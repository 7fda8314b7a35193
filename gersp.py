"""GeRSP: Generic Knowledge Boosted Remote Sensing Pre-training.

Huang, Zhang, Gong, Liu, Wang, "Generic Knowledge Boosted Pre-training for Remote Sensing Images", IEEE TGRS 2024.
A student ResNet learns from unlabeled remote-sensing images by momentum contrast against an EMA teacher (RSCL) and,
in the same step, from labeled natural images by supervised classification (NIAL); the student is the result.

    python gersp.py --arch resnet18 --img-size 64 --batch-size 64 --queue 4096   # smoke run: built-in textures
    python gersp.py --data /data/million_aid --natural /data/imagenet/train          # one GPU
    torchrun --nproc_per_node=8 gersp.py --data /data/million_aid --natural /data/imagenet/train   # the paper's run
    python gersp.py --data /data/million_aid --alpha 0          # Table V's ablation: GeRSP's recipe without NIAL

Paper -> code
    Sec. III-A  equal numbers of RS and natural images per iteration ... natural_batches() (cycles --natural)
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
The file reads top to bottom: flags, the method, train(), which makes every decision of the run in sight; below the
HELPERS banner, what train() calls (processes, loader, gather, checkpoint reading, the log, main), each doing one thing:
the same text in every method file.
"""

import copy
import json
import math
import os
import resource
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
from torch.utils.data import DataLoader

import data
from data import UserError

SCRIPT = os.path.basename(__file__)
METHOD = SCRIPT.removesuffix(".py")  # "method" in checkpoints and backbone.pth
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
LOGGED = ("loss", "loss_ct", "loss_ce", "nial_acc")  # what train_step() returns, in log.jsonl
RESUME_MUST_MATCH = ("arch", "dim", "queue", "batch_size", "img_size", "seed", "alpha")  # and the files read
READS = ("data", "natural", "knn_monitor")  # the flags of the paths the run reads (data.check_paths)
WRITES = ("out",)  # and of those it writes


def get_args(argv=None):
    p = data.ArgumentParser(prog=SCRIPT, description="GeRSP pre-training (see the module docstring).")
    p.add_argument("--data", action="append", help="folder of images, any nesting; repeat to mix (default: synthetic)")
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
    p.add_argument(
        "--teacher-momentum", "--teacher-m", type=float, default=0.996, help="EMA momentum m of the teacher (Eq. 4)"
    )
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
    p.add_argument("--seed", type=data.seed_value, default=0, help="random seed (offset by rank for the training)")
    p.add_argument("--out", default=f"runs/{METHOD}", help="output folder; a checkpoint there is resumed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke runs, curves)")
    p.add_argument("--log-every", type=int, default=20, help="log and progress line every N steps")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--knn-monitor", metavar="DIR", help="labeled images (EuroSAT, synthetic): log a kNN top-1")
    p.add_argument("--knn-every", type=int, default=1, help="epochs between kNN measurements (also at the start, end)")
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
    if not 0 <= args.teacher_momentum < 1:
        raise UserError(f"--teacher-momentum must be in [0, 1) (got {args.teacher_momentum}).")
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
    if local // bn_group_count(args, world) < 2:  # BatchNorm's statistics need two samples
        raise UserError(f"the per-process batch of {local} leaves BatchNorm groups of 1 image; raise --batch-size.")


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
def natural_data(args, augment):
    """--natural, augmented like the RS images but seeded apart from them: (the dataset, its number of classes, its
    files' identity); with alpha = 0, NIAL is off and --natural is never read."""
    if args.alpha == 0:
        return None, 1, {"files": 0, "sha256": None}
    paths, labels, classes, files = data.labeled_images(args.natural, "--natural")
    data.check_readable(paths, seed=args.seed, flag="--natural")
    return data.ImageDataset(paths, labels, augment, seed=args.seed + 1), len(classes), files


def natural_batches(loader, step, device):
    """Sec. III-A: as many natural images as RS ones per step, the natural data cycled pass after pass (each pass
    reshuffled, its augmentation seeded by (seed + 1, pass, image index)). Step s reads batch s mod B of pass s // B
    (B batches a pass), so a resumed run draws what an uninterrupted one would. Yields images and labels on `device`,
    and the files skipped."""
    natural_epoch, batch = divmod(step, loader.sampler.batches_per_epoch())
    while True:
        loader.dataset.set_epoch(natural_epoch)
        loader.sampler.set_epoch(natural_epoch, start_batch=batch)
        for images, labels, skipped in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True), skipped
        natural_epoch += 1
        batch = 0


# ------------------------------------------------------------------------------------------------ model
def bn_group_count(args, world):
    """Sec. 3.3: BatchNorm groups per process, of --bn-group samples each. With several processes the key batch is
    shuffled across them, so one group is enough; one process needs two, or keys would share their queries' groups."""
    return max(args.batch_size // world // args.bn_group, 1 if world > 1 else 2)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from `groups` interleaved sub-batches (samples i, i+g, i+2g...),
    so one process normalises like `groups` GPUs of the official code. Same parameters and state-dict keys."""

    def __init__(self, num_features, groups=1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.groups = groups

    def forward(self, x):
        if not self.training or self.groups == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.groups
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

    def __init__(self, arch, dim, bn_groups, num_classes, joint=True):
        super().__init__()
        self.backbone = torchvision.models.get_model(arch, norm_layer=partial(SplitBatchNorm2d, groups=bn_groups))
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

    def __init__(self, student, queue_size, dim, teacher_momentum, temperature):
        super().__init__()
        self.student = student
        self.teacher = nn.Sequential(
            OrderedDict(backbone=copy.deepcopy(student.backbone), projector=copy.deepcopy(student.projector))
        ).requires_grad_(False)
        self.teacher_momentum = teacher_momentum
        self.temperature = temperature
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
        torch._foreach_lerp_(list(self.teacher.parameters()), student, 1 - self.teacher_momentum)

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
def train_step(model, ddp_model, rs_q, rs_k, natural, labels, optimizer, scaler, amp_dtype, alpha):
    """One iteration (Fig. 2): student on RS queries and natural images, teacher keys, Eq. 3, SGD, Eq. 4, enqueue.
    `ddp_model` is the student wrapped by ddp(): its backward averages the gradients over processes. `natural` is None
    when alpha = 0: NIAL is then not computed at all. Returns (L, L_ct, L_ce, NIAL accuracy)."""
    with autocast(rs_q.device, amp_dtype):
        z_q, natural_logits = ddp_model(rs_q, natural)
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
    """Data, model, optimiser and resume; then the epoch / batch loop: train_step(), log, save. Every decision of the
    run is made here, in sight: the helpers below the banner do one thing each and report what they found."""
    proc = setup(args)  # this process (torchrun's RANK / WORLD_SIZE / LOCAL_RANK) and the flags every script shares
    check_args(args, proc.world)  # GeRSP's impossible settings: one sentence before any work
    paths, data_files = data.list_images(args.data)
    data.check_readable(paths, seed=args.seed)  # a sample must open: a folder of other files is refused
    augment = augmentation(args.aug, args.img_size)  # Sec. III-B: the same pipeline for both branches
    dataset = data.ImageDataset(paths, transform=partial(two_views, augment), seed=args.seed)
    loader = make_loader(dataset, args, proc, args.seed)
    inputs = {"data": data_files}  # what the run reads, by content: a resume needs the same files
    natural, num_classes, inputs["natural"] = natural_data(args, augment)  # alpha = 0: none, never read
    natural_loader = make_loader(natural, args, proc, args.seed + 1) if natural else None
    steps_per_epoch = loader.sampler.batches_per_epoch()  # an epoch is a pass over the RS images
    last_step = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    monitor = proc.rank == 0 and args.knn_monitor and data.KnnMonitor(args.knn_monitor, args.img_size, args.seed)
    torch.manual_seed(args.seed)  # the same initial weights and queue on every process
    student = Student(args.arch, args.dim, bn_group_count(args, proc.world), num_classes, args.nial_forward == "joint")
    student.predictor.requires_grad_(args.alpha > 0)  # alpha = 0: NIAL is off, the predictor never changes
    model = GeRSP(student, args.queue, args.dim, args.teacher_momentum, args.temperature).to(proc.device)
    backbone = model.student.backbone  # exported as backbone.pth, probed by --knn-monitor
    fused = proc.device.type == "cuda"  # one kernel for the whole update on a GPU
    optimizer = torch.optim.SGD(student.parameters(), args.lr, args.momentum, weight_decay=args.wd, fused=fused)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=proc.amp_dtype == torch.float16)  # --amp fp16 only
    checkpoint = read_checkpoint(args, RESUME_MUST_MATCH, inputs)  # None when --out holds none
    if proc.rank == 0:
        data.hold_out(args.out, SCRIPT)  # the last check: one run per --out, which it owns
    connect(proc)  # from here the processes work together
    signals = data.stop_at_safe_points()  # a first SIGTERM or Ctrl-C is recorded: the loop stops and saves
    ddp_model = ddp(model.student)  # the same weights; a backward through it averages the gradients
    torch.manual_seed(args.seed + proc.rank)  # shuffle-BN permutations: each process its own
    step = last_saved = 0
    if checkpoint:  # resume: the weights, queue, optimiser, loss scale, step and every process's random stream
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng(checkpoint["rng"], proc)
        step = last_saved = checkpoint["step"]

    segments = data.run_segments(checkpoint, args, proc.rank)  # args.json: each segment's flags, its first step
    log = Log(args, proc)
    if proc.rank == 0:  # the run's configuration, beside its log
        data.save_atomic(json.dumps({"segments": segments}, indent=2), os.path.join(args.out, "args.json"))
    nial = f"{len(natural)} natural images of {num_classes} classes" if natural else "NIAL off"
    start = f"resuming at step {step}" if step else "starting"
    log(f"{len(paths)} RS images, {nial}, {steps_per_epoch} steps/epoch, {proc.world} process(es), {start}")
    if monitor and step == 0:
        log_knn(log, monitor, backbone, 0, 0)  # random init: where the curve starts
    naturals = natural_batches(natural_loader, step, proc.device) if natural else None  # from this step on
    stopping = False
    while step < last_step and not stopping:
        epoch = step // steps_per_epoch
        lr = lr_at(args, epoch)  # Eq. 5, per epoch
        for group in optimizer.param_groups:
            group["lr"] = lr
        dataset.set_epoch(epoch)  # augmentations are seeded by (seed, epoch, image index): resumes are exact
        loader.sampler.set_epoch(epoch, start_batch=step % steps_per_epoch)
        for (rs_q, rs_k), _, skipped in loader:
            natural, labels, natural_skipped = next(naturals) if naturals else (None, None, skipped[:0])
            rs_q, rs_k = (x.to(proc.device, non_blocking=True) for x in (rs_q, rs_k))
            values = train_step(
                model, ddp_model, rs_q, rs_k, natural, labels, optimizer, scaler, proc.amp_dtype, args.alpha
            )
            log.add(values, torch.cat([skipped, natural_skipped]))
            step += 1
            at_once = signals and proc.world == 1  # a signal stops one process at once, several at a log step
            if step % args.log_every == 0 or step % steps_per_epoch == 0 or step == last_step or at_once:
                means = log.window(step, last_step, epoch, LOGGED, {"lr": lr}, signals)  # over all processes
                if not math.isfinite(loss := means["loss"]):  # stop: the last good checkpoint stays as it is
                    raise NonFiniteError(f"the loss became {loss}", step, means["steps"], args, last_saved)
                if means["unreadable"] > 0.5:
                    raise UserError(f"more than half the files read by step {step} could not be opened; check --data.")
                stopping = means["signalled"] > 0  # all processes stop at the same step
            if stopping or step == last_step:
                break
        if monitor and not stopping and (step == last_step or (epoch + 1) % args.knn_every == 0):
            log_knn(log, monitor, backbone, step, epoch)
        if bad := data.first_non_finite(model.state_dict()):  # stop before saving: the last good checkpoint stays
            raise NonFiniteError(f"{bad} became non-finite", step, 1, args, last_saved)
        rngs = rng_states(proc)
        if proc.rank == 0:  # at every epoch's end and on a stop: what a resume needs, and the backbone users share
            exported = {"arch": args.arch, "method": METHOD, "config": {}}
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
            state |= {"step": step, "epoch": epoch, "args": vars(args), "segments": segments, "rng": rngs}
            state |= {"inputs": inputs, "backbone_prefix": "student.backbone."}  # eval_linear.py reads it too
            data.save_atomic(state | exported, os.path.join(args.out, "checkpoint.pth"))
            data.save_atomic(exported | {"state_dict": backbone.state_dict()}, os.path.join(args.out, "backbone.pth"))
        last_saved = step
    log(f"{'stopped by a signal' if stopping else 'done'} at step {step}: backbone in {args.out}/backbone.pth")
    return stopping


# =================================================================================================================
# HELPERS: from here to the end the text is the same in every method file (the tests find the method files by this
# banner and hold the text equal: a fix lands in all of them). Each does one thing and returns what it found; train()
# above decides what to do with it. A reader who knows one method file can stop here.
# =================================================================================================================
Process = namedtuple("Process", "rank world device amp_dtype")  # this process; amp_dtype None: no autocast
RUN_FILES = ("checkpoint.pth", "backbone.pth", "args.json", "log.jsonl")  # what train() writes in --out


def setup(args):
    """nanoGPT-style: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (all three, or none: one process). Checks them, the
    flags every method shares and the paths the run reads and writes (READS, WRITES); returns this process's facts."""
    rank, world, local_rank = data.process_env()  # the one process check
    for name in ("epochs", "batch_size", "lr", "img_size", "log_every", "max_steps", "knn_every"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 or more (got {args.workers}).")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes.")
    data.check_paths(SCRIPT, args, READS, WRITES, RUN_FILES)  # no output in an input, no file of another run
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    amp_dtype = {"auto": torch.bfloat16 if cuda else None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return Process(rank, world, device, amp_dtype)


def connect(proc):
    """The processes start working together: NCCL on CUDA, gloo on CPU (one process: nothing to do)."""
    if proc.world > 1:  # a timeout, so that one failed process does not leave the others waiting forever
        dist.init_process_group("nccl" if proc.device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))


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


def make_loader(dataset, args, proc, seed):
    """This process's share of each global batch of `dataset` (data.EpochSampler, shuffled by `seed`). The workers
    start afresh each epoch, so they see the dataset's set_epoch(); they ignore SIGTERM / Ctrl-C."""
    sampler = data.EpochSampler(len(dataset), args.batch_size, proc.rank, proc.world, seed)
    if sampler.batches_per_epoch() == 0:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one batch of {args.batch_size}.")
    workers = args.workers
    if workers is None:  # the CPUs of this machine, shared by its processes
        workers = min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return DataLoader(
        dataset,
        args.batch_size // proc.world,
        sampler=sampler,
        num_workers=workers,
        pin_memory=proc.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        worker_init_fn=data.ignore_stop_signals,
        generator=torch.Generator().manual_seed(seed),
    )


def read_checkpoint(args, must_match, inputs):
    """--out's checkpoint.pth, or None when there is none; one sentence when it is not this script's training
    checkpoint, or was written with other values of the flags `must_match` or other `inputs` (data.file_list_id)."""
    path = os.path.join(args.out, "checkpoint.pth")
    if not os.path.exists(path):
        return None
    checkpoint = data.load_weights_only(path, fix="move it away to start afresh")
    if not isinstance(checkpoint, dict) or checkpoint.get("method") != METHOD or "args" not in checkpoint:
        raise UserError(f"{path} is not a {SCRIPT} training checkpoint; move it away to start afresh.")
    changed = [f"--{k.replace('_', '-')}" for k in must_match if checkpoint["args"].get(k) != vars(args)[k]]
    for flag, now in inputs.items():  # the files by name and size, wherever the folder is (older checkpoints: none)
        then = checkpoint.get("inputs", inputs)[flag]
        if then != now:
            changed.append(f"--{flag} ({then['files']} files then, {now['files']} now, compared by name and size)")
    if changed:
        raise UserError(
            f"{path} was written with other {', '.join(changed)}; use the same to resume, or another --out."
        )
    return checkpoint


def rng_states(proc):
    """The random state of every process (CPU, and CUDA's), in rank order: what a resume needs to continue each."""
    state = {"cpu": torch.get_rng_state()}
    if proc.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    states = [state] * proc.world
    if proc.world > 1:
        dist.all_gather_object(states, state)
    return states


def restore_rng(states, proc):
    """This process's random state from rng_states(); at another number of processes it has none, and is left."""
    if len(states) == proc.world:
        torch.set_rng_state(states[proc.rank]["cpu"])
        if "cuda" in states[proc.rank] and proc.device.type == "cuda":
            torch.cuda.set_rng_state(states[proc.rank]["cuda"], proc.device)


class Log:
    """log.jsonl and the progress line, by rank 0. add() sums a step's values on the device and counts its images and
    unreadable files; window() reduces them over all processes (the one host sync), logs and returns the means."""

    def __init__(self, args, proc):
        self.args = args
        self.proc = proc
        self.sums = self.steps = self.images = self.skipped = 0  # the window's
        self.start = time.time()

    def __call__(self, text, **record):
        if self.proc.rank == 0:  # the progress line; the record, if any, in log.jsonl
            print(f"{METHOD} | {text}", flush=True)
            if record:
                data.append_record(os.path.join(self.args.out, "log.jsonl"), record)

    def add(self, values, skipped):
        self.sums = self.sums + values.float()
        self.steps += 1
        self.images += len(skipped)
        self.skipped += int(skipped.sum())

    def window(self, step, last_step, epoch, names, schedule, signals):
        """Means of `names`, the steps, the unreadable share of the files read and the processes asked to stop."""
        sums = torch.cat([self.sums / self.steps, self.sums.new_tensor([self.images, self.skipped, len(signals)])])
        if self.proc.world > 1:
            dist.all_reduce(sums)
        *values, images, skipped, signalled = sums.tolist()
        means = {name: value / self.proc.world for name, value in zip(names, values)}
        seconds = time.time() - self.start
        memory = torch.cuda.max_memory_allocated() if self.sums.is_cuda else resource.getrusage(0).ru_maxrss * 1024
        record = {k: round(v, 5) for k, v in means.items()} | schedule | {"skipped_images": int(skipped)}
        record |= {"images_per_s": round(images / seconds, 1), "peak_mem_gb": round(memory / 2**30, 3)}
        eta = timedelta(seconds=int(seconds / self.steps * (last_step - step)))
        shown = " | ".join(f"{k} {v:.5g}" for k, v in record.items())
        self(f"ep {epoch + 1} | step {step}/{last_step} | {shown} | eta {eta}", epoch=epoch, step=step, **record)
        means |= {"steps": self.steps, "unreadable": skipped / (skipped + images), "signalled": signalled}
        self.sums = self.steps = self.images = self.skipped = 0
        self.start = time.time()
        return means


def log_knn(log, monitor, backbone, step, epoch):
    """--knn-monitor: the backbone's kNN top-1 now, logged (eval mode, no random draw: the training is unchanged)."""
    start = time.time()
    top1 = monitor.top1(backbone, log.proc.device, log.proc.amp_dtype)
    seconds = time.time() - start
    text = f"step {step} | knn_top1 {top1:.2f}% on {monitor.description} ({seconds:.1f} s)"
    log(text, epoch=epoch, step=step, knn_top1=round(top1, 2), knn_s=round(seconds, 1))


class NonFiniteError(FloatingPointError):
    """The stop on a non-finite loss or weights (exit code 1): `what`, over the `steps` up to `step`, and the last
    good checkpoint, which is left as it was."""

    def __init__(self, what, step, steps, args, last_saved):
        where = f"at step {step}" if steps == 1 else f"in steps {step - steps + 1}-{step}"
        saved = f"{os.path.join(args.out, 'checkpoint.pth')} (step {last_saved})" if last_saved else "none"
        super().__init__(
            f"{what} {where}; the last good checkpoint is {saved}, left as it was. Lower --lr or use --amp off."
        )


def main(argv=None):
    """Bad input: one sentence and exit code 2; non-finite loss or weights: exit code 1; a stop signal: exit code 128 +
    its number (130 Ctrl-C, 143 SIGTERM), never 0, after a line on resuming. Whatever happens, the signal handlers are
    restored, --out is released and the process group is closed."""
    args = get_args(argv)
    handlers = data.handle_stop_signals()  # from the first line of work: a signal before train() saves stops at once
    try:
        stopped = train(args)  # whether a signal stopped the loop
    except data.Interrupted:  # before the run had anything to save, or a second signal: the files written are whole
        stopped = True
    except (UserError, FloatingPointError) as err:
        if data.reports_errors() or isinstance(err, FloatingPointError):
            print(f"{SCRIPT}: error: {err}", file=sys.stderr)
        sys.exit(1 if isinstance(err, FloatingPointError) else 2)
    finally:
        data.restore_stop_signals(handlers)
        data.release_out()
        if dist.is_initialized():
            dist.destroy_process_group()
    if code := data.stop_exit_code(stopped):  # never 0: a `&&` chain or an after-success dependency stops here
        data.report_stop(SCRIPT, code, os.path.join(args.out, "checkpoint.pth"))
        sys.exit(code)


if __name__ == "__main__":
    main()
