"""PReCo: prompt-enhanced reconstructive pre-training of a Swin Transformer on remote-sensing images.

Zhang, Liu and Wang, "Prompt-Enhanced Self-supervised Representation Learning for Remote Sensing Image
Understanding" (paper 003), built on Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022.
No code was released: where the paper is silent, this file follows SimMIM's official code (microsoft/SimMIM).

    python preco.py --data synthetic --arch swin_t --img-size 64 --mask-unit 16 --batch-size 32 --epochs 4 \
        --warmup-epochs 1 --lr 1e-4
    python preco.py --data /data/rs_unlabeled --arch swin_b --batch-size 112           # one GPU, the paper's recipe
    torchrun --nproc_per_node=8 preco.py --data /data/rs_unlabeled --arch swin_b       # the paper's 8 x 112 images
    torchrun --nproc_per_node=2 preco.py --data synthetic --arch swin_t --img-size 64 --mask-unit 16 --batch-size 16
    python preco.py ... --no-prompt                  # the paper's ablation "- P-E" (Table 7): SimMIM on the same data
    python preco.py ... --vis grid.png               # at the end (also of a finished run): masked | Y_Re | Y_Pr | input

Paper -> code
    Sec. 3.2  patch-wise random masking ............... random_mask() on a grid of --mask-unit px, upsample_mask()
    Eq. 1  y = g_mlp(f_swin(x_hat)) on masked patches . PReCo.embed() (mask token) + PReCo.forward() (Swin, decoder)
    Eq. 2  L_Re = ||Y_Re - X|| / N, N masked pixels ... masked_distance(Y_Re, X, pixel mask)
    Sec. 3.3  prompt-enhanced branch: the unmasked x
              through the SAME encoder and decoder .... preco_losses(): one forward of [masked; unmasked] images
    Sec. 3.4  L_Pr = Eq. 2 between Y_Pr and X ......... masked_distance(Y_Pr, X, all pixels)
    Eq. 3  L_Sc = Dist(Y_Re, Y_Pr on the same part) ... masked_distance(Y_Re, Y_Pr, pixel mask, --sc-dist)
    Sec. 3.3  contrastive: x and x_hat as two views ... info_nce() on the pooled features, over the global batch
    Eq. 4  L = l_Re L_Re + l_Pr L_Pr + l_Sc L_Sc ...... train_step() (+ l_Con L_Con, the term Sec. 3.3 adds)
    Sec. 4.1  AdamW (0.9, 0.999, 1e-8), lr 1e-5 ....... build_optimizer(), lr_at()
    Table 7  "- P-E" (no prompt-enhanced branch) ...... --no-prompt

Stated by the paper (defaults): Swin-B, 192 x 192 inputs, AdamW betas (0.9, 0.999) eps 1e-8, lr 1e-5, 200 epochs,
batch 112 per GPU on 8 GPUs (--batch-size 896 in total); export the encoder. Where the paper is silent or vague:
    - Masking is SimMIM's: --mask-unit 32 px squares, ceil(--mask-ratio 0.6 x units) of them drawn uniformly.
    - At 64 px (EuroSAT, CPU) use --mask-unit 16: a 4 x 4 grid with 10 units masked (8 px would give 64 small units).
    - Mask token (trunc. normal, std 0.02) after torchvision's patch embedding (4x4 conv + LayerNorm), as SimMIM.
    - Decoder g is SimMIM's: 1x1 conv from the last stage (stride 32) to 32^2 x 3 channels + PixelShuffle(32).
    - Augmentation is SimMIM's (random resized crop 0.67-1, ratio 3/4-4/3, flip); both branches get the same image.
    - X ("raw pixel values") is the ImageNet-normalised input, the target of SimMIM's code.
    - ||.|| in Eq. 2 is L1, summed over masked pixels, divided by their number and the 3 channels (SimMIM).
    - L_Pr covers every pixel: the prompt branch has no masked patch, so Eq. 2's N is the whole image.
    - Dist in Eq. 3 is the same L1 on the masked pixels, where Y_Re predicts (--sc-dist l2: squared error).
    - L_Sc does not train Y_Pr (--no-sc-stop-grad lets it): the prompt, which sees the whole image and learns from
      L_Pr, pulls the masked guess towards itself; it is not pulled towards a guess made without the context.
    - Contrastive term: symmetric InfoNCE, masked vs unmasked view of each image, negatives = the rest of the global
      batch, on the L2-normalised average-pooled final features (what eval_linear.py probes), no projector.
    - Other processes' features enter InfoNCE as constants: the gradient flows through the local ones only.
    - Its temperature is 0.2 (MoCo v2's) --temperature; its weight --lambda-con. Eq. 4's lambdas are 1 (--lambda-*).
    - --no-prompt ("- P-E") drops the unmasked branch and so L_Pr, L_Sc and the contrastive term: SimMIM remains.
    - Weight decay 0.05 (SimMIM), not on norms, biases, the mask token and relative position bias tables (SimMIM).
    - Gradient norm clipped at 5 (SimMIM) --clip-grad; drop path 0 in pre-training (SimMIM) --drop-path.
    - lr per step as SimMIM: linear warmup from lr/200 for --warmup-epochs 10, cosine over all steps to lr/20.
    - The paper's lr 1e-5 is the lr itself; SimMIM would rescale its BASE_LR by batch / 512 (not done here).
    - Window 7 (torchvision) instead of SimMIM's 6 at 192 px: backbone.pth must load into torchvision's swin_t/b.
    - torchvision pads each stage to the window: at 64 px the stages are 16, 8, 4, 2 tokens wide (padded to 21,
      14, 7, 7) and the last one still has stride 32, so the decoder returns 64 px.
    - Both branches run as ONE forward of [masked; unmasked] (one DDP forward; no batch statistics in Swin).
    - Crops and masks are seeded by (seed, epoch, index), drop path by (seed, step, rank): resume is bit-for-bit.
"""
import argparse
import itertools
import json
import math
import os
import resource
import signal
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision import transforms as T

import data
from data import UserError

ARCHS = ("swin_t", "swin_s", "swin_b")
PATCH, STRIDE = 4, 32  # Swin's patch size and the stride of its last stage (SimMIM's encoder_stride)
WARMUP_START, MIN_LR_RATIO = 1 / 200, 1 / 20  # SimMIM's WARMUP_LR / BASE_LR and MIN_LR / BASE_LR
TERMS = ("re", "pr", "sc", "con")  # the logged loss terms; --no-prompt has only "re"
RESUME_MUST_MATCH = ("arch", "batch_size", "data", "img_size", "mask_unit", "mask_ratio", "prompt", "seed")


def get_args(argv=None):
    p = data.ArgumentParser(prog=os.path.basename(__file__),
                            description="PReCo pre-training (see the module docstring).")
    p.add_argument("--data", action="append", help="folder of unlabeled images (any nesting); repeat to mix "
                   "datasets; 'synthetic' = built-in generated images. Default: synthetic")
    p.add_argument("--arch", choices=ARCHS, default="swin_b", help="torchvision Swin encoder (swin_t for CPU)")
    p.add_argument("--mask-unit", type=int, default=32, help="side in px of a masked square (multiple of 4)")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="fraction of mask units masked (rounded up)")
    p.add_argument("--prompt", action=argparse.BooleanOptionalAction, default=True, help="the prompt-enhanced "
                   "branch (Sec. 3.3); --no-prompt is the paper's ablation '- P-E' (Table 7), i.e. SimMIM")
    p.add_argument("--lambda-re", type=float, default=1.0, help="weight of L_Re, the masked reconstruction (Eq. 4)")
    p.add_argument("--lambda-pr", type=float, default=1.0, help="weight of L_Pr, the prompt branch's loss (Eq. 4)")
    p.add_argument("--lambda-sc", type=float, default=1.0, help="weight of L_Sc, semantic consistency (Eq. 3, 4)")
    p.add_argument("--lambda-con", type=float, default=1.0, help="weight of the contrastive term (Sec. 3.3)")
    p.add_argument("--sc-dist", choices=("l1", "l2"), default="l1", help="Dist of Eq. 3 on the masked pixels")
    p.add_argument("--sc-stop-grad", action=argparse.BooleanOptionalAction, default=True, help="L_Sc trains Y_Re "
                   "only (Y_Pr detached); --no-sc-stop-grad also pulls Y_Pr towards Y_Re")
    p.add_argument("--temperature", type=float, default=0.2, help="temperature of the contrastive InfoNCE")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth of the deepest Swin block")
    p.add_argument("--epochs", type=int, default=200, help="training epochs")
    p.add_argument("--batch-size", type=int, default=896, help="TOTAL batch over all processes (paper: 112 x 8)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (AdamW), not rescaled by batch")
    p.add_argument("--min-lr", type=float, help="final lr of the cosine (default: lr / 20, as SimMIM)")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup from lr / 200 (SimMIM)")
    p.add_argument("--wd", type=float, default=0.05, help="weight decay (AdamW; not on norms, biases, tokens)")
    p.add_argument("--clip-grad", type=float, default=5.0, help="gradient norm clipping; 0 = off")
    p.add_argument("--img-size", type=int, default=192, help="crop size (a multiple of 32 and of --mask-unit)")
    p.add_argument("--workers", type=int, help="data-loading processes per GPU/process (default: CPUs / processes)")
    p.add_argument("--seed", type=int, default=0, help="random seed (offset by rank for the training randomness)")
    p.add_argument("--out", default="runs/preco", help="output folder; a checkpoint there is resumed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke runs)")
    p.add_argument("--benchmark", type=int, metavar="N", help="time N steps on synthetic tensors, the compute floor "
                   "and N steps with the real loader; print one JSON line and exit (nothing is written)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="autocast: auto = bf16 "
                   "on CUDA, off on CPU")
    p.add_argument("--log-every", type=int, default=20, help="log and progress line every N steps")
    p.add_argument("--vis", metavar="PATH", help="at the end, write a PNG grid: masked input | Y_Re | Y_Pr | input")
    args = p.parse_args(argv)
    args.data = args.data or [data.SYNTHETIC]
    if args.min_lr is None:
        args.min_lr = args.lr * MIN_LR_RATIO
    return args


def check_args(args, world_size):
    """Every impossible setting is one sentence before anything runs or is written."""
    for name in ("epochs", "batch_size", "lr", "lambda_re", "temperature", "mask_unit", "img_size", "log_every",
                 "max_steps", "benchmark"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    for name in ("lambda_pr", "lambda_sc", "lambda_con", "min_lr", "warmup_epochs", "wd", "clip_grad"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative (got {getattr(args, name)}).")
    if not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask-ratio must be between 0 and 1 (got {args.mask_ratio}).")
    if not 0 <= args.drop_path < 1:
        raise UserError(f"--drop-path must be in [0, 1) (got {args.drop_path}).")
    if args.mask_unit % PATCH:
        raise UserError(f"--mask-unit {args.mask_unit} is not a multiple of Swin's {PATCH}-px patch.")
    if args.img_size % STRIDE:
        raise UserError(f"--img-size {args.img_size} is not a multiple of {STRIDE}, the stride of Swin's last stage "
                        "that the decoder upsamples by.")
    if args.img_size % args.mask_unit:
        raise UserError(f"--img-size {args.img_size} is not a multiple of --mask-unit {args.mask_unit}.")
    units = (args.img_size // args.mask_unit) ** 2
    if math.ceil(units * args.mask_ratio) >= units:
        raise UserError(f"--mask-ratio {args.mask_ratio} of {units} mask unit(s) masks the whole image; use a smaller "
                        "--mask-unit or --mask-ratio.")
    if args.warmup_epochs >= args.epochs:
        raise UserError(f"--warmup-epochs {args.warmup_epochs} must be smaller than --epochs {args.epochs}.")
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes.")
    if args.prompt and args.lambda_con > 0 and args.batch_size < 2:
        raise UserError("the contrastive term needs at least 2 images per batch; raise --batch-size or set "
                        "--lambda-con 0.")
    if os.path.isfile(args.out):
        raise UserError(f"--out {args.out} is a file; give a folder.")
    if args.vis is not None and os.path.isdir(args.vis):
        raise UserError(f"--vis {args.vis} is a folder; give a .png file name.")


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


def gather(x):
    """Concatenate `x` from all processes along dim 0 (rank order); the local part keeps its gradient, the other
    processes' parts are constants here (their own process back-propagates them). Identity on one process."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------ masking and data
def random_mask(grid, ratio):
    """Sec. 3.2 (SimMIM's MaskGenerator): exactly ceil(ratio * grid^2) of the grid x grid units, True = masked."""
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    mask[torch.randperm(grid * grid)[:math.ceil(grid * grid * ratio)]] = True
    return mask.view(grid, grid)


def upsample_mask(mask, factor):
    """(..., g, g) unit mask -> (..., g * factor, g * factor): each unit covers factor x factor tokens or pixels."""
    return mask.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


class MaskedView:
    """SimMIM's pre-training input: (augmented image, its unit mask). data.ImageDataset calls it under the seed of
    (seed, epoch, index), so the crop and the mask of every sample are the same before and after a resume."""

    def __init__(self, size, mask_unit, mask_ratio):
        self.transform = T.Compose([T.RandomResizedCrop(size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)),
                                    T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
        self.grid, self.ratio = size // mask_unit, mask_ratio

    def __call__(self, img):
        return self.transform(img), random_mask(self.grid, self.ratio)


def quiet_worker(worker_id):
    """A SIGTERM or Ctrl-C sent to the process group must not kill the data workers mid-step: the main process
    finishes the step, saves the checkpoint, and then shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ------------------------------------------------------------------------------------------------ model
class PReCo(nn.Module):
    """f_theta: torchvision's Swin (head removed, key names unchanged) with a mask token; g_theta: SimMIM's decoder.
    The reconstructive and the prompt-enhanced branch both run through these same modules (Sec. 3.3)."""

    def __init__(self, arch, mask_unit, drop_path=0.0):
        super().__init__()
        self.encoder = torchvision.models.get_model(arch)
        width = self.encoder.head.in_features
        self.encoder.head = nn.Identity()
        blocks = [m for m in self.encoder.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
        for i, module in enumerate(blocks):  # torchvision's linear rule, rescaled to --drop-path
            module.p = drop_path * i / max(len(blocks) - 1, 1)
        self.mask_token = nn.Parameter(torch.zeros(self.encoder.features[0][-1].normalized_shape[0]))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(nn.Conv2d(width, STRIDE ** 2 * 3, kernel_size=1), nn.PixelShuffle(STRIDE))
        self.tokens_per_unit = mask_unit // PATCH

    def embed(self, images, mask):
        """Sec. 3.2: patch embedding (N H/4 W/4 C), then the mask token replaces every masked patch's embedding."""
        x = self.encoder.features[0](images)
        w = upsample_mask(mask, self.tokens_per_unit).unsqueeze(-1).to(x.dtype)
        return x * (1 - w) + self.mask_token.to(x.dtype) * w

    def forward(self, images, mask):
        """Eq. 1: (predicted pixels N 3 H W, globally averaged final features N C). The loss picks the pixels."""
        x = self.encoder.norm(self.encoder.features[1:](self.embed(images, mask)))
        return self.decoder(x.permute(0, 3, 1, 2)), x.mean(dim=(1, 2))


# ------------------------------------------------------------------------------------------------ losses
def masked_distance(pred, target, mask, dist_fn="l1"):
    """Eq. 2: ||pred - target|| summed over the pixels where `mask` (N H W) is set, divided by their number and by
    the 3 channels (SimMIM's normalisation). L_Re, L_Pr (a mask of ones) and L_Sc (Eq. 3) all use it."""
    diff = (pred - target).abs() if dist_fn == "l1" else (pred - target) ** 2
    weight = mask.unsqueeze(1).to(diff.dtype)
    return (diff * weight).sum() / (weight.sum() + 1e-5) / pred.shape[1]


def info_nce(z_a, z_b, temperature):
    """Sec. 3.3: the masked and the unmasked view of one image are a positive pair, all other images of the global
    batch negatives; symmetric InfoNCE on L2-normalised features, the positive of local sample i at rank * n + i."""
    z_a, z_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    offset = dist.get_rank() * len(z_a) if dist.is_initialized() else 0
    labels = torch.arange(len(z_a), device=z_a.device) + offset
    return 0.5 * (F.cross_entropy(z_a @ gather(z_b).T / temperature, labels) +
                  F.cross_entropy(z_b @ gather(z_a).T / temperature, labels))


def preco_losses(model, images, mask, args):
    """Both branches in ONE pass through the shared encoder and decoder; returns [L_Re, L_Pr, L_Sc, L_Con] in
    float32, or [L_Re] with --no-prompt ('- P-E')."""
    pixel_mask = upsample_mask(mask, args.mask_unit)
    if not args.prompt:
        y_re, _ = model(images, mask)
        return [masked_distance(y_re.float(), images, pixel_mask)]  # Eq. 2
    pixels, pooled = model(torch.cat([images, images]), torch.cat([mask, torch.zeros_like(mask)]))
    (y_re, y_pr), (z_re, z_pr) = pixels.float().chunk(2), pooled.float().chunk(2)
    return [masked_distance(y_re, images, pixel_mask),  # Eq. 2
            masked_distance(y_pr, images, torch.ones_like(pixel_mask)),  # Sec. 3.4: Eq. 2 for Y_Pr, every pixel
            masked_distance(y_re, y_pr.detach() if args.sc_stop_grad else y_pr, pixel_mask, args.sc_dist),  # Eq. 3
            info_nce(z_re, z_pr, args.temperature)]  # Sec. 3.3


# ------------------------------------------------------------------------------------------------ training
def train_step(model, images, mask, optimizer, scaler, amp_dtype, args):
    """One AdamW step on Eq. 4; returns (loss, the terms) as tensors, without a host-device sync."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        terms = preco_losses(model, images, mask, args)
    weights = (args.lambda_re, args.lambda_pr, args.lambda_sc, args.lambda_con)
    loss = sum(w * term for w, term in zip(weights, terms))  # Eq. 4
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.clip_grad > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), torch.stack(terms).detach()


def build_optimizer(model, args):
    """Sec. 4.1: AdamW (0.9, 0.999), eps 1e-8; no weight decay on norms, biases, the mask token and the relative
    position bias tables (SimMIM's no_weight_decay and no_weight_decay_keywords)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim == 1 or name.endswith(".bias") or name == "mask_token" or "relative_position_bias" in name
        (no_decay if skip else decay).append(param)
    fused = next(model.parameters()).is_cuda  # one kernel for the whole update on a GPU
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                             betas=(0.9, 0.999), eps=1e-8, weight_decay=args.wd, fused=fused)


def lr_at(args, step, steps_per_epoch):
    """SimMIM's per-step schedule (timm's CosineLRScheduler): linear warmup from lr/200, then the cosine over ALL
    steps (the warmup only replaces its start) from lr down to --min-lr."""
    warmup = round(args.warmup_epochs * steps_per_epoch)
    if step < warmup:
        start = args.lr * WARMUP_START
        return start + (args.lr - start) * step / warmup
    progress = step / (args.epochs * steps_per_epoch)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def save_visualisation(model, dataset, path, device, count=8):
    """--vis: one row per image of [masked input | Y_Re in the masked units | Y_Pr | input], with PIL."""
    items = [dataset[(0, i)][0] for i in range(min(count, len(dataset)))]
    images = torch.stack([image for image, _ in items]).to(device)
    mask = torch.stack([m for _, m in items]).to(device)
    model.eval()
    y_re, _ = model(images, mask)
    y_pr, _ = model(images, torch.zeros_like(mask))
    model.train()
    m = upsample_mask(mask, images.shape[-1] // mask.shape[-1]).unsqueeze(1).float()
    mean = torch.tensor(data.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    columns = [images * (1 - m), images * (1 - m) + y_re.float() * m, y_pr.float(), images]  # masked = mean colour
    tiles = [((c * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy() for c in columns]
    n, size, gap = len(images), images.shape[-1], 2
    grid = np.full((n * (size + gap) + gap, 4 * (size + gap) + gap, 3), 255, dtype=np.uint8)
    for col, tile in enumerate(tiles):
        for row in range(n):
            y, x = gap + row * (size + gap), gap + col * (size + gap)
            grid[y:y + size, x:x + size] = tile[row]
    zoom = max(1, 128 // size)  # small inputs (EuroSAT's 64 px) are enlarged to be visible
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.repeat(zoom, 0).repeat(zoom, 1)).save(path)


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


def benchmark(args, model, ddp_model, optimizer, scaler, amp_dtype, loader, device, world):
    """--benchmark N: the training step on synthetic images and masks already on the device, against its compute
    floor (the Swin encoder's forward + backward on the masked and the unmasked batch, without decoder, losses or
    updates), then the step fed by the real loader. Prints one JSON line (rank 0)."""
    local, grid = args.batch_size // world, args.img_size // args.mask_unit
    images = torch.randn(local, 3, args.img_size, args.img_size, device=device)
    mask = torch.stack([random_mask(grid, args.mask_ratio) for _ in range(local)]).to(device)
    both = torch.cat([images, images]) if args.prompt else images  # --no-prompt: the masked branch only

    def floor():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            model.encoder(both).float().sum().backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = timed(lambda: train_step(ddp_model, images, mask, optimizer, scaler, amp_dtype, args), args.benchmark,
                   device)
    peak = peak_memory_gb(device)
    floor_s = timed(floor, args.benchmark, device)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # as many epochs as the timing needs

    def loader_step():
        (x, m), _, _ = next(batches)
        train_step(ddp_model, x.to(device, non_blocking=True), m.to(device, non_blocking=True), optimizer, scaler,
                   amp_dtype, args)

    loader_s = timed(loader_step, args.benchmark, device)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"method": "preco" if args.prompt else "preco - P-E", "arch": args.arch,
                          "img_size": args.img_size, "batch_size": args.batch_size, "processes": world,
                          "device": device.type, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
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
        changed = [k for k in RESUME_MUST_MATCH if ckpt.get("args", {}).get(k) != vars(args)[k]]
        if changed:
            raise UserError(f"{ckpt_path} was written with other --{', --'.join(changed).replace('_', '-')}; "
                            "use the same values to resume, or another --out.")
    init_process_group(world, device)
    amp_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bf16": torch.bfloat16,
                 "fp16": torch.float16, "off": None}[args.amp]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    local_batch = args.batch_size // world
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = PReCo(args.arch, args.mask_unit, args.drop_path).to(device)
    ddp_model = DDP(model) if world > 1 else model
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]

    dataset = data.ImageDataset(paths, transform=MaskedView(args.img_size, args.mask_unit, args.mask_ratio),
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
        return benchmark(args, model, ddp_model, optimizer, scaler, amp_dtype, loader, device, world)
    terms = TERMS if args.prompt else TERMS[:1]

    def save(epoch):
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "args": vars(args),
                         "arch": args.arch, "method": "preco", "backbone_prefix": "encoder."}, ckpt_path)
            save_atomic({"arch": args.arch, "method": "preco", "config": {}, "state_dict": model.encoder.state_dict()},
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
        print(f"preco{'' if args.prompt else ' - P-E (no prompt-enhanced branch)'}: {len(paths)} images, "
              f"{steps_per_epoch} steps/epoch, {world} process(es) on {device.type}, "
              f"{'resuming at step %d' % step if step else 'starting'}", flush=True)
    log_file = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None
    model.train()
    loss_sum, terms_sum = torch.zeros((), device=device), torch.zeros(len(terms), device=device)
    skipped = torch.zeros((), dtype=torch.long)
    window_start, window_steps, run_start, run_start_step = time.time(), 0, time.time(), step
    last_saved, stopping = (step if ckpt is not None else None), False
    while step < last_step and not stopping:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, start_batch=step % steps_per_epoch)
        epoch_skipped, epoch_start_step = torch.zeros((), dtype=torch.long), step
        for (images, mask), _, n_skipped in loader:
            images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(args, step, steps_per_epoch)
            torch.manual_seed((args.seed * 1_000_003 + step) * 1_009 + rank)  # drop path: fixed by (seed, step, rank)
            loss, step_terms = train_step(ddp_model, images, mask, optimizer, scaler, amp_dtype, args)
            step += 1
            window_steps += 1
            loss_sum += loss
            terms_sum += step_terms
            epoch_skipped += n_skipped.sum()
            end_of_epoch = step % steps_per_epoch == 0
            signalled = world == 1 and stop["signal"] is not None  # one process stops at once; DDP at a log step
            if step % args.log_every and not end_of_epoch and step < last_step and not signalled:
                continue
            # ---- log step: the only host-device sync of the loop
            stats = torch.cat([loss_sum.view(1) / window_steps, terms_sum / window_steps,
                               torch.tensor([float(stop["signal"] is not None)], device=device)])
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            mean_loss, *term_values, stop_votes = stats.tolist()
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
                record = {"epoch": epoch, "step": step, "loss": round(mean_loss, 5),
                          **{f"l_{k}": round(v, 5) for k, v in zip(terms, term_values)},
                          "lr": optimizer.param_groups[0]["lr"], "images_per_s": round(images_per_s, 1),
                          "peak_mem_gb": round(peak_memory_gb(device), 3)}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                print(f"preco | ep {epoch + 1}/{args.epochs} | step {step}/{last_step} | loss {mean_loss:.4f} | "
                      + " ".join(f"{k} {v:.4f}" for k, v in zip(terms, term_values)) +
                      f" | lr {record['lr']:.4g} | {images_per_s:.1f} img/s | mem {record['peak_mem_gb']:.2f} GB | "
                      f"eta {format_eta(eta)}", flush=True)
            loss_sum.zero_()
            terms_sum.zero_()
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
            print(f"preco | epoch {epoch + 1}: skipped {int(epoch_skipped)} unreadable image(s)", flush=True)
        seen = (step - epoch_start_step) * args.batch_size
        if epoch_skipped > seen // 2:
            raise UserError(f"{int(epoch_skipped)} of the {seen} images read in epoch {epoch + 1} could not be "
                            "opened; check the dataset.")
        save(epoch)
        last_saved = step
        if stopping and rank == 0:
            print(f"preco | stopped by a signal at step {step}; {ckpt_path} resumes it", flush=True)
    if rank == 0:
        if skipped > 0:
            print(f"preco | {int(skipped)} unreadable image(s) were skipped in this run", flush=True)
        if not stopping:
            if args.vis:
                save_visualisation(model, dataset, args.vis, device)
                print(f"preco | reconstructions of {min(8, len(dataset))} images in {args.vis}", flush=True)
            print(f"preco | done at step {step}: backbone in {os.path.join(args.out, 'backbone.pth')}", flush=True)
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
            print(f"preco.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:
        print(f"preco.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
