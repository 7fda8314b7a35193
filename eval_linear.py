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
(data.labeled_datasets): the splits are drawn over the readable images, the same for every backbone.
A backbone fine-tuned on the evaluated dataset (finetune_cls.py --save-backbone) is refused: its training images
would be in the test split (paper 004 never uses one dataset as source and target).
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
    p.add_argument("--preprocess", choices=("resize", "paper004"), default="resize", help="resize: the whole image "
                   "to --img-size; paper004: resize to 292 and crop the centre 256 (paper 004, Sec. III)")
    p.add_argument("--img-size", type=int, help="resize: the square image size (default 224); paper004: the centre "
                   "crop (default 256, of a 292 resize)")
    p.add_argument("--stages", action="store_true", help="also probe each stage of the backbone (GeRSP Fig. 6)")
    p.add_argument("--knn", action="store_true", help="also the weighted kNN protocol (InstDisc / DINO) on the same "
                   "features and splits")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours that vote in --knn")
    p.add_argument("--knn-temperature", type=float, default=0.07, help="temperature of the --knn votes")
    p.add_argument("--epochs", type=int, default=100, help="classifier epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the classifier")
    p.add_argument("--batch-size", type=int, default=100, help="classifier batch size")
    p.add_argument("--extract-batch-size", type=int, default=256, help="batch size of the feature extraction")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--amp", choices=("off", "bf16"), default="off", help="autocast of the extraction: off = float32 "
                   "as in the papers; bf16 is faster on a GPU")
    p.add_argument("--out", default="runs/eval_linear", help="folder for results.json, results.md, log.jsonl")
    args = p.parse_args(argv)
    args.data, args.weights = args.data or [data.SYNTHETIC], args.weights or ["random"]
    if args.img_size is None:
        args.img_size = 256 if args.preprocess == "paper004" else 224
    return args


def check_args(args):
    for name in ("img_size", "runs", "epochs", "lr", "batch_size", "extract_batch_size", "knn_k", "knn_temperature"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if args.dataset and len(args.dataset) != len(args.data):
        raise UserError(f"{len(args.dataset)} --dataset names for {len(args.data)} --data folders; give one each.")
    data.check_out_dir(args.out)
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


def preprocess(args):
    """The extraction's pipeline: paper 004's resize-292 + centre-256 crop, or the whole image resized."""
    if args.preprocess == "paper004":
        return data.center_crop_transform(args.img_size)
    return data.eval_transform(args.img_size)


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
    dataset = data.ImageDataset(paths, transform=preprocess(args))
    loader = DataLoader(dataset, batch_size=args.extract_batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    features, skipped = {}, 0
    for images, _, n_skipped in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            outputs["final"] = model(images.to(device, non_blocking=True))
        for key, value in outputs.items():
            features.setdefault(key, []).append(value.float().cpu())
        skipped += int(n_skipped.sum())
    for hook in hooks:
        hook.remove()
    if skipped:  # every file decoded at start-up; a neighbour's feature under this label would be a wrong result
        raise UserError(f"{skipped} image(s) became unreadable after the check at start-up; check the disk and run "
                        "again.")
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


def probe_dataset(features, labels, classes, splits, width, args):
    """Every protocol on one dataset's cached features: the softmax probe of the final (and each stage's) features
    over every split, and with --knn the weighted kNN of the final features on the same splits."""
    labels, splits = torch.tensor(labels), [(torch.from_numpy(tr), torch.from_numpy(te)) for tr, te in splits]
    per_key = {key: [train_probe(feats, labels, tr, te, len(classes), args, args.seed + r)
                     for r, (tr, te) in enumerate(splits)] for key, feats in features.items()}
    result = data.run_summary([acc for acc, _ in per_key["final"]], classes=classes, feature_dim=width,
                              confusion_last_run=per_key["final"][-1][1],
                              stages={key: data.run_summary([acc for acc, _ in runs])
                                      for key, runs in per_key.items() if key != "final"})
    if args.knn:
        final, n = features["final"], len(classes)
        accuracies = [float((data.knn_predict(final[tr], labels[tr], final[te], n, args.knn_k, args.knn_temperature)
                             == labels[te]).float().mean() * 100) for tr, te in splits]
        result["knn"] = data.run_summary(accuracies, k=args.knn_k, temperature=args.knn_temperature)
    return result


def stage_table(entries, names):
    """GeRSP Fig. 6 as a table: a row per backbone and dataset, the probe's top-1 on each stage's pooled features."""
    keys = [f"stage{i}" for i in range(1, 5)]
    lines = ["Stage-wise linear probe (GeRSP Fig. 6), top-1 mean +- std", "",
             "| weights | method | arch | dataset | " + " | ".join(keys) + " |", "|---|---|---|---|" + "---|" * 4]
    lines += [f"| {e['weights']} | {e['method']} | {e['arch']} | {n} | " + " | ".join(
        "%.2f +- %.2f" % (e[n]["stages"][k]["mean"], e[n]["stages"][k]["std"]) for k in keys) + " |"
        for e in entries for n in names]
    return "\n".join(lines) + "\n"


def evaluate(args):
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    backbones = [data.load_backbone(w, args.arch, args.img_size, args.patch_size)  # all checked before any work
                 for w in args.weights]
    datasets = data.labeled_datasets(args.data, args.dataset, args.train_ratio, args.runs, args.seed,
                                     workers=args.workers)
    for weights, (_, _, _, method) in zip(args.weights, backbones):
        for name, *_ in datasets:
            data.check_not_source(weights, method, name)

    results, log = [], []
    for weights, (model, width, arch, method) in zip(args.weights, backbones):
        before, entry = fingerprint(model), {"weights": weights, "method": method, "arch": arch}
        for name, paths, labels, classes, splits in datasets:
            start = time.time()
            features = extract_features(model, paths, args, device)
            extract_s = time.time() - start
            entry[name] = result = probe_dataset(features, labels, classes, splits, width, args)
            log += [{"weights": weights, "dataset": name, "features": key, "dim": features[key].shape[1],
                     "accuracies": (result["stages"][key] if key != "final" else result)["accuracies"],
                     "extract_s": round(extract_s, 1)} for key in features]
            stage_text = "".join(f" | {k} %.2f" % v["mean"] for k, v in result["stages"].items())
            knn_text = " | kNN %.2f +- %.2f" % (result["knn"]["mean"], result["knn"]["std"]) if args.knn else ""
            print(f"eval_linear | {weights} on {name}: top-1 {result['mean']:.2f} +- {result['std']:.2f} over "
                  f"{args.runs} run(s){knn_text}{stage_text} ({time.time() - start:.0f}s, extraction {extract_s:.0f}s)",
                  flush=True)
        entry["backbone_unchanged"] = fingerprint(model) == before
        if not entry["backbone_unchanged"]:
            raise RuntimeError(f"the backbone of {weights} changed during linear evaluation")
        results.append(entry)

    knn = f" and weighted kNN (k {args.knn_k}, temperature {args.knn_temperature})" if args.knn else ""
    names = [d[0] for d in datasets]
    data.write_results(args.out, "linear", args, results, names, f"Linear probe (frozen features, {args.preprocess} "
                       f"{args.img_size} px){knn}, {args.runs} run(s), train ratio {args.train_ratio}",
                       extra=stage_table(results, names) if args.stages else "")
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
