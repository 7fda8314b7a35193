"""Shared test helpers: tiny generated image folders in a temp dir (never a real dataset) and script runners."""

import hashlib
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "smoke: the quick subset, `python -m pytest -q -m smoke` (under a minute on 2 "
        "cores): a real training step of each method, each evaluation program, one resume",
    )


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses share the 2 cores with pytest itself

# Tiny runs that every pre-training smoke test can afford on a CPU: the backbone's flags, which any method on that
# backbone accepts; each method's own tiny command line (tiny_argv) adds the flags of that method only.
TINY_RESNET = [
    "--arch",
    "resnet18",
    "--img-size",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--log-every",
    "1",
]
# vit_tiny (12 blocks, so the export loads anywhere) on 32 px crops of 8 px patches: 16 patches, s/l/t = 5/3/8 (the
# paper's 0.3 / 0.2 / 0.5, which the tests count by hand);
# 2 local crops of 16 px: 4 patches, s/t = 1/2. Small heads keep the checkpoints small.
TINY_VIT = [
    "--arch",
    "vit_tiny",
    "--img-size",
    "32",
    "--patch-size",
    "8",
    "--local-size",
    "16",
    "--local-crops",
    "2",
    "--out-dim",
    "64",
    "--head-hidden",
    "64",
    "--head-bottleneck",
    "32",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--log-every",
    "1",
    "--warmup-epochs",
    "0",
    "--teacher-temp-epochs",
    "0",  # no warm-up: every warm-up must fit in --epochs, and some runs here are 1 epoch long
    "--mask-ratios",
    "0.3",
    "0.2",
    "0.5",
]
# swin_t on 32 px images: 8 x 8 tokens, a 4 x 4 grid of 8-px mask units (10 masked), a 1 x 1 last stage.
TINY_SWIN = [
    "--arch",
    "swin_t",
    "--img-size",
    "32",
    "--mask-unit",
    "8",
    "--batch-size",
    "2",
    "--warmup-epochs",
    "0",
    "--workers",
    "0",
    "--log-every",
    "1",
]


def tiny_argv(method):
    """`method`'s own tiny command line (no --data, --out): TINY in its tests/test_<method>.py, so that a new method
    brings its line with its test file and the tests of every method (faults, plumbing, benchmark) run it unedited."""
    return list(importlib.import_module(f"test_{method}").TINY)


def make_image_folder(root, classes=3, per_class=8, size=32, ext=".png", seed=0):
    """root/<class_i>/<j><ext>: class i has its own mean colour, so a probe can separate the classes."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        colour = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 151 + 40) % 256], dtype=np.float64)
        for j in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, f"class{c}", f"{j}{ext}"))
    return str(root)


def run_script(script, *args, env=None, timeout=300):
    """Run a script of the repo as a user would; returns the CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_ran_cleanly(result):
    """Exit 0 and no Python warning on stderr: a user's multi-process run shows only torchrun's own banner."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]


def run_torchrun(script, nproc, *args, timeout=300):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        os.path.join(REPO, script),
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def refusal(module, argv, capsys, printed=None):
    """main(argv) of a script, in this process: exit code 2 and one line on stderr, which is returned (and stdout
    appended to `printed`, when given)."""
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"{module.__name__}.py: error: "), err
    if printed is not None:
        printed.append(captured.out)
    return err[0]


def assert_one_sentence_error(result, script, *fragments):
    """Exit code 2 and a single 'script: error: ...' line on stderr, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(path):
    """Every file under `path` with a hash of its content (or None when `path` does not exist)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    return {
        os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
        for d, _, files in os.walk(path)
        for f in files
    }


@pytest.fixture
def image_folder(tmp_path_factory):
    """Images in a folder of their own: a run's --out (tmp_path) may not hold its inputs."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")
