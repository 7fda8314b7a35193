"""Backbones for both evaluation programs: any --weights file loaded into a torchvision model exactly.

eval_linear.py and finetune_cls.py import load_backbone() from here. It lived at the end of eval_linear.py until the
published checkpoints of the remote-sensing papers' comparison tables (ViTs of any size, MAE's decoders and pooling,
Swin of any window, Swin V2, mmcls Swin, what torchvision cannot express) tripled it: a reader of eval_linear.py
meets the protocol (datasets, features, probe, table) and only one call into this module.

The file reads: load_backbone() and what it calls (the model a file describes: build_model / model_config, the
feature it is probed on, load_exactly), then the published layouts: per layout a table of key renaming rules
(LAYOUTS), what torchvision cannot express (UNSUPPORTED), and the few finishing functions that read sizes from the
tensors. docs/weights.md lists every published file with the line it prints.
"""

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
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
from torchvision.models.vision_transformer import interpolate_embeddings

import data
from data import UserError

HEADS = ("fc", "heads", "head")  # the classifier of torchvision's ResNet, ViT and Swin
# width, depth, heads: DeiT's tiny / small, ViT's base / large / huge (timm, MAE, DINOv2; ViT-H has 16, not width / 64)
VITS = {arch: (width, 12, heads) for arch, (width, heads) in data.VIT_SIZES.items()}
VITS |= {"vit_large": (1024, 24, 16), "vit_huge": (1280, 32, 16)}
# width, depths, heads, stochastic depth: torchvision's swin_t / s / b (and swin_v2_*, whose window is 8, not 7)
SWINS = {
    "swin_t": (96, [2, 2, 6, 2], [3, 6, 12, 24], 0.2),
    "swin_s": (96, [2, 2, 18, 2], [3, 6, 12, 24], 0.3),
    "swin_b": (128, [2, 2, 18, 2], [4, 8, 16, 32], 0.5),
}


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
    file's own arch, shape, ViT patch size and heads win over the arguments; a ViT's heads the file does not say are
    its size's (width / 64 but ViT-H's 16) or --heads, and the line that reports a published layout says which, and
    the feature the probe reads."""
    state = None  # the weights in torchvision's keys, or None: random
    method = weights
    config = {}  # what build_model needs besides the arch: our files' and the layouts' ViT shape, patch, heads, ...
    unrecognised = None  # why no backbone was found in a file
    report = []  # the clauses of the line that says what a published file was read as and what it dropped
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
        identity = data.sha256(weights)
        trained_on = obj.get("trained_on", [])  # finetune_cls.py's datasets, by their file lists
        ours = "method" in obj  # a backbone.pth or checkpoint.pth of this project: its "config" is ours
        arch = obj.get("arch", arch)
        config = obj.get("config", {}) if ours else {}
        if "backbone_prefix" in obj:  # a training checkpoint of this project
            n = len(obj["backbone_prefix"])
            state = {k[n:]: v for k, v in obj["model"].items() if k.startswith(obj["backbone_prefix"])}
            method = obj.get("method", "torchvision")
        else:  # our backbone.pth, a plain state dict or a published layout (MoCo, DINO, Swin ...): torchvision's keys
            state, layout, found, report = published_backbone(obj, weights, identity)
            if found:  # the file's arch and shape; our own config (heads) wins
                arch, config = found[0], found[1] | config
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
    model = build_model(arch, image_size, {"patch_size": patch_size, "heads": heads} | config)
    if report and os.environ.get("RANK", "0") == "0":  # one line per job
        read_as, dropped = report
        read_as += _assumed_heads(model, config, heads)
        print("; ".join(part for part in (read_as, dropped, f"probed on {probed_feature(model)}") if part))
    if imagenet:
        state, method, identity = imagenet_state(weights, arch)
    width = strip_head(model)
    if state is not None:
        if config.get("positions") == "sin-cos":  # Scale-MAE: the positions its forward computes for this grid
            state["encoder.pos_embedding"] = sincos_positions(model.hidden_dim, image_size // model.patch_size)
        load_exactly(model, state, weights, arch, image_size, unrecognised)
    return Backbone(model, width, arch, method, identity, trained_on)


def weights_fix(path):
    """data.load_weights_only's advice for a --weights file it refuses, by torch's error: a TorchScript archive is
    exported to a state dict, a pickle naming a global that could run code is stripped to its tensors under string
    keys (old Lightning keys its callbacks by their class), both only for a file the user trusts: loading them runs
    its code; anything else is not a weights file."""
    out = f"{path}.state_dict.pth"
    quoted = json.dumps  # Python strings in double quotes: the shell needs single ones
    export = f'import torch; torch.save(torch.jit.load({quoted(path)}, map_location="cpu").state_dict(), {quoted(out)})'
    strip = (
        "import torch; keep = lambda o: {k: keep(v) if isinstance(v, dict) else v for k, v in o.items() if "
        "isinstance(k, str) and (isinstance(v, dict) or torch.is_tensor(v))}; "
        f'c = torch.load({quoted(path)}, map_location="cpu", weights_only=False); '
        f"torch.save(keep(c if isinstance(c, dict) else c.state_dict()), {quoted(out)})"
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
    if arch in VITS or arch == "vit":
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
    return data.load_weights_only(path), f"torchvision {tag}", data.sha256(path)


# ------------------------------------------------------------------------- the model a file describes, and its feature
class MeanPooledViT(torchvision.models.VisionTransformer):
    """torchvision's ViT probed as MAE's models_vit.py global_pool: the mean of the patch tokens through fc_norm (the
    final norm is deleted there, so encoder.ln is Identity here)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder.ln = nn.Identity()
        self.fc_norm = nn.LayerNorm(self.hidden_dim, eps=1e-6)  # MAE's norm_layer: LayerNorm(eps=1e-6)

    def forward(self, x):
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1)
        x = self.encoder(x)
        return self.heads(self.fc_norm(x[:, 1:].mean(dim=1)))


def build_model(arch, image_size=224, config=None):
    """The torchvision model of `arch` shaped as `config` says (a file's or the flags'): a ViT's depth, width, MLP
    width, patch, heads and pooling ('mean': MeanPooledViT); a Swin's window and whether it keeps its final norm.
    Anything else is data.build_model's, as every script builds it."""
    config = config or {}
    if arch in VITS or arch == "vit":
        if arch not in VITS and "width" not in config:
            raise UserError("--arch vit has no size: give vit_tiny / vit_small / vit_base / vit_large / vit_huge.")
        width, depth, heads = VITS.get(arch) or (config["width"], config["depth"], None)
        width = config.get("width", width)
        heads = config.get("heads") or heads or max(width // 64, 1)
        patch = config.get("patch_size", 16)
        if image_size % patch:  # torchvision would assert
            raise UserError(f"--img-size {image_size} is not a multiple of the ViT's patch size {patch}.")
        if width % heads:
            raise UserError(f"a ViT of width {width} cannot have {heads} heads; give --heads a divisor of {width}.")
        vit = MeanPooledViT if config.get("pool") == "mean" else torchvision.models.VisionTransformer
        return vit(image_size, patch, config.get("depth", depth), heads, width, config.get("mlp_dim", 4 * width))
    if arch.startswith("swin") and config.get("window"):
        width, depths, heads, drop = SWINS[arch.replace("_v2", "")]
        v2 = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if "_v2" in arch else {}
        model = torchvision.models.SwinTransformer(
            [4, 4], width, depths, heads, [config["window"]] * 2, stochastic_depth_prob=drop, **v2
        )
    else:
        model = data.build_model(arch, image_size, config.get("patch_size", 16), config.get("heads"))
    if config.get("final_norm") is False:  # SatlasPretrain's: never trained, so not read
        model.norm = nn.Identity()
    return model


def model_config(model, image_size):
    """What build_model needs besides the arch to build `model` again (finetune_cls.py's --save-backbone): a ViT's
    image and patch size, heads, shape and pooling; a Swin's window where torchvision's differs, its final norm."""
    if isinstance(model, torchvision.models.VisionTransformer):
        config = {"image_size": image_size, "patch_size": model.patch_size, "heads": model.encoder.layers[0].num_heads}
        config |= {"depth": len(model.encoder.layers), "width": model.hidden_dim, "mlp_dim": model.mlp_dim}
        return config | ({"pool": "mean"} if isinstance(model, MeanPooledViT) else {})
    if isinstance(model, torchvision.models.SwinTransformer):
        window = model.features[1][0].attn.window_size[0]
        v2 = isinstance(model.features[1][0], SwinTransformerBlockV2)
        config = {"window": window} if window != (8 if v2 else 7) else {}
        return config | ({"final_norm": False} if isinstance(model.norm, nn.Identity) else {})
    return {}


def probed_feature(model):
    """What the probe reads from `model`, in words (the line of a published file ends with it)."""
    if isinstance(model, MeanPooledViT):
        return "the mean of the patch tokens through fc_norm (MAE's global_pool)"
    if isinstance(model, torchvision.models.VisionTransformer):
        return "the class token after the final norm"
    if isinstance(model, torchvision.models.SwinTransformer):
        norm = "without the final norm" if isinstance(model.norm, nn.Identity) else "after the final norm"
        return f"the mean of the last stage's tokens {norm}"
    if isinstance(model, torchvision.models.ResNet):
        return "the global average of layer4"
    return "its output without the classifier"


def _assumed_heads(model, config, heads):
    """', N heads assumed (...)' where a ViT's heads are not in its file: --heads, or its size's."""
    if not isinstance(model, torchvision.models.VisionTransformer) or "heads" in config:
        return ""
    n = model.encoder.layers[0].num_heads
    plural = "s" * (n > 1)
    if heads:
        return f", {n} head{plural} (--heads)"
    why = "ViT-H's in MAE, timm and torchvision" if n != max(model.hidden_dim // 64, 1) else "width / 64"
    return f", {n} head{plural} assumed ({why}; --heads N if not)"


def sincos_positions(width, grid):
    """MAE's fixed 2-D sin-cos positions (util/pos_embed.py: sin and cos of the column, then of the row, at
    frequencies 1 / 10000^(i / (width / 4))), class token row zero: the table Scale-MAE's forward computes for a
    grid at resolution res = 1 (its positions times res), the default of its linear probe."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    coordinates = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coordinates, coordinates, indexing="ij")
    parts = []
    for position in (cols, rows):
        angles = torch.outer(position.flatten(), omega)
        parts += [angles.sin(), angles.cos()]
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), torch.cat(parts, dim=1)]).float()[None]


FIRST_LAYERS = ("conv1.weight", "conv_proj.weight", "features.0.0.weight")  # what reads the image: ResNet, ViT, Swin


def load_exactly(model, state, weights, arch, image_size, unrecognised=None):
    """Load `state` into the headless `model`: every tensor of the model must be in the file with its shape, and
    every tensor of the file must be used (a classifier head aside), or one sentence: a ResNet-101 file holds all
    of ResNet-50's tensors and 306 more, and must not load as a ResNet-50 with two thirds of layer3 dropped.
    `unrecognised` says why nothing fits a file where no backbone was found."""
    bands = next((k for k in FIRST_LAYERS if k in state and state[k].dim() == 4 and state[k].shape[1] != 3), None)
    if bands:  # SSL4EO-S12's, SatMAE's, Satlas's multispectral files
        raise UserError(
            f"--weights {weights} reads {state[bands].shape[1]} bands in its first layer ({bands} is "
            f"{tuple(state[bands].shape)}), a multispectral backbone; this project evaluates RGB images (3 bands)."
        )
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


_MMCLS_SWIN = [  # mmcls's SwinTransformer (CMID's Swin-B): mmcv's PatchEmbed, ShiftWindowMSA, FFN and PatchMerging
    (r"^patch_embed\.projection\.", "features.0.0."),
    (r"^patch_embed\.norm\.", "features.0.2."),
    (r"^stages\.(\d)\.blocks\.", lambda m: f"features.{2 * int(m[1]) + 1}."),
    (r"^stages\.(\d)\.downsample\.", lambda m: f"features.{2 * int(m[1]) + 2}."),  # merging ends stage i
    (r"\.attn\.w_msa\.", ".attn."),
    (r"\.ffn\.layers\.0\.0\.", ".mlp.0."),
    (r"\.ffn\.layers\.1\.", ".mlp.3."),
    (r"^norm3\.", "norm."),  # the norm of out_indices=(3,): the last stage's
]


# the modules of a backbone's file that are not the backbone (under its prefix): dropped, and named by this part
DROPPED = r"fc|heads?|decoder\w*|fpn|fcn\w*|mask_token\w*|masked_embed|pos_emb_projection|attn_mask"
# heads / projectors; MAE's, SatMAE's and Scale-MAE's decoder (decoder_*, fpn, fcn*, mask_token_decoder,
# pos_emb_projection); DINOv2's, SimMIM's and MAE's mask_token, iBOT's masked_embed; Swin's attn_mask buffers

UNSUPPORTED = [  # (a key, in torchvision's names where a layout mapped it, what it belongs to): one sentence each
    (r"register_tokens", "ViT with register tokens"),  # DINOv2's _reg4_ files
    (r"\.mlp\.w12\.", "ViT with a SwiGLU feed-forward"),  # DINOv2 ViT-g
    (r"\.attn\.sampling_offsets\.", "ViT with RVSA's rotated varied-size window attention"),  # ViT_Win_RVSA
    (r"\.PCM\.", "ViT whose blocks add ViTAE's parallel convolution (PCM) to attention"),  # ViTAE, ViTAE-RVSA
    (r"^channel_embed$", "ViT with SatMAE's band groups, a patch embedding each and a channel embedding"),  # group_c
]

SATLAS_PREFIXES = ("backbone.backbone.", "backbone.backbone.backbone.")  # satlaspretrain_models: single-, multi-image
# torchgeo's re-hosted SatlasPretrain RGB Swin V2 files, by the sha256 prefix their names carry (torch hub's rule):
# swin_v2_b_{naip,sentinel2}_rgb_satlas, aerial_swinb_{si,mi}, sentinel2_swinb_{si,mi}_rgb, sentinel2_swint_{si,mi}_rgb
TORCHGEO_SATLAS = ("685f45bd", "51471041", "e4169eb1", "326d69e1", "156a98d5", "4efa210c", "0c1a96e0", "424d91f4")
MOCO_V3_VITS = ("vit_small", "vit_base", "vit_conv_small", "vit_conv_base")  # vits.py: 12 heads at every width
Source = namedtuple("Source", "weights prefix obj identity dropped")  # what a finishing function may read


def _named_heads(obj):
    """A ViT's heads where its file names the architecture: MoCo v3's `arch` (vits.py: 12 heads at every width), or
    the argparse `args` of DINO (arch), MAE, SatMAE, Scale-MAE and RVSA (model: mae_vit_large_patch16): that size's."""
    if obj.get("arch") in MOCO_V3_VITS:
        return 12
    args = obj.get("args")
    named = re.search(r"vit_(tiny|small|base|large|huge)", f"{getattr(args, 'model', '')} {getattr(args, 'arch', '')}")
    return VITS[f"vit_{named[1]}"][2] if named else None


def _timm_vit(state, source):
    """(arch, config, notes) of a timm-style ViT (timm, DINO, DINOv2, iBOT, MoCo v3, MAE, SatMAE, Scale-MAE): depth,
    width, MLP width and patch from the tensors, heads where the file names them, LayerScale folded into the layer
    before it (gamma (W x + b) = (gamma W) x + gamma b), MAE's global pooling where fc_norm replaces the final norm,
    and Scale-MAE's positions, which its forward computes (its decoder's fpn / mask_token_decoder tell it)."""
    width = state["class_token"].shape[-1]
    positions = state.get("encoder.pos_embedding")
    if positions is not None and positions.shape[-1] != width:  # SatMAE's models_vit_temporal.py
        raise UserError(
            f"--weights {source.weights} is a temporal ViT (SatMAE's): its positions are {positions.shape[-1]} wide "
            f"and its tokens {width}, the other {width - positions.shape[-1]} channels carrying a time encoding of "
            "each of three frames, which torchvision's VisionTransformer does not have."
        )
    gammas = [k for k in state if re.search(r"\.ls[12]\.gamma$", k)]
    for key in gammas:
        layer = key[:-9] + ("self_attention.out_proj." if ".ls1." in key else "mlp.3.")
        if layer + "bias" in state:  # otherwise gamma stays, unused, and load_exactly names it
            gamma = state.pop(key)
            state[layer + "weight"], state[layer + "bias"] = (
                state[layer + "weight"] * gamma[:, None],
                state[layer + "bias"] * gamma,
            )
    notes = ["LayerScale folded"] if gammas else []
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    mlp_dim = state["encoder.layers.encoder_layer_0.mlp.0.weight"].shape[0]
    arch = next((a for a, (w, d, _) in VITS.items() if (w, d, 4 * w) == (width, depth, mlp_dim)), "vit")
    config = {"depth": depth, "width": width, "mlp_dim": mlp_dim} if arch == "vit" else {}
    config["patch_size"] = state["conv_proj.weight"].shape[-1]
    if heads := _named_heads(source.obj):
        config["heads"] = heads
    if "fc_norm.weight" in state and "encoder.ln.weight" not in state:  # MAE's models_vit.py: global_pool
        config["pool"] = "mean"
    if {"fpn", "mask_token_decoder"} & source.dropped.keys():  # Scale-MAE's models_mae.py decoder
        state.pop("encoder.pos_embedding")
        config["positions"] = "sin-cos"
        notes.append("pos_embed replaced by the sin-cos positions Scale-MAE computes at res 1 (its probe's default)")
    return arch, config, notes


def _swin(state, source):
    """(arch, config, notes) of a Swin or Swin V2 in torchvision's keys: width and stage-3 depth name the torchvision
    model, the relative-position tables the window (torchvision builds 7, V2 8), and Microsoft's and mmcls's N x N
    relative_position_index becomes torchvision's flat one. SatlasPretrain's forward reads `features` only: its final
    norm kept its ImageNet values, so it is left out (Satlas's prefixes; torchgeo's re-hosted files by their hash)."""
    if "features.1.0.attn.qkv.weight" not in state:  # features.0.0 of another torchvision model: --arch names it
        return None, {}, []
    v2 = "features.1.0.attn.logit_scale" in state
    if v2:
        window = (state["features.1.0.attn.relative_coords_table"].shape[1] + 1) // 2
    else:
        window = (math.isqrt(state["features.1.0.attn.relative_position_bias_table"].shape[0]) + 1) // 2
    for key in [k for k in state if k.endswith("relative_position_index")]:
        state[key] = state[key].flatten()
    width = state["features.0.0.weight"].shape[0]
    depth = len({k.split(".")[2] for k in state if k.startswith("features.5.")})
    arch = {(96, 6): "swin_t", (96, 18): "swin_s", (128, 18): "swin_b"}.get((width, depth))
    if arch is None:
        raise UserError(
            f"--weights {source.weights} is a Swin of width {width} with {depth} blocks in stage 3; torchvision "
            "has swin_t (96, 6), swin_s (96, 18) and swin_b (128, 18)."
        )
    config = {"window": window} if window != (8 if v2 else 7) else {}
    notes = []
    if source.prefix in SATLAS_PREFIXES or source.identity[:8] in TORCHGEO_SATLAS:
        state.pop("norm.weight", None)
        state.pop("norm.bias", None)
        config["final_norm"] = False
        notes.append("norm left out: Satlas's forward reads features only, so its final norm was never trained")
    return arch.replace("swin_", "swin_v2_") if v2 else arch, config, notes


def _mmcls_swin(state, source):
    """mmcv's PatchMerging gathers each 2 x 2 neighbourhood with nn.Unfold, channel-major (c, di, dj); Microsoft's
    and torchvision's concatenate the positions (0, 0) (1, 0) (0, 1) (1, 1), each C channels: the merges' reduction
    columns and norm are reordered, then the Swin is read as any other."""
    for key in [k for k in state if re.fullmatch(r"features\.[246]\.reduction\.weight", k)]:
        channels = state[key].shape[1] // 4
        order = [c * 4 + 2 * di + dj for dj in (0, 1) for di in (0, 1) for c in range(channels)]
        for name in ("reduction.weight", "norm.weight", "norm.bias"):
            state[key[:11] + name] = state[key[:11] + name][..., order]
    arch, config, notes = _swin(state, source)
    return arch, config, notes + ["PatchMerging reordered from mmcv's nn.Unfold order"]


LAYOUTS = [  # (the key that marks a backbone, below its prefix; layout; rules; what reads (arch, config, notes))
    (r"layer1\.0\.conv1\.weight", "torchvision", [], None),  # also timm's, torchgeo's, MoCo's and mmselfsup's ResNets
    (r"class_token", "torchvision", [], None),
    (r"features\.0\.0\.weight", "torchvision", [], _swin),  # Swin, Swin V2 (Satlas, torchgeo), or --arch's model
    (r"4\.0\.conv1\.weight", "ResNet nn.Sequential", _SEQUENTIAL, None),
    (r"cls_token", "timm ViT", _TIMM_VIT, _timm_vit),
    (r"layers\.0\.blocks\.0\.attn\.qkv\.weight", "Microsoft Swin", _MS_SWIN, _swin),
    (r"stages\.0\.blocks\.0\.attn\.w_msa\.qkv\.weight", "mmcls Swin", _MMCLS_SWIN, _mmcls_swin),
]
PRINTED = ("depth", "width", "mlp_dim", "patch_size", "heads", "window")  # the shape a line states


def _tensors(obj, path=""):
    """Every tensor of a nested checkpoint under its dotted path, e.g. state_dict.module.encoder_q.conv1.weight."""
    found = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            found.update(_tensors(value, f"{path}{key}."))
        elif isinstance(value, torch.Tensor):
            found[f"{path}{key}"] = value
    return found


def _rank(prefix, prefixes):
    """Of several networks in a file, the backbone: a teacher beside its student (DINO's and iBOT's EMA teacher, the
    one they evaluate), then a 'backbone', then the others; key / momentum / EMA copies (CMID's branch_encoder) and a
    teacher without a student (GFM's frozen ImageNet Swin, a distillation target) last: a name does not decide."""
    if re.search(r"(^|[._])(encoder_k|momentum|target|ema|branch_encoder)[._]", prefix):
        return 3
    if "teacher" in prefix:
        return 0 if any("student" in p for p in prefixes) else 3
    return 1 if "backbone" in prefix else 2


def _refuse_unsupported(keys, weights):
    """One sentence for a network torchvision cannot express (UNSUPPORTED), naming the key that shows it."""
    for pattern, what in UNSUPPORTED:
        key = next((k for k in keys if re.search(pattern, k)), None)
        if key:
            raise UserError(
                f"--weights {weights} is a {what} ({key}), which torchvision's VisionTransformer does not have."
            )


def published_backbone(obj, weights, identity=""):
    """(state dict in torchvision's keys, layout, (arch, config) where the file says them, else None, the line that
    reports what was read, as [read as, dropped]) of any file but our training checkpoint; (its own state dict, None,
    None, []) when no backbone key is found. A LAYOUTS key marks the backbone and its prefix: in a plain state dict
    '', DDP's 'module.' or below a module named backbone (Satlas's backbone.backbone.); in a checkpoint any path
    (state_dict.module.encoder_q., teacher.backbone., model.encoder.). All else (heads, key encoder, queue,
    optimizer, decoders, mask_token, Swin's attn_mask buffers) is dropped, named in one line."""
    tensors = _tensors(obj)
    nested = any(isinstance(v, dict) for v in obj.values())
    candidates = {  # a plain state dict's backbone: at its top level, below DDP's module. or a `backbone` (Satlas's)
        (m[1], i)
        for k in tensors
        for i, (mark, *_) in enumerate(LAYOUTS)
        if (m := re.fullmatch(rf"((?:.*\.)?){mark}", k)) and (nested or m[1] in ("", "module.") or "backbone." in m[1])
    }
    prefixes = [p for p, _ in candidates]
    found = sorted(candidates, key=lambda c: (_rank(c[0], prefixes), c))
    if not found:  # no layout we know: with --arch another torchvision model's plain state dict may fit, else nothing
        _refuse_unsupported(tensors, weights)
        return {k.removeprefix("module."): v for k, v in obj.get("state_dict", obj).items()}, None, None, []
    prefix = found[0][0]
    _, layout, rules, finish = LAYOUTS[found[0][1]]
    if len(found) > 1 and _rank(found[1][0], prefixes) == _rank(prefix, prefixes):
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
            name = next(
                (part for part in (new.split(".")[0], new.rsplit(".", 1)[-1]) if re.fullmatch(DROPPED, part)), None
            )
            if name is None:  # neither its module (heads, decoders) nor its own name (mask_token, attn_mask) dropped
                state[new] = value
                continue
        dropped[name] = dropped.get(name, 0) + 1
    _refuse_unsupported(state, weights)
    try:
        arch, config, notes = (
            finish(state, Source(weights, prefix, obj, identity, dropped)) if finish else (None, {}, [])
        )
    except KeyError as err:
        raise UserError(f"--weights {weights} ({layout} under '{prefix}') lacks {err}.") from None
    names = "torchvision key names" if layout == "torchvision" else f"{layout} layout"  # the shapes may differ
    read_as = f"--weights {weights}: {names} under '{prefix}'" + (f", {arch}" if arch else "")
    read_as += "".join(f" {k} {config[k]}" for k in PRINTED if k in config) + "".join(f", {n}" for n in notes)
    dropped = ", ".join(f"{n} ({c} tensor{'s' * (c > 1)})" for n, c in dropped.items())
    report = [read_as, f"dropped {dropped}" if dropped else ""]  # load_backbone adds the heads and the feature
    label = f"{layout} {re.sub(r'^((state_dict|model|module)[.])+', '', prefix)}".strip(" .")
    return state, label, (arch, config) if arch else None, [] if "method" in obj else report  # ours need no report
