"""What each GGUF quant type costs a fine-tuned model, measured the way `finetune export` verifies a file.

    python scripts/bench_quant.py RUN [--types q8_0,q6_k,q5_k_m,q4_k_m]

RUN is a run already exported to GGUF (e.g. the demo's: `finetune export run=RUN to=ollama` left
export/merged/ and export/gguf/model-f16.gguf). Each type is made from model-f16.gguf by llama.cpp's quantizer
into a temporary folder; for LoRA runs the base GGUF + f16 adapter route is measured too. Every file answers the
run's trained prompts and the shipped general text (finetune.export.verify): size, perplexity ratio, mean KL
divergence, top-1 agreement, whether the fine-tune survived, and the verdict against verify's thresholds. The
table is printed in Markdown, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from finetune.export import gguf, pipeline, verify
from finetune.models import chat
from finetune.rundir import open_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--types", default="q8_0,q6_k,q5_k_m,q4_k_m")
    args = parser.parse_args()
    run = open_run(args.run)
    files, merged = run.export_dir("gguf"), run.export_dir("merged")
    tokenizer, template = AutoTokenizer.from_pretrained(merged), run.base().template
    start = time.perf_counter()
    reference = verify.Reference.build(merged, run.base().directory, pipeline.general_text(tokenizer),
                                       pipeline.trained_prompts(run, tokenizer, template),
                                       chat.get(template).stop_token_ids(tokenizer))
    print(f"reference (merged + base in transformers): {time.perf_counter() - start:.0f} s")
    rows = ["| route | size (MiB) | perplexity ratio | mean KL divergence | top-1 agreement | fine-tune kept | "
            "retained | verdict |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=files) as tmp:
        routes = [verify.Route(files / "model-f16.gguf", "f16")]
        for quant in args.types.split(","):
            routes.append(verify.Route(gguf.quantize(files / "model-f16.gguf", Path(tmp) / f"model-{quant}.gguf",
                                                     quant), quant))
        for base in sorted(files.glob("base-*.gguf")):
            if (files / "adapter-f16.gguf").is_file():
                routes.append(verify.Route(base, base.stem.removeprefix("base-"), adapter=files / "adapter-f16.gguf"))
        for route in routes:
            check = verify.compare(reference, route)
            size = sum(p.stat().st_size for p in (route.model, route.adapter) if p) / 2**20
            rows.append(f"| {route.label} | {size:,.0f} | {check.ppl_ratio:.3f} | {check.kld_mean:.4f} | "
                        f"{check.top1_agreement:.1%} | {check.kept}/{check.changed} | "
                        f"{'n/a' if check.retained is None else f'{check.retained:.0%}'} | "
                        f"{'PASS' if check.passed else 'FAIL: ' + '; '.join(check.failures)} |")
            print(rows[-1], flush=True)
    print("\n".join(["", f"merged model perplexity on the general text: {check.ppl_merged:.2f}", *rows]))


if __name__ == "__main__":
    main()
