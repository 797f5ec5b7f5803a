"""Does torch.compile pay for LoRA on the real 0.5B on this CPU? One step = forward + backward + AdamW on a fixed
[2, 256] batch, LoRA r16 on every block linear, fp32, the model's own loss; eager, then torch.compile (inductor) with
its compile time, then eager again (the first eager pass also warms caches; compare the compiled figure with it).

    python scripts/bench_compile.py        # needs the real model once: python scripts/fetch_real_model.py

Prints seconds per step and tokens/s for each. Fixed shapes are compile's best case: training's padding-free
micro-batches change length every step, and each new length recompiles (or runs dynamic-shape code)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_real_model import fetch  # noqa: E402

from finetune.models import gguf_base  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> int:
    torch.manual_seed(0)
    path = gguf_base.native_dir(gguf_base.named(str(fetch(quiet=True))))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size - 1000, (2, 256))

    def step(m: torch.nn.Module) -> None:
        m(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(m: torch.nn.Module, label: str, warm: int = 2, n: int = 3) -> float:
        start = time.perf_counter()
        for _ in range(warm):
            step(m)
        warm_s, start = time.perf_counter() - start, time.perf_counter()
        for _ in range(n):
            step(m)
        per_step = (time.perf_counter() - start) / n
        print(f"{label}: warm-up {warm_s:.1f} s, {per_step:.2f} s/step, {ids.numel() / per_step:.1f} tokens/s",
              flush=True)
        return per_step

    timed(model, "eager")
    compiled = timed(torch.compile(model), "torch.compile (inductor)")
    eager = timed(model, "eager again")
    print(f"compiled vs eager (warm): {eager / compiled:.2f}x per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
