"""PerA: Perfectly Aligned sample pairs, a DINOv2-style ViT teacher-student on disjoint patch sets of one crop.

Shen et al., "A Contrastive Learning Foundation Model Based on Perfectly Aligned Sample Pairs for Remote Sensing
Images" (paper 002 of this project; authors' code SathShen/PerA). Student and teacher see the SAME crop with
different colours; a random partition of its patches gives the student part s, the learnable part l (mask tokens
whose pixels the student predicts) and the teacher part t. Both networks run on their short sequences only.

    python pera.py --data synthetic --arch vit_tiny --img-size 32 --patch-size 8 --batch-size 32 --epochs 2 \
        --local-crops 2 --warmup-epochs 0 --teacher-temp-epochs 1 --vis runs/pera/vis.png
    python pera.py --data /data/million_aid          # one GPU: the defaults, on a ViT-B/16 (the paper's: a ViT-G/16)
    torchrun --nproc_per_node=8 pera.py --data /data/million_aid --img-size 448 \
        --out runs/pera_vitb                      # the authors' ViT-B config (448 px global, 96 px local crops)
    python pera.py ... --mse-reduction mean --mse-weight 0.1 --koleo-weight 0.01     # Eq. 4 and Eq. 9 as printed
    python tests/benchmark.py pera.py --data /data/million_aid --steps 20 [--dense]   # time, memory (Table 10)

Paper -> code
    Eq. 1-3  disjoint masks s / l / t, U = s + l + t .............................. disjoint_masks(), mask_counts()
    Eq. 1-3  a fresh partition of every crop; the views crop-major ................ masked_views()
    Sec. 3.2.2  aligned views: one crop + flips, two colourings ................... AlignedMultiCrop
    Fig. 2b  sparse student, mask tokens join halfway; sparse teacher ............. encode(), PerA
    Sec. 3.2.2  projector g (student, teacher) and pixel predictor q .............. DINOHead
    Eq. 4  its target: each patch's p x p x 3 pixels, in the embedding's order .... patchify()
    Eq. 4  pixel MSE of the predictor q at l ...................................... pixel_loss()
    Eq. 5-7  [cls] cross-entropy, temperatures, centre ..... cls_loss(), teacher_targets(), update_center()
    Eq. 8  KoLeo (float32, outside autocast) ...................................... koleo()
    Eq. 9-10  L = C1 L_cls + C2 L_MSE + C3 L_KoLeo; teacher = EMA of the student .. train_step(), PerA.ema_update()
    Sec. 4.1  AdamW on the student, q and the mask token (the teacher: Eq. 10) .... train()
    Sec. 4.1  warm-up + cosine lr, rising wd / momentum, drop path ................ schedules(), block_forward()
    Fig. 4b  partition and reconstruction pictures (--vis) ........................ save_visualisation()
    Sec. 3.2.3  the teacher encoder is the backbone; the run: data, loop, save .... train()

Stated by the paper and taken: C1 = 1.0 (after Eq. 9), student temperature 0.1, teacher temperature warm-up 30
epochs, lr warm-up 20 epochs, drop path 0.3, 200 epochs, total batch 192, AdamW, patch 16, multi-crop, 131,072
prototypes.
Where the paper is ambiguous, silent, or contradicts the authors' code, the code's value (the flag gives the paper's):
    - s/l/t 0.2/0.2/0.6 (S_RATIO, T_RATIO in both configs; equal best in Table 13, and Sec. 4.4.3's "s:l about 1:1"):
      Sec. 4.1's 0.3/0.2/0.5 contradicts both: --mask-ratios 0.3 0.2 0.5.
    - L_MSE (Eq. 4, "1/B sum (x - p)^2"): the code sums each patch's p*p*3 squared errors and averages over the
      patches at l; the paper's text reads as a mean over every value: --mse-reduction mean.
    - C2 = 0.01 on that loss and C3 = 0.1, the code's (MAE_LOSS_WEIGHT, KOLEO_LOSS_WEIGHT in Configs/pera_vitb.yaml);
      the paper's C2 0.1 and C3 0.01 (after Eq. 9) are swapped against them: --mse-weight 0.1 --koleo-weight 0.01.
    - Mask tokens (+ position embedding) join the student before block depth // 2 ("halfway").
    - Pixel target: the STUDENT view (colour-jittered, as the code; the paper says "original images"),
      ImageNet-normalised, no per-patch normalisation.
    - [cls] loss index-matched (student crop i vs teacher crop i), averaged over all crops; no cross-crop pairs.
    - Teacher temperature 0.03 -> 0.05 (--warmup-teacher-temp, --teacher-temp); centre momentum 0.9 (Eq. 7's n).
    - The centre averages all crops of the GLOBAL batch; KoLeo (eps 1e-8) on each global crop's head outputs,
      summed, its nearest neighbours searched within each PROCESS's share (as the code): it depends on the processes.
    - Heads g and q: GELU MLP 2048-2048-384 (--head-hidden, --head-bottleneck), L2 norm, weight-normed last layer.
    - lr 1e-3 at any batch size, warm-up from 0, cosine to --min-lr 1e-6; all schedules stepped per iteration.
    - Both warm-ups (lr, teacher temperature) are the code's np.linspace(start, peak, W): the peak at step W - 1.
    - Weight decay cosine 0.04 -> 0.2 on every parameter (biases, norms too); teacher momentum cosine 0.992 -> 1.
    - AdamW betas (0.9, 0.999), eps 2e-5; gradient clipping at global norm 3.0 (--clip-grad 0 = off).
    - Drop path uniform over the student's blocks, per sample; none in the teacher.
    - 2 global crops (scale 0.4-1) and --local-crops 8 of 96 px (--local-size), scale 0.05-0.4, all pairs.
    - Shared horizontal AND vertical flips. Student colour with p=0.8: grayscale (for 0.1 of those) INSTEAD of
      ColorJitter(0.4, 0.4, 0.2, 0.1) (the paper: "DINOv2's colour distortion, additionally random grayscale").
    - Teacher colour: the same jitter with p=0.1. No blur, no solarisation (Sec. 4.1 lists none either).
    - Local crops are split into s and t too (their l patches dropped); their position embeddings bicubic-resized.
Choices of this file:
    - --arch vit_base (the paper's comparisons, Tables 9-13; its ViT-G/16 has no torchvision preset) on 224 px global
      crops, a quarter of the tokens of the code's 448; local crops of 96 px, at most 3/7 of a smaller --img-size.
    - --out-dim 8,192 for vit_tiny; its short CPU runs (README) need --drop-path 0: with 0.3, made for ViT-B, the
      teacher probes below random init.
    - --dense is full-length PerA (both networks on every patch from block 0), Table 10's comparison of sequence
      lengths for time and memory; not the paper's DINOv2 baseline (teacher on global crops only, an iBOT head).
    - Masks are drawn on the device; crops are seeded by (seed, epoch, image index) and every process's RNG state
      is checkpointed, so a resumed run continues bit-for-bit.
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

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

import data
from data import UserError

SCRIPT = os.path.basename(__file__)
METHOD = SCRIPT.removesuffix(".py")  # "method" in checkpoints and backbone.pth
ARCHS = tuple(data.VIT_SIZES)  # vit_tiny / vit_small / vit_base: torchvision VisionTransformer, 12 blocks
OUT_DIMS = {"vit_tiny": 8192, "vit_small": 131072, "vit_base": 131072}  # --out-dim default per arch
GLOBAL_CROPS = 2
TO_TENSOR = T.Compose([T.ToTensor(), T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])  # what the ViT reads
LOGGED = ("loss", "cls", "mse", "koleo")  # what train_step() returns, in log.jsonl
RESUME_MUST_MATCH = ("arch", "patch_size", "img_size", "local_size", "local_crops", "out_dim", "head_hidden")
RESUME_MUST_MATCH += ("head_bottleneck", "batch_size", "seed", "dense")  # and --data's files
READS = ("data", "knn_monitor")  # the flags of the paths the run reads (data.check_paths)
WRITES = ("out", "vis")  # and of those it writes


def get_args(argv=None):
    p = data.ArgumentParser(prog=SCRIPT, description="PerA pre-training (see the module docstring).")
    p.add_argument("--data", action="append", help="folder of images, any nesting; repeat to mix (default: synthetic)")
    p.add_argument("--arch", choices=ARCHS, default="vit_base", help="torchvision ViT (vit_tiny for CPU)")
    p.add_argument("--patch-size", type=int, default=16, help="ViT patch size (8 suits 64 px images)")
    p.add_argument("--img-size", type=int, default=224, help="size of the global crops (and of the exported ViT)")
    p.add_argument("--local-size", type=int, help="local crop size (default: 96, or 3/7 of a smaller --img-size)")
    p.add_argument("--local-crops", type=int, default=8, help="local crop pairs per image (multi-crop; 0 = none)")
    scale = dict(type=float, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--global-scale", default=[0.4, 1.0], help="area range of the global crops", **scale)
    p.add_argument("--local-scale", default=[0.05, 0.4], help="area range of the local crops", **scale)
    ratios = dict(type=float, nargs=3, default=[0.2, 0.2, 0.6], metavar=("S", "L", "T"))
    p.add_argument(
        "--mask-ratios",
        help="disjoint parts: student, learnable, teacher (Eq. 1-3); sum 1 (paper: 0.3 0.2 0.5)",
        **ratios,
    )
    p.add_argument("--dense", action="store_true", help="full-length PerA, every patch from block 0 (Table 10)")
    p.add_argument("--out-dim", type=int, help="DINO head prototypes (default: 131072, the paper's; vit_tiny 8192)")
    p.add_argument("--head-hidden", type=int, default=2048, help="hidden width of the head and predictor MLPs")
    p.add_argument("--head-bottleneck", type=int, default=384, help="bottleneck width before the last layer")
    p.add_argument("--drop-path", type=float, default=0.3, help="stochastic depth rate of the student's blocks")
    p.add_argument("--student-temp", type=float, default=0.1, help="student temperature tpt_s (Eq. 5)")
    p.add_argument("--teacher-temp", type=float, default=0.05, help="teacher temperature tpt_t after its warm-up")
    p.add_argument("--warmup-teacher-temp", type=float, default=0.03, help="teacher temperature at step 0")
    p.add_argument("--teacher-temp-epochs", type=int, default=30, help="epochs of the teacher temperature warm-up")
    p.add_argument("--center-momentum", type=float, default=0.9, help="momentum n of the centre (Eq. 7)")
    p.add_argument("--teacher-momentum", type=float, default=0.992, help="EMA momentum m at step 0; cosine to 1")
    p.add_argument("--cls-weight", type=float, default=1.0, help="C1, weight of the [cls] loss (Eq. 9)")
    p.add_argument(
        "--mse-reduction",
        choices=("patch-sum", "mean"),
        default="patch-sum",
        help="L_MSE (Eq. 4): each patch's squared errors summed, averaged over patches (the code's), or the mean",
    )
    p.add_argument("--mse-weight", type=float, default=0.01, help="C2, weight of L_MSE (Eq. 9; the paper's: 0.1)")
    p.add_argument("--koleo-weight", type=float, default=0.1, help="C3, weight of KoLeo (Eq. 9; the paper's: 0.01)")
    p.add_argument("--epochs", type=int, default=200, help="training epochs")
    p.add_argument("--batch-size", type=int, default=192, help="TOTAL batch over all processes")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate after the warm-up")
    p.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine")
    p.add_argument("--warmup-epochs", type=int, default=20, help="epochs of linear lr warm-up from 0")
    p.add_argument("--wd", type=float, default=0.04, help="weight decay at step 0; cosine to --wd-end")
    p.add_argument("--wd-end", type=float, default=0.2, help="weight decay at the end of training")
    p.add_argument("--clip-grad", type=float, default=3.0, help="clip the global gradient norm (0 = off)")
    p.add_argument("--vis", help="at the end, write a PNG of the s / l / t partition and the predicted pixels")
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
    args.out_dim = args.out_dim or OUT_DIMS[args.arch]
    if args.local_size is None and args.patch_size > 0:  # 96 px (the code's), at most 3/7 of a small --img-size
        patch = args.patch_size
        args.local_size = min(round(96 / patch), max(2, round(args.img_size * 3 / 7 / patch))) * patch
    return args


def check_args(args, world):
    """Every impossible setting of the method is one sentence before anything runs or is written."""
    for name in (
        "patch_size",
        "local_size",
        "out_dim",
        "head_hidden",
        "head_bottleneck",
        "student_temp",
        "teacher_temp",
        "warmup_teacher_temp",
    ):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    for name in (
        "local_crops",
        "warmup_epochs",
        "teacher_temp_epochs",
        "min_lr",
        "wd",
        "wd_end",
        "clip_grad",
        "cls_weight",
        "mse_weight",
        "koleo_weight",
    ):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative (got {getattr(args, name)}).")
    if min(args.mask_ratios) <= 0 or abs(sum(args.mask_ratios) - 1) > 1e-6:
        raise UserError(
            f"--mask-ratios {' '.join(map(str, args.mask_ratios))} must be three positive fractions "
            "s l t that sum to 1 (Eq. 3), e.g. 0.2 0.2 0.6."
        )
    for name in ("teacher_momentum", "center_momentum"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)}).")
    if not 0 <= args.drop_path < 1:
        raise UserError(f"--drop-path must be in [0, 1) (got {args.drop_path}).")
    for name, (low, high) in (("global_scale", args.global_scale), ("local_scale", args.local_scale)):
        if not 0 < low <= high <= 1:
            raise UserError(f"--{name.replace('_', '-')} {low} {high} must satisfy 0 < min <= max <= 1.")
    sizes = [("img_size", 3)] + [("local_size", 2)] * (args.local_crops > 0)  # global: s, l, t; local: s, t
    for name, parts in sizes:
        size = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if size % args.patch_size:
            raise UserError(f"{flag} {size} is not a multiple of --patch-size {args.patch_size}.")
        n = (size // args.patch_size) ** 2
        counts = mask_counts(n, args.mask_ratios)
        if min(counts[0], counts[2], counts[1] if parts == 3 else 1) < 1:
            raise UserError(
                f"{flag} {size} is too small: its {n} patches of {args.patch_size} px leave a part of "
                f"--mask-ratios empty ({counts}); use a larger {flag} or a smaller --patch-size."
            )
    for name, target in (("warmup_epochs", "the lr --lr"), ("teacher_temp_epochs", "--teacher-temp")):
        if getattr(args, name) >= args.epochs:  # a warm-up must end before the run does, as in preco.py
            raise UserError(
                f"--{name.replace('_', '-')} {getattr(args, name)} does not fit in --epochs {args.epochs}: "
                f"{target} would not be reached before the end; give fewer warm-up epochs or more --epochs."
            )
    if args.vis and not args.vis.lower().endswith(data.IMAGE_EXTENSIONS):
        raise UserError(f"--vis {args.vis} has no image extension; give a file name such as vis.png.")


# ------------------------------------------------------------------------------------------------ views and masks
class AlignedMultiCrop:
    """Sec. 3.2.2: every crop is ONE random resized crop + flips shared by the student and the teacher view, which
    differ only in colour. Returns (student globals, teacher globals, student locals, teacher locals), each
    crops x 3 x size x size. All randomness is torch's, which data.ImageDataset seeds per (seed, epoch, index)."""

    def __init__(self, size, local_size, local_crops, global_scale, local_scale):
        self.crops = [(size, global_scale)] * GLOBAL_CROPS + [(local_size, local_scale)] * local_crops
        self.jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)  # Sec. 4.1: brightness ... hue, in a random order

    def student_colour(self, img):
        """With p=0.8 a colour change: grayscale for 0.1 of those, the jitter for the rest (code; the paper: DINOv2's
        distortion "additionally" with random grayscale)."""
        if torch.rand(1) < 0.8:
            return TF.rgb_to_grayscale(img, 3) if torch.rand(1) < 0.1 else self.jitter(img)
        return img

    def teacher_colour(self, img):
        """The teacher view is lightly distorted (code: the same jitter with p=0.1)."""
        return self.jitter(img) if torch.rand(1) < 0.1 else img

    def __call__(self, img):
        student, teacher = [], []
        for size, scale in self.crops:
            top, left, h, w = T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
            crop = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
            if torch.rand(1) < 0.5:
                crop = TF.hflip(crop)
            if torch.rand(1) < 0.5:  # RS images have no upright: vertical flips too (code)
                crop = TF.vflip(crop)
            student.append(TO_TENSOR(self.student_colour(crop)))
            teacher.append(TO_TENSOR(self.teacher_colour(crop)))
        parts = (student[:GLOBAL_CROPS], teacher[:GLOBAL_CROPS], student[GLOBAL_CROPS:], teacher[GLOBAL_CROPS:])
        return tuple(torch.stack(views) if views else torch.empty(0) for views in parts)  # no local crops: empty


def mask_counts(n, ratios):
    """Sizes of the s, l, t parts of n patches, rounded as the authors' code does."""
    n_s, n_sl = round(n * ratios[0]), round(n * (ratios[0] + ratios[1]))
    return n_s, n_sl - n_s, n - n_sl


def disjoint_masks(batch, n, ratios, device, generator=None):
    """Eq. 1-3: per image, a random partition of its n patches into s / l / t (index tensors, batch x part size)."""
    order = torch.rand(batch, n, device=device, generator=generator).argsort(dim=1)
    n_s, n_l, _ = mask_counts(n, ratios)
    return order[:, :n_s], order[:, n_s : n_s + n_l], order[:, n_s + n_l :]


def take(x, index):
    """Rows x[b, index[b]] of every image b: B x N x D and B x n -> B x n x D."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def patchify(images, p):
    """B x 3 x H x W -> B x N x (p*p*3), patches in the row-major order of the patch embedding (Eq. 4's targets)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


# ------------------------------------------------------------------------------------------------ model
def drop_path(x, rate):
    """Stochastic depth: the residual branch of a whole sample is dropped with probability `rate`."""
    return x if rate == 0 else x * x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - rate) / (1 - rate)


def block_forward(block, x, rate):
    """torchvision's EncoderBlock.forward with drop path on both branches (its own submodules: keys unchanged)."""
    h = block.ln_1(x)
    h = block.self_attention(h, h, h, need_weights=False)[0]
    x = x + drop_path(block.dropout(h), rate)
    return x + drop_path(block.mlp(block.ln_2(x)), rate)


def patch_positions(vit, grid):
    """Position embeddings of a grid x grid crop: the ViT's own, bicubic-resized for local crops (as DINOv2)."""
    pos = vit.encoder.pos_embedding[:, 1:]
    side = math.isqrt(pos.shape[1])
    if grid != side:
        pos = (
            F.interpolate(
                pos.reshape(1, side, side, -1).permute(0, 3, 1, 2),
                size=(grid, grid),
                mode="bicubic",
                align_corners=False,
            )
            .permute(0, 2, 3, 1)
            .flatten(1, 2)
        )
    return pos


def encode(vit, images, keep=None, masked=None, mask_token=None, join_at=0, rate=0.0):
    """Fig. 2b: the ViT on the patches `keep` only (+ class token; None = all patches). Before block `join_at` the
    mask token (+ its position embedding) joins at the positions `masked`. Returns the final-norm tokens in the
    order [cls, kept patches, mask tokens]. Dropped patches never enter a block."""
    pos = patch_positions(vit, images.shape[-1] // vit.patch_size)
    x = vit.conv_proj(images).flatten(2).transpose(1, 2) + pos  # B x N x D
    if keep is not None:
        x = take(x, keep)
    cls = (vit.class_token + vit.encoder.pos_embedding[:, :1]).expand(len(x), -1, -1)
    x = vit.encoder.dropout(torch.cat([cls, x], dim=1))
    for i, block in enumerate(vit.encoder.layers):
        if masked is not None and i == join_at:  # Sec. 3.2.2: mask tokens "participate in encoding halfway"
            # appended after the kept patches: attention ignores order, each token's position is its embedding
            x = torch.cat([x, mask_token + take(pos.expand(len(x), -1, -1), masked)], dim=1)
        x = block_forward(block, x, rate)
    return vit.encoder.ln(x)


class DINOHead(nn.Module):
    """Projector g and predictor q (Sec. 3.2.2): 3-layer GELU MLP, L2 normalisation, weight-normalised last layer."""

    def __init__(self, in_dim, out_dim, hidden, bottleneck):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        for layer in self.mlp[::2]:
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        # each row's gain starts at 1 (code): g's rows are unit prototypes; q's outputs start as cosines in [-1, 1]
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=1e-6))


class PerA(nn.Module):
    """Student (encoder f^s, head g^s, predictor q, mask token m), teacher (f^t, g^t: an EMA copy without q) and
    the centre c. forward() is the student (the part DDP wraps); teacher_forward() runs without gradients."""

    def __init__(self, args):
        super().__init__()
        vit = data.build_model(args.arch, args.img_size, args.patch_size)
        vit.heads = nn.Identity()  # the exported keys are torchvision's minus the classifier
        width = vit.hidden_dim
        self.student = nn.ModuleDict(
            dict(encoder=vit, head=DINOHead(width, args.out_dim, args.head_hidden, args.head_bottleneck))
        )
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.predictor = DINOHead(width, 3 * args.patch_size**2, args.head_hidden, args.head_bottleneck)
        self.mask_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.register_buffer("center", torch.zeros(args.out_dim))
        self.dense = args.dense
        self.rate = args.drop_path
        self.join_at = 0 if args.dense else len(vit.encoder.layers) // 2

    def student_encode(self, glob, loc, masks, local_masks):
        """The student encoder alone: the class tokens of every crop (global then local) and the tokens at l."""
        s, l, t = masks
        rate = self.rate if self.training else 0.0
        keep = torch.cat([s, t], dim=1) if self.dense else s  # --dense: every patch, from block 0
        x = encode(self.student.encoder, glob, keep, l, self.mask_token, self.join_at, rate)
        cls = [x[:, 0]]
        if loc is not None:  # local crops: the student's part s only (their l is dropped)
            local_s, _, _ = local_masks
            cls.append(encode(self.student.encoder, loc, None if self.dense else local_s, rate=rate)[:, 0])
        return torch.cat(cls), x[:, -l.shape[1] :]  # the mask tokens come last

    def forward(self, glob, loc, masks, local_masks):
        """Head outputs of the global then local crops (crop-major rows) and the predicted pixels at l."""
        cls, at_l = self.student_encode(glob, loc, masks, local_masks)
        return self.student.head(cls), self.predictor(at_l)

    def teacher_encode(self, glob, loc, masks, local_masks):
        """The teacher encoder alone, on the part t of every crop: the class tokens (global then local)."""
        _, _, t = masks
        cls = [encode(self.teacher.encoder, glob, None if self.dense else t)[:, 0]]
        if loc is not None:
            _, _, local_t = local_masks
            cls.append(encode(self.teacher.encoder, loc, None if self.dense else local_t)[:, 0])
        return torch.cat(cls)

    @torch.no_grad()
    def teacher_forward(self, glob, loc, masks, local_masks):
        return self.teacher.head(self.teacher_encode(glob, loc, masks, local_masks))

    @torch.no_grad()
    def ema_update(self, momentum):
        """Eq. 10: theta_t <- m theta_t + (1 - m) theta_s over the encoder and head, in one foreach call."""
        torch._foreach_lerp_(list(self.teacher.parameters()), list(self.student.parameters()), 1 - momentum)


# ------------------------------------------------------------------------------------------------ losses
def teacher_targets(teacher_out, center, temperature):
    """Eq. 5-6, teacher side: H((t - c) / tpt_t), the centred and sharpened teacher distribution."""
    return F.softmax((teacher_out - center) / temperature, dim=-1)


def cls_loss(student_out, targets, temperature):
    """Eq. 5: -H((t - c) / tpt_t) log H(s / tpt_s), each student crop against the teacher's view of the same crop,
    averaged over crops and images."""
    return -(targets * F.log_softmax(student_out / temperature, dim=-1)).sum(dim=-1).mean()


@torch.no_grad()
def update_center(center, teacher_out, momentum):
    """Eq. 7: c <- n c + (1 - n) * the mean teacher output of the global batch (all crops, all processes)."""
    center.lerp_(gather(teacher_out.float().mean(dim=0, keepdim=True)).mean(dim=0), 1 - momentum)


def koleo(x, eps=1e-8):
    """Eq. 8: -1/B sum_i log(||x_i - x_i'|| + eps), x_i' the nearest other vector of the batch (after L2 norm). The
    batch is this process's share (as in the code): with more processes, fewer candidates. In float32 even under
    autocast: bf16 rounding could pick the wrong nearest neighbour."""
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.T
            dots.fill_diagonal_(-2.0)  # never one's own neighbour
            nearest = dots.argmax(dim=1)
        return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()


def pixel_loss(predicted, images, learnable, patch_size, reduction="patch-sum"):
    """Eq. 4: L_MSE of the pixels predicted at l against the student view's own (normalised) pixels there.
    "patch-sum", the authors' code: each patch's p*p*3 squared errors summed, then averaged over the patches (its C2
    0.01 holds at any --patch-size); "mean": averaged over every value, i.e. "patch-sum" / (3 p^2)."""
    target = take(patchify(images, patch_size), learnable)
    if reduction == "mean":
        return F.mse_loss(predicted.float(), target)
    return (predicted.float() - target).pow(2).sum(dim=-1).mean()


# ------------------------------------------------------------------------------------------------ training
def masked_views(views, args):
    """The loader's views (B x crops x 3 x H x W) crop-major: (crops * B) x 3 x H x W, rows of crop 0 first, so
    .chunk(crops) splits by crop; and a fresh partition s / l / t of every crop (Eq. 1-3)."""
    s_glob, t_glob, s_loc, t_loc = (v.transpose(0, 1).flatten(0, 1) for v in views)
    masks = disjoint_masks(len(s_glob), (args.img_size // args.patch_size) ** 2, args.mask_ratios, s_glob.device)
    if not args.local_crops:
        return s_glob, t_glob, None, None, masks, None
    local_masks = disjoint_masks(len(s_loc), (args.local_size // args.patch_size) ** 2, args.mask_ratios, s_loc.device)
    return s_glob, t_glob, s_loc, t_loc, masks, local_masks


def train_step(model, ddp_model, views, args, sched, optimizer, scaler, amp_dtype):
    """Fig. 2a: disjoint masks, sparse teacher and student, Eq. 9, AdamW with clipping, then Eq. 7 and Eq. 10, at the
    step's schedule `sched`. `model` is the PerA module; `ddp_model` the same weights wrapped by ddp(): its forward is
    the student's, and the backward through it averages the gradients over processes. Returns the detached
    [loss, L_cls, L_MSE, L_KoLeo]."""
    s_glob, t_glob, s_loc, t_loc, masks, local_masks = masked_views(views, args)
    with autocast(s_glob.device, amp_dtype):
        t_out = model.teacher_forward(t_glob, t_loc, masks, local_masks).float()
        s_out, pred = ddp_model(s_glob, s_loc, masks, local_masks)
    s_out = s_out.float()
    l_cls = cls_loss(s_out, teacher_targets(t_out, model.center, sched["teacher_temp"]), args.student_temp)
    _, learnable, _ = masks
    l_mse = pixel_loss(pred, s_glob, learnable, args.patch_size, args.mse_reduction)  # Eq. 4 at l
    l_koleo = sum(koleo(x) for x in s_out[: len(s_glob)].chunk(GLOBAL_CROPS))  # Eq. 8 per global crop (this process's)
    loss = args.cls_weight * l_cls + args.mse_weight * l_mse + args.koleo_weight * l_koleo  # Eq. 9
    update_center(model.center, t_out, args.center_momentum)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    model.ema_update(sched["teacher_momentum"])
    return torch.stack([loss, l_cls, l_mse, l_koleo]).detach()


def cosine(start, end, progress):
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def schedules(args, step, steps_per_epoch):
    """Sec. 4.1, the values of step `step`: lr warm-up from 0, then cosine to --min-lr; weight decay and teacher
    momentum rise on a cosine; the teacher temperature rises during its warm-up, then stays. A warm-up of W steps is
    the authors' np.linspace(start, peak, W): the peak at step W - 1."""
    total = args.epochs * steps_per_epoch
    warm = args.warmup_epochs * steps_per_epoch
    warm_t = args.teacher_temp_epochs * steps_per_epoch
    lr = (
        args.lr * step / max(warm - 1, 1)
        if step < warm
        else cosine(args.lr, args.min_lr, (step - warm) / max(total - warm, 1))
    )
    temp = (
        args.teacher_temp
        if step >= warm_t
        else args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp) * step / max(warm_t - 1, 1)
    )
    return {
        "lr": lr,
        "wd": cosine(args.wd, args.wd_end, step / total),
        "teacher_temp": temp,
        "teacher_momentum": cosine(args.teacher_momentum, 1.0, step / total),
    }


@torch.no_grad()
def save_visualisation(model, paths, args, device, rows=4):
    """Fig. 4b: one row per image (resized whole), six columns: the image | its partition (s as is, l red, t blue) |
    the student's input s | the teacher's input t | the true pixels at l | the predicted ones (Eq. 4). Tiles are
    enlarged to at least 128 px. Returns the line that names the columns."""
    whole = T.Compose([T.Resize((args.img_size, args.img_size)), TO_TENSOR])  # resized, not cropped
    dataset = data.ImageDataset(paths[:rows], transform=whole)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
    p = args.patch_size
    s, l, t = disjoint_masks(
        len(images), (args.img_size // p) ** 2, args.mask_ratios, device, torch.Generator(device).manual_seed(args.seed)
    )
    model.eval()
    _, pred = model(images, None, (s, l, t), None)
    model.train()
    mean, std = (torch.tensor(v, device=device).repeat(p * p) for v in (data.IMAGENET_MEAN, data.IMAGENET_STD))
    img = (patchify(images, p) * std + mean).clamp(0, 1)
    gray, red, blue = (torch.tensor(c, device=device).repeat(p * p) for c in ([0.5] * 3, [1.0, 0, 0], [0, 0, 1.0]))

    def paste(base, index, values):
        return base.scatter(1, index.unsqueeze(-1).expand(-1, -1, base.shape[-1]), values)

    parts = paste(paste(img, l, take(0.4 * img + 0.6 * red, l)), t, take(0.4 * img + 0.6 * blue, t))
    gray = gray.expand_as(img)
    panels = [
        img,
        parts,
        paste(gray, s, take(img, s)),
        paste(gray, t, take(img, t)),
        paste(gray, l, take(img, l)),
        paste(gray, l, (pred.float() * std + mean).clamp(0, 1)),
    ]
    g = args.img_size // p  # patches per side; below: patchify's inverse, image-major, to (N * 6) x 3 x H x W
    tiles = torch.stack(panels, 1).reshape(-1, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(-1, 3, g * p, g * p)
    tiles = F.interpolate(tiles.float().cpu(), scale_factor=-(-128 // (g * p)), mode="nearest")
    os.makedirs(os.path.dirname(os.path.abspath(args.vis)), exist_ok=True)
    save_image(make_grid(tiles, nrow=len(panels), padding=2, pad_value=1.0), args.vis)
    data.record_output(args.out, args.vis)  # the run of --out wrote it: a later run of it may replace it
    return (
        f"partition and reconstruction of {len(images)} images in {args.vis}; columns: image | s / l / t (l red, "
        "t blue) | student input s | teacher input t | true pixels at l | predicted at l"
    )


# ------------------------------------------------------------------------------------------------ the run
def train(args):
    """Data, model, optimiser and resume; then the epoch / batch loop: schedules, train_step(), log, save; --vis at
    the end. Every decision of the run is made here, in sight: the helpers below the banner do one thing each."""
    proc = setup(args)  # this process (torchrun's RANK / WORLD_SIZE / LOCAL_RANK) and the flags every script shares
    check_args(args, proc.world)  # PerA's impossible settings: one sentence before any work
    paths, data_files = data.list_images(args.data)
    data.check_readable(paths, seed=args.seed)  # a sample must open: a folder of other files is refused
    crops = AlignedMultiCrop(args.img_size, args.local_size, args.local_crops, args.global_scale, args.local_scale)
    dataset = data.ImageDataset(paths, transform=crops, seed=args.seed)
    loader = make_loader(dataset, args, proc, args.seed)
    steps_per_epoch = loader.sampler.batches_per_epoch()
    last_step = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    monitor = proc.rank == 0 and args.knn_monitor and data.KnnMonitor(args.knn_monitor, args.img_size, args.seed)

    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = PerA(args).to(proc.device)
    backbone = model.teacher.encoder  # Sec. 3.2.3: the TEACHER encoder is exported and probed by --knn-monitor
    vit_config = {"image_size": args.img_size, "patch_size": args.patch_size}  # what backbone.pth needs besides arch
    trained = [p for p in model.parameters() if p.requires_grad]  # the teacher follows by EMA (Eq. 10)
    fused = proc.device.type == "cuda"  # one kernel for the whole update on a GPU
    optimizer = torch.optim.AdamW(trained, args.lr, betas=(0.9, 0.999), eps=2e-5, weight_decay=args.wd, fused=fused)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=proc.amp_dtype == torch.float16)  # --amp fp16 only
    inputs = {"data": data_files}  # what the run reads, by content: a resume needs the same files
    checkpoint = read_checkpoint(args, RESUME_MUST_MATCH, inputs)  # None when --out holds none
    if proc.rank == 0:
        data.hold_out(args.out, SCRIPT)  # the last check: one run per --out, which it owns
    connect(proc)  # from here the processes work together
    signals = data.stop_at_safe_points()  # a first SIGTERM or Ctrl-C is recorded: the loop stops and saves
    # the same weights; a backward through it averages the gradients over processes (the centre: update_center())
    ddp_model = ddp(model, forward_sync_buffers=False)
    torch.manual_seed(args.seed + proc.rank)  # masks and drop path: each process its own
    step = last_saved = 0
    if checkpoint:  # resume: the weights, centre, optimiser, loss scale, step and every process's random stream
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng(checkpoint["rng"], proc)
        step = last_saved = checkpoint["step"]

    segments = data.run_segments(checkpoint, args, proc.rank)  # args.json: each segment's flags, its first step
    log = Log(args, proc)
    if proc.rank == 0:  # the run's configuration, beside its log
        data.save_atomic(json.dumps({"segments": segments}, indent=2), os.path.join(args.out, "args.json"))
    n = (args.img_size // args.patch_size) ** 2
    n_s, n_l, n_t = (n, 0, n) if args.dense else mask_counts(n, args.mask_ratios)
    tokens = f"{n} patches: student {1 + n_s} -> {1 + n_s + n_l} tokens, teacher {1 + n_t}{' (--dense)' * args.dense}"
    start = f"resuming at step {step}" if step else "starting"
    log(f"{len(paths)} images, {tokens}, {steps_per_epoch} steps/epoch, {proc.world} process(es), {start}")
    if monitor and step == 0:
        log_knn(log, monitor, backbone, 0, 0)  # random init: where the curve starts
    stopping = False
    while step < last_step and not stopping:
        epoch = step // steps_per_epoch
        dataset.set_epoch(epoch)  # crops are seeded by (seed, epoch, image index): resumes are exact
        loader.sampler.set_epoch(epoch, start_batch=step % steps_per_epoch)
        for views, _, skipped in loader:
            sched = schedules(args, step, steps_per_epoch)  # Sec. 4.1, per step
            for group in optimizer.param_groups:
                group["lr"] = sched["lr"]
                group["weight_decay"] = sched["wd"]
            views = [v.to(proc.device, non_blocking=True) for v in views]
            log.add(train_step(model, ddp_model, views, args, sched, optimizer, scaler, proc.amp_dtype), skipped)
            step += 1
            at_once = signals and proc.world == 1  # a signal stops one process at once, several at a log step
            if step % args.log_every == 0 or step % steps_per_epoch == 0 or step == last_step or at_once:
                means = log.window(step, last_step, epoch, LOGGED, sched, signals)  # over all processes
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
            exported = {"arch": args.arch, "method": METHOD, "config": vit_config}
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
            state |= {"step": step, "epoch": epoch, "args": vars(args), "segments": segments, "rng": rngs}
            state |= {"inputs": inputs, "backbone_prefix": "teacher.encoder."}  # eval_linear.py reads it too
            data.save_atomic(state | exported, os.path.join(args.out, "checkpoint.pth"))
            data.save_atomic(exported | {"state_dict": backbone.state_dict()}, os.path.join(args.out, "backbone.pth"))
        last_saved = step
    if args.vis and not stopping and proc.rank == 0:  # Fig. 4b, of the final weights
        log(save_visualisation(model, paths, args, proc.device))
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
