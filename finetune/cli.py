"""`finetune` on the command line: subcommands, `key=value` overrides, and the one place that maps errors to exit codes.

    finetune recipe=NAME [key=value ...] [--dry-run] [--force] [--print-config]   train (the default command)
    finetune estimate recipe=NAME [key=value ...] [--json] [--compare] [--png F]   memory estimate and verdict
    finetune data recipe=NAME [preview=N] [--json] [--png FILE]                    what the trainer will see
    finetune export run=DIR to=merged|gguf|ollama|awq [quant=q4_k_m] [--force]    deploy a run
    finetune chat run=DIR|model=NAME [adapter=DIR] [prompt="..."] [system=...]     talk to it in the terminal
    finetune serve run=DIR|model=NAME [adapters=a:DIR,...] [port=8000] [api_key=K]  OpenAI-compatible HTTP API
    finetune eval run=DIR|model=NAME [eval.file=F] [eval.dir=D eval.task=ceval]  BLEU/ROUGE, C-Eval/CMMLU/MMLU
    finetune convert SRC DST                                                       original checkpoint → native
    finetune list recipes|models                                                   what ships
    finetune recommend gpu_mem=24 [lang=zh] [task=chat] [--json]                   what fits this GPU
    finetune gpus [--watch N]                                                      GPUs, memory, processes
    finetune web [host=127.0.0.1] [port=7860] [auth_file=F]                        the same on a local web page

Everything a recipe holds is `key=value` (OmegaConf dotlist); double-dash flags only change how a command behaves.
Output: what you asked for (tables, reports, --json) on stdout; logs, progress and errors on stderr.
Exit codes: 0 ok, 2 bad input (one line, no traceback), 3 the run will not fit the GPU, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from finetune import atomic, config, quiet
from finetune.errors import UserError, did_you_mean

out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
"""What the user asked for — a listing, a table, a report, an answer — is the command's output: stdout, so
`finetune list recipes | grep qwen` works. With --json, stdout holds that one JSON object and nothing else."""
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
"""Logs, progress, warnings and errors: stderr."""


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """(key=value items, everything else) — argparse only ever sees the flags."""
    pairs = [a for a in args if "=" in a and not a.startswith("-")]
    return pairs, [a for a in args if a not in pairs]


def _flags(prog: str, args: list[str], *adders: Callable[[argparse.ArgumentParser], None]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"finetune {prog}", add_help=True)
    for add in adders:
        add(parser)
    namespace, unknown = parser.parse_known_args(args)
    if unknown:
        raise UserError(f"unexpected argument '{unknown[0]}' for `finetune {prog}`; settings are key=value "
                        f"(e.g. train.lr=1e-4), see `finetune {prog} --help`")
    return namespace


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)")


def _png_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--png", metavar="FILE", help="also save a picture (bar chart / histogram) to FILE")


def _recipe_and_overrides(pairs: list[str]) -> tuple[Optional[str], list[str]]:
    names = [p.split("=", 1)[1] for p in pairs if p.startswith("recipe=")]
    return (names[-1] if names else None), [p for p in pairs if not p.startswith("recipe=")]


def _load(pairs: list[str]) -> config.Recipe:
    name, overrides = _recipe_and_overrides(pairs)
    if name is None and not any(p.startswith("model=") for p in overrides):
        raise UserError("no recipe given: add recipe=NAME (`finetune list recipes`) or at least model=NAME")
    return config.load(name, overrides)


# ---------------------------------------------------------------------------------------------------- commands

def cmd_train(args: list[str]) -> int:
    pairs, rest = _split(args)
    flags = _flags("train", rest, lambda p: (
        p.add_argument("--dry-run", action="store_true", help="estimate memory and stop; loads no weights"),
        p.add_argument("--force", action="store_true", help="start even when the estimate says it will not fit"),
        p.add_argument("--print-config", action="store_true", help="print the fully resolved recipe and stop"),
        p.add_argument("--trust-remote-code", action="store_true",
                       help="let transformers run Python files from the model's repository (never a recipe key)"),
    ))
    recipe = _load(pairs)
    if flags.print_config:
        sys.stdout.write(config.to_yaml(recipe))
        return 0
    if flags.dry_run:
        from finetune import kernels
        from finetune.estimate import gpu

        if refused := kernels.problem(recipe, gpu=bool(gpu.detect())):
            err.print(f"[yellow]training would refuse to start:[/] {refused}", soft_wrap=True)
        return _estimate(recipe, as_json=False, png=None, compare=True)
    from finetune import train

    run = train.run(recipe, force=flags.force, trust_remote_code=flags.trust_remote_code)
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate/torchrun every rank returns here
        out.print(f"[bold green]done[/] — run directory: {run.path}", soft_wrap=True)
    return 0


def cmd_estimate(args: list[str]) -> int:
    pairs, rest = _split(args)
    flags = _flags("estimate", rest, _json_flag, _png_flag, lambda p: p.add_argument(
        "--compare", action="store_true",
        help="also plan the recipe as most scripts run it (train.logits=full quant.upcast=true), term by term"))
    return _estimate(_load(pairs), as_json=flags.json, png=flags.png, compare=flags.compare)


def _estimate(recipe: config.Recipe, *, as_json: bool, png: Optional[str], compare: bool) -> int:
    """The estimate on stdout; the dry run always sets it against the plain stack (`compare`)."""
    from finetune.estimate import gpu, report
    from finetune.models import gguf_base

    spec = gguf_base.spec_for_estimate(recipe.model, recipe.variant)
    result = report.estimate_report(recipe, spec, gpu.detect(), gpu_mem=recipe.gpu_mem, compare=compare)
    if as_json:
        print(json.dumps(result, default=str))
    else:
        out.print(report.render_estimate(result))
    if png:
        report.save_breakdown_png(result, Path(png))
        err.print(f"breakdown chart: {png}")
    return 3 if result["fits"] is False else 0


def cmd_data(args: list[str]) -> int:
    pairs, rest = _split(args)
    flags = _flags("data", rest, _json_flag, _png_flag)
    dirs = [p.split("=", 1)[1] for p in pairs if p.startswith("data.dir=")]
    if dirs and not any(p.startswith("data.name=") for p in pairs):  # a registry without a choice: list it
        from finetune.data import registry

        rows = registry.listing(dirs[-1])
        if flags.json:
            print(json.dumps({"dir": dirs[-1], "datasets": rows}, ensure_ascii=False))
        else:
            out.print(registry.render_listing(dirs[-1], rows))
        return 0
    previews = [p for p in pairs if p.startswith("preview=")]
    preview = int(previews[-1].split("=", 1)[1]) if previews else 3
    recipe = _load([p for p in pairs if not p.startswith("preview=")])
    from finetune import data

    tokenizer, template = data.tokenizer_for(recipe)
    result = data.inspect(recipe, tokenizer, template, preview=preview)
    if flags.json:
        print(json.dumps(result, default=str, ensure_ascii=False))
    else:
        out.print(data.render_inspect(result, tokenizer))
    if flags.png:
        data.save_length_histogram_png(result, Path(flags.png))
        err.print(f"length histogram: {flags.png}")
    return 0


@dataclass
class ExportOptions:
    run: Optional[str] = None
    to: str = "ollama"
    quant: str = "q4_k_m"
    name: Optional[str] = None
    verify: bool = True


def cmd_export(args: list[str]) -> int:
    pairs, rest = _split(args)
    flags = _flags("export", rest, lambda p: p.add_argument(
        "--force", action="store_true", help="redo steps whose outputs already exist (replaced atomically)"))
    options: ExportOptions = config.parse_options(ExportOptions, pairs, "export")
    if options.run is None:
        raise UserError("`finetune export` needs run=DIR (the directory a training run printed at its end)")
    from finetune.export import pipeline

    result = pipeline.export(Path(options.run), options.to, quant=options.quant, verify=options.verify,
                             force=flags.force, name=options.name)
    out.print(result.summary(), soft_wrap=True)  # paths and `ollama create` lines are copied: never broken
    return 0


def cmd_convert(args: list[str]) -> int:
    flags = _flags("convert", args, lambda p: (
        p.add_argument("src", help="original checkpoint directory (ChatGLM3 / Baichuan2 / Qwen-1 layout) or a "
                                   "GGUF file (Qwen2.5, Llama-2) to dequantize"),
        p.add_argument("dst", help="new directory for the native checkpoint (must not exist)"),
    ))
    from finetune.models import gguf_base
    from finetune.models.convert import convert_checkpoint

    dst = Path(flags.dst)
    if dst.exists():
        raise UserError(f"{dst} already exists; converting never overwrites, choose a new directory")
    if gguf_base.is_gguf(flags.src):
        base = gguf_base.named(flags.src)
        with atomic.directory(dst) as tmp:
            gguf_base.dequantize(base, tmp)
        err.print(base.note)
        converted = dst
    else:
        converted = convert_checkpoint(Path(flags.src), dst, progress=True)
    out.print(f"[bold green]converted[/] → {converted} (load it with AutoModelForCausalLM.from_pretrained, "
              f"no remote code)")
    return 0


def cmd_list(args: list[str]) -> int:
    flags = _flags("list", args, lambda p: p.add_argument("what", choices=["recipes", "models"]), _json_flag)
    from finetune import listing
    from finetune.estimate import recommend

    rows = listing.recipes() if flags.what == "recipes" else recommend.models_table()
    if flags.json:
        print(json.dumps(rows, default=str, ensure_ascii=False))
    else:
        out.print(listing.table(rows, title=f"finetune {flags.what}"))
    return 0


@dataclass
class RecommendOptions:
    gpu_mem: Optional[float] = None
    lang: Optional[str] = None
    task: Optional[str] = None


def cmd_recommend(args: list[str]) -> int:
    pairs, rest = _split(args)
    flags = _flags("recommend", rest, _json_flag)
    options: RecommendOptions = config.parse_options(RecommendOptions, pairs, "recommend")
    from finetune.estimate import gpu, recommend

    gpu_mem = options.gpu_mem
    if gpu_mem is None:
        found = gpu.detect()
        if not found:
            raise UserError("no GPU found here; say how much memory the card has, e.g. gpu_mem=24 (GiB)")
        gpu_mem = found[0].total_bytes / 2**30
    rows = recommend.recommend(gpu_mem, options.lang, options.task)
    if flags.json:
        print(json.dumps(rows, default=str, ensure_ascii=False))
    else:
        out.print(recommend.render(rows, gpu_mem))
    return 0


def cmd_gpus(args: list[str]) -> int:
    flags = _flags("gpus", args, _json_flag, lambda p: p.add_argument(
        "--watch", type=float, metavar="N", help="refresh every N seconds until Ctrl-C (like gpustat -i)"))
    from finetune.estimate import gpu

    if flags.json:
        print(json.dumps([g.as_dict() for g in gpu.detect()], default=str))
        return 0
    if flags.watch:
        gpu.watch(flags.watch, out)
        return 0
    out.print(gpu.format_gpus(gpu.detect()))
    return 0


def _infer_options(kind: type, pairs: list[str], command: str):
    """chat/serve options: free text (prompt=, system=) taken verbatim, the rest typed and checked by
    config.parse_options."""
    from finetune.infer.options import TEXT_KEYS

    text = {p.split("=", 1)[0]: p.split("=", 1)[1] for p in pairs if p.split("=", 1)[0] in TEXT_KEYS}
    options = config.parse_options(kind, [p for p in pairs if p.split("=", 1)[0] not in TEXT_KEYS], command)
    for key, value in text.items():
        if key not in kind.__dataclass_fields__:
            raise UserError(f"`finetune {command}`: unknown key '{key}'")
        setattr(options, key, value)
    return options


def cmd_chat(args: list[str]) -> int:
    pairs, rest = _split(args)
    _flags("chat", rest)
    from finetune.infer import chat
    from finetune.infer.options import ChatOptions

    return chat.run(_infer_options(ChatOptions, pairs, "chat"), err)


def cmd_serve(args: list[str]) -> int:
    pairs, rest = _split(args)
    _flags("serve", rest)
    from finetune.infer import server
    from finetune.infer.options import ServeOptions

    return server.run(_infer_options(ServeOptions, pairs, "serve"), err)


def cmd_eval(args: list[str]) -> int:
    pairs, rest = _split(args)
    flags = _flags("eval", rest, lambda p: p.add_argument(
        "--force", action="store_true", help="replace an existing evaluation (same as overwrite=true)"))
    from finetune import evaluate
    from finetune.evaluate import options

    return evaluate.run(options.parse(pairs, force=flags.force), out, err)


def cmd_web(args: list[str]) -> int:
    pairs, rest = _split(args)
    _flags("web", rest)
    from finetune.web import app

    return app.serve(config.parse_options(app.WebOptions, pairs, "web"))


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train, "estimate": cmd_estimate, "data": cmd_data, "export": cmd_export, "convert": cmd_convert,
    "list": cmd_list, "recommend": cmd_recommend, "gpus": cmd_gpus, "chat": cmd_chat, "serve": cmd_serve,
    "eval": cmd_eval, "web": cmd_web,
}


def _usage() -> str:
    return (__doc__ or "").split("\n\n")[1] + "\n\nExamples:\n" \
        "  finetune list recipes\n" \
        "  finetune recipe=qwen7b_qlora --dry-run gpu_mem=24\n" \
        "  accelerate launch -m finetune recipe=qwen7b_qlora data.path=my.jsonl train.lr=1e-4\n" \
        "  finetune export run=outputs/qwen7b_qlora-20261123-101500 to=ollama quant=q4_k_m\n" \
        "  finetune chat run=outputs/qwen7b_qlora-20261123-101500\n" \
        "Every key: finetune recipe=NAME --print-config.  Docs: README.md\n"


def _setup_logging() -> None:
    """Our own INFO lines (model source, mirror used, estimate) go to stderr; libraries stay at their level, less
    the lines that are expected here (finetune.quiet)."""
    quiet.install()
    handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    logger = logging.getLogger("finetune")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return 0
    command, rest = (args[0], args[1:]) if args[0] in COMMANDS else ("train", args)
    if command == "train" and rest and "=" not in rest[0] and not rest[0].startswith("-"):
        err.print(f"[red]error:[/] unknown command '{rest[0]}'{did_you_mean(rest[0], COMMANDS)}; "
                  f"commands: {', '.join(COMMANDS)}")
        return 2
    try:
        return COMMANDS[command](rest)
    except UserError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)  # text, not markup: "finetune[serve]"
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130

