"""Turn a recipe's `model=` into a local directory in the native layout, the way our users get models.

`model=` may be a registry name (+ `variant=`, `hub=`), a hub id `org/name`, or a local directory. Downloads go
through each hub's own client, so users keep what they know: Hugging Face's cache (HF_HOME / HF_HUB_CACHE), its
mirrors (HF_ENDPOINT, e.g. https://hf-mirror.com), its login (HF_TOKEN / `hf auth login`); ModelScope's
`snapshot_download` and MODELSCOPE_CACHE. Both clients resume: finished files are kept and only the missing ones
are fetched again. Only what a model needs is fetched: configs, tokenizer files and the weights (safetensors,
or *.bin when a repo has no safetensors), never *.py: we never run downloaded code. A checkpoint in an original
remote-code layout (ChatGLM3, Baichuan2, Qwen-1) is converted once to its native class (`convert_checkpoint`).
Every failure a person can fix is one line (UserError) that names the model, the hub tried and what to do.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from finetune.config import Recipe
from finetune.errors import UserError, did_you_mean
from finetune.models import gguf_base, registry
from finetune.models.convert import convert_checkpoint
from finetune.models.native import detect_original_family
from finetune.models.registry import ModelSpec
from finetune.models.tiny import cached_tiny

log = logging.getLogger(__name__)

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
HF_MIRROR = "https://hf-mirror.com"
META_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "merges.txt", "*.tiktoken", "chat_template*"]
WEIGHT_FORMATS = {"safetensors": ["*.safetensors", "*.safetensors.index.json"], "bin": ["*.bin", "*.bin.index.json"]}
NEVER = ["*.py"]


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # native layout: AutoModelForCausalLM.from_pretrained(path) works without remote code
    spec: Optional[ModelSpec]  # the registry entry, when the checkpoint is one we know
    source: str  # one line for people: where the weights came from


def hub_id(spec: ModelSpec, hub: str) -> str:
    """The repo id of the spec's variant on `hub` (hf | modelscope): pure, so every registry entry is testable."""
    if spec.model.tiny:
        raise UserError(f"{spec.name} is built locally for tests and demos; it has no hub id")
    if hub == "modelscope":
        if not spec.variant.modelscope_id:
            raise UserError(f"{spec.name} variant={spec.variant.name} is not published on ModelScope; use hub=hf "
                            f"(with HF_ENDPOINT={HF_MIRROR} where huggingface.co is slow) or a local directory")
        return spec.variant.modelscope_id
    return spec.variant.hf_id


def resolve(recipe: Recipe, *, progress: bool = True) -> ResolvedModel:
    """The local native-layout directory for `recipe.model`, downloading or converting once where needed."""
    name = recipe.model
    if name in registry.models():
        spec = registry.spec(name, recipe.variant)
        if spec.model.tiny:
            return ResolvedModel(cached_tiny(name, layout="native"), spec, "tiny model built locally")
        return _from_hub(hub_id(spec, recipe.hub), recipe, spec, progress)
    path = Path(name).expanduser()
    if gguf_base.is_gguf(name):
        return _from_gguf(path, recipe.variant)
    if path.exists():
        return _prepare(path, f"local dir {path}", None, recipe.variant, progress)
    if "/" not in name:
        registry.spec(name)  # raises the registry's did-you-mean over model names
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise UserError(f"model={name}: local directory {path} does not exist")
    spec = registry.spec_for_hub_id(name)
    if recipe.variant and recipe.variant != (spec and spec.variant.name):
        log.warning("variant=%s ignored: the hub id %s names the checkpoint itself", recipe.variant, name)
    repo = hub_id(spec, recipe.hub) if spec else name  # a registry id given for the other hub: this hub's id
    if repo != name:
        log.info("%s is published as %s on hub=%s", name, repo, recipe.hub)
    return _from_hub(repo, recipe, spec, progress)


def _from_gguf(path: Path, variant: Optional[str]) -> ResolvedModel:
    """A GGUF file, dequantized once into the converted cache; its metadata names its variant, not the recipe."""
    base = gguf_base.named(str(path))
    if variant and variant != base.spec.variant.name:
        log.info("variant=%s ignored: %s is %s %s", variant, path.name, base.spec.name, base.spec.variant.name)
    native = gguf_base.native_dir(base)
    return ResolvedModel(native, base.spec, f"GGUF {path} ({base.name}), {base.note}")


def identify(config: dict) -> Optional[ModelSpec]:
    """The registry entry a config.json (original or native layout) belongs to, or None for a model we don't know.

    Candidates share the family (original layout) or the native class (native layout) and the shape (hidden size,
    layers, vocabulary); among them the variant whose published config agrees on the most keys wins.
    """
    family = detect_original_family(config)
    architectures = set(config.get("architectures") or ())
    best: tuple[int, Optional[ModelSpec]] = (0, None)
    for fam, model in registry.models().values():
        for variant in model.variants:
            spec = ModelSpec(fam, model, variant)
            same_kind = fam.name == family if family else spec.native_class in architectures
            if not same_kind or registry.config_shape(spec.original_config) != registry.config_shape(config):
                continue
            score = 1 + sum(config.get(key) == value for key, value in spec.original_config.items())
            best = max(best, (score, spec), key=lambda pair: pair[0])
    return best[1]


def missing_parts(path: Path) -> Optional[str]:
    """What keeps `path` from being a complete checkpoint (config, every weight shard an index lists), or None."""
    if not (path / "config.json").is_file():
        return "no config.json (a model directory holds config.json, tokenizer files and *.safetensors or *.bin)"
    for fmt, (shards, index) in WEIGHT_FORMATS.items():
        if not any(path.glob(shards)):
            continue
        for index_file in path.glob(index):
            listed = set(json.loads(index_file.read_text())["weight_map"].values())
            missing = sorted(shard for shard in listed if not (path / shard).is_file())
            if missing:
                return f"{len(missing)} of {len(listed)} weight files listed in {index_file.name} are missing " \
                       f"({', '.join(missing[:3])})"
        return None
    return "no weights (*.safetensors or *.bin) next to config.json"


def _with_variant(spec: Optional[ModelSpec], variant: Optional[str], source: str) -> Optional[ModelSpec]:
    """`variant=` picks among the variants of the model a directory turned out to be: their configs can be
    identical (Llama-2 base and chat). Shipped recipes carry a variant, so one that cannot apply is a warning."""
    if variant is None or (spec is not None and spec.variant.name == variant):
        return spec
    names = [v.name for v in spec.model.variants] if spec else []
    if variant not in names:
        log.warning("variant=%s ignored: %s is %s", variant, source,
                    f"{spec.name} (variants: {', '.join(names)})" if spec else "not a registry model")
        return spec
    return registry.spec(spec.name, variant)


def _prepare(path: Path, source: str, spec: Optional[ModelSpec], variant: Optional[str], progress: bool,
             hint: str = "") -> ResolvedModel:
    """Check a checkpoint directory is complete; convert it when it is in an original layout."""
    if not path.is_dir():
        raise UserError(f"{source}: model= must be a model directory, not a file")
    problem = missing_parts(path)
    if problem:
        raise UserError(f"{source}: {problem}{hint}")
    config = json.loads((path / "config.json").read_text())
    spec = _with_variant(spec or identify(config), variant, source)
    if detect_original_family(config):
        native = convert_checkpoint(path, progress=progress)
        return ResolvedModel(native, spec, f"{source}, converted to the native layout in {native}")
    return ResolvedModel(path, spec, source)


def _from_hub(repo: str, recipe: Recipe, spec: Optional[ModelSpec], progress: bool) -> ResolvedModel:
    if recipe.hub == "modelscope":
        where = "ModelScope"
        path = _fetch(lambda patterns: _modelscope_download(repo, recipe.revision, patterns, spec))
    else:
        endpoint = (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
        where = "Hugging Face" if endpoint == HF_DEFAULT_ENDPOINT else f"Hugging Face (mirror {endpoint})"
        path = _fetch(lambda patterns: _hf_download(repo, recipe.revision, patterns, endpoint, where, spec, progress))
    return _prepare(path, f"{where} {repo}", spec, None, progress,
                    hint=f" in {path}: run the same command again to fetch the rest, or check that the "
                         f"repository holds transformers weights")


def _fetch(download: Callable[[list[str]], Path]) -> Path:
    """Configs, tokenizer and safetensors first; the *.bin weights only when the repo has no safetensors."""
    path = download(META_FILES + WEIGHT_FORMATS["safetensors"])
    if not any(path.glob("*.safetensors")):
        path = download(META_FILES + WEIGHT_FORMATS["bin"])
    return path


def _hf_cache() -> Path:
    """HF's cache, from the environment at call time (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _hf_download(repo: str, revision: Optional[str], patterns: list[str], endpoint: str, where: str,
                 spec: Optional[ModelSpec], progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Quiet(hf_tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    cache = _hf_cache()
    log.info("fetching %s from %s into %s", repo, where, cache)
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, endpoint=endpoint,
                                      allow_patterns=patterns, ignore_patterns=NEVER,
                                      tqdm_class=None if progress else Quiet))
    except Exception as exc:  # huggingface_hub and httpx errors, told apart in _hf_error
        problem = _hf_error(exc, repo, revision, where, cache, spec)
        if problem is None:
            raise
        raise problem from None


def _hf_error(exc: Exception, repo: str, revision: Optional[str], where: str, cache: Path,
              spec: Optional[ModelSpec]) -> Optional[UserError]:
    """One line a person can act on, for each way a Hugging Face download fails; None for what is a bug."""
    import httpx
    from huggingface_hub import errors

    response = getattr(exc, "response", None)
    cause = f"HTTP {response.status_code} {response.reason_phrase}" if isinstance(exc, errors.HfHubHTTPError) \
        and response is not None else _root_cause(exc)
    elsewhere = _elsewhere(repo, spec)
    if isinstance(exc, errors.GatedRepoError):
        who = "your token's account has not been granted access yet" if exc.response.status_code == 403 \
            else "you are not logged in"
        return UserError(f"{repo} is gated ({who}): accept its license on https://huggingface.co/{repo} while "
                         f"logged in, then run `hf auth login` (older clients: `huggingface-cli login`) or set "
                         f"HF_TOKEN=<token from https://huggingface.co/settings/tokens>; {elsewhere}")
    if isinstance(exc, errors.RevisionNotFoundError):
        return UserError(f"{where} has no revision '{revision}' of {repo}; fix revision= or drop it for the latest")
    if isinstance(exc, errors.RepositoryNotFoundError):
        ids = [*registry.models()] + [i for _, m in registry.models().values() for v in m.variants
                                      for i in (v.hf_id, v.modelscope_id) if i]
        return UserError(f"{where} has no model {repo}{did_you_mean(repo, ids)}; `finetune list models` shows "
                         f"the registry, or pass a local directory")
    if isinstance(exc, errors.IncompleteSnapshotError):
        return UserError(f"cannot reach {where} ({cause}) and the cached copy of {repo} in {cache} is incomplete; "
                         f"run again when the hub is reachable to fetch the rest, or {elsewhere}")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        if "HF_HUB_OFFLINE" in str(exc):
            return UserError(f"HF_HUB_OFFLINE is set and {repo} is not in the cache {cache}; unset it to "
                             f"download, or {elsewhere}")
        return UserError(f"cannot reach {where} to download {repo} ({cause}); {elsewhere}")
    if isinstance(exc, (httpx.TransportError, errors.HfHubHTTPError)) or "Consistency check failed" in str(exc):
        return UserError(f"the download of {repo} from {where} was interrupted ({cause}); finished files are kept "
                         f"in {cache}: run the same command again to resume, or {elsewhere}")
    return None


def _elsewhere(repo: str, spec: Optional[ModelSpec]) -> str:
    """The ways around an unreachable or refusing Hugging Face, naming this model's ModelScope id when known."""
    modelscope = f"hub=modelscope ({spec.variant.modelscope_id})" if spec and spec.variant.modelscope_id \
        else "hub=modelscope"
    return f"use {modelscope}, HF_ENDPOINT={HF_MIRROR}, or a local directory: model=/path/to/{repo.split('/')[-1]}"


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _modelscope_download(repo: str, revision: Optional[str], patterns: list[str],
                         spec: Optional[ModelSpec]) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise UserError(f"hub=modelscope needs the ModelScope client: pip install modelscope (or use hub=hf, "
                        f"with HF_ENDPOINT={HF_MIRROR} where huggingface.co is slow)") from None
    log.info("fetching %s from ModelScope into %s", repo, os.environ.get("MODELSCOPE_CACHE", "~/.cache/modelscope"))
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=NEVER))
    except Exception as exc:  # the modelscope SDK raises requests, its own HubError tree and ValueError alike
        hf = f"hub=hf ({spec.variant.hf_id})" if spec else "hub=hf"
        raise UserError(f"ModelScope could not deliver {repo} ({_root_cause(exc)}); check the id on "
                        f"https://modelscope.cn/models/{repo}, run again to resume, or use {hf} or a local "
                        f"directory") from None
