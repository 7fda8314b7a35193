"""Linear evaluation of frozen backbones: a softmax classifier on cached features (and GeRSP's stage-wise probe).

Risojevic & Stojnic, "The Role of Pre-Training in High-Resolution Remote Sensing Scene Classification" (paper 004,
Sec. III "feature extraction"), and GeRSP (paper 000, Sec. VI-B, Fig. 6, stage-wise linear evaluation).

    python eval_linear.py --data synthetic --weights random --arch resnet18 --img-size 64 --runs 2
    python eval_linear.py --data /data/EuroSAT --dataset eurosat --weights runs/moco/backbone.pth --weights imagenet
    python eval_linear.py --data /data/NWPU-RESISC45 --dataset nwpu --weights runs/gersp/backbone.pth --stages

Protocol (paper 004): the backbone is frozen and in eval mode; the features of every image are extracted ONCE
(no augmentation), then a softmax classifier is trained on the cached features with Adam, lr 1e-3, batch 100, for
100 epochs. 20 % of each class trains, 80 % tests (--train-ratio); --runs 5 repeats with the splits of seeds
--seed, --seed+1, ... and reports mean +- std of top-1, as the papers do. Every --weights (repeatable) is evaluated on
the same splits, and the results form one table (GeRSP Table I's shape) in results.md beside results.json.
--stages probes the globally pooled output of each stage (ResNet layer1-4, Swin's four stages, the class token after
each quarter of a ViT's blocks), one accuracy per stage.
Choices where the papers are silent: images are resized to --img-size x --img-size (224, GeRSP's fine-tuning size;
paper 004 resizes to 292 and centre-crops 256); features are not normalised; the std is the sample std (ddof=1).
"""
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

import data
from data import UserError


def get_args(argv=None):
    p = data.evaluation_parser(__file__, "Linear probe on frozen features (see the module docstring).")
    p.add_argument("--img-size", type=int, default=224, help="images are resized to this square size")
    p.add_argument("--stages", action="store_true", help="also probe each stage of the backbone (GeRSP Fig. 6)")
    p.add_argument("--epochs", type=int, default=100, help="classifier epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the classifier")
    p.add_argument("--batch-size", type=int, default=100, help="classifier batch size")
    p.add_argument("--extract-batch-size", type=int, default=256, help="batch size of the feature extraction")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="autocast of the extraction: "
                   "auto = bf16 on CUDA, off on CPU")
    p.add_argument("--out", default="runs/eval_linear", help="folder for results.json, results.md, log.jsonl")
    args = p.parse_args(argv)
    args.data, args.weights = args.data or [data.SYNTHETIC], args.weights or ["random"]
    return args


def check_args(args):
    for name in ("img_size", "runs", "epochs", "lr", "batch_size", "extract_batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if args.dataset and len(args.dataset) != len(args.data):
        raise UserError(f"{len(args.dataset)} --dataset names for {len(args.data)} --data folders; give one each.")
    if os.path.isfile(args.out):
        raise UserError(f"--out {args.out} is a file; give a folder.")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("eval_linear.py runs in one process (the probe takes minutes); start it with python.")


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


@torch.no_grad()
def extract_features(model, paths, args, device):
    """Features of every image, once: {'final': N x D, and with --stages 'stage1'..'stage4'}, on the CPU."""
    model.eval().to(device)
    outputs, hooks = {}, []
    if args.stages:
        names, pool = stage_modules(model)
        modules = dict(model.named_modules())
        for i, name in enumerate(names, 1):
            hooks.append(modules[name].register_forward_hook(
                lambda mod, inp, out, key=f"stage{i}": outputs.__setitem__(key, pool(out))))
    dataset = data.ImageDataset(paths, transform=data.eval_transform(args.img_size))
    loader = DataLoader(dataset, batch_size=args.extract_batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    features, skipped = {}, 0
    for images, _, n_skipped in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            outputs["final"] = model(images.to(device, non_blocking=True))
        for key, value in outputs.items():
            features.setdefault(key, []).append(value.float().cpu())
        skipped += int(n_skipped.sum())
    for hook in hooks:
        hook.remove()
    if skipped:
        print(f"eval_linear | {skipped} unreadable image(s) were replaced by their neighbours", flush=True)
    return {key: torch.cat(value) for key, value in features.items()}


def fingerprint(model):
    """A float64 sum of every parameter and buffer: equal before and after probing proves the backbone is frozen."""
    return sum(float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------ probe
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
    confusion = torch.bincount(truth * num_classes + predicted, minlength=num_classes ** 2)
    return float((predicted == truth).float().mean() * 100), confusion.view(num_classes, num_classes).tolist()


def evaluate(args):
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    datasets = data.labeled_datasets(args.data, args.dataset, args.train_ratio, args.runs, args.seed)
    torch.manual_seed(args.seed)
    backbones = [data.load_backbone(w, args.arch, args.img_size, args.patch_size)  # all checked before any work
                 for w in args.weights]

    results, log = [], []
    for weights, (model, width, arch, method) in zip(args.weights, backbones):
        before, entry = fingerprint(model), {"weights": weights, "method": method, "arch": arch}
        for name, paths, labels, classes, splits in datasets:
            start = time.time()
            features = extract_features(model, paths, args, device)
            extract_s = time.time() - start
            per_key = {}
            for key, feats in features.items():
                runs = [train_probe(feats, torch.tensor(labels), torch.from_numpy(tr), torch.from_numpy(te),
                                    len(classes), args, args.seed + r) for r, (tr, te) in enumerate(splits)]
                per_key[key] = runs
                log.append({"weights": weights, "dataset": name, "features": key, "dim": feats.shape[1],
                            "accuracies": [acc for acc, _ in runs], "extract_s": round(extract_s, 1)})
            accs = [acc for acc, _ in per_key["final"]]
            mean, std = data.mean_std(accs)
            entry[name] = {"accuracies": accs, "mean": mean, "std": std, "classes": classes,
                           "confusion_last_run": per_key["final"][-1][1], "feature_dim": width,
                           "stages": {k: dict(zip(("mean", "std"), data.mean_std([a for a, _ in v])),
                                              accuracies=[a for a, _ in v]) for k, v in per_key.items()
                                      if k != "final"}}
            stage_text = "".join(f" | {k} %.2f" % entry[name]["stages"][k]["mean"] for k in entry[name]["stages"])
            print(f"eval_linear | {weights} on {name}: top-1 {mean:.2f} +- {std:.2f} over {len(accs)} run(s)"
                  f"{stage_text} ({time.time() - start:.0f}s, extraction {extract_s:.0f}s)", flush=True)
        entry["backbone_unchanged"] = fingerprint(model) == before
        if not entry["backbone_unchanged"]:
            raise RuntimeError(f"the backbone of {weights} changed during linear evaluation")
        results.append(entry)

    data.write_results(args.out, "linear", args, results, [d[0] for d in datasets],
                       f"Linear probe (frozen features), {args.runs} run(s), train ratio {args.train_ratio}")
    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
        f.writelines(json.dumps(record) + "\n" for record in log)
    return results


def main(argv=None):
    args = get_args(argv)
    try:
        evaluate(args)
    except UserError as err:
        print(f"eval_linear.py: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
