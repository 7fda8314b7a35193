"""MoCo v1 / v2: Momentum Contrast pre-training on remote-sensing images.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020 (v1), and
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv:2003.04297 (v2). MoCo is the baseline
of the three remote-sensing papers of this project (GeRSP Table I: MoCo-MAID, MoCo-IN-MAID, MoCov2).

    python moco.py --data synthetic --arch resnet18 --img-size 64 --batch-size 64 --queue 4096 --epochs 2
    python moco.py --data /data/million_aid                                    # one GPU, MoCo v2 recipe
    torchrun --nproc_per_node=8 moco.py --data /data/million_aid --data /data/imagenet/train    # MoCo-IN-MAID
    torchrun --nproc_per_node=2 moco.py --data synthetic --arch resnet18 --img-size 64 --batch-size 64 --queue 4096

Paper -> code
    Eq. 1  InfoNCE, the positive key at index 0, temperature T ........ info_nce()
    Eq. 2  momentum update  theta_k <- m theta_k + (1 - m) theta_q ..... MoCo.momentum_update() (projector included)
    Sec. 3.2  the dictionary as a queue: newest keys in, oldest out .... MoCo.enqueue() (keys of all processes)
    Sec. 3.3  shuffling BN .............................................. MoCo.keys() across processes, and
              SplitBatchNorm2d within one (one GPU or CPU process normalises like --bn-group-sized GPUs)
    Algorithm 1  one training step ...................................... train_step()
    v2: MLP projector, blur augmentation, cosine lr ..................... build_encoder(), data.augmentation(), lr_at()

Defaults are those of the official code (facebookresearch/moco): ResNet-50, 200 epochs, total batch 256, SGD lr 0.03
momentum 0.9 weight decay 1e-4, K = 65,536, m = 0.999, feature dim 128; v1: linear head, T = 0.07, jitter
(0.4, 0.4, 0.4, 0.4) every time, lr x0.1 at epochs 120 and 160; v2 (default): 2048-2048-128 MLP head, T = 0.2,
jitter p=0.8 + blur, cosine lr. Choices where the papers are silent:
    - The lr is stepped once per epoch, as in the official code; it is not rescaled when --batch-size changes.
    - BatchNorm statistics come from groups of --bn-group = 32 samples (the official 256 / 8 GPUs) whatever the
      number of processes: the key batch is shuffled over all processes and then split into those groups.
    - The momentum update runs after the optimiser step instead of before the key forward of the next step:
      the key encoder sees exactly the same weights, and the queue needs no clone for autograd.
    - Augmentations are seeded by (seed, epoch, image index), so a resumed run continues bit-for-bit.
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

VERSIONS = {  # what --version switches (Sec. 2 of the MoCo v2 report)
    "v1": dict(head="linear", temperature=0.07, aug="moco_v1", schedule="step"),
    "v2": dict(head="mlp", temperature=0.2, aug="moco_v2", schedule="cosine"),
}
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
RESUME_MUST_MATCH = ("arch", "head", "dim", "queue", "batch_size", "data", "img_size", "seed")


def get_args(argv=None):
    p = data.ArgumentParser(prog=os.path.basename(__file__),
                            description="MoCo v1/v2 pre-training (see the module docstring).")
    p.add_argument("--data", action="append", help="folder of unlabeled images (any nesting); repeat to mix "
                   "datasets; 'synthetic' = built-in generated images. Default: synthetic")
    p.add_argument("--version", choices=VERSIONS, default="v2", help="recipe: head, temperature, augmentation, lr")
    p.add_argument("--head", choices=("linear", "mlp"), help="projector (default: from --version)")
    p.add_argument("--temperature", type=float, help="InfoNCE temperature T (default: 0.07 v1, 0.2 v2)")
    p.add_argument("--aug", choices=("moco_v1", "moco_v2", "gersp"), help="augmentation (default: from --version)")
    p.add_argument("--schedule", choices=("step", "cosine"), help="lr schedule (default: from --version)")
    p.add_argument("--lr-steps", type=int, nargs="+", default=[120, 160], help="epochs of lr x0.1 (step schedule)")
    p.add_argument("--arch", choices=ARCHS, default="resnet50", help="torchvision backbone (resnet18 for CPU)")
    p.add_argument("--dim", type=int, default=128, help="feature dimension of the projector output")
    p.add_argument("--queue", type=int, default=65536, help="K, keys in the queue (a multiple of --batch-size)")
    p.add_argument("--moco-m", type=float, default=0.999, help="momentum m of the key encoder (Eq. 2)")
    p.add_argument("--bn-group", type=int, default=32, help="samples per BatchNorm group (shuffle-BN, Sec. 3.3)")
    p.add_argument("--epochs", type=int, default=200, help="training epochs")
    p.add_argument("--batch-size", type=int, default=256, help="TOTAL batch over all processes")
    p.add_argument("--lr", type=float, default=0.03, help="base learning rate (SGD)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    p.add_argument("--img-size", type=int, default=224, help="crop size of the augmented views")
    p.add_argument("--workers", type=int, help="data-loading processes per GPU/process (default: CPUs / processes)")
    p.add_argument("--seed", type=int, default=0, help="random seed (offset by rank for the training randomness)")
    p.add_argument("--out", default="runs/moco", help="output folder; a checkpoint there is resumed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke runs)")
    p.add_argument("--benchmark", type=int, metavar="N", help="time N steps on synthetic tensors, the compute floor "
                   "and N steps with the real loader; print one JSON line and exit (nothing is written)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="autocast: auto = bf16 "
                   "on CUDA, off on CPU")
    p.add_argument("--log-every", type=int, default=20, help="log and progress line every N steps")
    args = p.parse_args(argv)
    args.data = args.data or [data.SYNTHETIC]
    for key, value in VERSIONS[args.version].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args, world_size):
    """Every impossible setting is one sentence before anything runs or is written."""
    for name in ("epochs", "batch_size", "lr", "queue", "dim", "temperature", "bn_group", "log_every", "max_steps",
                 "benchmark"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if not 0 <= args.moco_m < 1:
        raise UserError(f"--moco-m must be in [0, 1) (got {args.moco_m}).")
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


def build_encoder(arch, head, dim, bn_splits):
    """torchvision ResNet (fc removed: its keys stay torchvision's) + projector: linear (v1) or 2-layer MLP (v2)."""
    backbone = torchvision.models.get_model(arch, norm_layer=partial(SplitBatchNorm2d, splits=bn_splits))
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    if head == "mlp":
        projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))
    else:
        projector = nn.Linear(width, dim)
    return nn.Sequential(OrderedDict(backbone=backbone, projector=projector))


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
        self.queue[self.queue_ptr:self.queue_ptr + len(keys)] = keys
        self.queue_ptr = (self.queue_ptr + len(keys)) % len(self.queue)

    @torch.no_grad()
    def keys(self, im_k):
        """Sec. 3.3 shuffling BN: the key encoder normalises a random subset of the global batch, so the BN
        statistics of a key never come from the same samples as its query's. Returns (local keys, all keys)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        all_images = gather(im_k)
        perm = torch.randperm(len(all_images), device=im_k.device)
        if dist.is_initialized():
            dist.broadcast(perm, 0)
        b = len(im_k)
        k = F.normalize(self.encoder_k(all_images[perm[rank * b:(rank + 1) * b]]), dim=1)
        shuffled = gather(k)
        all_keys = torch.empty_like(shuffled)
        all_keys[perm] = shuffled  # un-shuffle: all_keys[i] is the key of global sample i
        return all_keys[rank * b:(rank + 1) * b], all_keys


def info_nce(q, k, queue, temperature):
    """Eq. 1: L = -log exp(q.k+/T) / (exp(q.k+/T) + sum_i exp(q.k_i/T)); the positive is class 0 of N x (1+K)."""
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels), logits


# ------------------------------------------------------------------------------------------------ training
def train_step(model, query_encoder, im_q, im_k, optimizer, scaler, amp_dtype):
    """Algorithm 1 of the paper: queries with gradient, keys without, InfoNCE, SGD, momentum update, enqueue."""
    with torch.autocast(im_q.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        q = F.normalize(query_encoder(im_q), dim=1)
        k, all_keys = model.keys(im_k)
        loss, logits = info_nce(q.float(), k.float(), model.queue, model.temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.momentum_update()
    model.enqueue(all_keys)
    return loss.detach(), logits.detach()


def lr_at(args, epoch):
    """Official schedule, stepped per epoch: cosine (v2) or x0.1 at --lr-steps (v1)."""
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    return args.lr * 0.1 ** sum(epoch >= milestone for milestone in args.lr_steps)


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


def benchmark(args, model, query_encoder, optimizer, scaler, amp_dtype, loader, device, world):
    """--benchmark N: the training step on synthetic tensors already on the device, against its compute floor (the
    query encoder's forward + backward and the key encoder's forward on the same batch, nothing else), then the
    step fed by the real loader. Prints one JSON line (rank 0)."""
    local = args.batch_size // world
    im_q, im_k = (torch.randn(local, 3, args.img_size, args.img_size, device=device) for _ in range(2))
    autocast = partial(torch.autocast, device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    def floor():
        with autocast():
            model.encoder_q(im_q).float().sum().backward()
            with torch.no_grad():
                model.encoder_k(im_k)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = timed(lambda: train_step(model, query_encoder, im_q, im_k, optimizer, scaler, amp_dtype),
                   args.benchmark, device)
    peak = peak_memory_gb(device)
    floor_s = timed(floor, args.benchmark, device)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # as many epochs as the timing needs

    def loader_step():
        (q, k), _, _ = next(batches)
        train_step(model, query_encoder, q.to(device, non_blocking=True), k.to(device, non_blocking=True), optimizer,
                   scaler, amp_dtype)

    loader_s = timed(loader_step, args.benchmark, device)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"method": f"moco {args.version}", "arch": args.arch, "img_size": args.img_size,
                          "batch_size": args.batch_size, "processes": world, "device": device.type,
                          "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
                          "images_per_s": round(args.batch_size / step_s, 1), "step_s": round(step_s, 4),
                          "floor_s": round(floor_s, 4), "step_over_floor": round(step_s / floor_s, 3),
                          "peak_mem_gb": round(peak, 3), "workers": loader.num_workers,
                          "loader_images_per_s": round(args.batch_size / loader_s, 1)}), flush=True)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def format_eta(seconds):
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def train(args):
    rank, world, device = setup_distributed()
    check_args(args, world)
    paths = data.list_images(args.data)
    data.check_readable(paths, seed=args.seed)
    if len(paths) < args.batch_size:
        raise UserError(f"the dataset has {len(paths)} images, fewer than one batch of {args.batch_size}.")
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
    model = MoCo(build_encoder(args.arch, args.head, args.dim, max(1, local_batch // args.bn_group)),
                 args.queue, args.dim, args.moco_m, args.temperature).to(device)
    query_encoder = DDP(model.encoder_q) if world > 1 else model.encoder_q
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.wd, fused=device.type == "cuda")  # one kernel for the update
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

    dataset = data.ImageDataset(paths, transform=data.TwoViews(data.augmentation(args.aug, args.img_size)),
                                seed=args.seed)
    sampler = data.EpochSampler(len(dataset), args.batch_size, rank, world, args.seed)
    workers = args.workers if args.workers is not None else min(
        8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None, worker_init_fn=quiet_worker,
                        generator=torch.Generator().manual_seed(args.seed))  # leaves the global RNG to the model
    steps_per_epoch = sampler.batches_per_epoch()
    total_steps = args.epochs * steps_per_epoch
    last_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    if args.benchmark:
        return benchmark(args, model, query_encoder, optimizer, scaler, amp_dtype, loader, device, world)

    def save(epoch):
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            rng = {"cpu": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "args": vars(args),
                         "rng": rng, "arch": args.arch, "method": "moco", "backbone_prefix": "encoder_q.backbone."},
                        ckpt_path)
            save_atomic({"arch": args.arch, "method": "moco", "state_dict": model.encoder_q.backbone.state_dict()},
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
        print(f"moco {args.version}: {len(paths)} images, {steps_per_epoch} steps/epoch, {world} process(es) on "
              f"{device.type}, {'resuming at step %d' % step if step else 'starting'}", flush=True)
    log_file = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None
    model.train()
    loss_sum, skipped = torch.zeros((), device=device), torch.zeros((), dtype=torch.long)
    window_start, window_steps, run_start, run_start_step = time.time(), 0, time.time(), step
    last_saved, stopping = (step if ckpt is not None else None), False
    while step < last_step and not stopping:
        epoch = step // steps_per_epoch
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args, epoch)
        sampler.set_epoch(epoch, start_batch=step % steps_per_epoch)
        epoch_skipped, epoch_start_step = torch.zeros((), dtype=torch.long), step
        for (im_q, im_k), _, n_skipped in loader:
            im_q, im_k = im_q.to(device, non_blocking=True), im_k.to(device, non_blocking=True)
            loss, logits = train_step(model, query_encoder, im_q, im_k, optimizer, scaler, amp_dtype)
            step += 1
            window_steps += 1
            loss_sum += loss
            epoch_skipped += n_skipped.sum()
            end_of_epoch = step % steps_per_epoch == 0
            signalled = world == 1 and stop["signal"] is not None  # one process stops at once; DDP at a log step
            if step % args.log_every and not end_of_epoch and step < last_step and not signalled:
                continue
            # ---- log step: the only host-device sync of the loop
            stats = torch.stack([loss_sum / window_steps, (logits.argmax(1) == 0).float().mean() * 100,
                                 torch.tensor(float(stop["signal"] is not None), device=device)])
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            mean_loss, accuracy, stop_votes = stats.tolist()
            if not math.isfinite(mean_loss):
                where = f"at step {step}" if window_steps == 1 else f"in steps {step - window_steps + 1}-{step}"
                raise FloatingPointError(
                    f"the loss became {mean_loss} {where}; the last good "
                    f"checkpoint is {ckpt_path + ' (step %d)' % last_saved if last_saved else 'none'}, left as it "
                    "was. Lower --lr or use --amp off.")
            now = time.time()
            images_per_s = window_steps * args.batch_size / (now - window_start)
            if rank == 0:
                eta = (now - run_start) / max(step - run_start_step, 1) * (last_step - step)
                record = {"epoch": epoch, "step": step, "loss": round(mean_loss, 5), "acc": round(accuracy, 2),
                          "lr": optimizer.param_groups[0]["lr"], "images_per_s": round(images_per_s, 1),
                          "peak_mem_gb": round(peak_memory_gb(device), 3)}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                print(f"moco | ep {epoch + 1}/{args.epochs} | step {step}/{last_step} | loss {mean_loss:.4f} | "
                      f"acc {accuracy:.1f}% | lr {record['lr']:.4g} | {images_per_s:.0f} img/s | "
                      f"mem {record['peak_mem_gb']:.2f} GB | eta {format_eta(eta)}", flush=True)
            loss_sum.zero_()
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
            print(f"moco | epoch {epoch + 1}: skipped {int(epoch_skipped)} unreadable image(s)", flush=True)
        seen = (step - epoch_start_step) * args.batch_size
        if epoch_skipped > seen // 2:
            raise UserError(f"{int(epoch_skipped)} of the {seen} images read in epoch {epoch + 1} could not be "
                            "opened; check the dataset.")
        save(epoch)
        last_saved = step
        if stopping and rank == 0:
            print(f"moco | stopped by a signal at step {step}; {ckpt_path} resumes it", flush=True)
    if rank == 0:
        if skipped > 0:
            print(f"moco | {int(skipped)} unreadable image(s) were skipped in this run", flush=True)
        if not stopping:
            print(f"moco | done at step {step}: backbone in {os.path.join(args.out, 'backbone.pth')}", flush=True)
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
            print(f"moco.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:
        print(f"moco.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
