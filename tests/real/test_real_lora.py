"""LoRA on the real Qwen2.5-0.5B (dequantized from its Q4_K_M GGUF) through the real CLI: it learns four identity
answers; the export keeps them in every GGUF route (checked by the export's own verification and again here by
llama.cpp, on q8_0 and on the base GGUF + f16 adapter); a GGUF that lost the fine-tune fails the verification;
`finetune chat` and `finetune serve` (the official openai client) answer as trained."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from real_tier import QUESTIONS

from finetune.export import gguf, pipeline, verify
from finetune.models import chat
from finetune.rundir import RunDir

pytestmark = [pytest.mark.real, pytest.mark.e2e, pytest.mark.llamacpp]

TRAIN = ("recipe=qwen2_5_0_5b_demo", "data.max_samples=4", "train.max_steps=12", "train.save_steps=12",
         "train.lr=1e-3", "train.sample_prompts=0")
"""The demo's recipe on its first four questions at a larger step: every answer is exact by step ~10 (r 16). This
tier checks learning and export; whether the model keeps its other skills is the demo's question."""


def finetune(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def run(real_gguf, tmp_path_factory) -> RunDir:
    path = tmp_path_factory.mktemp("real") / "lora"
    done = finetune(*TRAIN, f"model={real_gguf}", f"output_dir={path}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dequantized from Q4_K_M" in done.stderr  # the summary says what the base carries
    return RunDir(path)


@pytest.fixture(scope="module")
def exported(run) -> RunDir:
    done = finetune("export", f"run={run.path}", "to=ollama", "quant=q4_k_m")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def prompts(run: RunDir, tokenizer) -> dict[str, list[int]]:
    system = [{"role": "system", "content": chat.get("qwen2_5").default_system}]
    return {q: chat.get("qwen2_5").encode_prompt(tokenizer, [*system, {"role": "user", "content": q}])
            for q in QUESTIONS}


def llama_answers(model: Path, adapter: Path | None, run: RunDir) -> dict[str, str]:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.export_dir("merged"))
    stops = chat.get("qwen2_5").stop_token_ids(tokenizer)
    llm = Llama(model_path=str(model), lora_path=str(adapter) if adapter else None, n_ctx=256, verbose=False)
    answers = {}
    for question, ids in prompts(run, tokenizer).items():
        llm.reset()
        out: list[int] = []
        for token in llm.generate(ids, top_k=1, temp=0.0):
            if token in stops or len(out) == 32:
                break
            out.append(token)
        answers[question] = tokenizer.decode(out).strip()
    return answers


def test_the_gguf_base_is_a_plain_16_bit_checkpoint_and_the_run_says_where_it_came_from(run, real_gguf):
    """Dequantized once into the converted cache: the native class, 16-bit weights, no GGUF quantization_config
    left (save_pretrained refuses one), embeddings tied only where the GGUF has no output tensor of its own (this
    one has: llama.cpp's converter wrote Qwen2.5-Coder-0.5B's lm_head as output.weight); the report says the base
    carries Q4_K_M's rounding error."""
    from gguf import GGUFReader

    base = run.base().directory
    saved = json.loads((base / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2ForCausalLM"] and "quantization_config" not in saved
    has_output = any(t.name == "output.weight" for t in GGUFReader(str(real_gguf)).tensors)
    assert saved["dtype"] == "bfloat16" and saved["tie_word_embeddings"] is not has_output
    assert json.loads((base / "gguf_source.json").read_text())["file"] == str(real_gguf)
    assert "base dequantized from Q4_K_M" in run.report_file.read_text(encoding="utf-8")


def test_chat_takes_the_gguf_file_itself_as_its_model(real_gguf):
    """model=file.gguf wherever a model is named: the untrained base answers as Qwen2.5-Coder does (from the
    converted cache the training run filled: no second dequantization)."""
    done = finetune("chat", f"model={real_gguf}", "prompt=你是谁？", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "阿里" in done.stdout and "小调" not in done.stdout, done.stdout


def test_lora_teaches_the_real_model_and_chat_answers_as_trained(run):
    losses = [row["loss"] for row in map(json.loads, run.metrics_file.read_text().splitlines()) if "loss" in row]
    assert losses[-1] < losses[0] / 20, losses
    done = finetune("chat", f"run={run.path}", "prompt=Who are you?", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == QUESTIONS["Who are you?"]


def test_every_export_route_keeps_the_finetune_and_passes_its_thresholds(exported):
    routes = {c["route"]: c for c in json.loads((exported.export_dir("gguf") / "verify.json").read_text())}
    assert set(routes) == {"model-f16.gguf", "model-q4_k_m.gguf", "base-q4_k_m.gguf + adapter-f16.gguf"}
    for route in routes.values():
        assert route["passed"] and route["changed"] == 4 and route["kept"] == 4, route
        assert route["retained"] > 0.8 and route["top1_agreement"] >= verify.TOP1_MIN, route
    f16 = routes["model-f16.gguf"]
    assert abs(f16["ppl_ratio"] - 1) < 0.01 and f16["kld_mean"] < 1e-3  # a conversion, not an approximation
    # the pair runs the user's own GGUF under the adapter: the weights the run trained on, nothing re-rounded
    assert routes["base-q4_k_m.gguf + adapter-f16.gguf"]["kld_mean"] < routes["model-q4_k_m.gguf"]["kld_mean"]
    assert (exported.export_dir("gguf") / "base-q4_k_m.gguf").stat().st_size == 491_400_064
    text = (exported.export_dir("gguf") / "verify.md").read_text()
    assert "A route passes when" in text and "FAIL" not in text


def test_the_modelfile_runs_a_verified_route_in_a_usable_context(exported):
    ollama_dir = exported.export_dir("ollama")
    modelfile = (ollama_dir / "Modelfile").read_text()
    assert "PARAMETER num_ctx 4096" in modelfile  # trained at 128 tokens; Ollama gets a real conversation's room
    source = re.search(r"^FROM \./(\S+)$", modelfile, re.M).group(1)
    assert source == "model-q4_k_m.gguf" and (ollama_dir / source).is_file()
    assert "ADAPTER ./adapter-f16.gguf" in (ollama_dir / "Modelfile.adapter").read_text()


def test_q8_0_and_the_base_plus_adapter_route_answer_as_trained(exported, tmp_path):
    files = exported.export_dir("gguf")
    q8 = gguf.quantize(files / "model-f16.gguf", tmp_path / "model-q8_0.gguf", "q8_0")
    assert llama_answers(q8, None, exported) == QUESTIONS
    assert llama_answers(files / "base-q4_k_m.gguf", files / "adapter-f16.gguf", exported) == QUESTIONS


def test_a_gguf_that_lost_the_finetune_fails_verification(exported, real_gguf):
    """The extreme of a delta rounded away: the base model's own GGUF offered as the export. Its perplexity and
    KL divergence look like any quantized file's; only the trained prompts show it answers like the base."""
    from transformers import AutoTokenizer

    merged = exported.export_dir("merged")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    reference = verify.Reference.build(  # two trained prompts and one paragraph: the verdict, at half the cost
        merged, exported.base().directory, pipeline.general_text(tokenizer)[:1],
        pipeline.trained_prompts(exported, tokenizer, "qwen2_5")[:2], chat.get("qwen2_5").stop_token_ids(tokenizer))
    check = verify.compare(reference, verify.Route(real_gguf, "q4_k_m"))
    assert check.lost_finetune and not check.passed
    assert check.kept == 0 and check.retained is not None and check.retained < 0.2
    assert check.failures[0].startswith("lost the fine-tune: answers like the base model on 2 of the 2")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_answers_as_trained_through_the_openai_client(run):
    openai = pytest.importorskip("openai")
    port = _free_port()
    log = open(run.path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", f"run={run.path}", f"port={port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (run.path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        for question in ("你是谁？", "What is your name?"):
            answer = client.chat.completions.create(model=run.path.name, temperature=0, max_tokens=40,
                                                    messages=[{"role": "user", "content": question}])
            assert answer.choices[0].message.content == QUESTIONS[question]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
