"""Data pipeline benchmark: preprocessing throughput and padding waste, through the real pipeline.

    .venv/bin/python scripts/bench_data.py [--n 100000] [--family qwen2_5] [--num-proc 1 2] [--max-length 2048]

Writes N synthetic multi-turn conversations (Chinese and English words, log-normal turn lengths: most short, a
long tail) to a JSONL file, then runs `finetune.data` on it as training does: `datasets` JSON loading, format
conversion and tokenization with the family's exact template (batched map, each num_proc in a fresh cache), then
once more on a warm cache. Padding waste is measured on the rendered lengths, micro batches in shuffled order as
the trainer samples them, padded to their longest row: unpacked vs packed to max_length.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the model learns from data quickly and answers every question with care while "
         "training on examples of arithmetic translation geography history science").split() + \
        ["模型", "数据", "训练", "问题", "回答", "北京", "翻译", "计算", "科学", "历史", "地理", "例子"]


def conversation(rng: random.Random) -> dict:
    def text(mean_words: float) -> str:
        n = max(1, min(1500, int(rng.lognormvariate(mean_words, 0.9))))
        return " ".join(rng.choice(WORDS) for _ in range(n))

    messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        messages += [{"role": "user", "content": text(3.0)}, {"role": "assistant", "content": text(4.3)}]
    return {"messages": messages}


def cpu_seconds() -> float:
    """CPU time of this process and its finished workers (wall time lies on a shared machine)."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--family", default="qwen2_5", help="chatglm3 | baichuan2 | qwen1 | qwen2_5 | llama2")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()

    import datasets
    from transformers import AutoTokenizer

    from finetune import config
    from finetune.data import load
    from finetune.data.pack import pack, padding_waste
    from finetune.data.render import prepare
    from finetune.models import registry
    from finetune.models.tokenizers import bundled_tokenizer_dir

    datasets.disable_progress_bars()
    model = next(m.name for m in registry.family(args.family).models if m.tiny)
    template = registry.spec(model).family.template
    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_dir(args.family))
    work = Path(tempfile.mkdtemp(prefix="bench_data-"))
    data = work / "synthetic.jsonl"
    rng = random.Random(0)
    with data.open("w", encoding="utf-8") as handle:
        for _ in range(args.n):
            handle.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")
    print(f"{args.n:,} synthetic conversations ({data.stat().st_size / 2**20:.0f} MiB JSONL), template {template}, "
          f"max_length {args.max_length}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)

    rendered = None
    for num_proc in args.num_proc:
        os.environ["FINETUNE_CACHE"] = str(work / f"cache-{num_proc}")  # cold cache: everything is computed
        recipe = config.load(None, [f"model={model}", f"data.path={data}", f"train.max_length={args.max_length}",
                                    f"data.num_proc={num_proc}"])
        for state in ("cold", "warm"):
            start, cpu = time.perf_counter(), cpu_seconds()
            splits, dropped, _ = prepare(recipe, tokenizer, template)
            seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
            train = splits["train"]
            tokens = sum(load.column(train, "_length"))
            print(f"num_proc={num_proc} {state} cache: {seconds:6.1f} s wall  {len(train) / seconds:8,.0f} examples/s  "
                  f"{tokens / seconds:10,.0f} tokens/s  | {cpu:6.1f} CPU-s: {len(train) / cpu:8,.0f} examples/CPU-s "
                  f"{tokens / cpu:10,.0f} tokens/CPU-s", flush=True)
        print(f"  ({tokens:,} tokens, truncated {sum(load.column(train, '_truncated'))}, dropped {dict(dropped)})")
        rendered = train

    lengths = [len(ids) for ids in load.column(rendered, "input_ids")]
    random.Random(1).shuffle(lengths)  # the trainer samples in random order
    packed = pack(rendered.select_columns(["input_ids", "labels"]), args.max_length)
    packed_lengths = [sum(s) for s in load.column(packed, "seq_lengths")]
    random.Random(1).shuffle(packed_lengths)
    qs = sorted(lengths)
    print(f"lengths: p10 {qs[len(qs) // 10]}, p50 {qs[len(qs) // 2]}, p90 {qs[9 * len(qs) // 10]}, max {qs[-1]}")
    for mb in sorted({1, args.micro_batch}):
        print(f"padding waste, micro_batch {mb}: unpacked {padding_waste(lengths, mb):6.1%} "
              f"({len(lengths):,} rows)  packed {padding_waste(packed_lengths, mb):6.1%} ({len(packed):,} rows of "
              f"≤{args.max_length})")
    print(f"padded to max_length instead: unpacked {1 - sum(lengths) / (len(lengths) * args.max_length):.1%}, "
          f"packed {1 - sum(packed_lengths) / (len(packed_lengths) * args.max_length):.1%}")
    print("packed rows train padding-free (TRL's collator concatenates them): 0 pad tokens in that mode")


if __name__ == "__main__":
    sys.exit(main())
