"""`finetune chat` as a user runs it (a subprocess): one-shot and interactive through stdin, answers compared token
for token with greedy generation of the same weights in plain transformers, prompt ids from the registry template;
and the same run's exported GGUF through backend=gguf."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ASK = {"zh": "你是谁？", "en": "Who are you?"}


def chat(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_one_shot_prompt_prints_exactly_the_greedy_answer(chat_run, reference):
    done = chat(f"run={chat_run.path}", f"prompt={ASK['zh']}")
    assert done.returncode == 0, done.stderr[-3000:]
    want, _ = reference.generate([user(ASK["zh"])])
    assert done.stdout == want + "\n"
    assert want.startswith("我是小调")  # the run learned it: the answer is the trained one, not noise
    assert "memory: needs" in done.stderr and "GiB" in done.stderr


def test_interactive_session_keeps_history_and_obeys_commands(chat_run, reference):
    lines = [ASK["en"], ASK["zh"], "/reset", ASK["zh"], "/system You are a pirate.", ASK["en"], "/nope", "/exit",
             "never asked"]
    done = chat(f"run={chat_run.path}", "max_tokens=64", stdin="\n".join(lines) + "\n")
    assert done.returncode == 0, done.stderr[-3000:]
    a1, _ = reference.generate([user(ASK["en"])])
    a2, _ = reference.generate([user(ASK["en"]), {"role": "assistant", "content": a1}, user(ASK["zh"])])
    a3, _ = reference.generate([user(ASK["zh"])])  # after /reset: a fresh conversation
    a4, _ = reference.generate([user(ASK["en"])], system="You are a pirate.")
    assert done.stdout == "".join(f"{answer}\n" for answer in (a1, a2, a3, a4))  # an answer may span lines
    assert "history cleared" in done.stderr and "unknown command /nope" in done.stderr


def test_what_to_load_is_checked_before_loading(chat_run, tmp_path):
    cases = [((), "say what to load"), ((f"run={tmp_path}",), "not a finetune run"),
             ((f"run={chat_run.path}", "backend=gguf", "quant=q5_0"), "finetune export"),
             ((f"run={chat_run.path}", "temprature=0"), "did you mean: temperature")]
    if not _importable("vllm"):
        cases.append(((f"run={chat_run.path}", "backend=vllm"), "needs vLLM"))
    for args, fragment in cases:
        done = chat(*args, "prompt=hi")
        assert done.returncode == 2 and fragment in done.stderr, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and done.stdout == ""


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.llamacpp
def test_gguf_backend_answers_as_transformers(chat_run, reference):
    pytest.importorskip("llama_cpp")
    export = subprocess.run([sys.executable, "-m", "finetune", "export", f"run={chat_run.path}", "to=gguf",
                             "quant=f16", "verify=false"], capture_output=True, text=True, timeout=900)
    assert export.returncode == 0, export.stderr[-3000:]
    for question in ASK.values():
        done = chat(f"run={chat_run.path}", "backend=gguf", "quant=f16", f"prompt={question}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout == reference.generate([user(question)])[0] + "\n"
