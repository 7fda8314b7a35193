"""Linear evaluation of frozen backbones: a softmax classifier on cached features (and GeRSP's stage-wise probe).

Risojevic & Stojnic, "The Role of Pre-Training in High-Resolution Remote Sensing Scene Classification" (paper 004,
Sec. III "feature extraction"), and GeRSP (paper 000, Sec. VI-B, Fig. 6, stage-wise linear evaluation).

    python eval_linear.py --data synthetic --weights random --arch resnet18 --img-size 64 --runs 2
    python eval_linear.py --data /data/EuroSAT --dataset eurosat --weights runs/moco/backbone.pth --weights imagenet
    python eval_linear.py --data /data/NWPU-RESISC45 --dataset nwpu --weights runs/gersp/backbone.pth --stages --knn
    python eval_linear.py --data /data/NWPU-RESISC45 --weights imagenet --arch resnet50 --preprocess paper004 --runs 1

Protocol (paper 004): the backbone is frozen and in eval mode; the features of every image are extracted ONCE
(no augmentation, float32 as in the papers; --amp bf16 is faster on a GPU), then a softmax classifier is trained on
the cached features with Adam, lr 1e-3, batch 100, for 100 epochs. 20 % of each class trains, 80 % tests
(--train-ratio). --runs 5 repeats with the splits of seeds --seed, --seed+1, ... and reports mean +- std of top-1:
that is GeRSP's protocol; paper 004 reports a single accuracy (--runs 1). Every --weights (repeatable) is evaluated on
the same splits, and the results form one table (GeRSP Table I's shape) in results.md beside results.json.
Images that do not decode are dropped before splitting, by one decoding pass over the dataset at start-up
(labeled_datasets): the splits are drawn over the readable images, the same for every backbone.
What a table measured is known by content: each --data by its file list (paths below the class folders, and sizes),
each --weights file by its sha256, both in results.json; a dataset's name in the table is unique (its folder's name,
with parent folders where two share it), and the same files given twice are refused.
A backbone fine-tuned on the evaluated dataset (finetune_cls.py --save-backbone, or its checkpoint.pth) is refused,
whatever path names the dataset: its training images would be in the test split (paper 004 never uses one dataset
as source and target).
--stages probes the globally pooled output of each stage (ResNet layer1-4, Swin's four stages, the class token after
each quarter of a ViT's blocks), one accuracy per stage: a second table in results.md (GeRSP Fig. 6 as numbers).
--knn adds the weighted kNN protocol of InstDisc / DINO (cosine similarity, the k = 20 nearest training features vote
with weight exp(similarity / 0.07); --knn-k, --knn-temperature) on the same cached final features and splits: a row
of its own per backbone ("knn" in the protocol column) in the same table; results.json keeps it under <dataset>.knn.
Preprocessing (--preprocess): paper004 = paper 004's test pipeline, resize to 292 x 292 and crop the centre 256 x 256
(--img-size is the crop, default 256; other sizes keep the 292 / 256 ratio). resize (the default, a choice: GeRSP is
silent about its linear probe's preprocessing) = the whole image resized to --img-size (default 224, GeRSP's
fine-tuning size), which keeps the borders of EuroSAT's 64-px images that a centre crop would cut.
Choices where the papers are silent: features are not normalised; the std is the sample std (ddof=1).
The file reads: the flags, the datasets and their splits, the features, the probe, the results table and evaluate();
then what finetune_cls.py shares with it: loading any backbone file exactly, and the published checkpoints' layouts.
"""

import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from collections import namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.models.vision_transformer import interpolate_embeddings

import data
from data import UserError

SCRIPT = os.path.basename(__file__)
READS = ("data", "weights")  # the flags of the paths an evaluation reads (data.check_paths)
WRITES = ("out",)  # and of those it writes
RUN_FILES = ("results.json", "results.md", "log.jsonl")  # what evaluate() writes in --out


# ---------------------------------------------------------------------------------------------- flags (both scripts)
def evaluation_parser(script, description):
    """The flags eval_linear.py and finetune_cls.py share: datasets, weights, split, runs and seed."""
    p = data.ArgumentParser(prog=os.path.basename(script), description=description)
    p.add_argument(
        "--data",
        action="append",
        help="class-per-folder dataset (repeatable); 'synthetic' = built-in. Default: synthetic",
    )
    p.add_argument(
        "--dataset",
        action="append",
        help="name of each --data in the report (eurosat, nwpu, ...); default: the folder name (with its parents "
        "where two --data share it)",
    )
    p.add_argument(
        "--weights",
        action="append",
        help="random | imagenet (torchvision's IMAGENET1K_V1, the papers' baseline) | imagenet:V2 (a newer "
        "torchvision recipe) | a backbone.pth / checkpoint.pth of this project | a torchvision state dict | a "
        "published checkpoint (MoCo v1-v3, mmselfsup, Lightning, DINO, DINOv2, timm, torchgeo, Swin, SimMIM: see "
        "docs/weights.md); repeat to compare backbones. Default: random",
    )
    p.add_argument("--arch", help="architecture, when the weights file does not say it (e.g. resnet50)")
    p.add_argument("--patch-size", type=int, default=16, help="ViT patch size, when the weights file does not say it")
    p.add_argument(
        "--heads", type=int, help="ViT attention heads, when the file does not say them (default: width / 64)"
    )
    p.add_argument("--train-ratio", type=float, default=0.2, help="fraction of each class used for training")
    p.add_argument("--runs", type=int, default=5, help="repetitions with different splits (mean +- std)")
    p.add_argument(
        "--seed",
        type=data.seed_value,
        default=0,
        help="seed of the first split (run r uses seed + r) and of random weights",
    )
    return p


def parse_evaluation_args(parser, argv):
    """parse_args, then the shared flags' defaults, which argparse's append would extend rather than replace: the
    built-in textures and random weights."""
    args = parser.parse_args(argv)
    args.data = args.data or [data.SYNTHETIC]
    args.weights = args.weights or ["random"]
    return args


def check_datasets(args):
    """One --dataset name per --data, no name twice, and no other name than 'synthetic' for the built-in textures: a
    table headed 'eurosat' must have measured EuroSAT."""
    if args.dataset and len(args.dataset) != len(args.data):
        raise UserError(f"{len(args.dataset)} --dataset names for {len(args.data)} --data folders; give one each.")
    names = [name.lower() for name in args.dataset or []]
    if twice := next((name for name in names if names.count(name) > 1), None):
        raise UserError(f"--dataset {twice} is given twice; give each --data a name of its own.")
    for root, name in zip(args.data, args.dataset or []):
        if root == data.SYNTHETIC and name.lower() != data.SYNTHETIC:
            raise UserError(
                f"--dataset {name} would name the built-in synthetic textures (--data synthetic, the "
                f"default without --data), not {name}; give --data the folder of {name}."
            )
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 or more (got {args.workers}).")


# ------------------------------------------------------------------------------------------------ the probe's flags
def get_args(argv=None):
    p = evaluation_parser(__file__, "Linear probe on frozen features (see the module docstring).")
    p.add_argument(
        "--preprocess",
        choices=("resize", "paper004"),
        default="resize",
        help="resize: the whole image "
        "to --img-size; paper004: resize to 292 and crop the centre 256 (paper 004, Sec. III)",
    )
    p.add_argument(
        "--img-size",
        type=int,
        help="resize: the square image size (default 224); paper004: the centre crop (default 256, of a 292 resize)",
    )
    p.add_argument("--stages", action="store_true", help="also probe each stage of the backbone (GeRSP Fig. 6)")
    p.add_argument(
        "--knn",
        action="store_true",
        help="also the weighted kNN protocol (InstDisc / DINO) on the same features and splits",
    )
    p.add_argument("--knn-k", type=int, default=20, help="neighbours that vote in --knn")
    p.add_argument("--knn-temperature", type=float, default=0.07, help="temperature of the --knn votes")
    p.add_argument("--epochs", type=int, default=100, help="classifier epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the classifier")
    p.add_argument("--batch-size", type=int, default=100, help="classifier batch size")
    p.add_argument("--extract-batch-size", type=int, default=256, help="batch size of the feature extraction")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument(
        "--amp",
        choices=("off", "bf16"),
        default="off",
        help="autocast of the extraction: off = float32 as in the papers; bf16 is faster on a GPU",
    )
    p.add_argument("--out", default="runs/eval_linear", help="folder for results.json, results.md, log.jsonl")
    args = parse_evaluation_args(p, argv)
    if args.img_size is None:
        args.img_size = 256 if args.preprocess == "paper004" else 224
    return args


def check_args(args):
    for name in ("img_size", "runs", "epochs", "lr", "batch_size", "extract_batch_size", "knn_k", "knn_temperature"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if data.process_env()[1] > 1:  # the one process check, then every path
        raise UserError("eval_linear.py runs in one process (the probe takes minutes); start it with python.")
    check_datasets(args)
    data.check_paths(SCRIPT, args, READS, WRITES, RUN_FILES)


# ------------------------------------------------------------------------------------------ datasets (both scripts)
LabeledDataset = namedtuple("LabeledDataset", "name paths labels classes splits files")  # files: data.file_list_id


def default_names(roots):
    """Each --data's name in the table: its folder's name, with as many parent folders as it takes to tell it from the
    others (x/images and y/images)."""
    parts = [os.path.abspath(root).split(os.sep) if root != data.SYNTHETIC else [root] for root in roots]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            break
    return names


def labeled_datasets(roots, names, train_ratio, runs, seed, verbose=True, workers=0):
    """The evaluation datasets, each a LabeledDataset with the (train, test) split of each run. The images that do
    not decode are dropped BEFORE splitting (readable_images), so the splits, drawn over the readable ones, are the same
    for every backbone and both scripts, and no image stands in for another with the wrong label. The same files
    given twice, under any path, are refused."""
    listed = [data.labeled_images(root) for root in roots]
    for i, j in itertools.combinations(range(len(roots)), 2):
        if listed[i][3] == listed[j][3]:
            raise UserError(f"--data {roots[i]} and --data {roots[j]} hold the same files; give each dataset once.")
    datasets = []
    for name, (paths, labels, classes, files) in zip(names or default_names(roots), listed):
        if verbose:
            print(f"{name}: {len(classes)} classes: {', '.join(classes)}", flush=True)
        paths, labels, unreadable = readable_images(paths, labels, classes, workers)
        splits = [data.stratified_split(labels, train_ratio, seed + r, classes) for r in range(runs)]
        datasets.append(LabeledDataset(name, paths, labels, classes, splits, files))
        if verbose:
            dropped = ""
            if unreadable:
                dropped = f" ({len(unreadable)} unreadable image(s) dropped before splitting, e.g. {unreadable[0]})"
            print(f"{name}: {len(paths)} images{dropped}, {len(splits[0][0])} train / {len(splits[0][1])} test a run")
    return datasets


def _decodes(paths):
    """Whether each of `paths` decodes (True / False), or the sentence refusing a file this project does not read (a
    16-bit colour TIFF): the collate_fn of readable_images' DataLoader, so that its workers do the work."""
    ok = []
    for path in paths:
        try:
            data.open_rgb(path)
            ok.append(True)
        except UserError as err:
            ok.append(str(err))
        except Exception:  # noqa: BLE001 - any decoder error means "unreadable"
            ok.append(False)
    return ok


def readable_images(paths, labels, classes, workers=0):
    """(paths, labels, unreadable paths): one decoding pass over every image (in `workers` processes; cheaper than
    the extraction or one epoch) drops the files that fail. A class left without a readable image is an error."""
    if all(p.startswith(data.SYNTHETIC) for p in paths):  # generated, always readable
        return paths, labels, []
    loader = DataLoader(
        paths, batch_size=64, num_workers=workers, collate_fn=_decodes, worker_init_fn=data.ignore_stop_signals
    )
    ok = [flag for batch in loader for flag in batch]
    if refused := next((flag for flag in ok if isinstance(flag, str)), None):
        raise UserError(refused)
    empty = sorted(set(range(len(classes))) - {label for label, good in zip(labels, ok) if good})
    if empty:
        raise UserError(f"no image of class {classes[empty[0]]} could be read; check the files of that folder.")
    keep = [i for i, good in enumerate(ok) if good]
    return [paths[i] for i in keep], [labels[i] for i in keep], [p for p, good in zip(paths, ok) if not good]


def normalised_tensor():
    """The end of every evaluation pipeline: a tensor in the ImageNet normalisation every backbone expects."""
    return [T.ToTensor(), T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)]


def eval_transform(size):
    """Evaluation: resize the whole image to size x size (the papers resize EuroSAT's 64 px to 224), normalise."""
    return T.Compose([T.Resize((size, size))] + normalised_tensor())


def center_crop_transform(size):
    """Paper 004's test pipeline (Sec. III): resize to 292 x 292 and crop the centre 256 x 256 (for another `size`,
    the same 292 / 256 ratio), normalise."""
    big = round(size * 292 / 256)
    return T.Compose([T.Resize((big, big)), T.CenterCrop(size)] + normalised_tensor())


# ------------------------------------------------------------------------------------------------ features
def stage_modules(model):
    """Names of the modules whose pooled outputs are the stage features, and how to pool them."""
    if isinstance(model, torchvision.models.ResNet):
        return [f"layer{i}" for i in range(1, 5)], lambda y: y.mean(dim=(2, 3))  # N C H W
    if isinstance(model, torchvision.models.SwinTransformer):
        return [f"features.{i}" for i in (1, 3, 5, 7)], lambda y: y.mean(dim=(1, 2))  # N H W C
    if isinstance(model, torchvision.models.VisionTransformer):
        n = len(model.encoder.layers)
        return [f"encoder.layers.encoder_layer_{d - 1}" for d in (n // 4, n // 2, 3 * n // 4, n)], lambda y: y[:, 0]
    raise UserError(f"--stages does not know the stages of {type(model).__name__}.")


def preprocess(args):
    """The extraction's pipeline: paper 004's resize-292 + centre-256 crop, or the whole image resized."""
    if args.preprocess == "paper004":
        return center_crop_transform(args.img_size)
    return eval_transform(args.img_size)


@torch.no_grad()
def extract_features(model, paths, args, device):
    """Features of every image, once: {'final': N x D, and with --stages 'stage1'..'stage4'}, on the CPU."""
    model.eval().to(device)
    outputs = {}  # the hooks' stage outputs of the batch, beside the final features
    hooks = []
    if args.stages:
        names, pool = stage_modules(model)
        modules = dict(model.named_modules())
        for i, name in enumerate(names, 1):
            hooks.append(
                modules[name].register_forward_hook(
                    lambda mod, inp, out, key=f"stage{i}": outputs.__setitem__(key, pool(out))
                )
            )
    dataset = data.ImageDataset(paths, transform=preprocess(args))
    loader = DataLoader(
        dataset,
        batch_size=args.extract_batch_size,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=data.ignore_stop_signals,  # a Ctrl-C is the main process's to handle
    )
    features = {}
    skipped = 0
    for images, _, n_skipped in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            outputs["final"] = model(images.to(device, non_blocking=True))
        for key, value in outputs.items():
            features.setdefault(key, []).append(value.float().cpu())
        skipped += int(n_skipped.sum())
    for hook in hooks:
        hook.remove()
    if skipped:  # every file decoded at start-up; a neighbour's feature under this label would be a wrong result
        raise UserError(
            f"{skipped} image(s) became unreadable after the check at start-up; check the disk and run again."
        )
    return {key: torch.cat(value) for key, value in features.items()}


def fingerprint(model):
    """A float64 sum of every parameter and buffer: equal before and after probing proves the backbone is frozen."""
    return sum(float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------ the probe
def train_probe(features, labels, train_idx, test_idx, num_classes, args, seed):
    """Softmax classifier on cached features: Adam, lr 1e-3, batch 100, 100 epochs (paper 004, Sec. III).
    Returns (top-1 accuracy in %, confusion matrix [true, predicted])."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_train, y_train = features[train_idx], labels[train_idx]
    classifier = nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.lr)
    for _ in range(args.epochs):
        for batch in torch.randperm(len(x_train), generator=generator).split(args.batch_size):
            loss = F.cross_entropy(classifier(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = classifier(features[test_idx]).argmax(1)
    truth = labels[test_idx]
    confusion = torch.bincount(truth * num_classes + predicted, minlength=num_classes**2)
    return float((predicted == truth).float().mean() * 100), confusion.view(num_classes, num_classes).tolist()


def probe_dataset(features, dataset, width, args):
    """Every protocol on one dataset's cached features: the softmax probe of the final (and each stage's) features
    over every split, and with --knn the weighted kNN of the final features on the same splits."""
    labels = torch.tensor(dataset.labels)
    classes = dataset.classes
    splits = [(torch.from_numpy(train), torch.from_numpy(test)) for train, test in dataset.splits]
    per_key = {
        key: [
            train_probe(feats, labels, tr, te, len(classes), args, args.seed + r) for r, (tr, te) in enumerate(splits)
        ]
        for key, feats in features.items()
    }
    result = run_summary(
        [acc for acc, _ in per_key["final"]],
        classes=classes,
        feature_dim=width,
        confusion_last_run=per_key["final"][-1][1],
        stages={key: run_summary([acc for acc, _ in runs]) for key, runs in per_key.items() if key != "final"},
    )
    if args.knn:
        final = features["final"]
        n = len(classes)
        accuracies = [
            float(
                (data.knn_predict(final[tr], labels[tr], final[te], n, args.knn_k, args.knn_temperature) == labels[te])
                .float()
                .mean()
                * 100
            )
            for tr, te in splits
        ]
        result["knn"] = run_summary(accuracies, k=args.knn_k, temperature=args.knn_temperature)
    return result


def stage_table(entries, names):
    """GeRSP Fig. 6 as a table: a row per backbone and dataset, the probe's top-1 on each stage's pooled features."""
    keys = [f"stage{i}" for i in range(1, 5)]
    lines = [
        "Stage-wise linear probe (GeRSP Fig. 6), top-1 mean +- std",
        "",
        "| weights | method | arch | dataset | " + " | ".join(keys) + " |",
        "|---|---|---|---|" + "---|" * 4,
    ]
    lines += [
        f"| {e['weights']} | {e['method']} | {e['arch']} | {n} | "
        + " | ".join("%.2f +- %.2f" % (e[n]["stages"][k]["mean"], e[n]["stages"][k]["std"]) for k in keys)
        + " |"
        for e in entries
        for n in names
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- results (both scripts)
def mean_std(values):
    """Mean and sample standard deviation (ddof=1; 0 for one run): the papers' mu +- sigma over runs."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def run_summary(accuracies, **extra):
    """One protocol's result on one dataset, as results.json keeps it: every run's top-1, their mean and std."""
    mean, std = mean_std(accuracies)
    return {"accuracies": accuracies, "mean": mean, "std": std, **extra}


def check_not_source(weights, backbone, dataset):
    """Paper 004 never uses one dataset as both source and target: a backbone fine-tuned on `dataset` has seen images
    of its test split. finetune_cls.py records the datasets it trained on by their file lists (in --save-backbone's
    file and in its checkpoint.pth), so whatever path names the dataset, it is recognised; a file of an older version
    records only the name, in its method."""
    sources = [files["sha256"] for files in backbone.trained_on]
    named = re.search(rf"\+finetune:{re.escape(dataset.name)}(\+|$)", str(backbone.method), re.IGNORECASE)
    if dataset.files["sha256"] in sources or (named and not sources):
        raise UserError(
            f"--weights {weights} was fine-tuned on {dataset.name} ({backbone.method}), so the test images of --data "
            f"{dataset.name} include its training images; evaluate it on another dataset."
        )


def check_distinct(weights, backbones):
    """Every --weights once: two names of the same file (by sha256), or 'random' twice, would make two rows of one."""
    for i, j in itertools.combinations(range(len(weights)), 2):
        if backbones[i].identity == backbones[j].identity:
            raise UserError(f"--weights {weights[i]} and --weights {weights[j]} are the same weights; give them once.")


def evaluation_identity(args, datasets, backbones):
    """What an evaluation measures, by content: its flags (but the paths, which are compared by content, and --out and
    --workers, which change no number), each dataset's name and file list, each weights' name and sha256."""
    values = {k: v for k, v in vars(args).items() if k not in ("data", "weights", "out", "workers")}
    values["datasets"] = [(d.name, d.files["sha256"]) for d in datasets]
    values["weights"] = [(w, b.identity) for w, b in zip(args.weights, backbones)]
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def earlier_results(out, identity):
    """--out's results.json when it holds this very evaluation (`identity`): a second run keeps it; None when --out
    holds no results; one sentence when it holds another evaluation's, which is never replaced."""
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {}
    if results.get("identity") != identity:
        raise UserError(
            f"--out {out} holds the results of another evaluation ({path}); give another --out, or move them away."
        )
    return results


def keep_results(out, results):
    """A second run of one evaluation: its table printed again from --out, nothing written."""
    table = os.path.join(out, "results.md")
    shown = open(table).read() if os.path.isfile(table) else json.dumps(results["backbones"], indent=1)
    print(f"{out} holds the results of this evaluation (the same flags and files); kept:\n\n{shown}", flush=True)
    return results["backbones"]


def write_results(out, protocol, args, entries, datasets, title, identity, extra=""):
    """results.md: GeRSP Table I's shape, a row per backbone and protocol (`protocol`, and 'knn' where eval_linear.py
    --knn stored a dataset's kNN result under "knn"), mean +- std per dataset, then `extra` (more markdown: the
    stage-wise table); then results.json (every run, what was measured: each dataset's file list and each weights
    file's sha256, and the evaluation's `identity`), last, so that results.json means the table is whole. entries:
    [{"weights", "method", "arch", "sha256", <dataset>: {"mean", "std", ..., "knn": {...}}}]; the tables are printed
    too."""
    names = [d.name for d in datasets]
    table = [
        "| weights | method | arch | protocol | " + " | ".join(f"{d} top-1" for d in names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for e in entries:
        for row in (protocol, "knn"):
            cells = [e.get(d) if row == protocol else e.get(d, {}).get("knn") for d in names]
            if any(cells):
                scores = " | ".join(f"{c['mean']:.2f} +- {c['std']:.2f}" if c else "" for c in cells)
                table.append(f"| {e['weights']} | {e['method']} | {e['arch']} | {row} | {scores} |")
    text = f"{title}\n\n" + "\n".join(table) + "\n" + (f"\n{extra}" if extra else "")
    measured = {d.name: {"data": os.path.abspath(root), **d.files} for d, root in zip(datasets, args.data)}
    results = {"protocol": protocol, "identity": identity, "args": vars(args), "datasets": measured}
    data.save_atomic(text, os.path.join(out, "results.md"))
    data.save_atomic(json.dumps(results | {"backbones": entries}, indent=1), os.path.join(out, "results.json"))
    print("\n" + text, flush=True)


# ------------------------------------------------------------------------------------------------ the evaluation
def evaluate(args):
    """Every check first (flags, weights files, datasets, the source-dataset rule, the --out lock); then, per backbone
    and dataset, the features once and every protocol on them; the table last."""
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    backbones = [load_backbone(w, args.arch, args.img_size, args.patch_size, args.heads) for w in args.weights]
    check_distinct(args.weights, backbones)
    datasets = labeled_datasets(args.data, args.dataset, args.train_ratio, args.runs, args.seed, workers=args.workers)
    for weights, backbone in zip(args.weights, backbones):
        for dataset in datasets:
            check_not_source(weights, backbone, dataset)
    identity = evaluation_identity(args, datasets, backbones)
    if kept := earlier_results(args.out, identity):  # the same evaluation again: its results stay as they are
        return keep_results(args.out, kept)
    data.hold_out(args.out, SCRIPT)  # the last check: one run per --out, which it owns

    results = []
    log = []
    for weights, backbone in zip(args.weights, backbones):
        before = fingerprint(backbone.model)
        entry = {"weights": weights, "method": backbone.method, "arch": backbone.arch, "sha256": backbone.identity}
        for dataset in datasets:
            start = time.time()
            features = extract_features(backbone.model, dataset.paths, args, device)
            extract_s = time.time() - start
            entry[dataset.name] = result = probe_dataset(features, dataset, backbone.width, args)
            for key, value in features.items():
                accuracies = (result["stages"][key] if key != "final" else result)["accuracies"]
                record = {"weights": weights, "dataset": dataset.name, "features": key, "dim": value.shape[1]}
                log.append(record | {"accuracies": accuracies, "extract_s": round(extract_s, 1)})
            stage_text = "".join(f" | {k} %.2f" % v["mean"] for k, v in result["stages"].items())
            knn_text = " | kNN %.2f +- %.2f" % (result["knn"]["mean"], result["knn"]["std"]) if args.knn else ""
            print(
                f"eval_linear | {weights} on {dataset.name}: top-1 {result['mean']:.2f} +- {result['std']:.2f} over "
                f"{args.runs} run(s){knn_text}{stage_text} ({time.time() - start:.0f}s, extraction {extract_s:.0f}s)",
                flush=True,
            )
        entry["backbone_unchanged"] = fingerprint(backbone.model) == before
        if not entry["backbone_unchanged"]:
            raise RuntimeError(f"the backbone of {weights} changed during linear evaluation")
        results.append(entry)

    knn = f" and weighted kNN (k {args.knn_k}, temperature {args.knn_temperature})" if args.knn else ""
    title = f"Linear probe (frozen features, {args.preprocess} {args.img_size} px){knn}, {args.runs} run(s), train "
    extra = stage_table(results, [d.name for d in datasets]) if args.stages else ""
    for record in log:
        data.append_record(os.path.join(args.out, "log.jsonl"), record)
    write_results(args.out, "linear", args, results, datasets, title + f"ratio {args.train_ratio}", identity, extra)
    return results


def main(argv=None):
    """Bad input: one sentence and exit code 2; a stop signal: exit code 128 + its number (130 Ctrl-C, 143 SIGTERM).
    The probe has nothing to save before its table (written last, atomically), so a signal stops it at once."""
    args = get_args(argv)
    handlers = data.handle_stop_signals()  # from the first line of work
    code = 0
    try:
        evaluate(args)
    except data.Interrupted:
        code = data.stop_exit_code(True)
    except UserError as err:
        print(f"{SCRIPT}: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        data.release_out()
    if code:  # never 0: a `&&` chain or an after-success dependency stops here
        data.report_stop(SCRIPT, code)
        sys.exit(code)


# ================================================================================================================
# BACKBONES (both scripts): any --weights loaded into a torchvision model exactly, and the published checkpoints'
# layouts mapped to torchvision's keys. The evaluation above needs only load_backbone() from here.
# ================================================================================================================
HEADS = ("fc", "heads", "head")  # the classifier of torchvision's ResNet, ViT and Swin


def strip_head(model):
    """Replace the classifier by Identity; returns the feature width. The remaining keys are torchvision's."""
    for name in HEADS:
        head = getattr(model, name, None)
        if head is not None:
            setattr(model, name, nn.Identity())
            return (head[-1] if isinstance(head, nn.Sequential) else head).in_features
    raise UserError(f"{type(model).__name__} has no classifier head named {' / '.join(HEADS)}.")


Backbone = namedtuple("Backbone", "model width arch method identity trained_on")  # identity: the file's sha256


def load_backbone(weights, arch=None, image_size=224, patch_size=16, heads=None):
    """A Backbone (the headless model, its feature width, arch, method, the file's sha256 and the datasets it was
    fine-tuned on) from 'random', 'imagenet[:V2]', one of our backbone.pth / checkpoint.pth files, a plain torchvision
    state dict or a published checkpoint (published_backbone), which must fit the model exactly (load_exactly). A
    file's own arch, ViT patch size and heads win over the arguments; a ViT's heads the file does not say are width /
    64 or --heads, and the line that reports a published layout says which."""
    state = None  # the weights in torchvision's keys, or None: random
    method = weights
    config = {}  # our files' image and patch size and heads
    unrecognised = None  # why no backbone was found in a file
    report = ""  # the line that says what a published file was read as
    identity = weights  # random; a file's sha256
    trained_on = []  # the datasets a fine-tuned backbone has seen
    imagenet = weights == "imagenet" or weights.startswith("imagenet:")
    if weights != "random" and not imagenet:
        if not os.path.isfile(weights):
            raise UserError(f"--weights {weights} is not a file (nor 'random' / 'imagenet').")
        obj = data.load_weights_only(weights, fix=weights_fix(weights))
        if not isinstance(obj, dict):
            raise UserError(f"--weights {weights} holds a {type(obj).__name__}, not a state dict.")
        if {"done", "current"} <= obj.keys() and obj["current"] is None:  # finetune_cls.py's, all runs done
            raise UserError(
                f"--weights {weights} is a checkpoint of finished fine-tuning runs: it holds their results, not "
                "weights; finetune_cls.py --save-backbone writes the fine-tuned backbone."
            )
        identity = sha256(weights)
        trained_on = obj.get("trained_on", [])  # finetune_cls.py's datasets, by their file lists
        ours = "method" in obj  # a backbone.pth or checkpoint.pth of this project: its "config" is ours
        arch = obj.get("arch", arch)
        config = obj.get("config", {}) if ours else {}
        if "backbone_prefix" in obj:  # a training checkpoint of this project
            n = len(obj["backbone_prefix"])
            state = {k[n:]: v for k, v in obj["model"].items() if k.startswith(obj["backbone_prefix"])}
            method = obj.get("method", "torchvision")
        else:  # our backbone.pth, a plain state dict or a published layout (MoCo, DINO, Swin ...): torchvision's keys
            state, layout, found, report = published_backbone(obj, weights)
            arch, config = found or (arch, config)
            method = obj.get("method", layout or "torchvision")
            if layout is None and not ours:  # no key where a backbone starts (a text or audio model?)
                unrecognised = (
                    "it holds no backbone this project recognises (its first tensors: "
                    f"{', '.join(list(_tensors(obj))[:3]) or 'none'})"
                )
            elif not ours and layout != "torchvision":  # a refusal names the layout it read
                weights = f"{weights} (read as {layout})"
        if arch is None and unrecognised:
            raise UserError(
                f"--weights {weights}: {unrecognised}; only another torchvision model's plain state dict "
                "would load, with its --arch."
            )
        if arch is None:
            raise UserError(f"--weights {weights} does not say its architecture; add --arch.")
    elif arch is None:
        raise UserError(f"--weights {weights} needs --arch.")
    patch_size = config.get("patch_size", patch_size)
    heads = config.get("heads", heads)
    if arch in data.VIT_SIZES and image_size % patch_size:  # torchvision would assert
        raise UserError(f"--img-size {image_size} is not a multiple of the ViT's patch size {patch_size}.")
    if arch in data.VIT_SIZES and report and "heads" not in config:  # the file cannot tell: say what is assumed
        report += (
            f", {heads} heads (--heads)"
            if heads
            else f", {data.VIT_SIZES[arch][1]} heads assumed (width / 64; --heads N if not)"
        )
    if report and os.environ.get("RANK", "0") == "0":  # one line per job
        print(report)
    model = data.build_model(arch, image_size, patch_size, heads)
    if imagenet:
        state, method, identity = imagenet_state(weights, arch)
    width = strip_head(model)
    if state is not None:
        load_exactly(model, state, weights, arch, image_size, unrecognised)
    return Backbone(model, width, arch, method, identity, trained_on)


def sha256(path):
    """The sha256 of a file's bytes (what identifies a --weights file in results.json and in a resume)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def weights_fix(path):
    """data.load_weights_only's advice for a --weights file it refuses, by torch's error: a TorchScript archive is
    exported to a state dict, a pickle naming a global that could run code is stripped to its tensors (both only for a
    file the user trusts: loading them runs its code); anything else is not a weights file."""
    out = f"{path}.state_dict.pth"
    quoted = json.dumps  # Python strings in double quotes: the shell needs single ones
    export = f'import torch; torch.save(torch.jit.load({quoted(path)}, map_location="cpu").state_dict(), {quoted(out)})'
    strip = (
        "import torch; keep = lambda o: {k: keep(v) if isinstance(v, dict) else v for k, v in o.items() if "
        f'isinstance(v, dict) or torch.is_tensor(v)}}; c = torch.load({quoted(path)}, map_location="cpu", '
        f"weights_only=False); torch.save(keep(c if isinstance(c, dict) else c.state_dict()), {quoted(out)})"
    )

    def fix(error):
        blocked = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))  # torch names what it refused
        if "TorchScript" in str(error):
            why, action, code = "it is a TorchScript archive, not a state dict", "export its weights", export
        elif blocked:
            why, action, code = f"it pickles {blocked[1]}, which could run code", "keep only its tensors", strip
            package = blocked[1].split(".")[0]
            if importlib.util.find_spec(package) is None:  # unpickling imports the module that defines it
                action = f"install the Python package {package} (pip install {package}), then keep only its tensors"
        else:
            return "give a backbone.pth, a checkpoint.pth or a torchvision state dict"
        return f"{why}: if you trust the file, {action} with python -c {shlex.quote(code)} and give --weights {out}"

    return fix


def imagenet_state(weights, arch):
    """(state dict, method, the file's sha256) of torchvision's ImageNet weights, read from the local torch hub cache
    (these machines are offline). 'imagenet' is IMAGENET1K_V1, the classic weights of GeRSP's IMP row and paper 004's
    baseline (torchvision's DEFAULT for resnet50 is V2, a 2021 recipe); 'imagenet:V2' asks for IMAGENET1K_V2."""
    if arch in data.VIT_SIZES:
        raise UserError(f"torchvision has no ImageNet weights for {arch}.")
    tag = "IMAGENET1K_" + (weights.partition(":")[2].removeprefix("IMAGENET1K_") or "V1")
    enum = torchvision.models.get_model_weights(arch)
    if tag not in enum.__members__:
        raise UserError(
            f"torchvision has no {tag} weights for {arch} (it has: {', '.join(w.name for w in enum)}); "
            "use --weights imagenet (IMAGENET1K_V1) or imagenet:<the part after IMAGENET1K_>."
        )
    url = enum[tag].url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(path):
        raise UserError(
            f"ImageNet weights for {arch} are not in the local cache: download {url} on a machine "
            f"with internet access and copy it to {path}."
        )
    return data.load_weights_only(path), f"torchvision {tag}", sha256(path)


def load_exactly(model, state, weights, arch, image_size, unrecognised=None):
    """Load `state` into the headless `model`: every tensor of the model must be in the file with its shape, and
    every tensor of the file must be used (a classifier head aside), or one sentence: a ResNet-101 file holds all
    of ResNet-50's tensors and 306 more, and must not load as a ResNet-50 with two thirds of layer3 dropped.
    `unrecognised` says why nothing fits a file where no backbone was found."""
    if (
        isinstance(model, torchvision.models.VisionTransformer)
        and "encoder.pos_embedding" in state
        and state["encoder.pos_embedding"].shape[1] != model.seq_length
    ):
        if math.isqrt(state["encoder.pos_embedding"].shape[1] - 1) ** 2 != state["encoder.pos_embedding"].shape[1] - 1:
            raise UserError(
                f"--weights {weights} has {state['encoder.pos_embedding'].shape[1]} position embeddings, "
                "not a class token's and a square grid's (timm's no_embed_class?)."
            )
        state = interpolate_embeddings(image_size, model.patch_size, state)  # ViT at another image size
    own = model.state_dict()
    loaded = [k for k in own if k in state and state[k].shape == own[k].shape]
    if len(loaded) < len(own):
        first = next(k for k in own if k not in loaded)
        if unrecognised and not loaded:
            why = unrecognised
        elif first in state:
            why = (
                f"the file's {first} is {tuple(state[first].shape)} where {arch} needs {tuple(own[first].shape)}, "
                "so it holds another architecture"
            )
        else:
            why = (
                f"{first} is missing (the file's first tensor is {next(iter(state), 'none')}), so it holds another "
                "architecture or other key names"
            )
        raise UserError(f"--weights {weights} matches only {len(loaded)} of the {len(own)} tensors of {arch}: {why}.")
    unused = [k for k in state if k not in own and k.split(".")[0] not in HEADS]
    if unused:
        raise UserError(
            f"--weights {weights} holds {len(unused)} tensor(s) that {arch} does not use (e.g. "
            f"{unused[0]}): it is a deeper or another architecture; give its --arch."
        )
    model.load_state_dict({k: state[k] for k in own})


# ---------------------------------------------------------------------- published checkpoints -> torchvision's keys
_SEQUENTIAL = [
    (r"^0\.", "conv1."),
    (r"^1\.", "bn1."),
    (r"^([4-7])\.", lambda m: f"layer{int(m[1]) - 3}."),
    (r"^9\.", "fc."),
]  # nn.Sequential(*resnet.children()); 2, 3, 8 (relu, maxpool, avgpool) hold nothing


_TIMM_VIT = [
    (r"^cls_token$", "class_token"),
    (r"^pos_embed$", "encoder.pos_embedding"),
    (r"^patch_embed\.proj\.", "conv_proj."),
    (r"^norm\.", "encoder.ln."),
    (r"^blocks\.\d+\.(\d+)\.", r"encoder.layers.encoder_layer_\1."),  # DINOv2's block_chunks: blocks.<chunk>.<i>
    (r"^blocks\.(\d+)\.", r"encoder.layers.encoder_layer_\1."),
    (r"(_\d+)\.norm([12])\.", r"\1.ln_\2."),
    (r"\.attn\.qkv\.", ".self_attention.in_proj_"),  # both stack q, k, v rows, head-major within each
    (r"\.attn\.proj\.", ".self_attention.out_proj."),
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.3."),
]


_MS_SWIN = [
    (r"^patch_embed\.proj\.", "features.0.0."),
    (r"^patch_embed\.norm\.", "features.0.2."),
    (r"^layers\.(\d)\.blocks\.", lambda m: f"features.{2 * int(m[1]) + 1}."),
    (r"^layers\.(\d)\.downsample\.", lambda m: f"features.{2 * int(m[1]) + 2}."),  # merging ends stage i
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.3."),
]  # same merge order (x0 x1 x2 x3), qkv, masks


def _timm_vit(state, weights, prefix, obj):
    """(arch, config) of a timm / DINO / DINOv2 / MoCo v3 ViT, its LayerScale folded into the layer before it: gamma
    (W x + b) = (gamma W) x + gamma b. Its heads are in the config when the file says them: MoCo v3's main_moco.py and
    main_lincls.py record their arch, whose ViTs have 12 heads; other files do not (width / 64 in DINO, DINOv2, DeiT
    and timm)."""
    odd = next((k for k in state if re.search(r"register_tokens|\.mlp\.w12\.", k)), None)
    if odd:
        what = "a SwiGLU feed-forward" if "w12" in odd else "register tokens"
        raise UserError(
            f"--weights {weights} is a ViT with {what} ({odd}), which torchvision's VisionTransformer does not have."
        )
    for key in [k for k in state if re.search(r"\.ls[12]\.gamma$", k)]:
        layer = key[:-9] + ("self_attention.out_proj." if ".ls1." in key else "mlp.3.")
        if layer + "bias" in state:  # otherwise gamma stays, unused, and load_exactly names it
            gamma = state.pop(key)
            state[layer + "weight"], state[layer + "bias"] = (
                state[layer + "weight"] * gamma[:, None],
                state[layer + "bias"] * gamma,
            )
    width = state["class_token"].shape[-1]
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    arch = next((a for a, (w, _) in data.VIT_SIZES.items() if w == width), None)
    if arch is None or depth != 12:
        raise UserError(
            f"--weights {weights} is a ViT of width {width} with {depth} blocks; only "
            f"{' / '.join(data.VIT_SIZES)} (width 192 / 384 / 768, 12 blocks) are built here."
        )
    config = {"patch_size": state["conv_proj.weight"].shape[-1]}
    if obj.get("arch") in ("vit_small", "vit_base", "vit_conv_small", "vit_conv_base"):  # MoCo v3's vits.py
        config["heads"] = 12
    return arch, config


def _ms_swin(state, weights, prefix, obj):
    """(arch, config) of a Microsoft Swin: the relative-position tables fix the window (torchvision's is 7), the N x N
    index becomes torchvision's flat one, and width and stage-3 depth name the torchvision model."""
    rows = state["features.1.0.attn.relative_position_bias_table"].shape[0]
    if rows != 169:
        raise UserError(
            f"--weights {weights} is a Swin with window {(math.isqrt(rows) + 1) // 2} ({rows}-row "
            "relative-position tables); torchvision's Swin has window 7 (169 rows)."
        )
    for key in [k for k in state if k.endswith("relative_position_index")]:
        state[key] = state[key].flatten()
    width = state["features.0.0.weight"].shape[0]
    depth = len({k.split(".")[2] for k in state if k.startswith("features.5.")})
    arch = {(96, 6): "swin_t", (96, 18): "swin_s", (128, 18): "swin_b"}.get((width, depth))
    if arch is None:
        raise UserError(
            f"--weights {weights} is a Swin of width {width} with {depth} blocks in stage 3; torchvision "
            "has swin_t (96, 6), swin_s (96, 18) and swin_b (128, 18)."
        )
    return arch, {}


LAYOUTS = [  # (the key that marks a backbone, below its prefix; layout; rules; what reads (arch, config) from it)
    (r"layer1\.0\.conv1\.weight", "torchvision", [], None),  # also timm's, torchgeo's, MoCo's and mmselfsup's ResNets
    (r"class_token", "torchvision", [], None),
    (r"features\.0\.0\.weight", "torchvision", [], None),
    (r"4\.0\.conv1\.weight", "ResNet nn.Sequential", _SEQUENTIAL, None),
    (r"cls_token", "timm ViT", _TIMM_VIT, _timm_vit),
    (r"layers\.0\.blocks\.0\.attn\.qkv\.weight", "Microsoft Swin", _MS_SWIN, _ms_swin),
]


def _tensors(obj, path=""):
    """Every tensor of a nested checkpoint under its dotted path, e.g. state_dict.module.encoder_q.conv1.weight."""
    found = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            found.update(_tensors(value, f"{path}{key}."))
        elif isinstance(value, torch.Tensor):
            found[f"{path}{key}"] = value
    return found


def _rank(prefix):
    """Of several networks in a file, the backbone: DINO's teacher, a 'backbone', the others; key / EMA copies last."""
    if re.search(r"(^|[._])(encoder_k|momentum|target|ema)[._]", prefix):
        return 3
    return 0 if "teacher" in prefix else 1 if "backbone" in prefix else 2


def published_backbone(obj, weights):
    """(state dict in torchvision's keys, layout, (arch, config) where the file says them, else None, the line that
    reports what was read) of any file but our training checkpoint; (its own state dict, None, None, "") when no
    backbone key is found. A LAYOUTS key marks the
    backbone and its prefix: in a plain state dict '' or DDP's 'module.'; in a checkpoint any path (state_dict.module.
    encoder_q., teacher.backbone., model.encoder.). All else (heads, key encoder, queue, optimizer, mask_token, Swin's
    attn_mask buffers) is dropped, named in one line."""
    tensors = _tensors(obj)
    nested = any(isinstance(v, dict) for v in obj.values())
    found = sorted(
        {
            (m[1], i)
            for k in tensors
            for i, (mark, *_) in enumerate(LAYOUTS)
            if (m := re.fullmatch(rf"((?:.*\.)?){mark}", k)) and (nested or m[1] in ("", "module."))
        },
        key=lambda c: (_rank(c[0]), c),
    )
    if not found:  # no layout we know: with --arch another torchvision model's plain state dict may fit, else nothing
        return {k.removeprefix("module."): v for k, v in obj.get("state_dict", obj).items()}, None, None, ""
    prefix = found[0][0]
    _, layout, rules, finish = LAYOUTS[found[0][1]]
    if len(found) > 1 and _rank(found[1][0]) == _rank(prefix):
        raise UserError(
            f"--weights {weights} holds several backbones ({', '.join(p for p, _ in found)}) and does "
            "not say which to evaluate; save that one alone."
        )
    state = {}
    dropped = {}  # what is left out, by name: a count of tensors
    for key, value in tensors.items():
        if not key.startswith(prefix):  # another network or entry: named where its path leaves the backbone's
            name = next((p for p, q in zip(key.split("."), prefix.split(".")) if p != q), key)
        else:
            new = key[len(prefix) :]
            for pattern, replacement in rules:
                new = re.sub(pattern, replacement, new, count=1)
            name = new.split(".")[0] if new.split(".")[0] in HEADS else new.rsplit(".", 1)[-1]
            if name not in HEADS + ("mask_token", "attn_mask"):  # DINOv2's / SimMIM's mask token, Swin's masks
                state[new] = value
                continue
        dropped[name] = dropped.get(name, 0) + 1
    folded = any(re.search(r"\.ls[12]\.gamma$", k) for k in state)
    try:
        arch, config = finish(state, weights, prefix, obj) if finish else (None, {})
    except KeyError as err:
        raise UserError(f"--weights {weights} ({layout} under '{prefix}') lacks {err}.") from None
    names = "torchvision key names" if layout == "torchvision" else f"{layout} layout"  # the shapes may differ
    dropped = ", ".join(f"{n} ({c} tensor{'s' * (c > 1)})" for n, c in dropped.items())
    report = f"--weights {weights}: {names} under '{prefix}'" + (f", {arch}" if arch else "")
    report += "".join(f" {k} {v}" for k, v in config.items()) + (", LayerScale folded" if folded else "")
    report += f"; dropped {dropped}" if dropped else ""
    label = f"{layout} {re.sub(r'^((state_dict|model|module)[.])+', '', prefix)}".strip(" .")
    return state, label, (arch, config) if arch else None, "" if "method" in obj else report  # ours need no report


if __name__ == "__main__":
    main()
