"""GGUF files through llama.cpp's own converter and quantizer — never a rewrite of either.

The converter runs as a subprocess of this module (`python -m finetune.export.gguf PLAN.json`) with the vendored
gguf-py and conversion/ on its path. Before running llama.cpp's script, that subprocess applies a few changes, each
restoring a fact of the checkpoint the converter would otherwise miss, keyed by the checkpoint's native class (PREP):
- config keys the converter reads under other names (GLM: eps from `layernorm_epsilon`, context from `seq_length`);
- a SentencePiece vocabulary where the converter only knows a BPE one (natively converted ChatGLM3), and in every
  SentencePiece vocabulary the user-defined pieces and tokenizer.json's added tokens it drops;
- an architecture exported as another llama.cpp graph (Baichuan2-13B's ALiBi model as `refact`: the same
  RMSNorm + SwiGLU + ALiBi(max bias 8) graph at any depth, where llama.cpp's `baichuan` picks ALiBi by layer count);
- tokenizer flags the converter leaves at llama.cpp's SPM defaults: `add_space_prefix` follows the SentencePiece
  model's own add_dummy_prefix (false for Baichuan2) and `add_bos_token` whether the saved tokenizer adds BOS.
Baichuan2-7B needs only the tokenizer facts: its native form is LlamaForCausalLM with the NormHead already
normalised by `finetune convert`, so llama.cpp's Baichuan class (and its recursion bug) is never reached.

Quantized types are made from the f16 file with `llama_cpp.llama_model_quantize`. Every file is written under a
`.tmp-` name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from finetune import atomic
from finetune.errors import UserError, did_you_mean
from finetune.export.llamacpp import Toolchain, ensure_toolchain, require_llama_cpp

CONVERTER_TYPES = ("f16", "bf16")  # written by the converter itself
QUANT_FTYPES = {  # made from f16 by llama.cpp's quantizer (llama_cpp.LLAMA_FTYPE_*)
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
QUANTS = CONVERTER_TYPES + tuple(QUANT_FTYPES)


@dataclass(frozen=True)
class Prep:
    """What llama.cpp's converter needs for one native class beyond the checkpoint."""

    hparams: Callable[[dict], dict] = lambda config: {}
    sentencepiece_vocab: bool = False  # vocabulary from tokenizer.model (the converter would expect a BPE one)
    as_arch: str | None = None  # export under this llama.cpp architecture (gguf MODEL_ARCH name)


PREP: dict[str, Prep] = {
    "GlmForCausalLM": Prep(
        hparams=lambda c: {"layernorm_epsilon": c["rms_norm_eps"], "seq_length": c["max_position_embeddings"]},
        sentencepiece_vocab=True),
    "BaichuanAlibiForCausalLM": Prep(as_arch="REFACT"),
}


@dataclass
class Job:
    """One run of a llama.cpp converter script, with the preparation the subprocess applies around it."""

    script: str
    argv: list[str]
    tmp: str  # where the script writes; renamed to `out` by the subprocess when the script returns
    out: str
    hparams: dict = field(default_factory=dict)
    sentencepiece_vocab: list[str] = field(default_factory=list)  # native classes whose vocab comes from SPM
    as_arch: dict[str, str] = field(default_factory=dict)  # native class -> gguf MODEL_ARCH name
    metadata: dict[str, bool] = field(default_factory=dict)  # GGUF keys written after the converter's own


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise UserError(f"unknown quant type '{quant}'{did_you_mean(quant, QUANTS)}; choose one of "
                        f"{', '.join(QUANTS)} (q4_k_m is the usual laptop choice, q8_0 is close to the original)")
    return quant


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """A temporary name next to `final` for a writer we do not control; renamed to `final` only on success."""
    tmp = atomic.temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def tokenizer_metadata(model_dir: Path) -> dict[str, bool]:
    """SentencePiece flags llama.cpp would otherwise default (add_space_prefix=true, add_bos=true): the dummy
    prefix as the model file says, and BOS exactly when the saved tokenizer itself puts one first."""
    sp_file = Path(model_dir) / "tokenizer.model"
    if not sp_file.is_file():
        return {}
    from sentencepiece import sentencepiece_model_pb2
    from transformers import AutoTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_file.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    first = tokenizer("a")["input_ids"][0]
    return {"tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
            "tokenizer.ggml.add_bos_token": tokenizer.bos_token_id is not None and first == tokenizer.bos_token_id}


def _job(script: Path, argv: list[str], prep_dir: Path, out: Path, *, with_tokenizer: bool) -> Job:
    config = json.loads((Path(prep_dir) / "config.json").read_text())
    arch = config["architectures"][0]
    prep = PREP.get(arch, Prep())
    tmp = atomic.temp_path(out)
    return Job(script=str(script), argv=[*argv, "--outfile", str(tmp)], tmp=str(tmp), out=str(out),
               hparams=prep.hparams(config), sentencepiece_vocab=[arch] if prep.sentencepiece_vocab else [],
               as_arch={arch: prep.as_arch} if prep.as_arch else {},
               metadata=tokenizer_metadata(prep_dir) if with_tokenizer else {})


def model_job(tools: Toolchain, model_dir: Path, out: Path, outtype: str = "f16") -> Job:
    """HF checkpoint -> GGUF (f16 or bf16) with convert_hf_to_gguf.py."""
    return _job(tools.convert_hf, [str(model_dir), "--outtype", outtype], model_dir, out, with_tokenizer=True)


def lora_job(tools: Toolchain, adapter_dir: Path, base_dir: Path, out: Path) -> Job:
    """The LoRA adapter alone as an f16 GGUF (Ollama's ADAPTER line, llama.cpp's --lora)."""
    return _job(tools.convert_lora, [str(adapter_dir), "--base", str(base_dir), "--outtype", "f16"], base_dir, out,
                with_tokenizer=False)


def run_jobs(tools: Toolchain, jobs: list[Job]) -> None:
    """All conversions in ONE subprocess (interpreter + torch start-up dominates small conversions); each output
    appears under its final name only once its script has finished."""
    if not jobs:
        return
    for job in jobs:
        Path(job.out).parent.mkdir(parents=True, exist_ok=True)
    plan_file = atomic.temp_path(Path(jobs[0].out).with_name("plan.json"))
    plan_file.write_text(json.dumps({"root": str(tools.root), "jobs": [job.__dict__ for job in jobs]}))
    try:
        done = subprocess.run([sys.executable, "-m", "finetune.export.gguf", str(plan_file)], env=tools.env(),
                              capture_output=True, text=True)
    finally:
        plan_file.unlink(missing_ok=True)
        for job in jobs:
            Path(job.tmp).unlink(missing_ok=True)
    missing = [job.out for job in jobs if not Path(job.out).is_file()]
    if done.returncode != 0 or missing:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise UserError(f"llama.cpp's converter failed ({', '.join(missing)} not written):\n{tail}")


def convert(model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    tools = ensure_toolchain()
    run_jobs(tools, [model_job(tools, model_dir, out, outtype)])
    return out


def quantize(f16: Path, out: Path, quant: str) -> Path:
    """f16 GGUF -> a quantized GGUF with llama.cpp's own quantizer, atomically."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[check_quant(quant)])
    params.nthread = os.cpu_count() or 1
    from llama_cpp._utils import suppress_stdout_stderr  # the quantizer logs every tensor to stderr

    with atomic_file(out) as tmp, suppress_stdout_stderr(disable=False):
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise UserError(f"llama.cpp could not quantize {f16} to {quant} (return code {rc})")
    return out


def _faithful_sentencepiece(create: Callable) -> Callable:
    """llama.cpp's SentencePiece vocabulary, with two facts it drops restored:
    - user-defined pieces keep their type (it writes them as NORMAL, so Baichuan2's `<reserved_106>` in a prompt
      would be split into characters instead of matched whole, as SentencePiece matches it);
    - added tokens only tokenizer.json lists fill their ids (ChatGLM3's [gMASK], sop and role tokens are not pieces
      of its tokenizer.model, and transformers 5 no longer repeats them in tokenizer_config.json)."""
    from conversion.base import SentencePieceTokenTypes as Types
    from sentencepiece import sentencepiece_model_pb2

    def create_faithful(self):
        tokens, scores, toktypes = create(self)
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((self.dir_model / "tokenizer.model").read_bytes())
        for i, piece in enumerate(proto.pieces[: len(toktypes)]):
            if piece.type == piece.USER_DEFINED:
                toktypes[i] = Types.USER_DEFINED
        added = self.dir_model / "tokenizer.json"
        for token in json.loads(added.read_text()).get("added_tokens", []) if added.is_file() else []:
            i = token["id"]
            if i < len(tokens) and toktypes[i] == Types.UNUSED:
                tokens[i], scores[i] = token["content"].encode(), -1000.0
                toktypes[i] = Types.CONTROL if token["special"] else Types.USER_DEFINED
        return tokens, scores, toktypes

    return create_faithful


def _patch_converter(root: str) -> dict:
    """In the converter subprocess: load llama.cpp's conversion package and hook the points a Job may change.
    Returns the mutable hook state the next job fills in."""
    sys.path[:0] = [str(Path(root) / "gguf-py"), root]
    from conversion.base import ModelBase, TextModel

    state: dict = {"hparams": {}, "metadata": {}}
    load_hparams, prepare_metadata = ModelBase.load_hparams, TextModel.prepare_metadata

    def load_with_overrides(dir_model: Path, is_mistral_format: bool):
        return {**load_hparams(dir_model, is_mistral_format), **state["hparams"]}

    def prepare_then_override(self, vocab_only: bool):
        prepare_metadata(self, vocab_only)
        for key, value in state["metadata"].items():
            self.gguf_writer.add_bool(key, value)

    ModelBase.load_hparams = staticmethod(load_with_overrides)
    TextModel.prepare_metadata = prepare_then_override
    TextModel._create_vocab_sentencepiece = _faithful_sentencepiece(TextModel._create_vocab_sentencepiece)
    return state


def _run_job(job: dict, state: dict) -> None:
    import conversion
    from conversion.base import ModelBase, TextModel, gguf

    state.update(hparams=job["hparams"], metadata=job["metadata"])
    for arch, gguf_arch in job["as_arch"].items():
        ModelBase.register(arch)(type(f"{arch}As{gguf_arch.title()}", (TextModel,), {
            "model_arch": gguf.MODEL_ARCH[gguf_arch],
            "set_vocab": TextModel._set_vocab_sentencepiece,
        }))
        conversion.TEXT_MODEL_MAP.setdefault(arch, "llama")  # the module get_model_class imports first
    for arch in job["sentencepiece_vocab"]:
        conversion.get_model_class(arch).set_vocab = TextModel._set_vocab_sentencepiece
    sys.argv = [job["script"], *job["argv"]]
    runpy.run_path(job["script"], run_name="__main__")
    os.replace(job["tmp"], job["out"])


if __name__ == "__main__":
    plan = json.loads(Path(sys.argv[1]).read_text())
    hooks = _patch_converter(plan["root"])
    for one in plan["jobs"]:
        _run_job(one, hooks)
