"""Fine-tuning evaluation: a whole backbone + one FC layer trained on a scene-classification dataset.

GeRSP (paper 000, Sec. V-A) is the default recipe; Risojevic & Stojnic (paper 004, Sec. III-IV) is the other one,
with its starting points: from scratch, ImageNet, and domain-adaptive pre-training (fine-tune, save, transfer).

    python finetune_cls.py --data synthetic --weights random --arch resnet18 --img-size 64 --epochs 2 --runs 2
    python finetune_cls.py --data /data/EuroSAT --dataset eurosat --weights runs/gersp/backbone.pth --weights imagenet
    torchrun --nproc_per_node=8 finetune_cls.py --data /data/NWPU-RESISC45 --dataset nwpu --weights imagenet \\
        --arch resnet50 --recipe risojevic --train-ratio 0.8 --runs 1 --save-backbone runs/dapt_nwpu/backbone.pth

Recipes (--recipe; every value can be overridden by its flag)
    gersp      backbone + global average pooling + one FC; SGD momentum 0.9, lr 0.01, weight decay 1e-4, batch 64,
               100 epochs, lr x0.1 at epochs 30, 60, 90; images resized to 224 x 224, random horizontal flip.
    risojevic  Adam, lr warmed up linearly over 5 epochs to 3e-4 (pre-trained) or 3e-3 (--weights random), x0.2 at
               epochs 50, 70, 90; batch 100, 100 epochs; train: resize 292 + random 256 crop, horizontal and vertical
               flips, rotations by multiples of 90 degrees; test: resize 292 + centre 256 crop.
--epochs other than the recipe's 100 without --milestones scales the recipe's milestones and warm-up to it: each
moves to epoch ceil(m x epochs / 100), the first epoch that starts at or after the same fraction of training
(30 / 60 / 90 of 100 -> 2 / 3 / 4 of 4), so a short run still lowers its lr as the recipe does.
Both: 20 % of each class trains, 80 % tests (--train-ratio), --runs 5 splits (seeds --seed, --seed+1, ...), mean
+- std of top-1 (GeRSP's protocol; paper 004 reports a single accuracy: --runs 1), one table row per --weights
(GeRSP Table I's shape) in results.md; results.json holds every run's accuracy and the confusion matrix of the last
run. `imagenet` is torchvision's IMAGENET1K_V1 (the papers' baseline), `imagenet:V2` the newer recipe; the method
column says which. An interrupted evaluation resumes at the epoch where it stopped.
Images that do not decode are dropped before splitting, by one decoding pass at start-up (labeled_datasets);
a file that fails later, at test time, is left out of the count rather than replaced by its neighbour.
Refused before any work: a training split smaller than one batch (its epochs would train nothing), and a backbone
fine-tuned on the evaluated dataset (its training images would be in the test split; paper 004 never uses one
dataset as source and target).
--save-backbone PATH writes the fine-tuned backbone (last run) as a backbone.pth that every script accepts as
--weights: domain-adaptive pre-training (paper 004, Sec. IV-D). It is written after that run's test and before the
run is recorded as done, so a job killed in between writes it when resumed. Before each checkpoint (after every
epoch; the last one holds the weights --save-backbone then writes), one pass over the weights checks that they are
finite: a NaN or inf stops the evaluation with exit code 1, naming the epoch and the tensor, and the files written
before stay as they were.
Choices where the papers are silent: weight decay 0 with Adam (paper 004 names none); the lr is stepped per epoch;
BatchNorm is synchronised across GPUs under torchrun (the papers fine-tune with one batch of 64 / 100); on several CPU
processes it is not (gloo has no SyncBatchNorm), so every process tests with rank 0's running statistics; the last
incomplete training batch of an epoch is dropped (the data is reshuffled every epoch).
"""

import json
import math
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision import transforms as T

import data
import eval_linear
from data import UserError

RECIPES = {
    "gersp": dict(
        optimizer="sgd",
        lr=0.01,
        wd=1e-4,
        batch_size=64,
        epochs=100,
        img_size=224,
        milestones=[30, 60, 90],
        gamma=0.1,
        warmup=0,
    ),
    "risojevic": dict(
        optimizer="adam",
        lr=3e-4,
        wd=0.0,
        batch_size=100,
        epochs=100,
        img_size=256,
        milestones=[50, 70, 90],
        gamma=0.2,
        warmup=5,
    ),
}
SCRATCH_LR = {"gersp": 0.01, "risojevic": 3e-3}  # paper 004 trains from scratch with a 10x larger lr


def get_args(argv=None):
    p = eval_linear.evaluation_parser(__file__, "Fine-tuning evaluation (see the module docstring).")
    p.add_argument("--recipe", choices=RECIPES, default="gersp", help="gersp (paper 000) or risojevic (paper 004)")
    p.add_argument("--epochs", type=int, help="training epochs (recipe: 100)")
    p.add_argument("--batch-size", type=int, help="TOTAL batch over all processes (recipe: 64 / 100)")
    p.add_argument("--lr", type=float, help="peak learning rate (recipe: 0.01 / 3e-4, and 3e-3 from scratch)")
    p.add_argument("--wd", type=float, help="weight decay (recipe: 1e-4 / 0)")
    p.add_argument(
        "--milestones",
        type=int,
        nargs="+",
        help="epochs where the lr is multiplied by the recipe's gamma (recipe: 30 60 90 / 50 70 90)",
    )
    p.add_argument("--img-size", type=int, help="training and test image size (recipe: 224 / 256 crops of 292)")
    p.add_argument("--save-backbone", help="write the fine-tuned backbone of the last run here (a backbone.pth)")
    p.add_argument("--workers", type=int, help="data-loading processes per process (default: CPUs / processes)")
    p.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        default="auto",
        help="autocast: auto = bf16 on CUDA, off on CPU",
    )
    p.add_argument("--out", default="runs/finetune", help="folder for results, logs and the resumable checkpoint")
    p.add_argument("--log-every", type=int, default=50, help="progress line every N steps")
    args = eval_linear.parse_evaluation_args(p, argv)
    recipe = RECIPES[args.recipe]
    if args.epochs and args.epochs != recipe["epochs"]:  # the recipe's schedule at the same fractions of training
        scaled = [math.ceil(m * args.epochs / recipe["epochs"]) for m in recipe["milestones"]]
        args.milestones = args.milestones or scaled
        args.warmup = math.ceil(recipe["warmup"] * args.epochs / recipe["epochs"])
    for key, value in recipe.items():
        if key != "lr" and getattr(args, key, None) is None:  # the lr depends on the weights: peak_lr()
            setattr(args, key, value)
    return args


def check_args(args, world_size):
    for name in ("epochs", "batch_size", "lr", "img_size", "runs", "log_every"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if args.wd < 0:
        raise UserError(f"--wd must be 0 or more (got {args.wd}).")
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes.")
    eval_linear.check_datasets(args)
    data.check_out_dir(args.out)
    if args.save_backbone:
        if len(args.weights) > 1 or len(args.data) > 1:
            raise UserError("--save-backbone needs a single --weights and a single --data.")
        if os.path.isdir(args.save_backbone):
            raise UserError(f"--save-backbone {args.save_backbone} is a folder; give a file name (backbone.pth).")
        data.check_out_dir(os.path.dirname(os.path.abspath(args.save_backbone)), "--save-backbone's folder")


# ------------------------------------------------------------------------------------------------ distributed
def setup_distributed():
    """nanoGPT-style: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them, one process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:  # a timeout, so that one failed process does not leave the others waiting forever
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return rank, world, device


# ------------------------------------------------------------------------------------------------ recipe pieces
class RandomRotation90:
    """Rotation by 0, 90, 180 or 270 degrees (paper 004), drawn from torch's RNG so it is seeded per sample."""

    def __call__(self, img):
        return img.rotate(90 * int(torch.randint(4, ())))


def transforms_for(args):
    """(train, test) pipelines of the recipe, ending in the ImageNet normalisation every backbone expects."""
    size, tail = args.img_size, eval_linear.normalised_tensor()
    if args.recipe == "gersp":
        return T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip()] + tail), eval_linear.eval_transform(size)
    big = round(size * 292 / 256)
    return (
        T.Compose(
            [
                T.Resize((big, big)),
                T.RandomCrop(size),
                T.RandomHorizontalFlip(),
                T.RandomVerticalFlip(),
                RandomRotation90(),
            ]
            + tail
        ),
        eval_linear.center_crop_transform(size),
    )


def first_non_finite(state_dict, world):
    """The name of the first tensor holding a NaN or inf, else None: one pass over the weights (one host sync), the
    same answer on every process."""
    weights = {k: v for k, v in state_dict.items() if v.is_floating_point()}
    finite = torch.stack([v.isfinite().all() for v in weights.values()]).float()
    if world > 1:
        dist.all_reduce(finite, dist.ReduceOp.MIN)
    return next((k for k, ok in zip(weights, finite.tolist()) if not ok), None)


def peak_lr(args, weights):
    """--lr, else the recipe's: paper 004 trains from scratch with 3e-3 and fine-tunes with 3e-4."""
    if args.lr is not None:
        return args.lr
    return SCRATCH_LR[args.recipe] if weights == "random" else RECIPES[args.recipe]["lr"]


def lr_at(args, epoch, peak):
    """Linear warm-up over `warmup` epochs, then x gamma at each milestone (stepped per epoch)."""
    if epoch < args.warmup:
        return peak * (epoch + 1) / args.warmup
    return peak * args.gamma ** sum(epoch >= m for m in args.milestones)


def make_optimizer(args, model, peak):
    fused = next(model.parameters()).is_cuda  # one kernel for the whole update on a GPU
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9, weight_decay=args.wd, fused=fused)
    return torch.optim.Adam(model.parameters(), lr=peak, weight_decay=args.wd, fused=fused)


class Classifier(nn.Module):
    """Backbone (its own global pooling; torchvision keys) + one fully connected layer (Sec. V-A)."""

    def __init__(self, backbone, width, num_classes):
        super().__init__()
        self.backbone, self.fc = backbone, nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.backbone(x))


def model_config(backbone, image_size):
    """What data.build_model needs besides the arch: a ViT's image and patch size."""
    if hasattr(backbone, "patch_size"):
        return {"image_size": image_size, "patch_size": backbone.patch_size}
    return {}


def format_eta(seconds):
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


@torch.no_grad()
def test_confusion(model, paths, labels, num_classes, transform, args, ctx):
    """Confusion matrix [true, predicted] on the test images, each process classifying its share with rank 0's
    BatchNorm statistics; a file that no longer decodes is left out, not replaced by its neighbour."""
    rank, world, device, amp_dtype, workers = ctx
    model.eval()
    if world > 1:  # SyncBatchNorm is CUDA-only: on CPU processes each rank's running statistics are its own
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    share = data.ImageDataset(paths[rank::world], labels[rank::world], transform)
    loader = DataLoader(
        share,
        batch_size=args.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=data.ignore_stop_signals,
    )
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    for images, targets, skipped in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            predicted = model(images.to(device, non_blocking=True)).argmax(1)
        cells = (targets.to(device) * num_classes + predicted)[skipped.to(device) == 0]
        confusion += torch.bincount(cells, minlength=num_classes**2)
    if world > 1:
        dist.all_reduce(confusion)
    return confusion.view(num_classes, num_classes).cpu()


# ------------------------------------------------------------------------------------------------ evaluation
def prepare(args, rank, world, workers):
    """Every check before any work and any file: the flags, every weights file (-> its arch and method), the datasets
    (unreadable images dropped, splits drawn), a backbone fine-tuned on the evaluated dataset, a split under a batch."""
    check_args(args, world)
    checked = {w: eval_linear.load_backbone(w, args.arch, args.img_size, args.patch_size)[2:] for w in args.weights}
    datasets = eval_linear.labeled_datasets(
        args.data, args.dataset, args.train_ratio, args.runs, args.seed, verbose=rank == 0, workers=workers
    )
    for name, _, _, _, splits in datasets:
        for weights, (_, method) in checked.items():
            eval_linear.check_not_source(weights, method, name)
        if len(splits[0][0]) < args.batch_size:  # the sampler drops the incomplete batch: epochs of 0 steps
            raise UserError(
                f"the training split of {name} has {len(splits[0][0])} images, fewer than one batch of "
                f"{args.batch_size}, so no step would train; lower --batch-size or raise --train-ratio."
            )
    return checked, datasets


def resume_state(args, ckpt_path, rank):
    """The runs done and the run in progress, from --out's checkpoint when there is one (same arguments only)."""
    if not os.path.exists(ckpt_path):
        return {"done": {}, "current": None}
    state = data.load_weights_only(ckpt_path)
    if state.get("args") != vars(args):
        raise UserError(
            f"{ckpt_path} belongs to an evaluation with other arguments; use the same ones to resume, or another --out."
        )
    if rank == 0:
        print(f"finetune | resuming: {len(state['done'])} run(s) done", flush=True)
    return state


def stop_on_signals():
    """SIGTERM / Ctrl-C set stop['signal']: the epoch finishes, is saved, and the evaluation exits; a second one
    interrupts at once."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def evaluate(args):
    rank, world, device = setup_distributed()
    amp_dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else None,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "off": None,
    }[args.amp]
    workers = (
        args.workers
        if args.workers is not None
        else min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    )
    ctx = (rank, world, device, amp_dtype, workers)
    torch.manual_seed(args.seed)
    checked, datasets = prepare(args, rank, world, workers)
    ckpt_path = os.path.join(args.out, "checkpoint.pth")
    state = resume_state(args, ckpt_path, rank)
    stop = stop_on_signals()
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None

    def save():
        if rank == 0:
            data.save_atomic({**state, "args": vars(args)}, ckpt_path)
        if world > 1:
            dist.barrier()

    total = len(args.weights) * args.runs * args.epochs * sum(len(d[4][0][0]) // args.batch_size for d in datasets)
    job = {
        "ctx": ctx,
        "state": state,
        "save": save,
        "stop": stop,
        "log": log,
        "transforms": transforms_for(args),
        "checkpoint": ckpt_path,
        "progress": {"steps": 0, "start": time.time(), "total": total},
    }
    entries = []
    for weights in args.weights:
        arch, method = checked[weights]  # from the check, so a row whose runs all finished before a resume has them
        entry = {"weights": weights, "method": method, "arch": arch}
        for name, paths, labels, classes, splits in datasets:
            for run, (train_idx, test_idx) in enumerate(splits):
                key = f"{weights} | {name} | run {run}"
                if key in state["done"]:
                    job["progress"]["steps"] += args.epochs * (len(train_idx) // args.batch_size)
                    continue
                model = train_run(
                    args,
                    job,
                    key,
                    weights,
                    run,
                    len(classes),
                    [paths[i] for i in train_idx],
                    [labels[i] for i in train_idx],
                )
                if model is None:
                    if rank == 0:
                        print(
                            f"finetune | stopped by a signal after epoch {state['current']['epoch']} of {key}; "
                            f"{ckpt_path} resumes it",
                            flush=True,
                        )
                    return None
                confusion = test_confusion(
                    model,
                    [paths[i] for i in test_idx],
                    [labels[i] for i in test_idx],
                    len(classes),
                    job["transforms"][1],
                    args,
                    ctx,
                )
                if args.save_backbone and rank == 0 and run == args.runs - 1:  # before the run counts as done
                    os.makedirs(os.path.dirname(os.path.abspath(args.save_backbone)), exist_ok=True)
                    data.save_atomic(
                        {
                            "arch": arch,
                            "method": f"{method}+finetune:{name}",
                            "config": model_config(model.backbone, args.img_size),
                            "state_dict": model.backbone.state_dict(),
                        },
                        args.save_backbone,
                    )
                    print(f"finetune | fine-tuned backbone saved to {args.save_backbone}", flush=True)
                accuracy = float(confusion.diag().sum() / confusion.sum() * 100)
                state["done"][key], state["current"] = {"accuracy": accuracy, "confusion": confusion.tolist()}, None
                save()
                if rank == 0:
                    log.write(
                        json.dumps({"weights": weights, "dataset": name, "run": run, "test_acc": round(accuracy, 3)})
                        + "\n"
                    )
                    log.flush()
                    print(f"finetune | {key}: top-1 {accuracy:.2f}", flush=True)
            done = [state["done"][f"{weights} | {name} | run {r}"] for r in range(args.runs)]
            entry[name] = eval_linear.run_summary(
                [d["accuracy"] for d in done], classes=classes, confusion_last_run=done[-1]["confusion"]
            )
        entries.append(entry)
    if rank == 0:
        eval_linear.write_results(
            args.out,
            "finetune",
            args,
            entries,
            [d[0] for d in datasets],
            f"Fine-tuning ({args.recipe} recipe), {args.runs} run(s), train ratio {args.train_ratio}",
        )
        log.close()
    if world > 1:
        dist.destroy_process_group()
    return entries


def train_run(args, job, key, weights, run, num_classes, paths, labels):
    """Fine-tune one run from its weights (or from where a checkpoint stopped it), saving after every epoch; returns
    the trained Classifier, or None when a signal stopped it (the checkpoint then holds its last epoch)."""
    rank, world, device, amp_dtype, workers = job["ctx"]
    state = job["state"]
    torch.manual_seed(args.seed + run)
    backbone, width, _, _ = eval_linear.load_backbone(weights, args.arch, args.img_size, args.patch_size)
    model = Classifier(backbone, width, num_classes).to(device)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    peak = peak_lr(args, weights)
    optimizer = make_optimizer(args, model, peak)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    first_epoch = 0
    if state["current"] is not None and state["current"]["key"] == key:
        current = state["current"]
        model.load_state_dict(current["model"])
        optimizer.load_state_dict(current["optimizer"])
        scaler.load_state_dict(current["scaler"])
        torch.set_rng_state(current["rng"])
        first_epoch = current["epoch"]
    ddp_model = DDP(model) if world > 1 else model
    train_set = data.ImageDataset(paths, labels, job["transforms"][0], seed=args.seed + run)
    sampler = data.EpochSampler(len(train_set), args.batch_size, rank, world, args.seed + run)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size // world,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=data.ignore_stop_signals,
        generator=torch.Generator().manual_seed(run),
    )  # workers start afresh: they see set_epoch()
    job["progress"]["steps"] += first_epoch * sampler.batches_per_epoch()
    for epoch in range(first_epoch, args.epochs):
        train_epoch(
            ddp_model,
            loader,
            sampler,
            optimizer,
            scaler,
            epoch,
            peak,
            key,
            args,
            job["ctx"],
            job["progress"],
            job["progress"]["total"],
            job["log"],
        )
        bad = first_non_finite(model.state_dict(), world)  # before the checkpoint (and then the backbone) holds it
        if bad:
            kept = (
                f"the last good checkpoint is {job['checkpoint']}, left as it was"
                if os.path.exists(job["checkpoint"])
                else "no checkpoint was written yet"
            )
            if args.save_backbone:
                kept += f"; --save-backbone {args.save_backbone} is not written"
            raise FloatingPointError(f"the weights became non-finite at epoch {epoch + 1} of {key} ({bad}); {kept}.")
        state["current"] = {
            "key": key,
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        job["save"]()
        if job["stop"]["signal"] is not None:
            return None
    return model


def train_epoch(model, loader, sampler, optimizer, scaler, epoch, peak, key, args, ctx, progress, total_steps, log):
    """One epoch of cross-entropy training; the loss is read back only at log steps and at the epoch's end."""
    rank, world, device, amp_dtype, _ = ctx
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr_at(args, epoch, peak)
    sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)  # the augmentation of image i is seeded by (seed, epoch, i)
    sums = torch.zeros(3, device=device)  # loss, correct, seen
    start = time.time()
    for i, (images, targets, _) in enumerate(loader, 1):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sums += torch.stack(
            [
                loss.detach() * len(targets),
                (logits.argmax(1) == targets).sum(),
                torch.tensor(len(targets), device=device),
            ]
        )
        progress["steps"] += 1
        if rank == 0 and (i % args.log_every == 0 or i == len(loader)):
            loss_now, correct, seen = sums.tolist()
            elapsed = time.time() - progress["start"]
            eta = elapsed / progress["steps"] * (total_steps - progress["steps"])
            print(
                f"finetune | {key} | ep {epoch + 1}/{args.epochs} | step {i}/{len(loader)} | loss "
                f"{loss_now / seen:.4f} | acc {correct / seen * 100:.1f}% | lr {optimizer.param_groups[0]['lr']:.3g} "
                f"| {seen * world / (time.time() - start):.0f} img/s | eta {format_eta(eta)}",
                flush=True,
            )
    if world > 1:
        dist.all_reduce(sums)
    loss_sum, correct, seen = sums.tolist()
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"the loss of {key} became {loss_sum} in epoch {epoch + 1}; lower --lr.")
    if log is not None:
        log.write(
            json.dumps(
                {
                    "run": key,
                    "epoch": epoch,
                    "loss": round(loss_sum / max(seen, 1), 5),
                    "train_acc": round(correct / max(seen, 1) * 100, 2),
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": round(seen / (time.time() - start), 1),
                }
            )
            + "\n"
        )
        log.flush()


def main(argv=None):
    args = get_args(argv)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # evaluate() replaces them
    try:
        evaluate(args)
    except UserError as err:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"finetune_cls.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:
        print(f"finetune_cls.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
