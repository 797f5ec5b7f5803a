"""`finetune export`: merged → gguf → ollama (and merged → awq), each step reusing what an earlier export left.

Every output appears complete or not at all (directories and files are built under `.tmp-` names and renamed),
so "present" means "finished": a later export reuses it unless --force. Bad input — an unknown target or quant
type, a run without an adapter, an adapter for another base — is refused before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from finetune.errors import UserError, did_you_mean
from finetune.export import gguf as gguf_mod
from finetune.export import merge as merge_mod
from finetune.export import ollama as ollama_mod
from finetune.export.llamacpp import ensure_toolchain
from finetune.rundir import EXPORT_TARGETS, RunDir, locked, open_run

PROMPTS = ("Introduce yourself in one sentence.", "用三句话介绍一下长城。",
           "Write a haiku about the sea.", "如何用 Python 读取一个 JSON 文件？")


@dataclass
class ExportResult:
    run: Path
    target: str
    merged: Optional[Path] = None
    files: dict[str, Path] = field(default_factory=dict)  # gguf files by role: model, base, adapter
    ollama: Optional[Path] = None
    awq: Optional[Path] = None
    report: Optional[Path] = None
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"export of {self.run} → {self.target}"]
        if self.merged:
            lines.append(f"  merged (16-bit safetensors): {self.merged}")
        lines += [f"  gguf {role}: {path}" for role, path in self.files.items()
                  if role != "model" or path != self.files.get("model-f16")]
        if self.report:
            lines.append(f"  verification: {self.report}")
        if self.ollama:
            lines.append(f"  ollama dir: {self.ollama}")
        if self.awq:
            lines.append(f"  awq (compressed-tensors, vLLM): {self.awq}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.commands:
            lines += ["next:", *(f"  {c}" for c in self.commands)]
        return "\n".join(lines)


def _template(run: RunDir) -> str:
    return run.base()["template"]


def samples(run: RunDir, merged: Path) -> list:
    """Held-out sequences for verification: the run's eval split when it has one (and its data is still where
    the recipe says), else fixed prompts in Chinese and English through the family's chat format."""
    from transformers import AutoTokenizer

    from finetune.export.verify import Sample
    from finetune.models import templates

    tokenizer, template, recipe = AutoTokenizer.from_pretrained(merged), _template(run), run.recipe()
    if recipe.data.eval_path or recipe.data.val_size:
        from finetune import data

        try:
            rows = data.build(recipe, tokenizer, template)["eval"]
        except UserError:
            rows = None
        if rows is not None and len(rows):
            out = []
            for row in rows.select(range(min(4, len(rows)))):
                ids, labels = row["input_ids"][:128], row["labels"][:128]
                start = next((i for i, label in enumerate(labels) if label != -100), len(ids))
                out.append(Sample(prompt=ids[:max(start, 1)], text=ids))
            return out
    system = recipe.data.system_prompt or templates.default_system(template)
    head = [{"role": "system", "content": system}] if system else []
    prompts = [templates.encode_prompt(template, tokenizer, head + [{"role": "user", "content": p}])
               for p in PROMPTS]
    return [Sample(prompt=ids, text=ids) for ids in prompts]


def _merged(run: RunDir, force: bool) -> Path:
    dst = run.export_dir("merged")
    if dst.is_dir() and not force:
        return dst
    return merge_mod.merge(run, dst)


def _gguf(run: RunDir, merged: Path, quant: str, force: bool, result: ExportResult) -> Path:
    """model-f16.gguf (the reference and quantization source) + model-<quant>.gguf; for LoRA runs also
    adapter-f16.gguf and base-<quant>.gguf (Modelfile.adapter). Conversions share one converter process."""
    out = run.export_dir("gguf")
    out.mkdir(parents=True, exist_ok=True)
    tools = ensure_toolchain()

    def need(name: str) -> bool:
        return force or not (out / name).is_file()

    lora = run.has_adapter and not json.loads((run.adapter_dir / "adapter_config.json").read_text()).get("use_dora")
    if run.has_adapter and not lora:
        result.notes.append("DoRA adapters have no GGUF form in llama.cpp: use the merged model")
    exact = quant in gguf_mod.CONVERTER_TYPES
    jobs = [gguf_mod.model_job(tools, merged, out / f"model-{t}.gguf", t)
            for t in dict.fromkeys(("f16", quant)) if t in gguf_mod.CONVERTER_TYPES and need(f"model-{t}.gguf")]
    base_out = out / f"base-{quant}.gguf"
    base_src = base_out if exact else out / f".base-{quant}-source-f16.gguf"
    if lora:
        base = Path(run.base()["path"]).expanduser()
        if need("adapter-f16.gguf"):
            jobs.append(gguf_mod.lora_job(tools, run.adapter_dir, base, out / "adapter-f16.gguf"))
        if need(base_out.name):
            jobs.append(gguf_mod.model_job(tools, base, base_src, quant if exact else "f16"))
    gguf_mod.run_jobs(tools, jobs)
    if not exact:
        if need(f"model-{quant}.gguf"):
            gguf_mod.quantize(out / "model-f16.gguf", out / f"model-{quant}.gguf", quant)
        if base_src.is_file():
            gguf_mod.quantize(base_src, base_out, quant)
            base_src.unlink()
    result.files = {"model-f16": out / "model-f16.gguf", "model": out / f"model-{quant}.gguf"}
    if lora:
        result.files.update(adapter=out / "adapter-f16.gguf", base=base_out)
    return result.files["model"]


def _verify(run: RunDir, merged: Path, result: ExportResult, quant: str) -> None:
    from finetune.export import verify

    reference, sequences = verify.HFReference(merged), samples(run, merged)
    files = {"f16": result.files["model-f16"], quant: result.files["model"]}
    checks = [verify.compare(reference, path, kind, sequences) for kind, path in files.items()]
    result.report = verify.report(checks, run.export_dir("gguf"), reference.dtype)
    failed = [c.file for c in checks if not c.passed]
    if failed:
        raise UserError(f"verification failed for {', '.join(failed)}: the GGUF does not behave like the merged "
                        f"model (see {result.report}); please report it with that file")


@locked("export")  # one writer per run: two exports, or an export during training, never mix files
def export(run_dir: Path, to: str, *, quant: str = "q4_k_m", verify: bool = True, force: bool = False,
           name: Optional[str] = None) -> ExportResult:
    """Export a run to `to` (merged | gguf | ollama | awq); returns where everything is and what to run next."""
    if to not in EXPORT_TARGETS:
        raise UserError(f"unknown export target to={to}{did_you_mean(to, EXPORT_TARGETS)}; "
                        f"choose one of {', '.join(EXPORT_TARGETS)}")
    if to in ("gguf", "ollama"):
        gguf_mod.check_quant(quant)
    run = open_run(run_dir)
    if to != "merged" and run.recipe().stage == "rm":
        raise UserError(f"{run.path} is a reward model (stage=rm): it scores answers instead of writing them, so it "
                        f"has no GGUF, Ollama or AWQ form; export it with to=merged")
    result = ExportResult(run=run.path, target=to)
    result.merged = _merged(run, force)
    if to == "awq":
        from finetune.export import awq

        result.awq = awq.export(run, result.merged, run.export_dir("awq"), force=force)
        result.commands += awq.serve_commands(run, result.awq)
        return result
    if to == "merged":
        return result
    model = _gguf(run, result.merged, quant, force, result)
    if verify:
        _verify(run, result.merged, result, quant)
    if to == "gguf":
        result.commands.append(f"finetune export run={run.path} to=ollama quant={quant}   "
                               f"# adds a Modelfile with the exact training chat template")
        return result
    recipe, template = run.recipe(), _template(run)
    result.ollama = ollama_mod.write_dir(
        run.export_dir("ollama"), template, model, num_ctx=recipe.train.max_length, system=recipe.data.system_prompt,
        base_gguf=result.files.get("base"), adapter_gguf=result.files.get("adapter"))
    tag = name or ollama_mod.model_name(run.path.name)
    result.commands.append(ollama_mod.create_command(tag, result.ollama))
    if (result.ollama / "Modelfile.adapter").is_file():
        result.commands.append(ollama_mod.create_command(f"{tag}-adapter", result.ollama, "Modelfile.adapter"))
    smoke = ollama_mod.smoke_test(tag, result.ollama)
    result.notes.append(smoke or "no `ollama` on PATH: run the line below where Ollama is installed")
    return result
