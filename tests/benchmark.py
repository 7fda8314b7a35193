"""One pre-training step against its compute floor, as one JSON line (not collected by pytest: no test_ prefix).

    python tests/benchmark.py moco.py --arch resnet18 --img-size 32 --batch-size 64 --queue 4096 --steps 20
    torchrun --nproc_per_node=8 tests/benchmark.py gersp.py --data /data/million_aid --natural synthetic --steps 50

The method is built through its own file's classes and train_step, with the file's flags (defaults included). Three
timings, each after 3 warm-up steps: N steps on synthetic tensors already on the device (images/s, peak memory);
N of the step's compute floor, every network pass the method needs (forward + backward of what it trains: encoder,
projector, heads, predictor, decoder; forward of its EMA teacher); N steps fed by the file's real loader on --data.
step_over_floor then prices all the rest (losses, optimiser, EMA, queue, gathers): near 1, the method adds little
around its networks. Nothing is written. A method file is found by its HELPERS banner (tests/methods.py); one with no
entry in RUNS below is refused in one sentence that says what to add.
"""

import argparse
import importlib
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from methods import REPO, is_method_file, method_files  # noqa: E402


def epochs(loader):
    """The loader's batches, epoch after epoch, as many as the timing needs."""
    return itertools.chain.from_iterable(itertools.repeat(loader))


def moco_run(m, args, ctx):
    """MoCo: queries with gradient, shuffled keys without; the floor is both encoders' passes, projectors included."""
    local = args.batch_size // ctx.world
    encoder = m.Encoder(args.arch, args.dim, m.bn_group_count(args, ctx.world), args.head)
    model = m.MoCo(encoder, args.queue, args.dim, args.moco_m, args.temperature).to(ctx.device)
    ddp_model = m.ddp(model.encoder_q)
    fused = ctx.device.type == "cuda"
    optimizer = torch.optim.SGD(encoder.parameters(), args.lr, args.momentum, weight_decay=args.wd, fused=fused)
    views = partial(m.two_views, m.augmentation(args.aug, args.img_size))
    dataset = data.ImageDataset(data.list_images(args.data)[0], seed=args.seed, transform=views)
    batches = (
        [x.to(ctx.device, non_blocking=True) for x in b[0]]
        for b in epochs(m.make_loader(dataset, args, ctx, args.seed))
    )

    def step(batch):
        return m.train_step(model, ddp_model, *batch, optimizer, ctx.scaler, ctx.amp_dtype)

    def floor(batch):
        with m.autocast(ctx.device, ctx.amp_dtype):
            model.encoder_q(batch[0]).float().sum().backward()
            with torch.no_grad():
                model.encoder_k(batch[1])

    synthetic = [torch.randn(local, 3, args.img_size, args.img_size, device=ctx.device) for _ in range(2)]
    return dict(
        name=f"moco {args.version}",
        images=args.batch_size,
        model=model,
        step=step,
        floor=floor,
        synthetic=synthetic,
        batches=batches,
    )


def gersp_run(m, args, ctx):
    """GeRSP: the student on RS queries and natural images, the teacher on keys; the floor is those passes (the
    student's projector and predictor, the teacher's projector included)."""
    local = args.batch_size // ctx.world
    augment = m.augmentation(args.aug, args.img_size)
    paths = data.list_images(args.data)[0]
    dataset = data.ImageDataset(paths, transform=partial(m.two_views, augment), seed=args.seed)
    natural, classes, _ = m.natural_data(args, augment)
    student = m.Student(args.arch, args.dim, m.bn_group_count(args, ctx.world), classes, args.nial_forward == "joint")
    student.predictor.requires_grad_(args.alpha > 0)
    model = m.GeRSP(student, args.queue, args.dim, args.teacher_momentum, args.temperature).to(ctx.device)
    ddp_model = m.ddp(model.student)
    fused = ctx.device.type == "cuda"
    optimizer = torch.optim.SGD(student.parameters(), args.lr, args.momentum, weight_decay=args.wd, fused=fused)
    rs_batches = epochs(m.make_loader(dataset, args, ctx, args.seed))
    naturals = m.natural_batches(m.make_loader(natural, args, ctx, args.seed + 1), 0, ctx.device) if natural else None
    batches = (
        [x.to(ctx.device, non_blocking=True) for x in b[0]] + (list(next(naturals)[:2]) if naturals else [None, None])
        for b in rs_batches
    )

    def step(batch):
        return m.train_step(model, ddp_model, *batch, optimizer, ctx.scaler, ctx.amp_dtype, args.alpha)

    def floor(batch):
        with m.autocast(ctx.device, ctx.amp_dtype):
            z, logits = model.student(batch[0], batch[2])
            (z.float().sum() + (0 if logits is None else logits.float().sum())).backward()
            with torch.no_grad():
                model.teacher(batch[1])

    images = [torch.randn(local, 3, args.img_size, args.img_size, device=ctx.device) for _ in range(3)]
    synthetic = images + [torch.randint(classes, (local,), device=ctx.device)] if natural else images[:2] + [None] * 2
    return dict(
        name="gersp",
        images=args.batch_size * (2 if natural else 1),
        model=model,
        step=step,
        floor=floor,
        synthetic=synthetic,
        batches=batches,
    )


def pera_run(m, args, ctx):
    """PerA: sparse (or --dense) student and teacher; the floor is both networks' passes on the same masks: the
    student encoder, its head g and the pixel predictor q, and the teacher encoder and its head."""
    model = m.PerA(args).to(ctx.device)
    ddp_model = m.ddp(model, forward_sync_buffers=False)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.lr,
        betas=(0.9, 0.999),
        eps=2e-5,
        weight_decay=args.wd,
        fused=ctx.device.type == "cuda",
    )
    crops = m.AlignedMultiCrop(args.img_size, args.local_size, args.local_crops, args.global_scale, args.local_scale)
    dataset = data.ImageDataset(data.list_images(args.data)[0], transform=crops, seed=args.seed)
    batches = (
        [v.to(ctx.device, non_blocking=True) for v in b[0]]
        for b in epochs(m.make_loader(dataset, args, ctx, args.seed))
    )
    sched = m.schedules(args, 0, 1)

    def step(views):
        for group in optimizer.param_groups:
            group["lr"] = args.lr  # the peak lr: warm-up's 0 would skip no work
            group["weight_decay"] = sched["wd"]
        return m.train_step(model, ddp_model, views, args, sched, optimizer, ctx.scaler, ctx.amp_dtype)

    def floor(views):
        s_glob, t_glob, s_loc, t_loc, masks, local_masks = m.masked_views(views, args)
        with m.autocast(ctx.device, ctx.amp_dtype):
            head_out, pixels = model(s_glob, s_loc, masks, local_masks)
            (head_out.float().sum() + pixels.float().sum()).backward()
            model.teacher_forward(t_glob, t_loc, masks, local_masks)  # no gradient

    local = args.batch_size // ctx.world  # the loader's layout: image x crop x 3 x h x w
    synthetic = [
        torch.randn(local, n, 3, side, side, device=ctx.device)
        for n, side in [(m.GLOBAL_CROPS, args.img_size)] * 2 + [(args.local_crops, args.local_size)] * 2
    ]
    return dict(
        name="pera --dense (full-length)" if args.dense else "pera",
        images=args.batch_size,
        model=model,
        step=step,
        floor=floor,
        synthetic=synthetic,
        batches=batches,
    )


def preco_run(m, args, ctx):
    """PReCo: [masked; unmasked] through one Swin + decoder (--no-prompt: the masked batch); the floor is the
    forward + backward of the encoder (mask token included) and the decoder over the same images and masks."""
    model = m.PReCo(args.arch, args.mask_unit, args.drop_path).to(ctx.device)
    ddp_model = m.ddp(model)
    optimizer = m.build_optimizer(model, args)
    masked_views = m.MaskedView(args.img_size, args.mask_unit, args.mask_ratio)
    dataset = data.ImageDataset(data.list_images(args.data)[0], seed=args.seed, transform=masked_views)
    batches = (
        [x.to(ctx.device, non_blocking=True) for x in b[0]]
        for b in epochs(m.make_loader(dataset, args, ctx, args.seed))
    )

    def step(batch):
        return m.train_step(ddp_model, *batch, optimizer, ctx.scaler, ctx.amp_dtype, args)

    def floor(batch):
        images, mask = batch
        if args.prompt:  # the prompt branch: the same images, nothing masked
            images, mask = torch.cat([images, images]), torch.cat([mask, torch.zeros_like(mask)])
        with m.autocast(ctx.device, ctx.amp_dtype):
            pixels, pooled = model(images, mask)
            (pixels.float().sum() + pooled.float().sum()).backward()

    local, grid = args.batch_size // ctx.world, args.img_size // args.mask_unit
    synthetic = [
        torch.randn(local, 3, args.img_size, args.img_size, device=ctx.device),
        torch.stack([m.random_mask(grid, args.mask_ratio) for _ in range(local)]).to(ctx.device),
    ]
    return dict(
        name="preco" if args.prompt else "preco - P-E",
        images=args.batch_size,
        model=model,
        step=step,
        floor=floor,
        synthetic=synthetic,
        batches=batches,
    )


RUNS = {"moco": moco_run, "gersp": gersp_run, "pera": pera_run, "preco": preco_run}  # a new method adds its own


def load_method(script):
    """The method file `script` (a path, or the name of one of this repository's method files) as a module; or one
    sentence: it is not a method file, or it has no entry in RUNS."""
    path = script if os.path.isfile(script) else os.path.join(REPO, os.path.basename(script))
    if not is_method_file(path):
        known = ", ".join(method_files())
        sys.exit(f"benchmark.py: error: {script} is not a method file (one with the HELPERS banner: {known}).")
    name = os.path.basename(path).removesuffix(".py")
    if name not in RUNS:
        sys.exit(
            f"benchmark.py: error: {script} has no entry here; add a {name}_run(m, args, ctx) to tests/benchmark.py's "
            f"RUNS, returning its step, its floor (every network pass it needs) and its inputs, as moco_run does."
        )
    return importlib.import_module(name)


def timed(fn, steps, device):
    """Seconds per call of fn: 3 warm-up calls, then `steps` timed calls between two synchronisations."""

    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if dist.is_initialized():
            dist.barrier()

    for _ in range(3):
        fn()
    synchronise()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronise()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help=f"a method file: {', '.join(method_files())}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    ours, rest = parser.parse_known_args(argv)
    m = load_method(ours.script)
    with tempfile.TemporaryDirectory() as out:  # setup() checks --out and finds no checkpoint there
        args = m.get_args(rest + ["--out", out])
        try:
            proc = m.setup(args)
            m.check_args(args, proc.world)
        except data.UserError as err:
            sys.exit(f"{ours.script}: error: {err}")
    m.connect(proc)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=proc.amp_dtype == torch.float16)
    ctx = argparse.Namespace(**proc._asdict(), scaler=scaler)  # the process, and the loss scaler the steps share
    torch.manual_seed(args.seed)
    run = RUNS[m.METHOD](m, args, ctx)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    step_s = timed(lambda: run["step"](run["synthetic"]), ours.steps, ctx.device)
    peak = (
        torch.cuda.max_memory_allocated(ctx.device) / 2**30
        if ctx.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )  # Linux: KiB
    floor_s = timed(lambda: run["floor"](run["synthetic"]), ours.steps, ctx.device)
    loader_s = timed(lambda: run["step"](next(run["batches"])), ours.steps, ctx.device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # make_loader's default workers: CPUs / processes
    if ctx.rank == 0:
        print(
            json.dumps(
                {
                    "method": run["name"],
                    "arch": args.arch,
                    "img_size": args.img_size,
                    "batch_size": args.batch_size,
                    "processes": ctx.world,
                    "device": ctx.device.type,
                    "amp": str(ctx.amp_dtype).replace("torch.", "") if ctx.amp_dtype else "off",
                    "images_per_s": round(run["images"] / step_s, 1),
                    "step_s": round(step_s, 4),
                    "floor_s": round(floor_s, 4),
                    "step_over_floor": round(step_s / floor_s, 3),
                    "peak_mem_gb": round(peak, 3),
                    "workers": args.workers
                    if args.workers is not None
                    else min(8, (os.cpu_count() or 1) // local_world),
                    "loader_images_per_s": round(run["images"] / loader_s, 1),
                }
            ),
            flush=True,
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
