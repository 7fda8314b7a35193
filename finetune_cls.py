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
column says which. An interrupted evaluation resumes at the epoch where it stopped, if its inputs are the same: its
checkpoint records every --weights file's sha256 and every dataset's file list (paths below the class folders, and
sizes), and a resume with another file behind the same name is refused in one sentence, never served stale results.
Images that do not decode are dropped before splitting, by one decoding pass at start-up (labeled_datasets);
a file that fails later, at test time, is left out of the count rather than replaced by its neighbour.
Refused before any work: a training split smaller than one batch (its epochs would train nothing), a per-process
batch of 1 for a backbone with BatchNorm, a --out that another run holds or this user cannot write, and a backbone
fine-tuned on the evaluated dataset (its training images would be in the test split; paper 004 never uses one
dataset as source and target), recognised by the dataset's file list, not its name.
--save-backbone PATH writes the fine-tuned backbone (last run) as a backbone.pth that every script accepts as
--weights: domain-adaptive pre-training (paper 004, Sec. IV-D); it records the datasets it was trained on, by their
file lists, and so does checkpoint.pth. It is written after that run's test and before the
run is recorded as done, so a job killed in between writes it when resumed. Before each checkpoint (after every
epoch; the last one holds the weights --save-backbone then writes), one pass over the weights checks that they are
finite: a NaN or inf stops the evaluation with exit code 1, naming the epoch and the tensor, and the files written
before stay as they were.
A finished evaluation run again with the same flags and files prints its table and writes nothing; another
evaluation into its --out is refused. A stop signal ends the epoch, saves it, and exits with 128 + its number.
Choices where the papers are silent: weight decay 0 with Adam (paper 004 names none); the lr is stepped per epoch;
BatchNorm is synchronised across GPUs under torchrun (the papers fine-tune with one batch of 64 / 100); on several CPU
processes it is not (gloo has no SyncBatchNorm), so every process tests with rank 0's running statistics; the last
incomplete training batch of an epoch is dropped (the data is reshuffled every epoch).
"""

import math
import os
import sys
import time
from collections import namedtuple
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
from backbones import model_config  # what builds a saved backbone again: its shape, pooling, window
from data import UserError

SCRIPT = os.path.basename(__file__)
Process = namedtuple("Process", "rank world device amp_dtype workers")  # this process; amp_dtype None: no autocast
READS = ("data", "weights")  # the flags of the paths a fine-tuning reads (data.check_paths)
WRITES = ("out", "save_backbone")  # and of those it writes
RUN_FILES = ("checkpoint.pth", "results.json", "results.md", "log.jsonl")  # what evaluate() writes in --out

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


def check_args(args, world):
    for name in ("epochs", "batch_size", "lr", "img_size", "runs", "log_every"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if args.wd < 0:
        raise UserError(f"--wd must be 0 or more (got {args.wd}).")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes.")
    eval_linear.check_datasets(args)
    if args.save_backbone and (len(args.weights) > 1 or len(args.data) > 1):
        raise UserError("--save-backbone needs a single --weights and a single --data.")
    data.check_paths(SCRIPT, args, READS, WRITES, RUN_FILES)  # no output in an input, no file of another run


# ------------------------------------------------------------------------------------------------ processes
def setup(args):
    """nanoGPT-style: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (all three, or none: one process). Checks them;
    returns this process's facts."""
    rank, world, local_rank = data.process_env()  # the one process check
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    amp_dtype = {"auto": torch.bfloat16 if cuda else None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    workers = args.workers
    if workers is None:  # the CPUs of this machine, shared by its processes
        workers = min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return Process(rank, world, device, amp_dtype, workers)


def connect(proc):
    """The processes start working together: NCCL on CUDA, gloo on CPU (one process: nothing to do)."""
    if proc.world > 1:  # a timeout, so that one failed process does not leave the others waiting forever
        dist.init_process_group("nccl" if proc.device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))


# ------------------------------------------------------------------------------------------------ recipe pieces
class RandomRotation90:
    """Rotation by 0, 90, 180 or 270 degrees (paper 004), drawn from torch's RNG so it is seeded per sample."""

    def __call__(self, img):
        return img.rotate(90 * int(torch.randint(4, ())))


def transforms_for(args):
    """(train, test) pipelines of the recipe, ending in the ImageNet normalisation every backbone expects."""
    size = args.img_size
    tail = eval_linear.normalised_tensor()
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
        self.backbone = backbone
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.backbone(x))


@torch.no_grad()
def test_confusion(model, paths, labels, num_classes, transform, args, proc):
    """Confusion matrix [true, predicted] on the test images, each process classifying its share with rank 0's
    BatchNorm statistics; a file that no longer decodes is left out, not replaced by its neighbour."""
    rank, world, device, amp_dtype, workers = proc
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


# ------------------------------------------------------------------------------------------------ the evaluation
def prepare(args, proc):
    """Every check before any work and any file: the flags, every weights file (a Backbone, with its sha256), the
    datasets (unreadable images dropped, splits drawn, file lists), a backbone fine-tuned on an evaluated dataset, a
    split under a batch, a BatchNorm over one image. Returns (the Backbones by --weights, the datasets)."""
    check_args(args, proc.world)
    load = eval_linear.load_backbone
    backbones = {w: load(w, args.arch, args.img_size, args.patch_size, args.heads) for w in args.weights}
    eval_linear.check_distinct(args.weights, list(backbones.values()))
    datasets = eval_linear.labeled_datasets(
        args.data, args.dataset, args.train_ratio, args.runs, args.seed, verbose=proc.rank == 0, workers=proc.workers
    )
    for dataset in datasets:
        for weights, backbone in backbones.items():
            eval_linear.check_not_source(weights, backbone, dataset)
        if len(dataset.splits[0][0]) < args.batch_size:  # the sampler drops the incomplete batch: epochs of 0 steps
            raise UserError(
                f"the training split of {dataset.name} has {len(dataset.splits[0][0])} images, fewer than one batch "
                f"of {args.batch_size}, so no step would train; lower --batch-size or raise --train-ratio."
            )
    models = [backbone.model for backbone in backbones.values()]
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for model in models for m in model.modules())
    if batch_norm and args.batch_size // proc.world < 2:  # BatchNorm's training statistics need two images
        raise UserError(f"--batch-size {args.batch_size} leaves one image per process for BatchNorm; give 2 or more.")
    return backbones, datasets


def read_checkpoint(args, inputs):
    """The runs done and the run in progress, from --out's checkpoint when there is one: with the same arguments and
    the same `inputs` (each --weights file's sha256, each dataset's file list) only, else one sentence naming the
    change."""
    path = os.path.join(args.out, "checkpoint.pth")
    if not os.path.exists(path):
        return {"done": {}, "current": None}
    state = data.load_weights_only(path, fix="move it away to start afresh")
    if not isinstance(state, dict) or "done" not in state:
        raise UserError(f"{path} is not a finetune_cls.py checkpoint; use another --out.")
    if resume_args(state.get("args", {})) != resume_args(vars(args)):
        raise UserError(
            f"{path} belongs to an evaluation with other arguments; use the same ones to resume, or another --out."
        )
    then = state.get("inputs", inputs)  # a checkpoint of an older version records none
    changed = [f"--weights {w}" for w, a, b in zip(args.weights, then["weights"], inputs["weights"]) if a != b]
    changed += [f"--data {d}" for d, a, b in zip(args.data, then["datasets"], inputs["datasets"]) if a != b]
    if changed:
        raise UserError(
            f"{path} was written for other files behind {', '.join(changed)} (compared by content); use another "
            "--out, or move the checkpoint away to evaluate them afresh."
        )
    return state


def resume_args(values):
    """The arguments a resume must match: --data by resolved path (its files are compared by content too, as
    `inputs`), --workers not at all (it changes no result)."""
    resolved = [d if d == data.SYNTHETIC else os.path.realpath(d) for d in values.get("data", [])]
    return {**values, "data": resolved, "workers": None}


def evaluate(args):
    """Every check first; then each run (a --weights, a dataset, a split) fine-tuned, tested and recorded, the
    checkpoint written after every epoch and every run; the table last. Returns the table's entries, or None when a
    signal stopped the evaluation (its checkpoint resumes it)."""
    proc = setup(args)
    torch.manual_seed(args.seed)
    backbones, datasets = prepare(args, proc)
    inputs = {"weights": [b.identity for b in backbones.values()], "datasets": [d.files for d in datasets]}
    state = read_checkpoint(args, inputs)
    identity = eval_linear.evaluation_identity(args, datasets, backbones.values())
    if kept := eval_linear.earlier_results(args.out, identity):  # finished already: its results stay as they are
        return eval_linear.keep_results(args.out, kept) if proc.rank == 0 else kept["backbones"]
    if state["done"] and proc.rank == 0:
        print(f"finetune | resuming: {len(state['done'])} run(s) done", flush=True)
    if proc.rank == 0:
        data.hold_out(args.out, SCRIPT)  # the last check: one run per --out, which it owns
    connect(proc)
    signals = data.stop_at_safe_points()  # a first SIGTERM or Ctrl-C: the epoch finishes, is saved, and it stops
    sources = [files for backbone in backbones.values() for files in backbone.trained_on]
    state |= {"args": vars(args), "inputs": inputs, "trained_on": sources + inputs["datasets"]}  # what it has seen
    runs_left = [(w, d, r) for w in args.weights for d in datasets for r in range(args.runs)]
    runs_left = [(w, d, r) for w, d, r in runs_left if f"{w} | {d.name} | run {r}" not in state["done"]]
    start = time.time()
    for count, (weights, dataset, run) in enumerate(runs_left, 1):
        key = f"{weights} | {dataset.name} | run {run}"
        model, stopped = fine_tune(args, proc, state, key, weights, dataset, run, signals)
        if stopped:  # every process stopped after the same saved epoch
            if proc.rank == 0:
                print(f"finetune | stopped by a signal after epoch {state['current']['epoch']} of {key}", flush=True)
            return None
        test_idx = dataset.splits[run][1]
        test_set = ([dataset.paths[i] for i in test_idx], [dataset.labels[i] for i in test_idx])
        confusion = test_confusion(model, *test_set, len(dataset.classes), transforms_for(args)[1], args, proc)
        backbone = backbones[weights]
        if args.save_backbone and proc.rank == 0 and run == args.runs - 1:  # before the run counts as done
            exported = {"arch": backbone.arch, "method": f"{backbone.method}+finetune:{dataset.name}"}
            exported |= {
                "config": model_config(model.backbone, args.img_size),
                "state_dict": model.backbone.state_dict(),
            }
            data.save_atomic(exported | {"trained_on": backbone.trained_on + [dataset.files]}, args.save_backbone)
            data.record_output(args.out, args.save_backbone)  # this run wrote it: a resume of it may replace it
            print(f"finetune | fine-tuned backbone saved to {args.save_backbone}", flush=True)
        accuracy = float(confusion.diag().sum() / confusion.sum() * 100)
        state["done"][key] = {"accuracy": accuracy, "confusion": confusion.tolist()}
        state["current"] = None
        save_checkpoint(state, args, proc)
        log(args, proc, {"weights": weights, "dataset": dataset.name, "run": run, "test_acc": round(accuracy, 3)})
        eta = timedelta(seconds=int((time.time() - start) / count * (len(runs_left) - count)))
        if proc.rank == 0:
            print(f"finetune | {key}: top-1 {accuracy:.2f} ({count} of {len(runs_left)} runs, eta {eta})", flush=True)
        if count < len(runs_left) and any_signalled(signals, proc):  # a signal during the test: stop between runs
            return None
    entries = []
    for weights, backbone in backbones.items():
        entry = {"weights": weights, "method": backbone.method, "arch": backbone.arch, "sha256": backbone.identity}
        for dataset in datasets:
            runs = [state["done"][f"{weights} | {dataset.name} | run {r}"] for r in range(args.runs)]
            accuracies = [run["accuracy"] for run in runs]
            entry[dataset.name] = eval_linear.run_summary(
                accuracies, classes=dataset.classes, confusion_last_run=runs[-1]["confusion"]
            )
        entries.append(entry)
    if proc.rank == 0:
        title = f"Fine-tuning ({args.recipe} recipe), {args.runs} run(s), train ratio {args.train_ratio}"
        eval_linear.write_results(args.out, "finetune", args, entries, datasets, title, identity)
    return entries


def fine_tune(args, proc, state, key, weights, dataset, run, signals):
    """One run: the backbone of `weights` + one FC trained on the run's training split, from where the checkpoint's
    run in progress stopped if it is this one; each epoch's weights checked finite, then saved. Returns (the model,
    whether a signal stopped it: every process stops after the same saved epoch)."""
    torch.manual_seed(args.seed + run)
    backbone = eval_linear.load_backbone(weights, args.arch, args.img_size, args.patch_size, args.heads)
    if backbone.identity != state["inputs"]["weights"][args.weights.index(weights)]:  # what prepare() read and hashed
        raise UserError(f"--weights {weights} changed during the evaluation; run it again when the file is final.")
    model = Classifier(backbone.model, backbone.width, len(dataset.classes)).to(proc.device)
    if proc.world > 1 and proc.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    peak = peak_lr(args, weights)
    optimizer = make_optimizer(args, model, peak)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=proc.amp_dtype == torch.float16)
    first_epoch = 0
    if state["current"] is not None and state["current"]["key"] == key:  # resume: weights, optimiser, scale, RNG
        model.load_state_dict(state["current"]["model"])
        optimizer.load_state_dict(state["current"]["optimizer"])
        scaler.load_state_dict(state["current"]["scaler"])
        torch.set_rng_state(state["current"]["rng"])
        first_epoch = state["current"]["epoch"]
    ddp_model = DDP(model) if proc.world > 1 else model
    train_idx = dataset.splits[run][0]
    paths = [dataset.paths[i] for i in train_idx]
    train_set = data.ImageDataset(
        paths, [dataset.labels[i] for i in train_idx], transforms_for(args)[0], args.seed + run
    )
    sampler = data.EpochSampler(len(train_set), args.batch_size, proc.rank, proc.world, args.seed + run)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size // proc.world,
        sampler=sampler,
        num_workers=proc.workers,
        pin_memory=proc.device.type == "cuda",
        worker_init_fn=data.ignore_stop_signals,
        generator=torch.Generator().manual_seed(run),  # the workers start afresh each epoch: they see set_epoch()
    )
    for epoch in range(first_epoch, args.epochs):
        train_epoch(ddp_model, loader, sampler, optimizer, scaler, epoch, peak, key, args, proc)
        if bad := data.first_non_finite(model.state_dict()):  # before the checkpoint (and then the backbone) holds it
            kept = f"the last good checkpoint is {os.path.join(args.out, 'checkpoint.pth')}, left as it was"
            if not os.path.exists(os.path.join(args.out, "checkpoint.pth")):
                kept = "no checkpoint was written yet"
            kept += f"; --save-backbone {args.save_backbone} is not written" if args.save_backbone else ""
            raise FloatingPointError(f"the weights became non-finite at epoch {epoch + 1} of {key} ({bad}); {kept}.")
        state["current"] = {"key": key, "epoch": epoch + 1, "model": model.state_dict()}
        state["current"] |= {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
        state["current"]["rng"] = torch.get_rng_state()
        save_checkpoint(state, args, proc)
        if any_signalled(signals, proc):  # stop after this saved epoch, all processes together
            return model, True
    return model, False


def train_epoch(model, loader, sampler, optimizer, scaler, epoch, peak, key, args, proc):
    """One epoch of cross-entropy training; the loss is read back only at log steps and at the epoch's end, when its
    mean over all processes goes to log.jsonl (a non-finite one stops the evaluation)."""
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr_at(args, epoch, peak)
    sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)  # the augmentation of image i is seeded by (seed, epoch, i)
    sums = torch.zeros(3, device=proc.device)  # loss, correct, seen
    start = time.time()
    for i, (images, targets, _) in enumerate(loader, 1):
        images = images.to(proc.device, non_blocking=True)
        targets = targets.to(proc.device, non_blocking=True)
        with torch.autocast(
            proc.device.type, dtype=proc.amp_dtype or torch.float32, enabled=proc.amp_dtype is not None
        ):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        count = torch.tensor(len(targets), device=proc.device)
        sums += torch.stack([loss.detach() * len(targets), (logits.argmax(1) == targets).sum(), count])
        if proc.rank == 0 and (i % args.log_every == 0 or i == len(loader)):
            loss_sum, correct, seen = sums.tolist()
            speed = seen * proc.world / (time.time() - start)
            print(
                f"finetune | {key} | ep {epoch + 1}/{args.epochs} | step {i}/{len(loader)} | loss "
                f"{loss_sum / seen:.4f} | acc {correct / seen * 100:.1f}% | lr {optimizer.param_groups[0]['lr']:.3g} | "
                f"{speed:.0f} img/s",
                flush=True,
            )
    if proc.world > 1:
        dist.all_reduce(sums)
    loss_sum, correct, seen = sums.tolist()
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"the loss of {key} became {loss_sum} in epoch {epoch + 1}; lower --lr.")
    record = {
        "run": key,
        "epoch": epoch,
        "loss": round(loss_sum / seen, 5),
        "train_acc": round(correct / seen * 100, 2),
    }
    speed = round(seen / (time.time() - start), 1)
    log(args, proc, record | {"lr": optimizer.param_groups[0]["lr"], "images_per_s": speed})


def any_signalled(signals, proc):
    """Whether any process was asked to stop: the same answer on every process."""
    votes = torch.tensor(float(len(signals)), device=proc.device)
    if proc.world > 1:
        dist.all_reduce(votes)
    return votes.item() > 0


def save_checkpoint(state, args, proc):
    """--out/checkpoint.pth, written atomically by rank 0, once every process has reached it."""
    if proc.rank == 0:
        data.save_atomic(state, os.path.join(args.out, "checkpoint.pth"))
    if proc.world > 1:
        dist.barrier()


def log(args, proc, record):
    """A line of log.jsonl, by rank 0."""
    if proc.rank == 0:
        data.append_record(os.path.join(args.out, "log.jsonl"), record)


def main(argv=None):
    """Bad input: one sentence and exit code 2; non-finite loss or weights: exit code 1; a stop signal: exit code 128 +
    its number (130 Ctrl-C, 143 SIGTERM), never 0, after a line on resuming. Whatever happens, the signal handlers are
    restored, --out is released and the process group is closed."""
    args = get_args(argv)
    handlers = data.handle_stop_signals()  # from the first line of work: a signal before evaluate() saves stops at once
    try:
        stopped = evaluate(args) is None  # None: a signal stopped it after a saved epoch
    except data.Interrupted:  # before anything was saved, or a second signal: the files written are whole
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
