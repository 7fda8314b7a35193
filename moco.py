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

SCRIPT = os.path.basename(__file__)
METHOD = SCRIPT.removesuffix(".py")  # "method" in checkpoints and backbone.pth
VERSIONS = {  # what --version switches (Sec. 2 of the MoCo v2 report)
    "v1": dict(head="linear", temperature=0.07, aug="moco_v1", schedule="step"),
    "v2": dict(head="mlp", temperature=0.2, aug="moco_v2", schedule="cosine"),
}
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
LOGGED = ("loss", "acc")  # what train_step() returns, in log.jsonl
RESUME_MUST_MATCH = ("arch", "head", "dim", "queue", "batch_size", "img_size", "seed")  # and --data's files
READS = ("data", "knn_monitor")  # the flags of the paths the run reads (data.check_paths)
WRITES = ("out",)  # and of those it writes


def get_args(argv=None):
    p = data.ArgumentParser(prog=SCRIPT, description="MoCo v1/v2 pre-training (see the module docstring).")
    p.add_argument("--data", action="append", help="folder of images, any nesting; repeat to mix (default: synthetic)")
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
    p.add_argument("--seed", type=data.seed_value, default=0, help="random seed (offset by rank for the training)")
    p.add_argument("--out", default=f"runs/{METHOD}", help="output folder; a checkpoint there is resumed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke runs, curves)")
    p.add_argument("--log-every", type=int, default=20, help="log and progress line every N steps")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--knn-monitor", metavar="DIR", help="labeled images (EuroSAT, synthetic): log a kNN top-1")
    p.add_argument("--knn-every", type=int, default=1, help="epochs between kNN measurements (also at the start, end)")
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
    if local // bn_group_count(args, world) < 2:  # BatchNorm's statistics need two samples
        raise UserError(f"the per-process batch of {local} leaves BatchNorm groups of 1 image; raise --batch-size.")


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


class Encoder(nn.Module):
    """torchvision ResNet (fc removed: its keys stay torchvision's) + projector: linear (v1) or 2-layer MLP (v2)."""

    def __init__(self, arch, dim, bn_groups, head="mlp"):
        super().__init__()
        self.backbone = torchvision.models.get_model(arch, norm_layer=partial(SplitBatchNorm2d, groups=bn_groups))
        width = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))
        if head == "linear":
            self.projector = nn.Linear(width, dim)

    def forward(self, images):
        return self.projector(self.backbone(images))


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and the queue of keys (K x dim, unit vectors)."""

    def __init__(self, encoder, queue_size, dim, key_momentum, temperature):
        super().__init__()
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder).requires_grad_(False)
        self.key_momentum = key_momentum
        self.temperature = temperature
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.queue_ptr = 0  # a Python int: no host-device sync to read it; saved through get_extra_state

    def get_extra_state(self):
        return {"queue_ptr": self.queue_ptr}

    def set_extra_state(self, state):
        self.queue_ptr = state["queue_ptr"]

    @torch.no_grad()
    def momentum_update(self):
        """Eq. 2: theta_k <- m theta_k + (1 - m) theta_q, over every parameter (projector included)."""
        params_q = list(self.encoder_q.parameters())
        torch._foreach_lerp_(list(self.encoder_k.parameters()), params_q, 1 - self.key_momentum)

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
def train_step(model, ddp_model, im_q, im_k, optimizer, scaler, amp_dtype):
    """Algorithm 1 of the paper: queries with gradient, keys without, InfoNCE, SGD, momentum update, enqueue.
    `ddp_model` is the query encoder wrapped by ddp(): its backward averages the gradients over processes.
    Returns (loss, top-1 of the positive key among the queue's in %)."""
    with autocast(im_q.device, amp_dtype):
        q = F.normalize(ddp_model(im_q).float(), dim=1)
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
    """Data, model, optimiser and resume; then the epoch / batch loop: train_step(), log, save. Every decision of the
    run is made here, in sight: the helpers below the banner do one thing each and report what they found."""
    proc = setup(args)  # this process (torchrun's RANK / WORLD_SIZE / LOCAL_RANK) and the flags every script shares
    check_args(args, proc.world)  # MoCo's impossible settings: one sentence before any work
    paths, data_files = data.list_images(args.data)
    data.check_readable(paths, seed=args.seed)  # a sample must open: a folder of other files is refused
    views = partial(two_views, augmentation(args.aug, args.img_size))
    dataset = data.ImageDataset(paths, transform=views, seed=args.seed)
    loader = make_loader(dataset, args, proc, args.seed)
    steps_per_epoch = loader.sampler.batches_per_epoch()
    last_step = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    monitor = proc.rank == 0 and args.knn_monitor and data.KnnMonitor(args.knn_monitor, args.img_size, args.seed)
    torch.manual_seed(args.seed)  # the same initial weights and queue on every process
    encoder = Encoder(args.arch, args.dim, bn_group_count(args, proc.world), args.head)
    model = MoCo(encoder, args.queue, args.dim, args.moco_m, args.temperature).to(proc.device)
    backbone = model.encoder_q.backbone  # exported as backbone.pth, probed by --knn-monitor
    fused = proc.device.type == "cuda"  # one kernel for the whole update on a GPU
    optimizer = torch.optim.SGD(encoder.parameters(), args.lr, args.momentum, weight_decay=args.wd, fused=fused)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=proc.amp_dtype == torch.float16)  # --amp fp16 only
    inputs = {"data": data_files}  # what the run reads, by content: a resume needs the same files
    checkpoint = read_checkpoint(args, RESUME_MUST_MATCH, inputs)  # None when --out holds none
    if proc.rank == 0:
        data.hold_out(args.out, SCRIPT)  # the last check: one run per --out, which it owns
    connect(proc)  # from here the processes work together
    signals = data.stop_at_safe_points()  # a first SIGTERM or Ctrl-C is recorded: the loop stops and saves
    ddp_model = ddp(model.encoder_q)  # the same weights; a backward through it averages the gradients
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
    start = f"resuming at step {step}" if step else "starting"
    log(f"MoCo {args.version}, {len(paths)} images, {steps_per_epoch} steps/epoch, {proc.world} process(es), {start}")
    if monitor and step == 0:
        log_knn(log, monitor, backbone, 0, 0)  # random init: where the curve starts
    stopping = False
    while step < last_step and not stopping:
        epoch = step // steps_per_epoch
        lr = lr_at(args, epoch)  # per epoch, as the official code
        for group in optimizer.param_groups:
            group["lr"] = lr
        dataset.set_epoch(epoch)  # augmentations are seeded by (seed, epoch, image index): resumes are exact
        loader.sampler.set_epoch(epoch, start_batch=step % steps_per_epoch)
        for (im_q, im_k), _, skipped in loader:
            im_q, im_k = (x.to(proc.device, non_blocking=True) for x in (im_q, im_k))
            log.add(train_step(model, ddp_model, im_q, im_k, optimizer, scaler, proc.amp_dtype), skipped)
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
            state |= {"inputs": inputs, "backbone_prefix": "encoder_q.backbone."}  # eval_linear.py reads it too
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
