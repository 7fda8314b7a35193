"""The one module every script imports.

First half, data: image discovery, labeled folders and splits, augmentations, the dataset and sampler (unreadable
files skipped and counted; augmentations seeded by (seed, epoch, index), so a resumed run sees exactly what an
uninterrupted one would). "synthetic" names a built-in generated dataset, so every script runs without a download.
Second half, what the two evaluation programs share (so neither copies the other): their common flags, datasets with
their splits (unreadable images dropped before splitting), loading any backbone file exactly, the source-dataset
check of domain-adapted backbones, the weighted kNN classifier, and the results table.
"""
import argparse
import json
import math
import os
import random
import re
import textwrap
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.models.vision_transformer import interpolate_embeddings

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC = "synthetic"
SYNTHETIC_IMAGES, SYNTHETIC_SIZE = 2048, 64
SYNTHETIC_CLASS_NAMES = ("stripes", "checkerboard", "dots", "blobs")


class UserError(Exception):
    """A problem with the user's input or files: the scripts print it as one sentence and exit with code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown --arch, a missing value) are one line and exit code 2, like every bad input,
    and whose --help shows each default (those computed at run time are described in the flag's help)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=_ShowDefaults, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help).\n")


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def check_out_dir(path, flag="--out"):
    """An output folder must be a folder or creatable: one sentence when it, or a folder above it, is a file."""
    target = probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == target else f"is below the file {probe}"
        raise UserError(f"{flag} {path} {where}; give a folder.")


# ---------------------------------------------------------------- discovery
def _scan(root):
    """All image files below `root` (any nesting), via os.scandir: a million files take seconds. Directory links are
    followed, but each directory (its st_dev, st_ino) is read once, real folders before links: a link loop (a mirror's
    `up -> ..`) or a second link to a folder adds nothing, and an image keeps its real path when it has one."""
    found, stack, links, seen = [], [root], [], set()
    while stack or links:
        if not stack:  # every real folder is read; now the links, in name order so every machine lists the same paths
            links.sort(reverse=True)
            stack.append(links.pop())
        folder = stack.pop()
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    (links if entry.is_symlink() else stack).append(entry.path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(entry.path)
    return found


def list_images(roots):
    """Sorted image paths under each root; "synthetic" stands for the built-in generated dataset."""
    paths = []
    for root in roots:
        if root == SYNTHETIC:
            paths += [f"{SYNTHETIC}://{i}" for i in range(SYNTHETIC_IMAGES)]
            continue
        if not os.path.isdir(root):
            raise UserError(f"--data {root} is not a folder (give a folder of images, or 'synthetic').")
        found = _scan(root)
        if not found:
            raise UserError(f"--data {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        paths += sorted(found)
    return paths


def labeled_images(root):
    """(paths, labels, class_names) of a class-per-folder dataset; descends through single wrapper folders. macOS's
    __MACOSX/ (zip metadata) is never a class; a class folder holding image folders (a root of train/ and test/
    copies, each with its own class folders) is refused rather than read as one class each."""
    if root == SYNTHETIC:  # the class of synthetic image i is i mod 4
        paths = list_images([SYNTHETIC])
        return paths, [i % len(SYNTHETIC_CLASS_NAMES) for i in range(len(paths))], list(SYNTHETIC_CLASS_NAMES)
    if not os.path.isdir(root):
        raise UserError(f"--data {root} is not a folder (give a folder with one sub-folder per class).")
    while True:  # EuroSAT unpacks to 2750/<Class>/, NWPU to NWPU-RESISC45/<class>/
        entries = list(os.scandir(root))
        subdirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith(".") and
                         e.name != "__MACOSX")
        direct = any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
        if len(subdirs) == 1 and not direct:
            root = os.path.join(root, subdirs[0])
        else:
            break
    if len(subdirs) < 2:
        raise UserError(f"{root} has {len(subdirs)} class folder(s); a labeled dataset needs one folder per class "
                        "and at least two classes.")
    paths, labels = [], []
    for label, name in enumerate(subdirs):
        folder = os.path.join(root, name)
        files = sorted(_scan(folder))
        if not files:
            raise UserError(f"class folder {folder} holds no images; remove it or add images.")
        nested = next((os.path.dirname(f) for f in files if os.path.dirname(f) != folder), None)
        if nested:
            found = ", ".join(subdirs[:8]) + (", ..." if len(subdirs) > 8 else "")
            raise UserError(f"class folder {folder} holds image folders (e.g. {os.path.relpath(nested, root)}), so "
                            f"{root} is not one folder per class (found {len(subdirs)}: {found}); give --data the "
                            "folder whose sub-folders are the classes.")
        paths += files
        labels += [label] * len(files)
    return paths, labels, subdirs


def stratified_split(labels, train_ratio, seed):
    """Per class, a random `train_ratio` of the images for training and the rest for testing (fixed by `seed`)."""
    if not 0 < train_ratio < 1:
        raise UserError(f"--train-ratio must be between 0 and 1 (got {train_ratio}).")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(train_ratio * len(idx)))
        if n_train < 1 or n_train >= len(idx):
            raise UserError(f"class {c} has {len(idx)} images: a train ratio of {train_ratio} leaves it without "
                            f"{'training' if n_train < 1 else 'test'} images; add images or change --train-ratio.")
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---------------------------------------------------------------- images
def synthetic_image(index, size=SYNTHETIC_SIZE):
    """A generated grey texture whose class (index mod 4) is its pattern: stripes, checkerboard, dots or blobs.
    Grey levels, polarity, contrast, orientation, scale, phase and noise are random, so a random network's features
    (dominated by brightness and contrast) separate the classes poorly, while features that are invariant to
    crops and colour jitter, what contrastive pre-training learns, separate them well: the first command shows
    learning instead of a task that random features already solve."""
    rng = np.random.default_rng(index)
    label = index % len(SYNTHETIC_CLASS_NAMES)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle, freq, phase = rng.uniform(0, math.pi), rng.uniform(3, 7), rng.uniform(0, 2 * math.pi, 2)
    u = 2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase[0]
    v = 2 * math.pi * freq * (yy * math.cos(angle) - xx * math.sin(angle)) + phase[1]
    if label == 0:
        pattern = np.sin(u) > 0
    elif label == 1:
        pattern = np.sin(u) * np.sin(v) > 0
    elif label == 2:
        pattern = np.cos(u) + np.cos(v) > 1.0
    else:  # smooth random field, thresholded: blobs without a period
        cells = rng.integers(3, 7)
        field = np.asarray(Image.fromarray(rng.normal(0, 1, (cells, cells)).astype(np.float32))
                           .resize((size, size), Image.BICUBIC))
        pattern = field > np.median(field)
    low, high = rng.permutation([rng.uniform(0, 0.45), rng.uniform(0.55, 1)])  # random polarity and contrast
    grey = low + (high - low) * pattern + rng.normal(0, rng.uniform(0.02, 0.12), (size, size))
    rgb = grey[..., None] * rng.uniform(0.85, 1.0, 3)  # a faint random tint, not tied to the class
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def open_rgb(path):
    """Open any image as 8-bit RGB: grayscale, palette, RGBA, CMYK and 16-bit / float files are converted."""
    if path.startswith(SYNTHETIC):
        return synthetic_image(int(path.rsplit("/", 1)[1]))
    with Image.open(path) as img:
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit or float: stretch to 0-255
            arr = np.asarray(img, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8))
        return img.convert("RGB")


def check_readable(paths, samples=32, seed=0):
    """Open a random sample of the files at start-up: a dataset whose files mostly fail is an error, not a slow run."""
    picked, failed = random.Random(seed).sample(paths, min(samples, len(paths))), []
    for path in picked:
        try:
            open_rgb(path)
        except Exception as err:  # noqa: BLE001 - any decoder error means "unreadable"
            failed.append(f"{path} ({type(err).__name__})")
    if len(failed) > len(picked) // 2:
        raise UserError(f"{len(failed)} of {len(picked)} sampled images could not be read, e.g. {failed[0]}; "
                        "check that --data points at image files.")


# ---------------------------------------------------------------- augmentations
class RandomGaussianBlur:
    """Gaussian blur with sigma drawn from [0.1, 2.0] as in MoCo v2 (PIL's filter, like the official code)."""

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(1).uniform_(0.1, 2.0))))


def augmentation(name, size):
    """The pre-training pipelines: 'moco_v1', 'moco_v2' (official MoCo code) and 'gersp' (GeRSP Sec. III-B)."""
    crop = T.RandomResizedCrop(size, scale=(0.2, 1.0))
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if name == "moco_v1":
        steps = [crop, T.RandomGrayscale(p=0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip()]
    elif name == "moco_v2":
        steps = [crop, T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                 T.RandomApply([RandomGaussianBlur()], p=0.5), T.RandomHorizontalFlip()]
    elif name == "gersp":  # crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.16) p=0.8, gray 0.2, flip 0.5, blur 0.5
        steps = [crop, T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.16)], p=0.8), T.RandomGrayscale(p=0.2),
                 T.RandomHorizontalFlip(), T.RandomApply([RandomGaussianBlur()], p=0.5)]
    else:
        raise ValueError(f"unknown augmentation {name!r}")
    return T.Compose(steps + tail)


def eval_transform(size):
    """Evaluation: resize the whole image to size x size (the papers resize EuroSAT's 64 px to 224), normalise."""
    return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def center_crop_transform(size):
    """Paper 004's test pipeline (Sec. III): resize to 292 x 292 and crop the centre 256 x 256 (for another `size`,
    the same 292 / 256 ratio), normalise."""
    big = round(size * 292 / 256)
    return T.Compose([T.Resize((big, big)), T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TwoViews:
    """Two independent augmentations of one image: the query and key of a positive pair."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return [self.transform(img), self.transform(img)]


# ---------------------------------------------------------------- dataset and sampler
class ImageDataset(Dataset):
    """(transform(image), label or -1, files skipped) for items `index` or `(epoch, index)`. An unreadable file is
    replaced by the next readable one and counted; the augmentation is seeded by (seed, epoch, index) alone."""

    def __init__(self, paths, labels=None, transform=None, seed=0):
        self.paths, self.transform, self.seed = paths, transform, seed
        self.labels = [-1] * len(paths) if labels is None else labels
        self.reported = 0

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        epoch, index = item if isinstance(item, tuple) else (0, item)
        skipped = 0
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                img = open_rgb(path)
                break
            except Exception as err:  # noqa: BLE001 - any decoder error means "skip this file"
                skipped += 1
                if self.reported < 5:  # say which files fail, without flooding the log on a bad dataset
                    self.reported += 1
                    print(f"warning: skipping unreadable image {path} ({type(err).__name__}: {err})", flush=True)
        else:
            raise UserError("no image of the dataset could be read.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + index)
            x = self.transform(img) if self.transform else img
        return x, self.labels[(index + offset) % len(self.paths)], skipped


class EpochSampler(Sampler):
    """A permutation per epoch fixed by (seed, epoch), cut into global batches (the last incomplete one dropped), each
    process taking its slice of every batch; set_epoch(e, start_batch) resumes mid-epoch on the same batches."""

    def __init__(self, size, global_batch, rank=0, world_size=1, seed=0):
        self.size, self.global_batch, self.rank, self.world, self.seed = size, global_batch, rank, world_size, seed
        self.epoch, self.start_batch = 0, 0

    def batches_per_epoch(self):
        return self.size // self.global_batch

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        local = self.global_batch // self.world
        for b in range(self.start_batch, self.batches_per_epoch()):
            batch = order[b * self.global_batch:(b + 1) * self.global_batch]
            for i in batch[self.rank * local:(self.rank + 1) * local].tolist():
                yield (self.epoch, i)

    def __len__(self):
        return (self.batches_per_epoch() - self.start_batch) * (self.global_batch // self.world)


# ---------------------------------------------------------------- shared by eval_linear.py and finetune_cls.py
# (and the backbone files every script writes): flags, datasets, weights files, the results table.
def evaluation_parser(script, description):
    """The flags eval_linear.py and finetune_cls.py share: datasets, weights, split, runs and seed."""
    p = ArgumentParser(prog=os.path.basename(script), description=description)
    p.add_argument("--data", action="append", help="class-per-folder dataset (repeatable); 'synthetic' = built-in. "
                   "Default: synthetic")
    p.add_argument("--dataset", action="append", help="name of each --data in the report (eurosat, nwpu, ...); "
                   "default: the folder name")
    p.add_argument("--weights", action="append", help="random | imagenet (torchvision's IMAGENET1K_V1, the papers' "
                   "baseline) | imagenet:V2 (a newer torchvision recipe) | a backbone.pth / checkpoint.pth of this "
                   "project | a torchvision state dict | a published checkpoint (MoCo v1-v3, mmselfsup, Lightning, "
                   "DINO, DINOv2, timm, torchgeo, Swin, SimMIM: see README); repeat to compare backbones. Default: "
                   "random")
    p.add_argument("--arch", help="architecture, when the weights file does not say it (e.g. resnet50)")
    p.add_argument("--patch-size", type=int, default=16, help="ViT patch size, when the weights file does not say it")
    p.add_argument("--train-ratio", type=float, default=0.2, help="fraction of each class used for training")
    p.add_argument("--runs", type=int, default=5, help="repetitions with different splits (mean +- std)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first split (run r uses seed + r) and of random "
                   "weights")
    return p


def labeled_datasets(roots, names, train_ratio, runs, seed, verbose=True, workers=0):
    """The evaluation datasets: [(name, paths, labels, classes, [(train, test) split of each run])]. The images that
    do not decode are dropped BEFORE splitting (readable_images), so the splits, drawn over the readable ones, are the
    same for every backbone and both scripts, and no image stands in for another with the wrong label."""
    datasets = []
    for i, root in enumerate(roots):
        paths, labels, classes = labeled_images(root)
        name = names[i] if names else os.path.basename(os.path.normpath(root))
        if verbose:
            print(f"{name}: {len(classes)} classes: {', '.join(classes)}", flush=True)
        paths, labels, unreadable = readable_images(paths, labels, classes, workers)
        splits = [stratified_split(labels, train_ratio, seed + r) for r in range(runs)]
        datasets.append((name, paths, labels, classes, splits))
        if verbose:
            dropped = (f" ({len(unreadable)} unreadable image(s) dropped before splitting, e.g. {unreadable[0]})"
                       if unreadable else "")
            print(f"{name}: {len(paths)} images{dropped}, {len(splits[0][0])} train / {len(splits[0][1])} test per "
                  "run", flush=True)
    return datasets


def _decodes(paths):
    """Which of `paths` decode: the collate_fn of readable_images' DataLoader, so that its workers do the work."""
    ok = []
    for path in paths:
        try:
            open_rgb(path)
            ok.append(True)
        except Exception:  # noqa: BLE001 - any decoder error means "unreadable"
            ok.append(False)
    return ok


def readable_images(paths, labels, classes, workers=0):
    """(paths, labels, unreadable paths): one decoding pass over every image (in `workers` processes; cheaper than
    the extraction or one epoch) drops the files that fail. A class left without a readable image is an error."""
    if all(p.startswith(SYNTHETIC) for p in paths):  # generated, always readable
        return paths, labels, []
    loader = DataLoader(paths, batch_size=64, num_workers=workers, collate_fn=_decodes)
    ok = [flag for batch in loader for flag in batch]
    empty = sorted(set(range(len(classes))) - {label for label, good in zip(labels, ok) if good})
    if empty:
        raise UserError(f"no image of class {classes[empty[0]]} could be read; check the files of that folder.")
    keep = [i for i, good in enumerate(ok) if good]
    return [paths[i] for i in keep], [labels[i] for i in keep], [p for p, good in zip(paths, ok) if not good]


VIT_SIZES = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # width, heads; 12 blocks
HEADS = ("fc", "heads", "head")  # the classifier of torchvision's ResNet, ViT and Swin


def build_model(arch, image_size=224, patch_size=16):
    """A torchvision classification model; vit_tiny / vit_small / vit_base are VisionTransformer(12 blocks, mlp 4x)."""
    if arch in VIT_SIZES:
        return torchvision.models.VisionTransformer(image_size, patch_size, 12, VIT_SIZES[arch][1],
                                                    VIT_SIZES[arch][0], 4 * VIT_SIZES[arch][0])
    if arch not in torchvision.models.list_models(torchvision.models):
        raise UserError(f"unknown --arch {arch}; use a torchvision model name such as resnet50, swin_t or vit_small.")
    return torchvision.models.get_model(arch, **({"image_size": image_size} if arch.startswith("vit") else {}))


def strip_head(model):
    """Replace the classifier by Identity; returns the feature width. The remaining keys are torchvision's."""
    for name in HEADS:
        head = getattr(model, name, None)
        if head is not None:
            setattr(model, name, nn.Identity())
            return (head[-1] if isinstance(head, nn.Sequential) else head).in_features
    raise UserError(f"{type(model).__name__} has no classifier head named {' / '.join(HEADS)}.")


def load_backbone(weights, arch=None, image_size=224, patch_size=16):
    """(headless model, feature width, arch, method) from 'random', 'imagenet[:V2]', one of our backbone.pth /
    checkpoint.pth files, a plain torchvision state dict or a published checkpoint (published_backbone), which must
    fit the model exactly (load_exactly). A file's own arch and ViT patch size win over the arguments."""
    state, method, config = None, weights, {}
    imagenet = weights == "imagenet" or weights.startswith("imagenet:")
    if weights != "random" and not imagenet:
        if not os.path.isfile(weights):
            raise UserError(f"--weights {weights} is not a file (nor 'random' / 'imagenet').")
        obj = load_weights_only(weights)
        if not isinstance(obj, dict):
            raise UserError(f"--weights {weights} holds a {type(obj).__name__}, not a state dict.")
        ours = "method" in obj  # a backbone.pth or checkpoint.pth of this project: its "config" is ours
        arch, config = obj.get("arch", arch), obj.get("config", {}) if ours else {}
        if "backbone_prefix" in obj:  # a training checkpoint of this project
            n = len(obj["backbone_prefix"])
            state = {k[n:]: v for k, v in obj["model"].items() if k.startswith(obj["backbone_prefix"])}
            method = obj.get("method", "torchvision")
        else:  # our backbone.pth, a plain state dict or a published layout (MoCo, DINO, Swin ...): torchvision's keys
            state, layout, found = published_backbone(obj, weights)
            arch, config = found or (arch, config)
            method = obj.get("method", layout)
            if not ours and layout != "torchvision":  # a refusal names the layout it read
                weights = f"{weights} (read as {layout})"
        if arch is None:
            raise UserError(f"--weights {weights} does not say its architecture; add --arch.")
    elif arch is None:
        raise UserError(f"--weights {weights} needs --arch.")
    patch_size = config.get("patch_size", patch_size)
    if arch in VIT_SIZES and image_size % patch_size:  # torchvision would assert
        raise UserError(f"--img-size {image_size} is not a multiple of the ViT's patch size {patch_size}.")
    model = build_model(arch, image_size, patch_size)
    if imagenet:
        state, method = imagenet_state(weights, arch)
    width = strip_head(model)
    if state is not None:
        load_exactly(model, state, weights, arch, image_size)
    return model, width, arch, method


def imagenet_state(weights, arch):
    """(state dict, method) of torchvision's ImageNet weights, read from the local torch hub cache (these machines
    are offline). 'imagenet' is IMAGENET1K_V1, the classic weights of GeRSP's IMP row and paper 004's baseline
    (torchvision's DEFAULT for resnet50 is V2, a 2021 recipe); 'imagenet:V2' asks for IMAGENET1K_V2."""
    if arch in VIT_SIZES:
        raise UserError(f"torchvision has no ImageNet weights for {arch}.")
    tag = "IMAGENET1K_" + (weights.partition(":")[2].removeprefix("IMAGENET1K_") or "V1")
    enum = torchvision.models.get_model_weights(arch)
    if tag not in enum.__members__:
        raise UserError(f"torchvision has no {tag} weights for {arch} (it has: {', '.join(w.name for w in enum)}); "
                        "use --weights imagenet (IMAGENET1K_V1) or imagenet:<the part after IMAGENET1K_>.")
    url = enum[tag].url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(path):
        raise UserError(f"ImageNet weights for {arch} are not in the local cache: download {url} on a machine "
                        f"with internet access and copy it to {path}.")
    return load_weights_only(path), f"torchvision {tag}"


def load_exactly(model, state, weights, arch, image_size):
    """Load `state` into the headless `model`: every tensor of the model must be in the file with its shape, and
    every tensor of the file must be used (a classifier head aside), or one sentence: a ResNet-101 file holds all
    of ResNet-50's tensors and 306 more, and must not load as a ResNet-50 with two thirds of layer3 dropped."""
    if isinstance(model, torchvision.models.VisionTransformer) and "encoder.pos_embedding" in state and \
            state["encoder.pos_embedding"].shape[1] != model.seq_length:
        if math.isqrt(state["encoder.pos_embedding"].shape[1] - 1) ** 2 != state["encoder.pos_embedding"].shape[1] - 1:
            raise UserError(f"--weights {weights} has {state['encoder.pos_embedding'].shape[1]} position embeddings, "
                            "not a class token's and a square grid's (timm's no_embed_class?).")
        state = interpolate_embeddings(image_size, model.patch_size, state)  # ViT at another image size
    own = model.state_dict()
    loaded = [k for k in own if k in state and state[k].shape == own[k].shape]
    if len(loaded) < len(own):
        missing = next(k for k in own if k not in loaded)
        raise UserError(f"--weights {weights} matches only {len(loaded)} of the {len(own)} tensors of {arch} "
                        f"(e.g. {missing} is missing or of another shape; the file's first tensor is "
                        f"{next(iter(state), 'none')}): it holds another architecture or other key names.")
    unused = [k for k in state if k not in own and k.split(".")[0] not in HEADS]
    if unused:
        raise UserError(f"--weights {weights} holds {len(unused)} tensor(s) that {arch} does not use (e.g. "
                        f"{unused[0]}): it is a deeper or another architecture; give its --arch.")
    model.load_state_dict({k: state[k] for k in own})


def load_weights_only(path, fix="give a backbone.pth, a checkpoint.pth or a torchvision state dict"):
    """torch.load with weights_only=True: tensors and plain values load, a pickle that would run code is refused in
    one sentence (torch's warning about a foreign file's pickle protocol is silenced: the refusal says it all)."""
    try:  # argparse.Namespace (DINO's saved args) holds plain values and runs no code
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling error means "not a weights file"
        raise UserError(f"{path} is not a weights or checkpoint file that loads with weights_only=True "
                        f"({type(err).__name__}); {fix}.") from None


# ---------------------------------------------------------------- published checkpoints -> torchvision's keys
# Rules (regex, replacement), applied in order to every key below the backbone's prefix. A key no rule renames keeps
# its name; load_exactly then refuses whatever does not fit the model exactly, naming it.
_SEQUENTIAL = [(r"^0\.", "conv1."), (r"^1\.", "bn1."), (r"^([4-7])\.", lambda m: f"layer{int(m[1]) - 3}."),
               (r"^9\.", "fc.")]  # nn.Sequential(*resnet.children()); 2, 3, 8 (relu, maxpool, avgpool) hold nothing
_TIMM_VIT = [(r"^cls_token$", "class_token"), (r"^pos_embed$", "encoder.pos_embedding"),
             (r"^patch_embed\.proj\.", "conv_proj."), (r"^norm\.", "encoder.ln."),
             (r"^blocks\.(\d+)\.", r"encoder.layers.encoder_layer_\1."), (r"(_\d+)\.norm([12])\.", r"\1.ln_\2."),
             (r"\.attn\.qkv\.", ".self_attention.in_proj_"),  # both stack q, k, v rows, head-major within each
             (r"\.attn\.proj\.", ".self_attention.out_proj."), (r"\.mlp\.fc1\.", ".mlp.0."),
             (r"\.mlp\.fc2\.", ".mlp.3.")]
_MS_SWIN = [(r"^patch_embed\.proj\.", "features.0.0."), (r"^patch_embed\.norm\.", "features.0.2."),
            (r"^layers\.(\d)\.blocks\.", lambda m: f"features.{2 * int(m[1]) + 1}."),
            (r"^layers\.(\d)\.downsample\.", lambda m: f"features.{2 * int(m[1]) + 2}."),  # merging ends stage i
            (r"\.mlp\.fc1\.", ".mlp.0."), (r"\.mlp\.fc2\.", ".mlp.3.")]  # same merge order (x0 x1 x2 x3), qkv, masks


def _timm_vit(state, weights, prefix):
    """(arch, config) of a timm / DINO / DINOv2 ViT, its LayerScale folded into the layer before it: gamma (W x + b) =
    (gamma W) x + gamma b. Heads are not in the file: width / 64, as in DINO, DINOv2, DeiT and timm."""
    odd = next((k for k in state if re.search(r"register_tokens|\.mlp\.w12\.", k)), None)
    if odd:
        what = "a SwiGLU feed-forward" if "w12" in odd else "register tokens"
        raise UserError(f"--weights {weights} is a ViT with {what} ({odd}), which torchvision's VisionTransformer "
                        "does not have.")
    for key in [k for k in state if re.search(r"\.ls[12]\.gamma$", k)]:
        layer = key[:-9] + ("self_attention.out_proj." if ".ls1." in key else "mlp.3.")
        if layer + "bias" in state:  # otherwise gamma stays, unused, and load_exactly names it
            gamma = state.pop(key)
            state[layer + "weight"], state[layer + "bias"] = state[layer + "weight"] * gamma[:, None], \
                state[layer + "bias"] * gamma
    width = state["class_token"].shape[-1]
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    arch = next((a for a, (w, _) in VIT_SIZES.items() if w == width), None)
    if "base_encoder" in prefix and width == 384:
        raise UserError(f"--weights {weights} is MoCo v3's vit_small, whose 12 heads (ours has 6) the file does not "
                        "record.")
    if arch is None or depth != 12:
        raise UserError(f"--weights {weights} is a ViT of width {width} with {depth} blocks; only "
                        f"{' / '.join(VIT_SIZES)} (width 192 / 384 / 768, 12 blocks) are built here.")
    return arch, {"patch_size": state["conv_proj.weight"].shape[-1]}


def _ms_swin(state, weights, prefix):
    """(arch, config) of a Microsoft Swin: the relative-position tables fix the window (torchvision's is 7), the N x N
    index becomes torchvision's flat one, and width and stage-3 depth name the torchvision model."""
    rows = state["features.1.0.attn.relative_position_bias_table"].shape[0]
    if rows != 169:
        raise UserError(f"--weights {weights} is a Swin with window {(math.isqrt(rows) + 1) // 2} ({rows}-row "
                        "relative-position tables); torchvision's Swin has window 7 (169 rows).")
    for key in [k for k in state if k.endswith("relative_position_index")]:
        state[key] = state[key].flatten()
    width = state["features.0.0.weight"].shape[0]
    depth = len({k.split(".")[2] for k in state if k.startswith("features.5.")})
    arch = {(96, 6): "swin_t", (96, 18): "swin_s", (128, 18): "swin_b"}.get((width, depth))
    if arch is None:
        raise UserError(f"--weights {weights} is a Swin of width {width} with {depth} blocks in stage 3; torchvision "
                        "has swin_t (96, 6), swin_s (96, 18) and swin_b (128, 18).")
    return arch, {}


LAYOUTS = [  # (the key that marks a backbone, below its prefix; layout; rules; what reads (arch, config) from it)
    (r"layer1\.0\.conv1\.weight", "torchvision", [], None),  # also timm's, torchgeo's, MoCo's and mmselfsup's ResNets
    (r"class_token", "torchvision", [], None), (r"features\.0\.0\.weight", "torchvision", [], None),
    (r"4\.0\.conv1\.weight", "ResNet nn.Sequential", _SEQUENTIAL, None),
    (r"cls_token", "timm ViT", _TIMM_VIT, _timm_vit),
    (r"layers\.0\.blocks\.0\.attn\.qkv\.weight", "Microsoft Swin", _MS_SWIN, _ms_swin)]


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
    """(state dict in torchvision's keys, layout, (arch, config) where the file says them, else None) of any file but
    our training checkpoint. A LAYOUTS key marks the backbone and its prefix: in a plain state dict '' or DDP's
    'module.'; in a checkpoint any path (state_dict.module.encoder_q., teacher.backbone., model.encoder.). All else
    (heads, key encoder, queue, optimizer, mask_token, Swin's attn_mask buffers) is dropped, named in one line."""
    tensors, nested = _tensors(obj), any(isinstance(v, dict) for v in obj.values())
    found = sorted({(m[1], i) for k in tensors for i, (mark, *_) in enumerate(LAYOUTS)
                    if (m := re.fullmatch(rf"((?:.*\.)?){mark}", k)) and (nested or m[1] in ("", "module."))},
                   key=lambda c: (_rank(c[0]), c))
    if not found:  # no layout we know: load_exactly names what does not fit
        return {k.removeprefix("module."): v for k, v in obj.get("state_dict", obj).items()}, "torchvision", None
    prefix, (_, layout, rules, finish) = found[0][0], LAYOUTS[found[0][1]]
    if len(found) > 1 and _rank(found[1][0]) == _rank(prefix):
        raise UserError(f"--weights {weights} holds several backbones ({', '.join(p for p, _ in found)}) and does "
                        "not say which to evaluate; save that one alone.")
    state, dropped = {}, {}
    for key, value in tensors.items():
        if not key.startswith(prefix):  # another network or entry: named where its path leaves the backbone's
            name = next((p for p, q in zip(key.split("."), prefix.split(".")) if p != q), key)
        else:
            new = key[len(prefix):]
            for pattern, replacement in rules:
                new = re.sub(pattern, replacement, new, count=1)
            name = new.split(".")[0] if new.split(".")[0] in HEADS else new.rsplit(".", 1)[-1]
            if name not in HEADS + ("mask_token", "attn_mask"):  # DINOv2's / SimMIM's mask token, Swin's masks
                state[new] = value
                continue
        dropped[name] = dropped.get(name, 0) + 1
    folded = any(re.search(r"\.ls[12]\.gamma$", k) for k in state)
    try:
        arch, config = finish(state, weights, prefix) if finish else (None, {})
    except KeyError as err:
        raise UserError(f"--weights {weights} ({layout} under '{prefix}') lacks {err}.") from None
    if "method" not in obj and os.environ.get("RANK", "0") == "0":  # ours need no report; one line per job
        print(f"--weights {weights}: {layout} layout under '{prefix}'" + (f", {arch}" if arch else "") +
              "".join(f" {k} {v}" for k, v in config.items()) + (", LayerScale folded" if folded else "") +
              ("; dropped " + ", ".join(f"{n} ({c} tensor{'s' * (c > 1)})" for n, c in dropped.items()) if dropped
               else ""))
    label = f"{layout} {re.sub(r'^((state_dict|model|module)[.])+', '', prefix)}".strip(" .")
    return state, label, (arch, config) if arch else None


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07, chunk=1024):
    """Weighted kNN (InstDisc, DINO): cosine similarity to every training feature; the k nearest vote for their
    class with weight exp(similarity / temperature). Returns the predicted class of every test feature."""
    train = F.normalize(train_features.float(), dim=1)
    labels = torch.as_tensor(train_labels, device=train.device)
    predictions = []
    for part in F.normalize(test_features.float(), dim=1).split(chunk):
        similarity, nearest = (part @ train.T).topk(min(k, len(train)), dim=1)
        votes = torch.zeros(len(part), num_classes, device=part.device)
        predictions.append(votes.scatter_add_(1, labels[nearest], (similarity / temperature).exp()).argmax(1))
    return torch.cat(predictions)


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; 0 for one run): the papers' mu +- sigma over runs."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def run_summary(accuracies, **extra):
    """One protocol's result on one dataset, as results.json keeps it: every run's top-1, their mean and std."""
    mean, std = mean_std(accuracies)
    return {"accuracies": accuracies, "mean": mean, "std": std, **extra}


def check_not_source(weights, method, dataset):
    """Paper 004 never uses one dataset as both source and target: a backbone fine-tuned on `dataset`
    (finetune_cls.py --save-backbone records '<method>+finetune:<dataset>') has seen images of its test split. The
    names are compared case-insensitively: give both scripts the same --dataset (default: the folder name)."""
    if re.search(rf"\+finetune:{re.escape(dataset)}(\+|$)", str(method), re.IGNORECASE):
        raise UserError(f"--weights {weights} was fine-tuned on {dataset} ({method}), so the test images of --data "
                        f"{dataset} include its training images; evaluate it on another dataset.")


def write_results(out, protocol, args, entries, datasets, title, extra=""):
    """results.json (every run) and results.md: GeRSP Table I's shape, a row per backbone and protocol (`protocol`,
    and 'knn' where eval_linear.py --knn stored a dataset's kNN result under "knn"), mean +- std per dataset, then
    `extra` (more markdown: the stage-wise table). entries: [{"weights", "method", "arch", <dataset>: {"mean", "std",
    ..., "knn": {"mean", "std", ...}}}]; the tables are printed too."""
    table = ["| weights | method | arch | protocol | " + " | ".join(f"{d} top-1" for d in datasets) + " |",
             "|---|---|---|---|" + "---|" * len(datasets)]
    for e in entries:
        for row in (protocol, "knn"):
            cells = [e.get(d) if row == protocol else e.get(d, {}).get("knn") for d in datasets]
            if any(cells):
                table.append(f"| {e['weights']} | {e['method']} | {e['arch']} | {row} | " + " | ".join(
                    f"{c['mean']:.2f} +- {c['std']:.2f}" if c else "" for c in cells) + " |")
    text = f"{title}\n\n" + "\n".join(table) + "\n" + (f"\n{extra}" if extra else "")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"protocol": protocol, "args": vars(args), "backbones": entries}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)


# ---------------------------------------------------------------- the pre-training scripts' kNN monitor (--knn-monitor)
class KnnMonitor:
    """At most `per_class` images of each class of a labeled folder (a fixed random choice), half of each class the
    kNN's memory and half its test, resized and cached once as uint8 tensors. top1() is the weighted kNN accuracy
    (knn_predict) of a backbone's features, in eval mode, without gradients and without a random draw: measuring
    never changes the training."""

    def __init__(self, root, size, seed=0, per_class=200):
        paths, labels, classes = labeled_images(root)
        labels, rng = np.asarray(labels), np.random.default_rng(seed)
        chosen = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                         for c in range(len(classes))]))
        resize, images, kept = T.Resize((size, size)), [], []
        for i in chosen:
            try:
                images.append(T.functional.pil_to_tensor(resize(open_rgb(paths[i]))))
                kept.append(i)
            except Exception:  # noqa: BLE001 - an unreadable file is left out
                continue
        self.images, self.labels, self.classes = torch.stack(images), torch.from_numpy(labels[kept]), len(classes)
        self.train, self.test = (torch.from_numpy(i) for i in stratified_split(labels[kept], 0.5, seed))
        self.description = f"{len(self.test)} test images of {len(classes)} classes"

    @torch.no_grad()
    def top1(self, backbone, device, amp_dtype=None, batch=256):
        was_training = backbone.training
        backbone.eval()  # BatchNorm reads its running statistics and leaves them as they are
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))
        features = []
        for chunk in self.images.split(batch):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                features.append(backbone((chunk.to(device).float() - mean) / std).float())
        backbone.train(was_training)
        features, labels = torch.cat(features), self.labels.to(device)
        predicted = knn_predict(features[self.train], labels[self.train], features[self.test], self.classes)
        return float((predicted == labels[self.test]).float().mean() * 100)


# ---------------------------------------------------------------- --vis pictures of the pre-training scripts
def save_image_grid(columns, captions, path, gap=2, min_tile=128):
    """A PNG of images in a grid, one row per image and one column per view, under a caption row naming each column.
    columns: one N x H x W x 3 uint8 array per column. Small tiles are enlarged to at least `min_tile` pixels."""
    n, h, w, _ = columns[0].shape
    zoom = max(1, math.ceil(min_tile / max(h, w)))
    h, w = h * zoom, w * zoom
    font = ImageFont.load_default(size=max(10, min(16, w // 10)))
    lines = [textwrap.wrap(text, max(6, w // (font.size * 3 // 5))) for text in captions]
    top = gap + (font.size + 3) * max(map(len, lines)) + gap
    grid = Image.new("RGB", (len(columns) * (w + gap) + gap, top + n * (h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (column, caption) in enumerate(zip(columns, lines)):
        x = gap + c * (w + gap)
        for i, line in enumerate(caption):
            draw.text((x + w // 2, gap + i * (font.size + 3)), line, fill="black", font=font, anchor="ma")
        for r, tile in enumerate(column):
            grid.paste(Image.fromarray(tile).resize((w, h), Image.NEAREST), (x, top + r * (h + gap)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
