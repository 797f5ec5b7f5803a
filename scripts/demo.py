"""The main job on a CPU, through the real CLI: a tiny model learns to answer, and the deployed file answers the same.

tiny random Qwen2.5 + the real Qwen2.5 tokenizer → 8 identity questions in Chinese and English
(finetune/samples/identity_zh_en.jsonl) → LoRA → merge → GGUF f16 → Ollama directory. Then each trained question
is asked three times, greedily: the untrained model and the merged model in transformers, and the GGUF the
Modelfile names in llama.cpp. Fine-tuning worked when the merged model gives the trained answer word for word; the
export worked when llama.cpp generates the same tokens. Either failing exits non-zero.

    python scripts/demo.py [--output-dir DIR] [--json] [key=value ...]

key=value arguments change the training recipe (tiny_qwen2_5_demo), e.g. the test's fastest setting
`data.max_samples=4 train.max_steps=20`. With --json, stdout holds one JSON object (answers, ids, losses, timings)
and the steps' own output goes to stderr; otherwise the answers and the summary are tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from finetune.rundir import RunDir, open_run

REPO = Path(__file__).resolve().parent.parent
RECIPE = "tiny_qwen2_5_demo"
MAX_NEW_TOKENS = 32  # the longest trained answer is 17 tokens with its stop token
BEFORE_TOKENS = 12  # enough of the untrained model's noise to see what it is
log = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)  # a whole answer table row per line


@dataclass
class Answer:
    """One trained question, asked before training, after it, and of the exported GGUF."""

    question: str
    trained: str
    before: str
    after: str
    gguf: str
    after_ids: list[int]
    gguf_ids: list[int]
    stopped: bool  # the fine-tuned answer ended with a stop token, as trained

    @property
    def learned(self) -> bool:
        return self.stopped and self.after == self.trained

    @property
    def same(self) -> bool:
        return self.after_ids == self.gguf_ids


def step(title: str, args: list[str], quiet_stdout: bool) -> float:
    """One `finetune` command as a user types it; with --json its stdout is kept off ours."""
    log.rule(f"[bold]{title}")
    log.print(f"$ finetune {' '.join(args)}", style="cyan")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=REPO,
                          stdout=sys.stderr if quiet_stdout else None)
    if done.returncode != 0:
        log.print(f"[red]step failed (exit {done.returncode}): {title}")
        sys.exit(done.returncode)
    return time.perf_counter() - start


def model_file_source(modelfile: Path) -> str:
    """The GGUF a Modelfile's FROM line names: the demo answers from exactly what `ollama create` would load."""
    return next(line.split(None, 1)[1].strip() for line in modelfile.read_text().splitlines()
                if line.startswith("FROM "))


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
    """llama.cpp's greedy sampler on the GGUF, ending after the first stop token, as a server does."""
    out: list[int] = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        out.append(token)
        if token in stops or len(out) == limit:
            return out
    return out


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def ask_all(run: RunDir, gguf: Path) -> list[Answer]:
    """Greedy answers from the base and merged models (transformers, fp32) and the GGUF (llama.cpp), all prompted
    with the ids the deployed model receives: the family's inference prompt with the run's system prompt."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import templates

    recipe, base_info, merged = run.recipe(), run.base(), run.export_dir("merged")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    stops = templates.stop_token_ids(base_info["template"], tokenizer)
    system = [{"role": "system", "content": recipe.data.system_prompt}] if recipe.data.system_prompt else []
    base, tuned = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                   for path in (base_info["path"], merged))
    llm = Llama(model_path=str(gguf), n_ctx=256, verbose=False)
    answers = []
    for question, trained in trained_pairs(recipe.data.path, recipe.data.max_samples):
        prompt = templates.encode_prompt(base_info["template"], tokenizer,
                                         [*system, {"role": "user", "content": question}])
        after = greedy_hf(tuned, prompt, stops, MAX_NEW_TOKENS)
        from_gguf = greedy_gguf(llm, prompt, stops, MAX_NEW_TOKENS)
        answers.append(Answer(question, trained, decode(tokenizer, greedy_hf(base, prompt, stops, BEFORE_TOKENS)),
                              decode(tokenizer, after), decode(tokenizer, from_gguf), after, from_gguf,
                              stopped=after[-1] in stops))
    return answers


def losses(metrics_file: Path) -> tuple[float, float]:
    """The training loss at the first and the last logged step."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    values = [row["loss"] for row in rows if "loss" in row]
    return values[0], values[-1]


def shorten(text: str, width: int = 24) -> str:
    """An untrained model's noise, cut to fit its column."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width] + "…"


def answers_table(answers: list[Answer]) -> Table:
    table = Table(title="the same questions, before and after fine-tuning (greedy)")
    for column in ("question", "before training", "after training (transformers, merged)", "GGUF (llama.cpp)",
                   "same ids"):
        table.add_column(column)
    for a in answers:
        missed = "" if a.learned else f"\n[red]≠ trained: {a.trained}{'' if a.stopped else ' (no stop token)'}"
        table.add_row(a.question, shorten(a.before), a.after + missed, a.gguf,
                      "[green]yes" if a.same else "[red]NO")
    return table


@dataclass
class Result:
    run: RunDir
    gguf: Path
    loss: tuple[float, float]  # first and last logged training loss
    timings: dict[str, float]
    answers: list[Answer]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def summary_table(result: Result) -> Table:
    run, answers, modelfile = result.run, result.answers, result.gguf.parent / "Modelfile"
    summary = Table(title="demo: what it learned and where everything is", show_header=False)
    summary.add_row("loss", f"{result.loss[0]:.2f} → {result.loss[1]:.2f} (first → last step); "
                            f"curve: {rel(run.path / 'loss.png')}")
    summary.add_row("learned", f"{sum(a.learned for a in answers)}/{len(answers)} trained answers, word for word")
    summary.add_row("exported", f"{sum(a.same for a in answers)}/{len(answers)} GGUF answers identical to "
                                f"transformers, token for token")
    for label, path in (("run (recipe, metrics, report)", run.path), ("report", run.report_file),
                        ("adapter", run.adapter_dir), ("merged model", run.export_dir("merged")),
                        ("GGUF", result.gguf), ("Modelfile", modelfile)):
        summary.add_row(label, rel(path))
    summary.add_row("ollama", f"ollama create finetune-demo -f {rel(modelfile)}")
    summary.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    return summary


def as_json(result: Result) -> dict[str, Any]:
    return {"run": str(result.run.path), "gguf": str(result.gguf),
            "loss": {"first": result.loss[0], "last": result.loss[1]},
            "loss_curve": str(result.run.path / "loss.png"), "timings_s": result.timings,
            "answers": [{**asdict(a), "learned": a.learned, "same": a.same} for a in result.answers]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=f"outputs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the training recipe")
    args = parser.parse_args()
    run = REPO / args.output_dir
    timings = {
        "estimate": step("1/4 Would Qwen2.5-7B QLoRA fit a 24 GB card? (no download, no GPU needed)",
                         ["recipe=qwen7b_qlora", "--dry-run", "gpu_mem=24"], args.json),
        "train": step("2/4 Teach a tiny random Qwen2.5 who it is: LoRA on short Q&A, Chinese and English (CPU)",
                      [f"recipe={RECIPE}", f"output_dir={run}", *args.overrides], args.json),
        "export": step("3/4 Merge, convert to GGUF f16 (verified against the merged model), write an Ollama model",
                       ["export", f"run={run}", "to=ollama", "quant=f16"], args.json),
    }
    log.rule("[bold]4/4 Ask every trained question: untrained, fine-tuned (transformers), exported GGUF (llama.cpp)")
    opened = open_run(run)
    gguf = opened.export_dir("ollama") / model_file_source(opened.export_dir("ollama") / "Modelfile")
    start = time.perf_counter()
    answers = ask_all(opened, gguf)
    timings["answers"] = time.perf_counter() - start
    result = Result(opened, gguf, losses(opened.metrics_file), timings, answers)
    if args.json:
        print(json.dumps(as_json(result), ensure_ascii=False))
    else:
        out.print(answers_table(answers))
        out.print(summary_table(result))
    if not all(a.same for a in answers):
        sys.exit("the exported GGUF does not generate what the merged model generates")
    if not all(a.learned for a in answers):
        sys.exit("the fine-tuned model does not give every trained answer word for word")


if __name__ == "__main__":
    main()
