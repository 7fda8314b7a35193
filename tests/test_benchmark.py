"""tests/benchmark.py: one JSON line with the step, its compute floor and the loader-fed step, for every method with an
entry; one sentence for a file it has no entry for. Benchmarks report numbers; these tests check the report, never a
timing."""

import argparse
import importlib
import json
import os
import shutil

import pytest
import torch

import benchmark
from conftest import REPO, make_image_folder, tiny_argv
from methods import METHODS

RUNS = {name: tiny_argv(name) for name in benchmark.RUNS} | {"pera (dense baseline)": tiny_argv("pera") + ["--dense"]}


def test_the_benchmark_has_entries_for_method_files_only():
    assert set(benchmark.RUNS) <= set(METHODS)


@pytest.mark.parametrize("name", RUNS)
def test_benchmark_prints_one_json_line_and_writes_nothing(name, tmp_path, capsys, monkeypatch):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    monkeypatch.chdir(tmp_path)  # the scripts' default --out is runs/<method>: nothing may appear
    benchmark.main([name.split()[0] + ".py", *RUNS[name], "--data", folder, "--steps", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["method"].startswith(name.split()[0]) and report["processes"] == 1 and report["device"] == "cpu"
    assert ("dense" in report["method"]) == ("dense" in name)
    for key in ("images_per_s", "step_s", "floor_s", "step_over_floor", "peak_mem_gb", "loader_images_per_s"):
        assert report[key] > 0, key
    images = report["batch_size"] * (2 if name == "gersp" else 1)  # GeRSP: as many natural images as RS ones
    # the report rounds images/s to 0.1: a tiny batch on a loaded machine gives about 1 image/s
    assert report["images_per_s"] == pytest.approx(images / report["step_s"], rel=0.01, abs=0.051)
    assert report["step_over_floor"] == pytest.approx(report["step_s"] / report["floor_s"], rel=0.01)
    assert os.listdir(tmp_path) == ["images"]


@pytest.mark.parametrize("name", benchmark.RUNS)
def test_the_floor_passes_through_every_network_that_the_step_trains(name):
    """The fair floor: every parameter that the step's optimiser updates gets a gradient from the floor's passes (the
    projectors, heads, predictors and decoder included), so step / floor prices only what is not a network pass."""
    module = importlib.import_module(name)
    args = module.get_args(tiny_argv(name))  # on the built-in textures
    process = dict(rank=0, world=1, device=torch.device("cpu"), amp_dtype=None)
    ctx = argparse.Namespace(**process, scaler=torch.amp.GradScaler("cpu", enabled=False))
    torch.manual_seed(0)
    run = benchmark.RUNS[name](module, args, ctx)
    run["floor"](run["synthetic"])
    trained = {key for key, p in run["model"].named_parameters() if p.requires_grad}
    assert trained and trained == {key for key, p in run["model"].named_parameters() if p.grad is not None}


def test_a_method_file_without_an_entry_is_refused_in_one_sentence_that_says_what_to_add(tmp_path, capsys):
    shutil.copy(os.path.join(REPO, "moco.py"), tmp_path / "mymethod.py")  # README, Adding a method: step 1
    for script, fragment in [
        (str(tmp_path / "mymethod.py"), "has no entry here; add a mymethod_run(m, args, ctx) to tests/benchmark.py's"),
        ("eval_linear.py", "is not a method file (one with the HELPERS banner: "),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main([script, "--steps", "1"])
        assert exit_info.value.code.startswith("benchmark.py: error: ") and fragment in exit_info.value.code
        assert "\n" not in exit_info.value.code and capsys.readouterr().out == ""
