"""What the pre-training scripts share (the evaluation scripts use it too): the flag parser, image discovery and
opening, what a run knows its data by (the file list, by content), the built-in "synthetic" textures (every script
runs without a download), the dataset (augmentations seeded by (seed, epoch, index)) and sampler, torchvision
backbones, weights_only loading, the kNN monitor, and the run pieces every script uses the same way, so that nothing
is lost by construction: the one process check, the one check of every path a run reads and writes (and run.json,
which says whose an --out is), the --out lock, the atomic writer, a resumed run's segments, the finiteness check and
the one signal policy."""

import argparse
import fcntl
import hashlib
import itertools
import json
import math
import os
import random
import signal
import socket
import sys
import time
import uuid
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_png, read_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC = "synthetic"
SYNTHETIC_IMAGES = 2048
SYNTHETIC_SIZE = 64
SYNTHETIC_CLASS_NAMES = ("stripes", "checkerboard", "dots", "blobs")


class UserError(Exception):
    """A problem with the user's input or files: the scripts print it as one sentence and exit with code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (a bad value, nan or inf for a float) are one line and exit code 2, like every bad input,
    and whose --help shows each default."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=_ShowDefaults, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help).\n")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        for action in (a for a in self._actions if a.type is float):  # float() accepts "nan"; no flag means it
            value = getattr(parsed, action.dest, None)
            if any(not math.isfinite(v) for v in (value if isinstance(value, list) else [value]) if v is not None):
                self.error(f"argument {'/'.join(action.option_strings)}: must be a finite number (got {value})")
        return parsed, extras


def seed_value(text):
    """The type of --seed: an int from 0 to 2**32 - 1, so that numpy and torch accept every seed derived from it."""
    seed = int(text)
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {2**32 - 1} (got {text})")
    return seed


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a default computed at run time is described in the flag's help
        return action.help if action.default is None else super()._get_help_string(action)


def check_out_dir(path, flag="--out"):
    """An output folder must be a folder or creatable: one sentence when it, or a folder above it, is a file. Whether it
    can be written is found by hold_out(), which writes its lock there before any work."""
    target = probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(
            f"{flag} {path} {'is a file' if probe == target else f'is below the file {probe}'}; give a folder."
        )


# ---------------------------------------------------------------- images
def _scan(root):
    """Every image file below `root`, via os.scandir (a million files take seconds). Each directory (st_dev, st_ino)
    is read once, real folders before links: a link loop (a mirror's `up -> ..`) or a second link adds nothing.
    Hidden files and folders (macOS's ._ twins, .DS_Store) and __MACOSX/ are no images of the dataset."""
    found = []
    stack = [root]  # real folders still to read
    links = []  # linked folders, read after every real one
    seen = set()
    while stack or links:
        if not stack:  # every real folder is read; now the links, in name order so every machine lists the same paths
            links.sort(reverse=True)
        info = os.stat(folder := (stack or links).pop())
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name == "__MACOSX":
                    continue
                if entry.is_dir(follow_symlinks=True):
                    (links if entry.is_symlink() else stack).append(entry.path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(entry.path)
    return found


def list_images(roots, flag="--data"):
    """(sorted image paths under each root, their identity: file_list_id); "synthetic" stands for the built-in
    generated dataset. The same files given twice (one folder inside another, or two names of one) are refused."""
    groups = []  # (root, its paths)
    for root in roots:
        if root == SYNTHETIC:
            found = [f"{SYNTHETIC}://{i}" for i in range(SYNTHETIC_IMAGES)]
        elif not os.path.isdir(root):
            raise UserError(f"{flag} {root} is not a folder (give a folder of images, or 'synthetic').")
        elif not (found := sorted(_scan(root))):
            raise UserError(f"{flag} {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        groups.append((root, found))
    if len(groups) == 1:  # one folder: its identity is the dataset's, each file stat'ed once
        return groups[0][1], file_list_id(groups)
    check_given_once(roots, [file_list_id([group]) for group in groups], flag)
    return [path for _, found in groups for path in found], file_list_id(groups)


def check_given_once(roots, identities, flag="--data"):
    """One sentence when two of `roots` hold the same files: equal file lists (a copy, a path typed with its slash, a
    wrapper folder), or one folder inside the other."""
    for (i, root), (j, other) in itertools.combinations(enumerate(roots), 2):
        real = [os.path.realpath(r) for r in (root, other)]
        nested = SYNTHETIC not in (root, other) and (_within(*real) or _within(*real[::-1]))
        if identities[i] == identities[j] or nested:
            raise UserError(f"{flag} {root} and {flag} {other} hold the same files; give each dataset once.")


def file_list_id(groups):
    """What a run knows a dataset by, whatever path names it: the number of files and a sha256 of every file's path
    relative to its root and its size, root after root (a folder typed with a trailing slash, moved or reached
    through a link is the same dataset; an image added, removed or renamed makes another)."""
    digest = hashlib.sha256()
    count = 0
    for root, paths in groups:
        for path in paths:
            relative = path if path.startswith(SYNTHETIC) else os.path.relpath(path, root)
            try:
                size = 0 if path.startswith(SYNTHETIC) else os.stat(path).st_size
            except OSError:  # a dangling link: listed, never readable
                size = -1
            digest.update(f"{relative}\0{size}\n".encode())
            count += 1
    return {"files": count, "sha256": digest.hexdigest()}


def labeled_images(root, flag="--data"):
    """(paths, labels, class_names, identity) of a class-per-folder dataset, below single wrapper folders (EuroSAT's
    2750/): the identity (file_list_id) is taken relative to the folder of the classes, so `ds` and `ds/2750` are the
    same dataset. macOS's __MACOSX/ is never a class; a class folder holding image folders is refused."""
    if root == SYNTHETIC:  # the class of synthetic image i is i mod 4
        paths, identity = list_images([SYNTHETIC])
        return paths, [i % 4 for i in range(SYNTHETIC_IMAGES)], list(SYNTHETIC_CLASS_NAMES), identity
    if not os.path.isdir(root):
        raise UserError(f"{flag} {root} is not a folder (give a folder with one sub-folder per class).")
    while True:
        entries = list(os.scandir(root))
        subdirs = sorted(e.name for e in entries if e.is_dir() and e.name[0] != "." and e.name != "__MACOSX")
        if len(subdirs) != 1 or any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries):
            break
        root = os.path.join(root, subdirs[0])
    if len(subdirs) < 2:
        raise UserError(
            f"{root} has {len(subdirs)} class folder(s); a labeled dataset needs one folder per class "
            "and at least two classes."
        )
    paths, labels = [], []
    for label, name in enumerate(subdirs):
        if not (files := sorted(_scan(folder := os.path.join(root, name)))):
            raise UserError(f"class folder {folder} holds no images; remove it or add images.")
        if nested := next((os.path.dirname(f) for f in files if os.path.dirname(f) != folder), None):
            raise UserError(
                f"class folder {folder} holds image folders (e.g. {os.path.relpath(nested, root)}), so "
                f"{root} is not one folder per class (found {len(subdirs)}: {', '.join(subdirs[:8])}"
                f"{', ...' * (len(subdirs) > 8)}); give --data the folder whose sub-folders are the "
                "classes."
            )
        paths += files
        labels += [label] * len(files)
    return paths, labels, subdirs, file_list_id([(root, paths)])


def synthetic_image(index, size=SYNTHETIC_SIZE):
    """A grey texture whose class (index mod 4) is its pattern: stripes, checkerboard, dots or blobs. Grey levels,
    polarity, contrast, orientation, scale, phase and noise are random, so random features (brightness, contrast)
    separate the classes poorly and crop- and jitter-invariant ones, what pre-training learns, separate them well."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle, freq, phase = rng.uniform(0, math.pi), rng.uniform(3, 7), rng.uniform(0, 2 * math.pi, 2)
    u = 2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase[0]
    v = 2 * math.pi * freq * (yy * math.cos(angle) - xx * math.sin(angle)) + phase[1]
    if index % 4 < 3:
        pattern = (np.sin(u) > 0, np.sin(u) * np.sin(v) > 0, np.cos(u) + np.cos(v) > 1.0)[index % 4]
    else:  # a smooth random field, thresholded: blobs without a period
        cells = rng.integers(3, 7)
        field = np.asarray(
            Image.fromarray(rng.normal(0, 1, (cells, cells)).astype(np.float32)).resize((size, size), Image.BICUBIC)
        )
        pattern = field > np.median(field)
    low, high = rng.permutation([rng.uniform(0, 0.45), rng.uniform(0.55, 1)])  # random polarity and contrast
    grey = low + (high - low) * pattern + rng.normal(0, rng.uniform(0.02, 0.12), (size, size))
    rgb = grey[..., None] * rng.uniform(0.85, 1.0, 3)  # a faint random tint, not tied to the class
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def open_rgb(path):
    """Open any image as 8-bit RGB: grayscale, palette, RGBA and CMYK files are converted; 16-bit and float files are
    read at their full depth and stretched from their minimum to their maximum (a 16-bit RGB PNG through torchvision,
    whose decoder keeps the 16 bits that Pillow cuts to the high byte). A 16-bit colour file of another format is
    refused, never read black. Non-finite pixels (a GeoTIFF's NaN no-data) are filled: img.info["no_data"] counts
    them."""
    if path.startswith(SYNTHETIC):
        return synthetic_image(int(path.rsplit("/", 1)[1]))
    with Image.open(path) as img:
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # one band, 16-bit or float
            return _stretched(np.asarray(img, dtype=np.float32))
        if any(";16" in str(tile[3]) for tile in img.tile):  # several bands of 16 bits, which Pillow cuts to 8
            if img.format != "PNG":
                raise UserError(
                    f"{path} is a 16-bit {img.mode} {img.format}, which Pillow reads as its high bytes only (black "
                    "for values below 256); convert it to a 16-bit PNG or to 8 bits."
                )
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (in favour of TorchCodec)
                warnings.simplefilter("ignore", DeprecationWarning)
                bands = decode_png(read_file(path), ImageReadMode.UNCHANGED)  # C x H x W, uint16
            return _stretched(bands[: 3 if len(bands) >= 3 else 1].permute(1, 2, 0).squeeze(-1).float().numpy())
        return img.convert("RGB")


def _stretched(pixels):
    """float32 pixels (H x W, or H x W x 3) -> 8-bit RGB, stretched from their finite minimum to their finite maximum.
    Non-finite pixels are no-data: left out of the stretch, filled with the minimum, counted in info["no_data"]; a file
    with no finite pixel is unreadable (ValueError)."""
    finite = np.isfinite(pixels)
    if not finite.any():
        raise ValueError("no finite pixel: the whole image is no-data")
    low, high = float(pixels[finite].min()), float(pixels[finite].max())
    pixels = np.where(finite, pixels, low)
    img = Image.fromarray(((pixels - low) / max(high - low, 1e-6) * 255).astype(np.uint8)).convert("RGB")
    img.info["no_data"] = int((~finite).reshape(*pixels.shape[:2], -1).any(-1).sum())  # pixels, not values
    return img


def check_readable(paths, samples=32, seed=0, flag="--data"):
    """Open a random sample of the files at start-up: a dataset whose files mostly fail is an error, not a slow run."""
    picked = random.Random(seed).sample(paths, min(samples, len(paths)))
    failed = []
    for path in picked:
        try:
            open_rgb(path)
        except UserError:  # a file this project refuses to read (a 16-bit colour TIFF): its own sentence
            raise
        except Exception as err:  # noqa: BLE001 - any decoder error means "unreadable"
            failed.append(f"{path} ({type(err).__name__})")
    if len(failed) > len(picked) // 2:
        raise UserError(
            f"{len(failed)} of {len(picked)} sampled images could not be read, e.g. {failed[0]}; "
            f"check that {flag} points at image files."
        )


def stratified_split(labels, train_ratio, seed, classes, fix="add images or change --train-ratio"):
    """Per class, a random `train_ratio` of the images for training and the rest for testing (fixed by `seed`). A
    class left without either is one sentence naming its folder and ending in `fix`."""
    if not 0 < train_ratio < 1:
        raise UserError(f"--train-ratio must be between 0 and 1 (got {train_ratio}).")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(train_ratio * len(idx)))
        if n_train < 1 or n_train >= len(idx):
            raise UserError(
                f"class {classes[c]} has {len(idx)} readable image(s): a train ratio of {train_ratio} leaves it "
                f"without {'training' if n_train < 1 else 'test'} images; {fix}."
            )
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---------------------------------------------------------------- dataset and sampler
class ImageDataset(Dataset):
    """(transform(image), label or -1, files skipped) of image `index`. An unreadable file is replaced by the next
    readable one and counted. The augmentation is seeded by (seed, epoch, index) alone, so a resumed run sees what an
    uninterrupted one would: the loop calls set_epoch() before each epoch (the loader's workers start afresh every
    epoch, so they see it)."""

    def __init__(self, paths, labels=None, transform=None, seed=0):
        self.paths = paths
        self.labels = [-1] * len(paths) if labels is None else labels
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.reported = 0

    def __len__(self):
        return len(self.paths)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        return self.load(index, self.epoch)

    def load(self, index, epoch):
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
        if img.info.get("no_data") and self.reported < 5:  # a silent fill would hide a masked scene
            self.reported += 1
            print(f"warning: {path} has {img.info['no_data']} non-finite (no-data) pixel(s), filled", flush=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**64)  # torch takes < 2**64
            x = self.transform(img) if self.transform else img
        return x, self.labels[(index + offset) % len(self.paths)], skipped


class EpochSampler(Sampler):
    """A permutation per epoch fixed by (seed, epoch), cut into global batches (the last incomplete one dropped), each
    process taking its slice of every batch; set_epoch(e, start_batch) resumes mid-epoch on the same batches."""

    def __init__(self, size, global_batch, rank=0, world_size=1, seed=0):
        self.size = size
        self.global_batch = global_batch
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def batches_per_epoch(self):
        return self.size // self.global_batch

    def set_epoch(self, epoch, start_batch=0):
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        local = self.global_batch // self.world
        for b in range(self.start_batch, self.batches_per_epoch()):
            batch = order[b * self.global_batch : (b + 1) * self.global_batch]
            for i in batch[self.rank * local : (self.rank + 1) * local].tolist():
                yield i

    def __len__(self):
        return (self.batches_per_epoch() - self.start_batch) * (self.global_batch // self.world)


# ---------------------------------------------------------------- backbones, weights files, the kNN monitor
VIT_SIZES = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # width, heads; 12 blocks


def build_model(arch, image_size=224, patch_size=16, heads=None):
    """A torchvision classification model; vit_tiny / vit_small / vit_base are VisionTransformer(12 blocks, mlp 4x),
    with width / 64 heads (DINO's and DeiT's) unless `heads` says otherwise (MoCo v3's vit_small has 12)."""
    if arch in VIT_SIZES:
        width, default_heads = VIT_SIZES[arch]
        return torchvision.models.VisionTransformer(
            image_size, patch_size, 12, heads or default_heads, width, 4 * width
        )
    if arch not in torchvision.models.list_models(torchvision.models):
        raise UserError(f"unknown --arch {arch}; use a torchvision model name such as resnet50, swin_t or vit_small.")
    return torchvision.models.get_model(arch, **({"image_size": image_size} if arch.startswith("vit") else {}))


def load_weights_only(path, fix="give a backbone.pth, a checkpoint.pth or a torchvision state dict"):
    """torch.load(weights_only=True): tensors and plain values load, a file that would run code does not; a refusal is
    one sentence ending in `fix`, or in fix(error) when the advice depends on why (a TorchScript archive, ...)."""
    try:  # torch's warnings (a foreign pickle protocol, a TorchScript archive) would precede the sentence
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):  # DINO's saved args
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling error means "not a weights file"
        raise UserError(
            f"{path} is not a weights or checkpoint file that loads with weights_only=True "
            f"({type(err).__name__}); {fix(err) if callable(fix) else fix}."
        ) from None


# ---------------------------------------------------------------- what every script's run does the same way
PROCESS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets in each process it starts


def process_env():
    """The one process check of every script: (rank, world size, local rank) from torchrun's RANK, WORLD_SIZE and
    LOCAL_RANK, all three set, or (0, 1, 0) with none set (one process started by python). Anything else is one
    sentence before any write: a RANK left over in a shell would have a lone process wait forever for its group."""
    given = {name: os.environ.get(name) for name in PROCESS_ENV}
    unset = [name for name, value in given.items() if value is None]
    if len(unset) == len(PROCESS_ENV):
        return 0, 1, 0
    shown = ", ".join(f"{name}={value}" for name, value in given.items() if value is not None)
    if unset:
        raise UserError(
            f"{shown} is set but {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not: torchrun sets all "
            "three; start one process with none "
            "of them set, or several with torchrun."
        )
    try:
        rank, world, local_rank = (int(given[name]) for name in PROCESS_ENV)
    except ValueError:
        raise UserError(f"{shown}: RANK, WORLD_SIZE and LOCAL_RANK must be integers, as torchrun sets them.") from None
    if not 0 <= rank < world or not 0 <= local_rank < world:
        raise UserError(f"{shown} names no process of a group of {world}: RANK and LOCAL_RANK count from 0.")
    return rank, world, local_rank


def reports_errors():
    """Whether this process prints a refusal: rank 0 of torchrun's processes, and any process with a bad environment."""
    try:
        return process_env()[0] == 0
    except UserError:
        return True


RUN_RECORD = "run.json"  # in every --out: the script and the run that own it, and the files it wrote outside it
NO_PATH = (SYNTHETIC, "random", "imagenet")  # values of --data / --weights that name no file (also imagenet:V2 ...)


def _given(args, flag):
    """The paths a flag names (a repeatable flag: every one), without the built-in names."""
    values = getattr(args, flag, None)
    values = values if isinstance(values, list) else [values]
    return [v for v in values if v is not None and v not in NO_PATH and not v.startswith("imagenet:")]


def _within(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_paths(script, args, reads, writes, run_files):
    """The one check of every path a run reads (the flags `reads`) and writes (`writes`: --out and files such as
    --vis), before any work. Every sentence names the flag the path came from.
    - An input exists: a folder, or a file for --weights.
    - No output is, or lies inside, an input; an input is none of the `run_files` the run writes in --out.
    - --out is new, empty, or this script's run folder (its run.json), never another's. A folder of an earlier version,
      without run.json, is taken as this script's when it holds only `run_files`, the first of them included.
    - An existing output file is replaced only when the run of --out wrote it (run.json holds its sha256)."""
    dashed = {flag: "--" + flag.replace("_", "-") for flag in (*reads, *writes)}
    inputs = [(flag, path, os.path.realpath(path)) for flag in reads for path in _given(args, flag)]
    for flag, path, _ in inputs:
        kind = "file" if flag == "weights" else "folder"
        if not (os.path.isfile(path) if kind == "file" else os.path.isdir(path)):
            raise UserError(f"{dashed[flag]} {path} is not a {kind}{' (nor random / imagenet)' * (kind == 'file')}.")
    files = [(flag, path) for flag in writes if flag != "out" for path in _given(args, flag)]
    outputs = [("out", args.out)] + [("out", os.path.join(args.out, name)) for name in run_files] + files
    for (out_flag, output), (in_flag, path, real) in itertools.product(outputs, inputs):
        if output != args.out and out_flag == "out" and os.path.realpath(output) == real:
            name = os.path.basename(output)
            raise UserError(f"{dashed[in_flag]} {path} is the {name} this run writes in --out; give another --out.")
        if _within(os.path.realpath(output), real):
            where = "is" if os.path.realpath(output) == real else "lies inside"
            raise UserError(
                f"{dashed[out_flag]} {output} {where} {dashed[in_flag]} {path}, which the run reads: its output would "
                f"replace or join its input; give {dashed[out_flag]} a path outside it."
            )
    for flag, path in files:
        if os.path.realpath(path) in {os.path.realpath(os.path.join(args.out, name)) for name in run_files}:
            raise UserError(f"{dashed[flag]} {path} is a file this run writes in --out; give another file.")
        if os.path.isdir(path):
            raise UserError(f"{dashed[flag]} {path} is a folder; give a file name.")
        check_out_dir(os.path.dirname(os.path.abspath(path)), f"{dashed[flag]}'s folder")
    check_out_dir(args.out)
    record = run_record(args.out)
    if record is not None and record.get("script") != script:
        raise UserError(
            f"--out {args.out} is the run folder of {record.get('script')} ({RUN_RECORD}); give {script} a folder "
            "of its own."
        )
    making = {".lock", f"{RUN_RECORD}.tmp"}  # what rank 0's hold_out() may be writing while another rank looks
    entries = sorted(set(os.listdir(args.out)) - making) if os.path.isdir(args.out) else []
    earlier = {name.removesuffix(".tmp") for name in entries}  # an earlier version's folder: its files, and leftovers
    if record is None and entries and not (earlier <= set(run_files) and run_files[0] in entries):
        raise UserError(
            f"--out {args.out} holds {', '.join(entries[:3])}{', ...' * (len(entries) > 3)} and no {RUN_RECORD}, so it "
            f"is no run folder of {script}; give a new or empty folder."
        )
    written = (record or {}).get("outputs", {})
    for flag, path in files:
        if os.path.exists(path) and written.get(os.path.realpath(path)) != sha256(path):
            raise UserError(
                f"{dashed[flag]} {path} exists and the run of --out {args.out} did not write it; move it away or give "
                "another file."
            )


def run_record(out):
    """--out's run.json (the script and the run that own it, the files it wrote outside it), or None."""
    path = os.path.join(out, RUN_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        assert isinstance(record, dict)
    except (OSError, ValueError, AssertionError):
        raise UserError(f"{path} is not a run record of this project; give another --out.") from None
    return record


def record_output(out, path):
    """run.json notes a file the run wrote outside --out (--vis, --save-backbone) by its sha256: a later run of the same
    folder may replace it, no other may."""
    record = run_record(out)
    record.setdefault("outputs", {})[os.path.realpath(path)] = sha256(path)
    save_atomic(json.dumps(record, indent=1), os.path.join(out, RUN_RECORD))


def sha256(path):
    """The sha256 of a file's bytes: what identifies a --weights file, and an output file the run wrote."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


QUIET_FLAGS = ("data", "out", "workers", "log_every", "max_steps", "knn_monitor", "knn_every")  # change no weight


def run_segments(checkpoint, args, rank):
    """What a pre-training run's args.json records: each segment of the run, its flags' values and the step where it
    began. A resume with other values (of the flags its checkpoint lets change: lr, epochs, ...) starts a segment, and
    rank 0 prints a note naming each that changes the training (not the QUIET_FLAGS)."""
    now = vars(args)
    if not checkpoint:
        return [{"step": 0, "args": now}]
    segments = checkpoint.get("segments", [{"step": 0, "args": checkpoint["args"]}])  # older checkpoints: one
    then = segments[-1]["args"]
    changed = [k for k, v in now.items() if v != then.get(k)]
    noted = [f"--{k.replace('_', '-')} {now[k]} (was {then.get(k)})" for k in changed if k not in QUIET_FLAGS]
    if rank == 0 and noted:
        print(f"note: resuming at step {checkpoint['step']} with {', '.join(noted)}; args.json keeps each segment")
    return segments + [{"step": checkpoint["step"], "args": now}] if changed else segments


_held = {}  # the --out lock files this process holds (hold_out), by folder; closed by release_out()


def hold_out(out, script):
    """One run per --out: an exclusive lock on out/.lock, which the kernel releases when the process ends, however it
    ends; a note says so when the previous holder died without releasing it. A new folder gets its run.json, naming
    `script` and this run. A folder that cannot be written, or one that a live run holds, is one sentence: the last
    check before any work. Held already by this process: nothing to do (evaluate() or train() called twice in one
    Python session)."""
    if os.path.realpath(out) in _held:
        return
    lock = None
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.seek(0)
        previous = lock.read().strip()
        lock.truncate(0)
        os.write(lock.fileno(), f"process {os.getpid()} on {socket.gethostname()}".encode())  # unbuffered: fails here
    except BlockingIOError:  # a live run holds the lock
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"--out {out} is in use by {holder}; wait for that run to end, or use another --out.") from None
    except OSError as err:  # read-only, not ours, or a full disk
        if lock is not None:
            lock.close()
        raise UserError(
            f"--out {out} cannot be written ({err.strerror}); give a folder this user can write, with free space."
        ) from None
    _held[os.path.realpath(out)] = lock
    if run_record(out) is None:  # this run owns the folder from now on
        record = {"script": script, "run": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        save_atomic(json.dumps(record | {"outputs": {}}, indent=1), os.path.join(out, RUN_RECORD))
    if previous:  # a killed run leaves its name: say that this run is taking its place
        print(f"note: --out {out} was held by {previous}, which ended without releasing it; this run takes it over")


def release_out():
    """Every --out this process holds is released (its .lock emptied, so the next run knows it ended cleanly)."""
    for lock in _held.values():
        lock.truncate(0)
        lock.close()
    _held.clear()


def save_atomic(obj, path):
    """torch.save (a str: its text) to a temp file, fsync, rename: a kill at any moment leaves the old file or the new
    one, never half. A failed write (a full disk) removes the partial file and is one sentence: the file at `path` is
    left as it was. An interruption (a second stop signal) removes it too, and stays an interruption."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(f"{path}.tmp", "wb") as f:
            if isinstance(obj, str):  # args.json, results.json, results.md, run.json
                f.write(obj.encode())
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        if os.path.lexists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")
        if isinstance(err.__context__, Interrupted):  # torch.save's writer reports the interrupted write as its own
            raise err.__context__ from None
        if not isinstance(err, (OSError, RuntimeError)):
            raise
        why = err.strerror if isinstance(err, OSError) else "the write failed; is the disk full?"
        kept = f"{path} is left as it was" if os.path.exists(path) else f"no {os.path.basename(path)} was written yet"
        raise UserError(f"writing {path} failed ({why}): the partial file is removed and {kept}.") from None
    os.replace(f"{path}.tmp", path)
    os.fsync(folder := os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY))  # the rename survives a crash
    os.close(folder)


def append_record(path, record):
    """One JSON line appended to log.jsonl. A failed write (a full disk) is one sentence; the lines before are kept."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise UserError(f"writing {path} failed ({err.strerror}); the lines written before are kept.") from None


def first_non_finite(state_dict):
    """The name of the first floating-point tensor holding a NaN or inf on any process, else None: one pass over the
    weights, one host sync, the same answer on every process."""
    weights = {k: v for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()}
    finite = torch.stack([v.isfinite().all() for v in weights.values()]).float()
    if dist.is_initialized():
        dist.all_reduce(finite, dist.ReduceOp.MIN)
    return next((name for name, ok in zip(weights, finite.tolist()) if not ok), None)


# ---------------------------------------------------------------- the one signal policy of every script
class Interrupted(BaseException):
    """A stop signal that stops at once: one before the run has anything to save, or a second one. A BaseException,
    so that no `except Exception` (an unreadable image, a failed write) takes it for something else."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_stop = {"received": [], "at": 0.0, "wait": False}  # the stop signals received; when the last came; wait: see below


def _on_stop_signal(signum, frame):
    received = _stop["received"]
    again = received[-1:] == [signum] and time.monotonic() - _stop["at"] < 1
    if again and "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun forwards to its workers what the terminal sent them
        return
    received.append(signum)
    _stop["at"] = time.monotonic()
    if not _stop["wait"] or len(received) > 1:
        raise Interrupted(signum)


def handle_stop_signals():
    """The first line of every script's main(): from here SIGTERM (a scheduler's notice) and Ctrl-C raise Interrupted
    at once, until stop_at_safe_points(). Returns the handlers it replaced, for main() to restore."""
    _stop.update(received=[], at=0.0, wait=False)
    return {s: signal.signal(s, _on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}


def restore_stop_signals(handlers):
    """The handlers handle_stop_signals() replaced, back (main()'s last act: a test or a notebook goes on)."""
    for s, handler in handlers.items():
        signal.signal(s, handler)


def stop_at_safe_points():
    """From here the run has something to save: a first stop signal is only recorded, in the returned list, for the
    loop to stop at a point it chooses and save; a second raises Interrupted at once (the files written are whole).
    (A signal before this raised Interrupted: the list starts empty.)"""
    handle_stop_signals()  # also when train() or evaluate() is called without main()
    _stop["wait"] = True
    return _stop["received"]


def stop_exit_code(stopped):
    """128 + the number of the first stop signal this process received (or of SIGTERM, when `stopped` because another
    process received one), as a shell reports a process that a signal ended; 0 when none came."""
    received = _stop["received"]
    signum = received[0] if received else signal.SIGTERM if stopped else 0
    return 128 + signum if signum else 0


def report_stop(script, code, checkpoint=None):
    """The line before a stopped run exits with `code` (128 + the signal's number): how the same command goes on."""
    if reports_errors():
        resume = f"resumes from {checkpoint}" if checkpoint and os.path.exists(checkpoint) else "starts it again"
        print(f"{script}: stopped by {signal.Signals(code - 128).name}; the same command {resume}.", file=sys.stderr)


def ignore_stop_signals(worker_id=None):
    """A loader worker's init: SIGTERM / Ctrl-C sent to the whole process group (a scheduler, a terminal) reach the
    main process, which finishes its step and saves, while its workers keep serving it."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07, chunk=1024):
    """Weighted kNN (InstDisc, DINO): the k training features of highest cosine similarity vote for their class with
    weight exp(similarity / temperature), computed as exp((similarity - the nearest's) / temperature): the same vote
    scaled by a constant, which never overflows float32 (at temperature 0.001, exp(1000) would). Returns the predicted
    class of every test feature."""
    train = F.normalize(train_features.float(), dim=1)
    labels = torch.as_tensor(train_labels, device=train.device)
    predictions = []
    for part in F.normalize(test_features.float(), dim=1).split(chunk):
        similarity, nearest = (part @ train.T).topk(min(k, len(train)), dim=1)
        votes = torch.zeros(len(part), num_classes, device=part.device)
        weights = ((similarity - similarity[:, :1]) / temperature).exp()  # topk sorts: column 0 is the nearest
        predictions.append(votes.scatter_add_(1, labels[nearest], weights).argmax(1))
    return torch.cat(predictions)


class KnnMonitor:
    """--knn-monitor: at most `per_class` images of each class of a labeled folder (a fixed random choice, split in
    halves per class: the kNN's memory and its test), cached as uint8. top1() is the weighted kNN accuracy of a
    backbone's features, in eval mode, without gradients and without a random draw: measuring never changes the
    training."""

    def __init__(self, root, size, seed=0, per_class=200):
        paths, labels, classes, _ = labeled_images(root, "--knn-monitor")
        labels = np.asarray(labels)
        rng = np.random.default_rng(seed)
        chosen = np.sort(
            np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(classes))])
        )
        resize = T.Resize((size, size))
        images = []
        kept = []
        for i in chosen:
            try:
                images.append(T.functional.pil_to_tensor(resize(open_rgb(paths[i]))))
                kept.append(i)
            except Exception:  # noqa: BLE001 - an unreadable file is left out
                continue
        fix = f"the kNN monitor of --knn-monitor {root} needs 2 of each class, one to remember and one to test"
        train, test = stratified_split(labels[kept], 0.5, seed, classes, fix)
        self.images = torch.stack(images)
        self.labels = torch.from_numpy(labels[kept])
        self.classes = len(classes)
        self.train = torch.from_numpy(train)
        self.test = torch.from_numpy(test)
        self.description = f"{len(test)} test images of {len(classes)} classes"

    @torch.no_grad()
    def top1(self, backbone, device, amp_dtype=None, batch=256):
        was_training = backbone.training
        features = []
        backbone.eval()  # BatchNorm reads its running statistics and leaves them as they are
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))
        for chunk in self.images.split(batch):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                features.append(backbone((chunk.to(device).float() - mean) / std).float())
        backbone.train(was_training)
        features = torch.cat(features)
        labels = self.labels.to(device)
        predicted = knn_predict(features[self.train], labels[self.train], features[self.test], self.classes)
        return float((predicted == labels[self.test]).float().mean() * 100)
