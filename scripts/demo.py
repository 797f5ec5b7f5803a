"""The main job on a CPU: every step a user would type, through the real CLI, then one answer from llama.cpp.

tiny random Qwen2.5 + the real Qwen2.5 tokenizer → data/ samples → LoRA → merge → GGUF f16 → Ollama directory →
llama.cpp generates from the exported file. A random tiny model answers gibberish: what matters is that each step
runs for real and ends where the summary says.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
QUESTION = "把 3 公里换算成米。"


def step(title: str, *args: str) -> float:
    console.rule(f"[bold]{title}")
    console.print(f"$ finetune {' '.join(args)}", style="cyan")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=REPO)
    if done.returncode != 0:
        console.print(f"[red]step failed (exit {done.returncode}): {title}")
        sys.exit(done.returncode)
    return time.perf_counter() - start


def model_file_source(modelfile: Path) -> str:
    """The GGUF a Modelfile's FROM line names: the demo answers from exactly what `ollama create` would load."""
    return next(line.split(None, 1)[1].strip() for line in modelfile.read_text().splitlines()
                if line.startswith("FROM "))


def greedy_tokens(gguf: Path, merged: Path, template: str, count: int = 12) -> tuple[list[int], list[int], str]:
    """Greedy tokens from the exported GGUF (llama.cpp) and from the merged model (transformers), prompted with
    exactly the ids training used; a random tiny model's answer is noise, but the two must be the same noise."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import templates

    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = templates.encode_prompt(template, tokenizer, [{"role": "user", "content": QUESTION}])
    llm = Llama(model_path=str(gguf), n_ctx=512, verbose=False, seed=0)
    from_gguf = [t for t, _ in zip(llm.generate(prompt, temp=0.0, top_k=1), range(count))]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():  # plain argmax, stop tokens included: generate() would stop or suppress them
        for _ in range(count):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return from_gguf, ids[len(prompt):], tokenizer.decode(from_gguf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=f"outputs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    run = REPO / parser.parse_args().output_dir
    timings = {
        "estimate": step("1/3 Would Qwen2.5-7B QLoRA fit a 24 GB card? (no download, no GPU needed)",
                         "recipe=qwen7b_qlora", "--dry-run", "gpu_mem=24"),
        "train": step("2/3 Fine-tune a tiny Qwen2.5 with LoRA on the sample data (CPU)",
                      "recipe=tiny_qwen2_5_lora", f"output_dir={run}"),
        "export": step("3/3 Merge, convert to GGUF f16 (verified against the merged model), write an Ollama model",
                       "export", f"run={run}", "to=ollama", "quant=f16"),
    }
    from finetune.rundir import open_run

    ollama_dir = open_run(run).export_dir("ollama")
    gguf = ollama_dir / model_file_source(ollama_dir / "Modelfile")
    merged = open_run(run).export_dir("merged")
    console.rule("[bold]llama.cpp answers from the exported GGUF")
    from_gguf, from_hf, text = greedy_tokens(gguf, merged, open_run(run).base()["template"])
    console.print(f"Q: {QUESTION}\nA (llama.cpp, {len(from_gguf)} greedy tokens): {text!r}\n"
                  f"   llama.cpp ids    {from_gguf}\n   transformers ids {from_hf}\n"
                  f"   identical: {'yes' if from_gguf == from_hf else 'NO'}\n"
                  "   (a random tiny model trained for 30 steps mostly learns that answers end with the stop token; "
                  "what the demo shows is that the deployed file generates exactly what the trained model does)")
    if from_gguf != from_hf:
        sys.exit("the exported GGUF does not generate what the merged model generates")

    summary = Table(title="demo: where everything is", show_header=False)
    for label, path in (("run (recipe, metrics, report)", run), ("adapter", run / "adapter"),
                        ("report", run / "report.md"), ("merged model", merged), ("GGUF", gguf),
                        ("Modelfile", ollama_dir / "Modelfile")):
        summary.add_row(label, str(path.relative_to(REPO) if path.is_relative_to(REPO) else path))
    summary.add_row("ollama", f"ollama create finetune-demo -f {ollama_dir / 'Modelfile'}")
    summary.add_row("time", ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    console.print(summary)


if __name__ == "__main__":
    main()
