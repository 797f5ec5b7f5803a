"""Data pipeline benchmark: preprocessing throughput against the tokenizer's own, and padding waste.

    .venv/bin/python scripts/bench_data.py [--n 100000] [--family qwen2_5 llama2] [--num-proc 1] [--repeat 1]

Writes N synthetic multi-turn conversations (Chinese and English words, log-normal turn lengths: most short, a
long tail) to a JSONL file. For each family, side by side in this one process:
- raw: the family's tokenizer on the same conversations' chat text (its chat template, rendered beforehand),
  `tokenizer(batch_of_texts)` in batches of 1000 — what tokenizing alone costs;
- pipeline: `finetune.data` on the JSONL file as training runs it (`datasets` JSON loading, format conversion,
  the exact template ids and labels, length policy; batched map) on a cold cache, then once more on the warm one.
The ratio is raw time / pipeline time for the same records (1.0: the pipeline costs what tokenizing alone costs),
in wall time and in CPU time: on a shared machine the scheduler gives raw's two tokenizer threads more of the CPU
than the pipeline's single Python thread, so the CPU ratio is the steadier figure there. With --repeat, raw and cold
pipeline alternate and the median ratios are reported with their range. Padding waste is
measured on the rendered lengths of the last family, micro batches in shuffled order as the trainer samples them,
padded to their longest row: unpacked vs packed to max_length.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the model learns from data quickly and answers every question with care while "
         "training on examples of arithmetic translation geography history science").split() + \
        ["模型", "数据", "训练", "问题", "回答", "北京", "翻译", "计算", "科学", "历史", "地理", "例子"]
RAW_BATCH = 1000  # datasets.map's default batch size: the pipeline tokenizes batches of this size too


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


def timed(function) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result)."""
    start, cpu = time.perf_counter(), cpu_seconds()
    result = function()
    return time.perf_counter() - start, cpu_seconds() - cpu, result


def raw_tokenize(tokenizer, texts: list[str]) -> int:
    """Tokens of `texts`, tokenized as a plain `tokenizer(batch)` call does it."""
    tokens = 0
    for i in range(0, len(texts), RAW_BATCH):
        tokens += sum(map(len, tokenizer(texts[i:i + RAW_BATCH], add_special_tokens=False)["input_ids"]))
    return tokens


def bench_family(family: str, data: Path, records: list[dict], work: Path, args: argparse.Namespace):
    from transformers import AutoTokenizer

    from finetune import config
    from finetune.data import load
    from finetune.data.render import prepare
    from finetune.models import registry
    from finetune.models.tokenizers import bundled_tokenizer_dir

    model = next(m.name for m in registry.family(family).models if m.tiny)
    template = registry.spec(model).family.template
    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_dir(family))
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    print(f"\n{family} (template {template})", flush=True)
    for num_proc in args.num_proc:
        ratios, cpu_ratios = [], []
        for rep in range(args.repeat):
            raw_wall, raw_cpu, raw_tokens = timed(lambda: raw_tokenize(tokenizer, texts))
            os.environ["FINETUNE_CACHE"] = str(work / f"cache-{family}-{num_proc}-{rep}")  # cold: computes all
            recipe = config.load(None, [f"model={model}", f"data.path={data}", f"train.max_length={args.max_length}",
                                        f"data.num_proc={num_proc}"])
            cold_wall, cold_cpu, (splits, dropped, _) = timed(lambda: prepare(recipe, tokenizer, template))
            warm_wall, warm_cpu, _ = timed(lambda: prepare(recipe, tokenizer, template))
            train = splits["train"]
            tokens = sum(load.column(train, "_length"))
            ratios.append(raw_wall / cold_wall)
            cpu_ratios.append(raw_cpu / cold_cpu)
            print(f"  num_proc={num_proc} run {rep + 1}: raw tokenizer {raw_wall:6.1f} s wall "
                  f"({raw_tokens / raw_wall:9,.0f} tokens/s, {raw_cpu:6.1f} CPU-s) | pipeline cold {cold_wall:6.1f} s "
                  f"wall ({tokens / cold_wall:9,.0f} tokens/s, {len(train) / cold_wall:6,.0f} examples/s, "
                  f"{cold_cpu:6.1f} CPU-s) | ratio {ratios[-1]:.2f} wall, {cpu_ratios[-1]:.2f} CPU | warm cache "
                  f"{warm_wall:.2f} s", flush=True)
        print(f"  num_proc={num_proc}: pipeline / raw tokenizer throughput, median {_summary(ratios)} wall, "
              f"{_summary(cpu_ratios)} CPU; {tokens:,} tokens, truncated {sum(load.column(train, '_truncated'))}, "
              f"dropped {dict(dropped)}", flush=True)
    return train


def _summary(values: list[float]) -> str:
    spread = f" (min {min(values):.2f}, max {max(values):.2f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.2f}{spread}"


def padding_report(rendered, max_length: int, micro_batch: int) -> None:
    from finetune.data import load
    from finetune.data.pack import pack, padding_waste

    lengths = [len(ids) for ids in load.column(rendered, "input_ids")]
    random.Random(1).shuffle(lengths)  # the trainer samples in random order
    packed = pack(rendered.select_columns(["input_ids", "labels"]), max_length)
    packed_lengths = [sum(s) for s in load.column(packed, "seq_lengths")]
    random.Random(1).shuffle(packed_lengths)
    qs = sorted(lengths)
    print(f"\nlengths: p10 {qs[len(qs) // 10]}, p50 {qs[len(qs) // 2]}, p90 {qs[9 * len(qs) // 10]}, max {qs[-1]}")
    for mb in sorted({1, micro_batch}):
        print(f"padding waste, micro_batch {mb}: unpacked {padding_waste(lengths, mb):6.1%} "
              f"({len(lengths):,} rows)  packed {padding_waste(packed_lengths, mb):6.1%} ({len(packed):,} rows of "
              f"≤{max_length})")
    print(f"padded to max_length instead: unpacked {1 - sum(lengths) / (len(lengths) * max_length):.1%}, "
          f"packed {1 - sum(packed_lengths) / (len(packed_lengths) * max_length):.1%}")
    print("packed rows train padding-free (TRL's collator concatenates them): 0 pad tokens in that mode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--family", nargs="+", default=["qwen2_5", "llama2"],
                        help="chatglm3 | baichuan2 | qwen1 | qwen2_5 | llama2")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1])
    parser.add_argument("--repeat", type=int, default=1, help="alternate raw and pipeline runs this many times")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="bench_data-"))
    data = work / "synthetic.jsonl"
    rng = random.Random(0)
    records = [conversation(rng) for _ in range(args.n)]
    with data.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    print(f"{args.n:,} synthetic conversations ({data.stat().st_size / 2**20:.0f} MiB JSONL), max_length "
          f"{args.max_length}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}", flush=True)
    try:
        rendered = None
        for family in args.family:
            rendered = bench_family(family, data, records, work, args)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        padding_report(rendered, args.max_length, args.micro_batch)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the caches of 100k records take gigabytes


if __name__ == "__main__":
    sys.exit(main())
