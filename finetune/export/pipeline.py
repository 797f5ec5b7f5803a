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

from finetune import atomic, shipped
from finetune.errors import UserError, did_you_mean
from finetune.export import gguf as gguf_mod
from finetune.export import merge as merge_mod
from finetune.export import ollama as ollama_mod
from finetune.export.llamacpp import ensure_toolchain
from finetune.models import chat
from finetune.models.chat.labels import first_answer
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
    return run.base().template


TRAINED_PROMPTS = 8  # prompts from the training data the verification answers (evenly spread over it)
TEXT_CHUNK = 256  # tokens per general-text chunk (a paragraph)


def general_text(tokenizer) -> list[list[int]]:
    """The shipped general text (Chinese and English paragraphs nobody trains on), one chunk per paragraph."""
    paragraphs = [p.strip() for p in (shipped.SAMPLES / "general_zh_en.txt").read_text().split("\n\n") if p.strip()]
    return [tokenizer(p, add_special_tokens=False)["input_ids"][:TEXT_CHUNK] for p in paragraphs]


def trained_prompts(run: RunDir, tokenizer, template: str) -> list:
    """Prompts the run trained on, each with its trained answer (label ids): where the fine-tune must show. When
    the run's data is no longer where its recipe says, fixed Chinese and English prompts (no trained answers)."""
    from finetune import data
    from finetune.export.verify import Prompt
    recipe = run.recipe()
    try:
        rows = data.build(recipe, tokenizer, template)["train"]
    except UserError:
        rows = None
    if rows is not None and len(rows):
        picked = sorted({round(i * (len(rows) - 1) / max(TRAINED_PROMPTS - 1, 1)) for i in range(TRAINED_PROMPTS)})
        out = []
        for row in rows.select(picked):
            ids, labels = row["input_ids"], row["labels"]
            answer = first_answer(labels)
            if answer is None:
                continue  # plain text: no prompt to ask
            start, end = answer
            out.append(Prompt(ids=ids[:start], answer=labels[start:end]))
        if out:
            return out
    fmt = chat.get(template)
    system = recipe.data.system_prompt or fmt.default_system
    head = [{"role": "system", "content": system}] if system else []
    return [Prompt(fmt.encode_prompt(tokenizer, head + [{"role": "user", "content": p}]))
            for p in PROMPTS]


def _merged(run: RunDir, force: bool) -> Path:
    dst = run.export_dir("merged")
    if dst.is_dir() and not force:
        return dst
    return merge_mod.merge(run, dst)


def _gguf(run: RunDir, merged: Path, quant: str, force: bool, result: ExportResult) -> None:
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
        base = run.base().directory
        if need("adapter-f16.gguf"):
            jobs.append(gguf_mod.lora_job(tools, run.adapter_dir, base, out / "adapter-f16.gguf"))
        original = _original_gguf(base, quant)
        if original is not None and need(base_out.name):
            atomic.link_or_copy(original, base_out)
            result.notes.append(f"{base_out.name} is the GGUF the run started from ({original}), unchanged")
        elif need(base_out.name):
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


def _routes(result: ExportResult, quant: str) -> list:
    """Every way the export can be run: model-f16, the merged quant, and base + adapter for LoRA runs."""
    from finetune.export.verify import Route

    routes = [Route(result.files["model-f16"], "f16")]
    if quant != "f16":
        routes.append(Route(result.files["model"], quant))
    if "adapter" in result.files:
        routes.append(Route(result.files["base"], quant, adapter=result.files["adapter"]))
    return routes


def _original_gguf(base: Path, quant: str) -> Optional[Path]:
    """The GGUF file a base was dequantized from, when it is still there and of the type asked for: the adapter
    was trained on exactly its weights, so base + adapter needs no new conversion (and is what the user runs)."""
    from finetune.models import gguf_base

    source = gguf_base.source_of(base)
    if source is None or source["file_type"].lower() != quant or not Path(source["file"]).is_file():
        return None
    return Path(source["file"])


def _verify(run: RunDir, merged: Path, result: ExportResult, quant: str) -> dict:
    """verify.md / verify.json for every route; {route file: passed}. A 16-bit file that fails means the
    conversion is broken (a bug: refused); a quantized route that fails is reported, and the Modelfile avoids it."""
    from transformers import AutoTokenizer

    from finetune.export import verify
    from finetune.models import chat

    tokenizer, template = AutoTokenizer.from_pretrained(merged), _template(run)
    reference = verify.Reference.build(
        merged, run.base().directory, general_text(tokenizer),
        trained_prompts(run, tokenizer, template), chat.get(template).stop_token_ids(tokenizer))
    checks = [verify.compare(reference, route) for route in _routes(result, quant)]
    result.report = verify.report(checks, run.export_dir("gguf"), reference)
    broken = [c for c in checks if c.quant in verify.EXACT_TYPES and not c.passed]
    if broken:
        raise UserError(f"verification failed for {broken[0].route}: the 16-bit GGUF does not behave like the merged "
                        f"model ({'; '.join(broken[0].failures)}; see {result.report}); please report it with that "
                        f"file")
    for c in checks:
        if not c.passed:
            result.notes.append(f"{c.route} FAILED verification: {'; '.join(c.failures)}"
                                + (f" — to keep it: {c.fix}" if c.fix else ""))
    return {c.route: c.passed for c in checks}


def _ollama_routes(result: ExportResult, quant: str, passed: Optional[dict]) -> tuple[tuple, Optional[tuple]]:
    """((model, adapter or None) for the Modelfile, (base, adapter) for Modelfile.adapter or None): routes that
    passed verification (all, when it was skipped: the notes say so), the merged quant first; none passed is an
    error."""
    from finetune.export.verify import LARGER_DELTA, Route

    merged = result.files["model"]
    pair = Route(result.files["base"], quant, adapter=result.files["adapter"]) if "adapter" in result.files else None
    pair_ok = pair is not None and (passed is None or passed.get(pair.label, False))
    if passed is None:
        result.notes.append(f"verification skipped (verify=false): the Modelfile runs {merged.name} unverified"
                            + (f", Modelfile.adapter {pair.label}" if pair else "") + "; a quantized merged file can "
                            "lose the fine-tune (answer like the base model): export without verify=false to check")
    if passed is None or passed.get(merged.name):
        return (merged, None), (pair.model, pair.adapter) if pair_ok else None
    if pair_ok:
        result.notes.append(f"the Modelfile runs {pair.label}: {merged.name} failed verification (see {result.report})")
        return (pair.model, pair.adapter), None
    raise UserError(f"no {quant} GGUF route passed verification (see {result.report}): export with quant=q8_0 or "
                    f"quant=f16, or {LARGER_DELTA}")


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
    _gguf(run, result.merged, quant, force, result)
    passed = _verify(run, result.merged, result, quant) if verify else None
    if to == "gguf":
        result.commands.append(f"finetune export run={run.path} to=ollama quant={quant}   "
                               f"# adds a Modelfile with the exact training chat template")
        return result
    (model, adapter), alternative = _ollama_routes(result, quant, passed)
    recipe, template = run.recipe(), _template(run)
    result.ollama = ollama_mod.write_dir(
        run.export_dir("ollama"), template, model, adapter_gguf=adapter, alternative=alternative,
        num_ctx=ollama_mod.context_length(recipe.train.max_length, result.merged), system=recipe.data.system_prompt)
    tag = ollama_mod.model_tag(run.path, name)
    result.commands += ollama_mod.create_commands(tag, result.ollama)
    smoke = ollama_mod.smoke_test(tag, result.ollama)
    result.notes.append(smoke or "no `ollama` on PATH: run the line below where Ollama is installed")
    return result
