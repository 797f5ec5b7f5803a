"""Files that ship inside the package: recipes, accelerate / DeepSpeed configs, model configs, tokenizer files.

They are package data, found through `importlib.resources`, so a plain `pip install .` or a wheel has everything
an editable checkout has (the repository's top-level `recipes/` is a link to `finetune/recipes/`, one source).
Product code reads nothing outside the package: never the test tree, never the checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from finetune.errors import UserError, did_you_mean


def package_path(*parts: str) -> Path:
    """A file or folder inside the installed package, as a real path (the package is installed unzipped)."""
    found = resources.files("finetune").joinpath(*parts)
    if not isinstance(found, Path):  # a zipped install: tools like llama.cpp's converter need real files
        raise RuntimeError(f"finetune must be installed as files, not zipped ({found})")
    return found


RECIPES = package_path("recipes")
"""recipes/<model>_<method>.yaml, base/, accelerate/, deepspeed/."""

MODEL_CONFIGS = package_path("models", "configs")
"""The real config.json of every registry model (and the tiny ones)."""

TOKENIZER_FILES = package_path("models", "tokenizer_files")
"""The original tokenizer files of each family (<family>/), hashes in their README: tiny models and tests use them."""

SAMPLES = package_path("samples")
"""Small sample datasets (the repository's data/ links here); recipes name them as `${sample:FILE}`."""


def sample(name: str) -> str:
    """The path of a shipped sample dataset: the `${sample:FILE}` a recipe may use, resolved anywhere."""
    path = SAMPLES / name
    if not path.is_file():
        names = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".json", ".jsonl"))
        raise UserError(f"no sample dataset '{name}'{did_you_mean(name, names)}; shipped: {', '.join(names)}")
    return str(path)
