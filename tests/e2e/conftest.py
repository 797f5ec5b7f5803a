"""Fixtures the chat and serve tests share: one tiny run trained through the real CLI, and the answers the run's
weights give through plain transformers (the reference what `chat` and `serve` must say, token for token)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from finetune.models import chat
from finetune.rundir import RunDir

TRAIN = ("recipe=tiny_qwen2_5_demo", "data.max_samples=2", "train.max_steps=16", "train.save_steps=8",
         "train.sample_prompts=0")
"""The demo's recipe, fastest setting (test_demo.py): the tiny Qwen2.5 learns two identity answers in 16 steps,
and its checkpoint at step 8 is a second, different adapter on the same base."""


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory) -> RunDir:
    """Trained once per test session — under pytest-xdist once for all workers (the first one trains, under a
    lock in the workers' shared temporary root; the others wait and reuse it). Tests copy it before writing."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-USER/pytest-N/, above each worker's popen-gwK/
    path = root / "shared-chat-run" / "tiny-chat"
    with FileLock(str(root / "shared-chat-run.lock")):
        if not RunDir(path).summary_file.is_file():
            done = subprocess.run([sys.executable, "-m", "finetune", *TRAIN, f"output_dir={path}"],
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
    run = RunDir(path)
    assert run.has_adapter and (run.checkpoints_dir / "checkpoint-8" / "adapter_config.json").is_file()
    return run


class Reference:
    """Greedy answers of base + adapter in transformers (model.generate), prompt ids from the registry template."""

    def __init__(self, run: RunDir):
        from transformers import AutoTokenizer

        self.run, self.info = run, run.base()
        self.tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
        self.chat = chat.get(self.info.template)
        self.stops = self.chat.stop_token_ids(self.tokenizer)
        self.system = run.recipe().data.system_prompt
        self.models: dict[Path, object] = {}

    def prompt(self, messages: list[dict], system: str | None = None) -> list[int]:
        head = [{"role": "system", "content": system or self.system}]
        return self.chat.encode_prompt(self.tokenizer, head + messages)

    @torch.inference_mode()
    def generate(self, messages: list[dict], adapter: Path | None = None, max_new_tokens: int = 64,
                 system: str | None = None) -> tuple[str, list[int]]:
        """(answer text, generated ids with the stop token) for the conversation."""
        model = self._model(adapter or self.run.adapter_dir)
        ids = torch.tensor([self.prompt(messages, system)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=self.stops, pad_token_id=self.stops[0])
        new = out[0, ids.shape[1]:].tolist()
        return self.tokenizer.decode(new, skip_special_tokens=True).strip(), new

    def _model(self, adapter: Path):
        if adapter not in self.models:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(self.info.path, dtype=torch.float32)
            self.models[adapter] = PeftModel.from_pretrained(base, adapter).eval()
        return self.models[adapter]


@pytest.fixture(scope="session")
def reference(chat_run) -> Reference:
    return Reference(chat_run)
