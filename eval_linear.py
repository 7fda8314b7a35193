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
--stages probes the globally pooled output of each stage (ResNet layer1-4, Swin's four stages, after each quarter of
a ViT's blocks its class token, or the mean of its patch tokens where the ViT is probed so: MAE's global pool), one
accuracy per stage: a second table in results.md (GeRSP Fig. 6 as numbers).
--knn adds the weighted kNN protocol of InstDisc / DINO (cosine similarity, the k = 20 nearest training features vote
with weight exp(similarity / 0.07); --knn-k, --knn-temperature) on the same cached final features and splits: a row
of its own per backbone ("knn" in the protocol column) in the same table; results.json keeps it under <dataset>.knn.
Preprocessing (--preprocess): paper004 = paper 004's test pipeline, resize to 292 x 292 and crop the centre 256 x 256
(--img-size is the crop, default 256; other sizes keep the 292 / 256 ratio). resize (the default, a choice: GeRSP is
silent about its linear probe's preprocessing) = the whole image resized to --img-size (default 224, GeRSP's
fine-tuning size), which keeps the borders of EuroSAT's 64-px images that a centre crop would cut.
Choices where the papers are silent: features are not normalised; the std is the sample std (ddof=1).
An --out holds one evaluation: the same flags and files again (compared by content) print the table it holds and write
nothing; another evaluation into it is refused. A stop signal ends the probe at once (exit 128 + its number): it has
nothing to save before its table, which is written last.
The file reads: the flags, the datasets and their splits, the features, the probe, the results table and evaluate().
Loading any backbone file exactly, and the published checkpoints' layouts, are backbones.py's (finetune_cls.py's too).
"""

import hashlib
import itertools
import json
import os
import re
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

import backbones
import data
from backbones import load_backbone  # finetune_cls.py's too: both programs load any file alike
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
    data.check_given_once(roots, [files for *_, files in listed])
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
        names = [f"encoder.layers.encoder_layer_{d - 1}" for d in (n // 4, n // 2, 3 * n // 4, n)]
        if isinstance(model, backbones.MeanPooledViT):  # MAE's global_pool: its feature is the patch tokens' mean
            return names, lambda y: y[:, 1:].mean(dim=1)
        return names, lambda y: y[:, 0]
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
        data.restore_stop_signals(handlers)
        data.release_out()
    if code:  # never 0: a `&&` chain or an after-success dependency stops here
        data.report_stop(SCRIPT, code)
        sys.exit(code)


if __name__ == "__main__":
    main()
