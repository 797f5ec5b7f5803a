"""Export time and peak memory on a random-init model of a real size (default: the registry's Qwen2.5-1.5B config).

    python scripts/bench_export.py [--model qwen2_5_1_5b] [--quant q4_k_m] [--workdir DIR] [--verify]

Set-up (not measured, in its own process): the random 16-bit base with the real Qwen2.5 tokenizer, a run
directory with a LoRA adapter (r=16, every family target). Measured, in a fresh process: `export to=ollama`
(merge → f16 GGUF → quantize, plus adapter GGUF and base GGUF for Modelfile.adapter). Peak RSS is the largest
SUM over the export process and its converter subprocess, sampled every 50 ms (psutil). Target: peak well below
2 × the 16-bit model size. With --verify the GGUF check against the HF model is timed and measured separately
(it loads the model in fp32 when memory allows).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

SETUP = r"""
import sys, torch
from pathlib import Path
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from finetune import config, rundir
from finetune.models import native, registry
from finetune.models.tokenizers import bundled_tokenizer_dir
from finetune.runfiles import RunBase

name, work = sys.argv[1], Path(sys.argv[2])
spec = registry.spec(name)
base = work / "base"
if not (base / "config.json").is_file():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(native.native_config(spec), dtype=torch.bfloat16)
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(bundled_tokenizer_dir(spec.family.name)).save_pretrained(base)
    del model
recipe = config.load(None, [f"model={name}", "method=lora", "lora.r=16", "train.max_length=2048", "overwrite=true"])
run = rundir.create(recipe, work / "run")
run.write_base(RunBase(path=str(base), model=name, family=spec.family.name, template=spec.family.template,
                       native_class=spec.native_class, source="random"))
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(spec.family.lora_targets)))
with torch.no_grad():
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.01)
peft_model.save_pretrained(run.adapter_dir)
print(sum(f.stat().st_size for f in base.glob("*.safetensors")))
"""

EXPORT = r"""
import sys, time
from finetune.export import pipeline
start = time.time()
result = pipeline.export(sys.argv[1], sys.argv[2], quant=sys.argv[3], verify=sys.argv[4] == "1")
print(result.summary(), file=sys.stderr)
print(time.time() - start)
"""


def measured(args: list[str]) -> tuple[float, int, str]:
    """(seconds, peak summed RSS of the process tree, stdout) of a python child."""
    start = time.time()
    proc = psutil.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True)
    peak, stop = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"child failed with exit code {proc.returncode}")
    return time.time() - start, peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_5_1_5b")
    parser.add_argument("--quant", default="q4_k_m")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--verify", action="store_true", help="also measure the GGUF verification step")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-export-"))
    print(f"set-up in {work} (random {args.model}, LoRA r=16) ...", file=sys.stderr)
    done = subprocess.run([sys.executable, "-c", SETUP, args.model, str(work)], stdout=subprocess.PIPE, text=True,
                          check=True)
    size = int(done.stdout.strip().splitlines()[-1])
    run = str(work / "run")
    seconds, peak, out = measured([EXPORT, run, "ollama", args.quant, "0"])
    rows = {"model": args.model, "model_bytes_16bit": size, "quant": args.quant,
            "export_seconds": round(float(out.strip().splitlines()[-1]), 1), "wall_seconds": round(seconds, 1),
            "peak_rss_tree_bytes": peak,
            "peak_over_model_size": round(peak / size, 2), "target": "peak_over_model_size well below 2"}
    if args.verify:
        seconds, vpeak, out = measured([EXPORT, run, "gguf", args.quant, "1"])
        rows.update(verify_seconds=round(float(out.strip().splitlines()[-1]), 1), verify_peak_rss_bytes=vpeak)
    gguf = work / "run" / "export" / "gguf"
    rows["files"] = {f.name: f.stat().st_size for f in sorted(gguf.glob("*.gguf"))}
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
