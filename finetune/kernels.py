"""`train.kernels=liger`: Liger's Triton kernels (fused RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy
that never materializes the logits) through TRL's `use_liger_kernel`. They are GPU kernels, so a CPU has nothing to
run them on, and without the liger-kernel package transformers fails only once it patches the model; both are
refused before anything loads, with what to do."""

from __future__ import annotations

import importlib.util
from typing import Optional

from finetune.schema import Recipe


def problem(recipe: Recipe, *, gpu: bool) -> Optional[str]:
    """Why `recipe.train.kernels` cannot run in a process that has (`gpu`) or lacks a CUDA GPU; None when it can."""
    if recipe.train.kernels != "liger":
        return None
    if importlib.util.find_spec("liger_kernel") is None:
        return ("train.kernels=liger needs the liger-kernel package (pip install liger-kernel); or leave "
                "train.kernels=none")
    if not gpu:
        return ("train.kernels=liger runs Triton kernels on a CUDA GPU and there is none for this run; leave "
                "train.kernels=none on a CPU")
    return None
