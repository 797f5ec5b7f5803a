"""GPU detection and the `finetune gpus` table: the no-GPU path for real on this machine, the table from GPUs."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from finetune.estimate import gpu
from finetune.estimate.gpu import GPU, GiB, GPUProcess


def _text(renderable) -> str:
    console = Console(record=True, width=160)
    console.print(renderable)
    return console.export_text()


no_gpu_here = pytest.mark.skipif(torch.cuda.is_available() or gpu._nvml() is not None,
                                 reason="this machine has an NVIDIA GPU")


@no_gpu_here
def test_no_gpu_means_an_empty_list_and_a_plain_message_saying_why():
    assert gpu.detect() == []
    text = _text(gpu.format_gpus([]))
    assert text.startswith("no NVIDIA GPU found (")
    assert "NVML" in text and ("CPU-only build" in text or "no CUDA device" in text)


def test_table_shows_each_gpu_memory_utilisation_and_processes():
    gpus = [GPU(0, "NVIDIA GeForce RTX 4090", 24 * GiB, 4 * GiB, 87,
                [GPUProcess(4242, "python", 19 * GiB)]),
            GPU(1, "NVIDIA A100-SXM4-80GB", 80 * GiB, 80 * GiB)]
    text = _text(gpu.format_gpus(gpus))
    assert "NVIDIA GeForce RTX 4090" in text and " 20.0 / 24.0 GiB" in text and "87%" in text
    assert "python/4242 (19.0G)" in text
    assert "0.0 / 80.0 GiB" in text


def test_gpu_as_dict_is_json_ready():
    d = GPU(0, "L4", 24 * GiB, 23 * GiB).as_dict()
    assert d == {"index": 0, "name": "L4", "total_bytes": 24 * GiB, "free_bytes": 23 * GiB,
                 "utilization": None, "processes": []}


def test_known_gpus_cover_the_cards_users_name():
    for card in ("RTX 3090 24GB", "RTX 4090 24GB", "A10 24GB", "L4 24GB", "A100 40GB", "A100 80GB", "H100 80GB",
                 "V100 16GB", "V100 32GB", "T4 16GB", "RTX 3060 12GB"):
        assert card in gpu.KNOWN_GPUS


def test_fits_on_lists_the_cards_with_enough_memory_smallest_first():
    fits = gpu.fits_on(20 * GiB)
    assert "RTX 4090 24GB" in fits and "T4 16GB" not in fits
    assert [gpu.KNOWN_GPUS[c] for c in fits] == sorted(gpu.KNOWN_GPUS[c] for c in fits)
    assert gpu.fits_on(24 * GiB)[0].endswith("24GB")  # a 24 GB card holds exactly 24 GiB
    assert gpu.fits_on(500 * GiB) == []
