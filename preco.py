"""PReCo: prompt-enhanced reconstructive pre-training of a Swin Transformer on remote-sensing images.

Zhang, Liu and Wang, "Prompt-Enhanced Self-supervised Representation Learning for Remote Sensing Image
Understanding" (paper 003), built on Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022.
No code was released: where the paper is silent, this file follows SimMIM's official code (microsoft/SimMIM).

    python preco.py --data synthetic --arch swin_t --img-size 64 --mask-unit 16 --batch-size 32 --epochs 4 \
        --warmup-epochs 1 --lr 1e-4
    python preco.py --data /data/rs_unlabeled --arch swin_b --batch-size 112      # one GPU, the paper's batch per GPU
    torchrun --nproc_per_node=8 preco.py --data /data/rs_unlabeled --arch swin_b       # the paper's 8 x 112 images
    python preco.py ... --no-prompt                  # the paper's ablation "- P-E" (Table 7): SimMIM on the same data
    python preco.py ... --lambda-con 0               # Eq. 4 as printed: no contrastive term
    python preco.py ... --vis grid.png               # at the end (also of a finished run): masked | Y_Re | Y_Pr | input

Paper -> code
    Sec. 3.2  patch-wise random masking ............... random_mask() on a grid of --mask-unit px, upsample_mask()
    Sec. 3.2  the input: an augmented crop, its mask .. MaskedView (seeded per image: exact resume)
    Eq. 1  y = g_mlp(f_swin(x_hat)) on masked patches . PReCo.embed() (mask token) + PReCo.forward() (Swin, decoder)
    Eq. 1  decoder g: stride-32 features to pixels .... PReCo.decoder (SimMIM's 1x1 conv + PixelShuffle)
    Eq. 2  L_Re = ||Y_Re - X|| / N, N masked pixels ... masked_distance(Y_Re, X, pixel mask)
    Sec. 3.3  prompt-enhanced branch: the unmasked x
              (the "prompt template", an all-zero mask)
              through the SAME encoder and decoder .... preco_losses(): one forward of [masked; unmasked] images
    Sec. 3.4  L_Pr = Eq. 2 between Y_Pr and X ......... masked_distance(Y_Pr, X, all pixels, or --pr-pixels masked)
    Eq. 3  L_Sc = Dist(Y_Re, Y_Pr on the same part) ... masked_distance(Y_Re, Y_Pr, pixel mask, --sc-dist)
    Eq. 4  L = l_Re L_Re + l_Pr L_Pr + l_Sc L_Sc ...... train_step(); Eq. 4 as printed has these 3 terms only
    not Eq. 4: + l_Con L_Con, this file's reading
              of Sec. 3.3 ("contrastive learning is also
              integrated": x and x_hat as two views) .. info_nce() on the pooled features, over the global batch;
                                                        ON by default, --lambda-con 0 gives Eq. 4 as printed
    Sec. 4.1  AdamW (0.9, 0.999, 1e-8), lr 1e-5 ....... build_optimizer(), lr_at()
    Table 7  "- P-E" (no prompt-enhanced branch) ...... --no-prompt
    Sec. 4.1  export: the encoder f (Swin, torchvision
              keys, no head) as backbone.pth .......... train() (backbone = model.encoder)
    the run: data, model, resume, loop, log, save ..... train() (sets the lr every step; --vis at the end)

Stated by the paper (defaults): Swin-B, 192 x 192 inputs, AdamW betas (0.9, 0.999) eps 1e-8, lr 1e-5, 200 epochs,
batch 112 per GPU on 8 GPUs (--batch-size 896 in total); export the encoder. Where the paper is silent or vague:
    - Masking is SimMIM's: --mask-unit 32 px squares, ceil(--mask-ratio 0.6 x units) of them drawn uniformly.
    - At 64 px (EuroSAT, CPU) use --mask-unit 16: a 4 x 4 grid with 10 units masked (8 px would give 64 small units).
    - Mask token (trunc. normal, std 0.02) after torchvision's patch embedding (4x4 conv + LayerNorm), as SimMIM.
    - Decoder g is SimMIM's: 1x1 conv (here as a Linear) from the last stage (stride 32) to 32^2 x 3, PixelShuffle.
    - Augmentation is SimMIM's (random resized crop 0.67-1, ratio 3/4-4/3, flip); both branches get the same image.
    - X ("raw pixel values") is the ImageNet-normalised input, the target of SimMIM's code.
    - ||.|| in Eq. 2 is L1, summed over masked pixels, divided by their number and the 3 channels (SimMIM).
    - L_Pr covers every pixel: the prompt branch has no masked patch, so Eq. 2's N is read as the whole image
      (--pr-pixels masked: the masked units only, Eq. 2's N taken literally).
    - Dist in Eq. 3 is the same L1 on the masked pixels, where Y_Re predicts (--sc-dist l2: squared error).
    - L_Sc does not train Y_Pr (--no-sc-stop-grad lets it): the prompt, which sees the whole image and learns from
      L_Pr, pulls the masked guess towards itself; it is not pulled towards a guess made without the context.
    - Contrastive term: symmetric InfoNCE, masked vs unmasked view of each image, negatives = the rest of the global
      batch, on the L2-normalised average-pooled final features (what eval_linear.py probes), no projector.
    - Every process's features enter InfoNCE through a differentiable gather: N processes on B / N images each
      train like one process on B (MoCo-style constants would lose (N-1)/N of the negatives' gradient).
    - Its temperature is 0.2 (MoCo v2's) --temperature; its weight --lambda-con 1: the contrastive term is ON by
      default although Eq. 4 as printed has none (--lambda-con 0). The paper contradicts itself (Sec. 3.3 integrates
      it, Eq. 4 omits it), has no code, and SimMIM has no such term to decide; the text names it part of PReCo, and
      at small scale it is what pays (README: 60.85 with it, 39.82 without, random 49.89). Eq. 4's lambdas are 1.
    - InfoNCE runs in float32 outside autocast (bf16 rounding would show at 1/T = 5).
    - --no-prompt ("- P-E") drops the unmasked branch and so L_Pr, L_Sc and the contrastive term: SimMIM remains.
    - Weight decay 0.05 (SimMIM), not on norms, biases, the mask token and relative position bias tables (SimMIM).
    - Gradient norm clipped at 5 (SimMIM) --clip-grad; drop path 0 in pre-training (SimMIM) --drop-path.
    - lr per step as SimMIM: linear warmup from lr/200 for --warmup-epochs 10, cosine over all steps to lr/20.
    - The paper's lr 1e-5 is the lr itself; SimMIM would rescale its BASE_LR by batch / 512 (not done here).
    - Window 7 (torchvision) instead of SimMIM's 6 at 192 px: backbone.pth must load into torchvision's swin_t/b.
    - Both branches run as ONE forward of [masked; unmasked] (one DDP forward; no batch statistics in Swin).
    - Crops and masks are seeded by (seed, epoch, index), every process's RNG (drop path) is saved: exact resume.
The file reads top to bottom: flags, the method, train(), which makes every decision of the run in sight; below the
HELPERS banner, what train() calls (processes, loader, gather, checkpoint reading, the log, main), each doing one thing:
the same text in every method file.
"""

import argparse
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
import torchvision
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
from data import UserError

SCRIPT = os.path.basename(__file__)
METHOD = SCRIPT.removesuffix(".py")  # "method" in checkpoints and backbone.pth
ARCHS = ("swin_t", "swin_s", "swin_b")
PATCH = 4  # Swin's patch size
STRIDE = 32  # the stride of Swin's last stage (SimMIM's encoder_stride); torchvision pads each stage to its window
WARMUP_START = 1 / 200  # SimMIM's WARMUP_LR / BASE_LR
MIN_LR_RATIO = 1 / 20  # SimMIM's MIN_LR / BASE_LR
LOGGED = ("loss", "l_re", "l_pr", "l_sc", "l_con")  # what train_step() returns; --no-prompt: the first two
RESUME_MUST_MATCH = ("arch", "batch_size", "img_size", "mask_unit", "mask_ratio", "prompt", "seed")  # + files
READS = ("data", "knn_monitor")  # the flags of the paths the run reads (data.check_paths)
WRITES = ("out", "vis")  # and of those it writes


def get_args(argv=None):
    p = data.ArgumentParser(prog=SCRIPT, description="PReCo pre-training (see the module docstring).")
    p.add_argument("--data", action="append", help="folder of images, any nesting; repeat to mix (default: synthetic)")
    p.add_argument("--arch", choices=ARCHS, default="swin_b", help="torchvision Swin encoder (swin_t for CPU)")
    p.add_argument("--mask-unit", type=int, default=32, help="side in px of a masked square (multiple of 4)")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="fraction of mask units masked (rounded up)")
    p.add_argument(
        "--prompt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the prompt-enhanced "
        "branch (Sec. 3.3); --no-prompt is the paper's ablation '- P-E' (Table 7), i.e. SimMIM",
    )
    p.add_argument("--lambda-re", type=float, default=1.0, help="weight of L_Re, the masked reconstruction (Eq. 4)")
    p.add_argument("--lambda-pr", type=float, default=1.0, help="weight of L_Pr, the prompt branch's loss (Eq. 4)")
    p.add_argument("--lambda-sc", type=float, default=1.0, help="weight of L_Sc, semantic consistency (Eq. 3, 4)")
    p.add_argument(
        "--lambda-con", type=float, default=1.0, help="weight of the contrastive term (Sec. 3.3); 0 = Eq. 4 as printed"
    )
    p.add_argument(
        "--pr-pixels",
        choices=("all", "masked"),
        default="all",
        help="pixels of L_Pr: every one, or the masked units only (Eq. 2's N)",
    )
    p.add_argument("--sc-dist", choices=("l1", "l2"), default="l1", help="Dist of Eq. 3 on the masked pixels")
    p.add_argument(
        "--sc-stop-grad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="L_Sc trains Y_Re only (Y_Pr detached); --no-sc-stop-grad also pulls Y_Pr towards Y_Re",
    )
    p.add_argument("--temperature", type=float, default=0.2, help="temperature of the contrastive InfoNCE")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth of the deepest Swin block")
    p.add_argument("--epochs", type=int, default=200, help="training epochs")
    p.add_argument("--batch-size", type=int, default=896, help="TOTAL batch over all processes (paper: 8 GPUs x 112)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (AdamW), not rescaled by batch")
    p.add_argument("--min-lr", type=float, help="final lr of the cosine (default: lr / 20, as SimMIM)")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup from lr / 200 (SimMIM)")
    p.add_argument("--wd", type=float, default=0.05, help="weight decay (AdamW; not on norms, biases, tokens)")
    p.add_argument("--clip-grad", type=float, default=5.0, help="gradient norm clipping; 0 = off")
    p.add_argument("--img-size", type=int, default=192, help="crop size (a multiple of 32 and of --mask-unit)")
    p.add_argument("--vis", metavar="PATH", help="at the end, write a PNG grid: masked input | Y_Re | Y_Pr | input")
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
    if args.min_lr is None:
        args.min_lr = args.lr * MIN_LR_RATIO
    return args


def check_args(args, world):
    """Every impossible setting of the method is one sentence before anything runs or is written."""
    for name in ("temperature", "mask_unit"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    for name in ("lambda_re", "lambda_pr", "lambda_sc", "lambda_con", "min_lr", "warmup_epochs", "wd", "clip_grad"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative (got {getattr(args, name)}).")
    weights = (args.lambda_re, args.lambda_pr, args.lambda_sc, args.lambda_con) if args.prompt else (args.lambda_re,)
    if not any(weights):
        raise UserError(
            "every loss weight is 0: raise one of --lambda-re, --lambda-pr, --lambda-sc, --lambda-con "
            "(--no-prompt trains L_Re alone)."
        )
    if not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask-ratio must be between 0 and 1 (got {args.mask_ratio}).")
    if not 0 <= args.drop_path < 1:
        raise UserError(f"--drop-path must be in [0, 1) (got {args.drop_path}).")
    if args.mask_unit % PATCH:
        raise UserError(f"--mask-unit {args.mask_unit} is not a multiple of Swin's {PATCH}-px patch.")
    if args.img_size % STRIDE:
        raise UserError(
            f"--img-size {args.img_size} is not a multiple of {STRIDE}, the stride of Swin's last stage "
            "that the decoder upsamples by."
        )
    if args.img_size % args.mask_unit:
        raise UserError(f"--img-size {args.img_size} is not a multiple of --mask-unit {args.mask_unit}.")
    units = (args.img_size // args.mask_unit) ** 2
    if math.ceil(units * args.mask_ratio) >= units:
        raise UserError(
            f"--mask-ratio {args.mask_ratio} of {units} mask unit(s) masks the whole image; use a smaller "
            "--mask-unit or --mask-ratio."
        )
    if args.warmup_epochs >= args.epochs:  # a warm-up must end before the run does, as in pera.py
        raise UserError(
            f"--warmup-epochs {args.warmup_epochs} does not fit in --epochs {args.epochs}: the lr --lr would not be "
            "reached before the end; give fewer warm-up epochs or more --epochs."
        )
    if args.prompt and args.lambda_con > 0 and args.batch_size < 2:
        raise UserError(
            "the contrastive term needs at least 2 images per batch; raise --batch-size or set --lambda-con 0."
        )
    if args.vis and not args.vis.lower().endswith(data.IMAGE_EXTENSIONS):
        raise UserError(f"--vis {args.vis} has no image extension; give a file name such as vis.png.")


# ------------------------------------------------------------------------------------------------ masking and data
def random_mask(grid, ratio):
    """Sec. 3.2 (SimMIM's MaskGenerator): exactly ceil(ratio * grid^2) of the grid x grid units, True = masked."""
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    mask[torch.randperm(grid * grid)[: math.ceil(grid * grid * ratio)]] = True
    return mask.view(grid, grid)


def upsample_mask(mask, factor):
    """(..., g, g) unit mask -> (..., g * factor, g * factor): each unit covers factor x factor tokens or pixels."""
    return mask.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


class MaskedView:
    """SimMIM's pre-training input: (augmented image, its unit mask). data.ImageDataset calls it under the seed of
    (seed, epoch, index), so the crop and the mask of every sample are the same before and after a resume."""

    def __init__(self, size, mask_unit, mask_ratio):
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
            ]
        )
        self.grid = size // mask_unit
        self.ratio = mask_ratio

    def __call__(self, img):
        return self.transform(img), random_mask(self.grid, self.ratio)


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
        # g: SimMIM's 1x1 conv, as the same Linear on Swin's N H W C output (at a 1 x 1 last stage the conv's gradient
        # layout made DDP warn every step), then PixelShuffle: each stride-32 token paints its own 32 x 32 pixels
        self.decoder = nn.Sequential(
            nn.Linear(width, STRIDE**2 * 3), torchvision.ops.Permute([0, 3, 1, 2]), nn.PixelShuffle(STRIDE)
        )
        self.tokens_per_unit = mask_unit // PATCH

    def embed(self, images, mask):
        """Sec. 3.2: patch embedding (N H/4 W/4 C), then the mask token replaces every masked patch's embedding."""
        x = self.encoder.features[0](images)
        w = upsample_mask(mask, self.tokens_per_unit).unsqueeze(-1).to(x.dtype)
        return x * (1 - w) + self.mask_token.to(x.dtype) * w

    def forward(self, images, mask):
        """Eq. 1: (predicted pixels N 3 H W, globally averaged final features N C). The loss picks the pixels."""
        x = self.encoder.norm(self.encoder.features[1:](self.embed(images, mask)))
        return self.decoder(x), x.mean(dim=(1, 2))


# ------------------------------------------------------------------------------------------------ losses
def masked_distance(pred, target, mask, dist_fn="l1"):
    """Eq. 2: ||pred - target|| summed over the pixels where `mask` (N H W) is set, divided by their number and by
    the 3 channels (SimMIM's normalisation). L_Re, L_Pr (a mask of ones) and L_Sc (Eq. 3) all use it."""
    diff = (pred - target).abs() if dist_fn == "l1" else (pred - target) ** 2
    weight = mask.unsqueeze(1).to(diff.dtype)
    return (diff * weight).sum() / (weight.sum() + 1e-5) / pred.shape[1]


def info_nce(z_a, z_b, temperature):
    """Sec. 3.3: the masked and the unmasked view of one image are a positive pair, all other images of the global
    batch negatives; symmetric InfoNCE on L2-normalised features, the positive of local sample i at rank * n + i.
    In float32 outside autocast; gather() is differentiable, so every process's anchors train every feature."""
    with torch.autocast(z_a.device.type, enabled=False):
        z_a, z_b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)
        offset = dist.get_rank() * len(z_a) if dist.is_initialized() else 0
        labels = torch.arange(len(z_a), device=z_a.device) + offset
        return 0.5 * (
            F.cross_entropy(z_a @ gather(z_b).T / temperature, labels)
            + F.cross_entropy(z_b @ gather(z_a).T / temperature, labels)
        )


def preco_losses(
    model, images, mask, mask_unit, prompt=True, pr_pixels="all", sc_dist="l1", sc_stop_grad=True, temperature=0.2
):
    """Both branches in ONE pass through the shared encoder and decoder; returns [L_Re, L_Pr, L_Sc, L_Con] in
    float32, or [L_Re] without the prompt branch ('- P-E')."""
    pixel_mask = upsample_mask(mask, mask_unit)
    if not prompt:
        y_re, _ = model(images, mask)
        return [masked_distance(y_re.float(), images, pixel_mask)]  # Eq. 2
    prompt_mask = torch.zeros_like(mask)  # Sec. 3.3's prompt template: the same image with nothing masked
    pixels, pooled = model(torch.cat([images, images]), torch.cat([mask, prompt_mask]))
    (y_re, y_pr), (z_re, z_pr) = pixels.float().chunk(2), pooled.float().chunk(2)
    pr_mask = pixel_mask if pr_pixels == "masked" else torch.ones_like(pixel_mask)
    return [
        masked_distance(y_re, images, pixel_mask),  # Eq. 2
        # Sec. 3.4: Eq. 2 for Y_Pr; no identity task: every 32 x 32 pixels come back from one stride-32 token
        masked_distance(y_pr, images, pr_mask),
        masked_distance(y_re, y_pr.detach() if sc_stop_grad else y_pr, pixel_mask, sc_dist),  # Eq. 3
        info_nce(z_re, z_pr, temperature),  # Sec. 3.3, this file's reading: not a term of Eq. 4
    ]


# ------------------------------------------------------------------------------------------------ training
def train_step(model, images, mask, optimizer, scaler, amp_dtype, args):
    """One AdamW step on Eq. 4 + l_Con L_Con; returns [loss, L_Re, L_Pr, L_Sc, L_Con] ([loss, L_Re] with --no-prompt),
    no sync."""
    with autocast(images.device, amp_dtype):
        terms = preco_losses(
            model,
            images,
            mask,
            args.mask_unit,
            args.prompt,
            args.pr_pixels,
            args.sc_dist,
            args.sc_stop_grad,
            args.temperature,
        )
    weights = (args.lambda_re, args.lambda_pr, args.lambda_sc, args.lambda_con)
    loss = sum(w * term for w, term in zip(weights, terms))  # Eq. 4, + the contrastive term unless --lambda-con 0
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.clip_grad > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return torch.stack([loss, *terms]).detach()


def build_optimizer(model, args):
    """Sec. 4.1: AdamW (0.9, 0.999), eps 1e-8; no weight decay on norms, biases, the mask token and the relative
    position bias tables (SimMIM's no_weight_decay and no_weight_decay_keywords). `model`: the plain PReCo."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim == 1 or name.endswith(".bias") or name == "mask_token" or "relative_position_bias" in name
        (no_decay if skip else decay).append(param)
    fused = next(model.parameters()).is_cuda  # one kernel for the whole update on a GPU
    return torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=args.wd,
        fused=fused,
    )


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
def save_visualisation(model, dataset, args, device, count=8):
    """--vis: a PNG, one row per image (epoch 0's crop and mask) of four columns: the masked input x_hat (masked
    units in the mean colour) | Y_Re pasted into the masked units (Eq. 1) | Y_Pr, the prompt branch's output | the
    input x; tiles enlarged to at least 128 px. Returns the line that names the columns."""
    items = [dataset.load(i, 0)[0] for i in range(min(count, len(dataset)))]
    images = torch.stack([image for image, _ in items]).to(device)
    mask = torch.stack([m for _, m in items]).to(device)
    model.eval()
    y_re, _ = model(images, mask)
    y_pr, _ = model(images, torch.zeros_like(mask))
    model.train()
    m = upsample_mask(mask, images.shape[-1] // mask.shape[-1]).unsqueeze(1).float()
    columns = [images * (1 - m), images * (1 - m) + y_re.float() * m, y_pr.float(), images]  # masked = mean colour
    mean = torch.tensor(data.IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)
    tiles = (torch.stack(columns, dim=1) * std + mean).clamp(0, 1).flatten(0, 1)  # row by row
    tiles = F.interpolate(tiles, scale_factor=math.ceil(128 / images.shape[-1]), mode="nearest")
    os.makedirs(os.path.dirname(os.path.abspath(args.vis)), exist_ok=True)
    grid = torchvision.utils.make_grid(tiles.cpu(), nrow=len(columns), pad_value=1.0)
    torchvision.utils.save_image(grid, args.vis)
    data.record_output(args.out, args.vis)  # the run of --out wrote it: a later run of it may replace it
    return (
        f"reconstructions of {len(images)} images in {args.vis}; columns: masked input (x_hat) | Y_Re in the masked "
        "units (Eq. 1) | Y_Pr, the prompt branch | input (x)"
    )


# ------------------------------------------------------------------------------------------------ the run
def train(args):
    """Data, model, optimiser and resume; then the epoch / batch loop: lr, train_step(), log, save; --vis at the end.
    Every decision of the run is made here, in sight: the helpers below the banner do one thing each."""
    proc = setup(args)  # this process (torchrun's RANK / WORLD_SIZE / LOCAL_RANK) and the flags every script shares
    check_args(args, proc.world)  # PReCo's impossible settings: one sentence before any work
    paths, data_files = data.list_images(args.data)
    data.check_readable(paths, seed=args.seed)  # a sample must open: a folder of other files is refused
    masked_views = MaskedView(args.img_size, args.mask_unit, args.mask_ratio)
    dataset = data.ImageDataset(paths, transform=masked_views, seed=args.seed)
    loader = make_loader(dataset, args, proc, args.seed)
    steps_per_epoch = loader.sampler.batches_per_epoch()
    last_step = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    monitor = proc.rank == 0 and args.knn_monitor and data.KnnMonitor(args.knn_monitor, args.img_size, args.seed)

    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = PReCo(args.arch, args.mask_unit, args.drop_path).to(proc.device)
    backbone = model.encoder  # the Swin encoder: exported as backbone.pth, probed by --knn-monitor
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=proc.amp_dtype == torch.float16)  # --amp fp16 only
    inputs = {"data": data_files}  # what the run reads, by content: a resume needs the same files
    checkpoint = read_checkpoint(args, RESUME_MUST_MATCH, inputs)  # None when --out holds none
    if proc.rank == 0:
        data.hold_out(args.out, SCRIPT)  # the last check: one run per --out, which it owns
    connect(proc)  # from here the processes work together
    signals = data.stop_at_safe_points()  # a first SIGTERM or Ctrl-C is recorded: the loop stops and saves
    ddp_model = ddp(model)  # the same weights; a backward through it averages the gradients over processes
    torch.manual_seed(args.seed + proc.rank)  # drop path: each process its own
    step = last_saved = 0
    if checkpoint:  # resume: the weights, optimiser, loss scale, step and every process's random stream
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng(checkpoint["rng"], proc)
        step = last_saved = checkpoint["step"]

    segments = data.run_segments(checkpoint, args, proc.rank)  # args.json: each segment's flags, its first step
    log = Log(args, proc)
    if proc.rank == 0:  # the run's configuration, beside its log
        data.save_atomic(json.dumps({"segments": segments}, indent=2), os.path.join(args.out, "args.json"))
    branches = "both branches" if args.prompt else "no prompt-enhanced branch (- P-E)"
    start = f"resuming at step {step}" if step else "starting"
    log(f"{len(paths)} images, {branches}, {steps_per_epoch} steps/epoch, {proc.world} process(es), {start}")
    if monitor and step == 0:
        log_knn(log, monitor, backbone, 0, 0)  # random init: where the curve starts
    logged = LOGGED if args.prompt else LOGGED[:2]  # the names of train_step()'s values
    stopping = False
    while step < last_step and not stopping:
        epoch = step // steps_per_epoch
        dataset.set_epoch(epoch)  # crops and masks are seeded by (seed, epoch, image index): resumes are exact
        loader.sampler.set_epoch(epoch, start_batch=step % steps_per_epoch)
        for (images, mask), _, skipped in loader:
            lr = lr_at(args, step, steps_per_epoch)  # per step, as SimMIM
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, mask = (x.to(proc.device, non_blocking=True) for x in (images, mask))
            log.add(train_step(ddp_model, images, mask, optimizer, scaler, proc.amp_dtype, args), skipped)
            step += 1
            at_once = signals and proc.world == 1  # a signal stops one process at once, several at a log step
            if step % args.log_every == 0 or step % steps_per_epoch == 0 or step == last_step or at_once:
                means = log.window(step, last_step, epoch, logged, {"lr": lr}, signals)  # over all processes
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
            state |= {"inputs": inputs, "backbone_prefix": "encoder."}  # eval_linear.py reads it too
            data.save_atomic(state | exported, os.path.join(args.out, "checkpoint.pth"))
            data.save_atomic(exported | {"state_dict": backbone.state_dict()}, os.path.join(args.out, "backbone.pth"))
        last_saved = step
    if args.vis and not stopping and proc.rank == 0:  # also of a finished run: its weights are the checkpoint's
        log(save_visualisation(model, dataset, args, proc.device))
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
