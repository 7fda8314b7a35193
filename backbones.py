"""Backbones for both evaluation programs: any --weights file loaded into a torchvision model exactly.

eval_linear.py and finetune_cls.py import load_backbone() from here. It lived at the end of eval_linear.py; the
published checkpoints' layouts are growing (issue 37: the remote-sensing papers' baselines) and would bury the
protocol a reader of eval_linear.py should meet first (datasets, features, probe, table).

The file reads: load_backbone() and what it calls, then the published layouts: per layout a table of key renaming
rules (LAYOUTS) and the functions that read sizes from the tensors.
"""

import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
from collections import namedtuple

import torch
import torch.nn as nn
import torchvision
from torchvision.models.vision_transformer import interpolate_embeddings

import data
from data import UserError

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
