"""The recipe: one typed schema, composed from YAML files and `key=value` overrides.

Precedence, lowest first: schema defaults < the recipes a recipe `extends` (in order) < the recipe < overrides.
Every key is checked against the schema, so a typo (`lora.rnk=8`) is one clear line naming the closest valid keys,
never a silently ignored setting. The fully resolved recipe is what a run saves and what every module receives.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from finetune import precision, shipped, stages
from finetune.errors import UserError, did_you_mean
from finetune.models import registry
from finetune.schema import Recipe, choices, trains_weights

OmegaConf.register_resolver("sample", shipped.sample, replace=True)
"""`data.path: ${sample:alpaca_zh_en.json}` in a recipe: a sample set inside the package, found wherever you run."""


POSITIVE: tuple[str, ...] = ("train.lr", "train.micro_batch", "train.grad_accum", "train.max_length", "lora.r",
                             "lora.alpha", "train.save_steps", "train.logging_steps",
                             "freeze.layers", "grpo.num_generations", "grpo.max_completion_length",
                             "grpo.temperature", "grpo.top_p")


def recipe_dirs() -> list[Path]:
    """Where `recipe=NAME` is looked up: the user's FINETUNE_RECIPES first, then the shipped recipes."""
    extra = os.environ.get("FINETUNE_RECIPES")
    return [Path(p) for p in extra.split(os.pathsep) if p] + [shipped.RECIPES] if extra else [shipped.RECIPES]


def shipped_recipes() -> dict[str, Path]:
    """Recipe name → file, for every YAML at the top of each recipe directory (bases live in base/)."""
    found: dict[str, Path] = {}
    for directory in reversed(recipe_dirs()):
        for path in sorted(directory.glob("*.yaml")):
            found[path.stem] = path
    return found


def find_recipe(name: str) -> Path:
    """A shipped recipe name (`qwen7b_qlora`, `base/lora`) or a path to a YAML file."""
    as_path = Path(name).expanduser()
    if as_path.suffix in (".yaml", ".yml"):
        if not as_path.is_file():
            raise UserError(f"recipe file {name} does not exist")
        return as_path
    for directory in recipe_dirs():
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    raise UserError(f"unknown recipe '{name}'{did_you_mean(name, shipped_recipes())}; "
                    f"`finetune list recipes` shows them all, or pass a path to a .yaml file")


def _read_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends carry line numbers in their text
        raise UserError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{path}: a recipe must be a mapping of keys to values")
    return loaded


def _compose(path: Path, seen: tuple[Path, ...] = ()) -> tuple[DictConfig, list[Path]]:
    """The recipe at `path` merged over the recipes it `extends`, and the files that were read (for errors)."""
    if path.resolve() in seen:
        raise UserError(f"{path}: 'extends' forms a cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    node = _read_yaml(path)
    parents = node.pop("extends", None)
    parent_names = [parents] if isinstance(parents, str) else list(parents or [])
    merged = OmegaConf.create({})
    files: list[Path] = []
    for parent in parent_names:
        parent_path = (path.parent / f"{parent}.yaml") if (path.parent / f"{parent}.yaml").is_file() \
            else find_recipe(parent)
        parent_cfg, parent_files = _compose(parent_path, (*seen, path.resolve()))
        merged = OmegaConf.merge(merged, parent_cfg)
        files += parent_files
    return OmegaConf.merge(merged, node), [*files, path]


def schema_keys(node: Any = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts, for did-you-mean suggestions."""
    keys: list[str] = []
    for f in dataclasses.fields(node):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += schema_keys(type(default), f"{name}.")
    return keys


def parse_options(kind: type, pairs: list[str], command: str, exclude: tuple[str, ...] = ()) -> Any:
    """A command's own key=value options (not recipe keys) against a small dataclass schema — nested sections as
    dotted keys (`eval.task=mmlu`) — with did-you-mean. `exclude`: inherited fields this command does not take."""
    every = [key for key in schema_keys(kind) if key not in exclude]
    keys = [key for key in every if not any(other.startswith(f"{key}.") for other in every)]  # leaves only
    for pair in pairs:
        key = pair.split("=", 1)[0]
        if key not in keys:
            raise UserError(f"`finetune {command}`: unknown key '{key}'{did_you_mean(key, keys)}; "
                            f"valid keys: {', '.join(keys)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(kind), OmegaConf.from_dotlist(pairs))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise UserError(f"`finetune {command}`: {str(exc).splitlines()[0]}") from None


REMOVED = {"trust_remote_code": "it is not a recipe key: a recipe (or a page) must not be able to run a model "
                                "repository's code; pass --trust-remote-code on the training command line yourself"}
"""Keys a recipe used to take, and why they are gone. A run saved with one (as false) still loads."""


def _refuse_removed(node: DictConfig, where: str) -> None:
    for key, why in REMOVED.items():
        if key in node:
            raise UserError(f"{where}: {key}: {why}")


def _explain(exc: OmegaConfBaseException, where: str) -> UserError:
    key = getattr(exc, "full_key", None) or ""
    inner: Optional[BaseException] = exc
    while inner is not None and not isinstance(inner, UserError):
        inner = inner.__cause__ or inner.__context__
    if inner is not None:  # raised by a resolver (`${sample:...}`): our own message, not OmegaConf's wrapping
        return UserError(f"{where}: key '{key}': {inner}")
    if isinstance(exc, ConfigKeyError) or "not in struct" in str(exc) or "Key '" in str(exc):
        bad = key or re.search(r"Key '([^']+)'", str(exc)).group(1)  # type: ignore[union-attr]
        hint = did_you_mean(bad, schema_keys()) or did_you_mean(bad.split(".")[-1], schema_keys())
        return UserError(f"{where}: unknown key '{bad}'{hint}; `--print-config` lists every key")
    allowed = choices(key) if key and key in schema_keys() else ()
    value = re.match(r"Invalid value '(.*)', expected one of", str(exc))
    if isinstance(exc, ValidationError) and allowed and value:
        return UserError(f"{where}: {key}={value.group(1)} is not one of {', '.join(map(str, allowed))}"
                         f"{did_you_mean(value.group(1), [str(a) for a in allowed])}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return UserError(f"{where}: key '{key}': {msg}")
    return UserError(f"{where}: {str(exc).splitlines()[0]}")


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"argument '{item}' is not key=value (e.g. train.lr=1e-4); flags start with --")
    try:
        return OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as exc:
        raise UserError(f"overrides: {str(exc).splitlines()[0]}") from None


def _validate(recipe: Recipe, where: str) -> None:
    cfg = OmegaConf.structured(recipe)
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            raise UserError(f"{where}: {key} must be positive, got {OmegaConf.select(cfg, key)}")
    if recipe.grpo.top_p > 1 or recipe.grpo.top_k < 0:
        raise UserError(f"{where}: grpo.top_p must be in (0, 1] and grpo.top_k ≥ 0 (0: off), got "
                        f"{recipe.grpo.top_p} and {recipe.grpo.top_k}")
    if recipe.train.logits == "full" and recipe.stage != "sft":
        raise UserError(f"{where}: train.logits=full is for stage=sft; stage={recipe.stage} scores tokens its own way")
    if recipe.lora.plus_ratio is not None and trains_weights(recipe.method):
        raise UserError(f"{where}: lora.plus_ratio is for method=lora/qlora (it scales the adapters' B matrices), "
                        f"not method={recipe.method}")
    for problem in stages.problems(recipe):
        raise UserError(f"{where}: {problem}")
    if recipe.model == "???":
        raise UserError(f"{where}: no model given; add model=NAME (`finetune list models`) or a local directory")
    _validate_model(recipe, where)


def _validate_model(recipe: Recipe, where: str) -> None:
    """A bare word must be a registry name; `org/name` is a hub id and a path must exist (checked when loading)."""
    looks_like_path_or_id = "/" in recipe.model or os.sep in recipe.model or Path(recipe.model).expanduser().exists()
    if recipe.model in registry.models():
        registry.spec(recipe.model, recipe.variant)  # raises on an unknown variant, naming the valid ones
    elif not looks_like_path_or_id:
        raise UserError(f"{where}: model={recipe.model} is not a registry model"
                        f"{did_you_mean(recipe.model, registry.models())}; `finetune list models` shows them, "
                        f"or give a hub id (org/name) or a local directory")


def load(recipe: Optional[str], overrides: list[str] = ()) -> Recipe:
    """The resolved, validated recipe for `recipe=NAME|PATH` plus `key=value` overrides."""
    schema = OmegaConf.structured(Recipe)
    files: list[Path] = []
    composed = OmegaConf.create({})
    if recipe:
        composed, files = _compose(find_recipe(recipe))
        composed.setdefault("name", Path(recipe).stem)
    where = str(files[-1]) if files else "overrides"
    _refuse_removed(composed, where)
    try:
        merged = OmegaConf.merge(schema, composed)
    except OmegaConfBaseException as exc:
        raise _explain(exc, where) from None
    given = _parse_overrides(list(overrides))
    _refuse_removed(given, "overrides")
    try:
        merged = OmegaConf.merge(merged, given)
    except OmegaConfBaseException as exc:
        raise _explain(exc, "overrides") from None
    try:
        resolved: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _explain(exc, where) from None
    _resolve_auto(resolved)
    _validate(resolved, where)
    return resolved


def _resolve_auto(recipe: Recipe) -> None:
    """train.precision=auto becomes this machine's choice (finetune.precision) once, here: the run's saved recipe
    then holds the precision it trained in."""
    recipe.train.precision = precision.resolve(recipe.train.precision)


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """A copy of a resolved recipe with a few keys changed (what-if estimates, tests)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(recipe), _parse_overrides(overrides))
        result: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _explain(exc, "overrides") from None
    _resolve_auto(result)
    _validate(result, "overrides")
    return result


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def from_yaml_file(path: Path) -> Recipe:
    """A recipe saved with a run (already resolved: no `extends`); a removed key it holds as false is dropped."""
    saved = _read_yaml(path)
    for key in REMOVED:
        if key in saved and saved[key] is False:
            saved.pop(key)
    _refuse_removed(saved, str(path))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Recipe), saved)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _explain(exc, str(path)) from None

