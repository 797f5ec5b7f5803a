"""train.kernels=liger is refused before anything loads where it cannot run: without the liger-kernel package, or
without a CUDA GPU (Liger's kernels are Triton GPU kernels). This machine has neither; the package probe is
replaced to reach the second rule."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from finetune import config, kernels


def test_liger_without_the_package_names_the_package():
    recipe = config.load("tiny_qwen2_5_lora", ["train.kernels=liger"])
    assert "pip install liger-kernel" in kernels.problem(recipe, gpu=True)
    assert kernels.problem(config.load("tiny_qwen2_5_lora"), gpu=False) is None  # none: nothing to refuse


def test_liger_on_a_cpu_is_refused_even_with_the_package(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "liger_kernel" else found(name))
    recipe = config.load("tiny_qwen2_5_lora", ["train.kernels=liger"])
    assert "a CUDA GPU" in kernels.problem(recipe, gpu=False)
    assert kernels.problem(recipe, gpu=True) is None


def test_training_refuses_liger_before_loading_and_the_dry_run_says_so(tmp_path):
    train = subprocess.run([sys.executable, "-m", "finetune", "recipe=tiny_qwen2_5_lora", "train.kernels=liger",
                            f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "train.kernels=liger needs the liger-kernel package" in train.stderr
    assert not (tmp_path / "run").exists()
    dry = subprocess.run([sys.executable, "-m", "finetune", "recipe=tiny_qwen2_5_lora", "train.kernels=liger",
                          "--dry-run"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "training would refuse to start: train.kernels=liger needs" in dry.stderr
