"""Real 2-process runs on CPU (gloo), launched the way users launch on GPUs: `accelerate launch --multi_gpu
--num_processes 2 -m finetune recipe=... distributed=ddp|zero2|zero3|zero3_offload|fsdp`, and two "nodes" on
127.0.0.1.

The traps they guard against: without `use_cpu=True` on a GPU-less machine both processes silently train alone
(world size 1 each); accelerate drops an FSDP plugin on CPU and silently trains DDP; a ZeRO-3 adapter saved from
partitioned (empty) parameters; an export that only works on a single-process run. So each run reports the engine
that actually ran (ZeRO-3 offload included), and the sharded engines must give DDP's losses and weights: same seed,
same data order, a constant learning rate (a run stopped after 2 steps and resumed to 4 then follows the same
schedule as the uninterrupted one).

What is proven, against 2-process DDP as two nodes on loopback:
- LoRA under zero2, zero3 and fsdp, stopped at step 2 and resumed to 4, and under zero3_offload (DeepSpeed's CPU
  Adam, weights and optimizer offloaded: on CPU a CPU-to-CPU move; 4 steps in one go): every step's loss within
  REL_TOL relative of DDP's, the adapter within REL_TOL (atol 1e-6) of DDP's and not empty; `finetune export
  to=merged` equals PEFT's merge of that saved adapter in this process, tensor for tensor and bit for bit, both in
  the export's 16-bit dtype (f16 for an fp32 run; a merge in fp32 rounded to f16 afterwards differs by up to
  5.7e-5, one f16 step: the export rounds the base to f16 before adding the delta).
- Full fine-tuning under zero2, zero3 and fsdp, stopped at step 2 and resumed to 4: every step's loss within
  REL_TOL of a 2-process DDP full run's, the weights within atol 1e-4 of DDP's; model/ is an ordinary checkpoint
  and its export is model/ rounded to f16, bit for bit.
- QLoRA trains under fsdp; two nodes train one run with one output_dir each (ddp) or a shared one (zero2).

Measured on CPU in fp32: every engine's step losses equal DDP's exactly and the adapters differ from DDP's by at
most 1.9e-7 (zero3, zero3_offload; zero2 1.5e-8, fsdp 0); REL_TOL leaves room for another summation order.
The first zero3_offload run on a machine compiles DeepSpeed's CPU Adam (77 s on 2 cores, then cached).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from finetune.rundir import RunDir

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
ARGS = ["data.max_samples=16", "data.val_size=0", "train.max_steps=4", "train.micro_batch=2", "train.grad_accum=1",
        "train.save_steps=2", "train.logging_steps=1", "train.sample_prompts=0", "train.scheduler=constant"]
LORA = ["recipe=tiny_qwen2_5_lora", *ARGS]
FULL = ["recipe=tiny_qwen2_5_full", *ARGS]
REL_TOL = 1e-5
ENGINE = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED zero2", "zero3": "DEEPSPEED zero3",
          "zero3_offload": "DEEPSPEED zero3 offload params+optimizer", "fsdp": "FSDP2"}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two processes on a shared 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], logs: Path, *, nodes: tuple[Path, ...] = (REPO,)) -> str:
    """`accelerate launch` of 2 processes in all, as a user runs it: on one machine, or as two machines on
    127.0.0.1 (one process each, each started in its own directory: a relative output_dir is then one per node).
    Returns what they logged, once all succeeded."""
    port, procs = free_port(), []
    for rank, cwd in enumerate(nodes):
        where = ["--num_machines", "1"] if len(nodes) == 1 else \
            ["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
        log = logs.with_name(f"{logs.name}.{rank}.log")
        procs.append((log, subprocess.Popen(
            [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", *where, "--mixed_precision", "no",
             "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "finetune", *args],
            cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD})))
    for log, proc in procs:
        assert proc.wait(timeout=580) == 0, log.read_text()[-4000:]
    return "".join(log.read_text() for log, _ in procs)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def train(root) -> Callable[..., tuple[Path, str]]:
    """train(name, *args, nodes=...) -> (run directory, log): each run once per module, shared by the tests."""
    done: dict[str, tuple[Path, str]] = {}

    def run(name: str, *args: str, nodes: tuple[Path, ...] = (REPO,)) -> tuple[Path, str]:
        if name not in done:
            done[name] = root / name, launch([*args, f"output_dir={root / name}"], root / name, nodes=nodes)
        return done[name]

    return run


@pytest.fixture(scope="module")
def ddp(root) -> tuple[Path, str]:
    """The reference: 2-process DDP, as two machines on 127.0.0.1 with one output_dir per node (relative, each node
    in its own directory, as machines without a shared filesystem)."""
    nodes = (root / "node0", root / "node1")
    for node in nodes:
        node.mkdir()
    return nodes[0] / "runs" / "ddp", launch([*LORA, "distributed=ddp", "output_dir=runs/ddp"], root / "ddp",
                                             nodes=nodes)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * abs(b)


def safetensors(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


def export_merged(out: Path) -> dict[str, torch.Tensor]:
    """`finetune export run=... to=merged`, as a user runs it after training (one process, no engine): the merged
    16-bit checkpoint's tensors."""
    done = subprocess.run([sys.executable, "-m", "finetune", "export", f"run={out}", "to=merged"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert done.returncode == 0, done.stderr[-3000:]
    return safetensors(RunDir(out).export_dir("merged"))


def test_two_nodes_on_loopback_train_one_run_and_only_global_rank0_writes(ddp):
    out, log = ddp
    got = summary(out)
    assert got["world_size"] == 2
    ranks = got["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    assert all(r["global_step"] == 4 and r["engine"] == "MULTI_CPU" for r in ranks)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # one writer: every step logged once
    # 4 steps x 2 examples x 2 ranks = all 16 examples once: each rank took its own share of the data
    assert rows[-1]["epoch"] == pytest.approx(1.0)
    assert list(out.parent.iterdir()) == [out]  # one run directory, not one per process
    assert (out / "checkpoints" / "checkpoint-2" / "rng_state_0.pth").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()
    # node 1 keeps only what the Trainer saves per rank (its RNG state, for resume); rank 0 wrote everything else
    node1 = out.parents[2] / "node1" / "runs" / "ddp"
    assert sorted(p.relative_to(node1).as_posix() for p in node1.rglob("*") if p.is_file()) == \
        [f"checkpoints/checkpoint-{step}/rng_state_1.pth" for step in (2, 4)]
    assert "2 process(es) on cpu (gloo)" in log and "already holds a run" not in log


def test_two_nodes_sharing_one_output_dir_train_zero2_together(train, root, ddp):
    """A shared filesystem, as on most clusters: node 1 must not find node 0's fresh run directory and refuse it."""
    out, log = train("zero2-nodes", *LORA, "distributed=zero2", nodes=(REPO, REPO))
    got = summary(out)
    assert [r["engine"] for r in got["ranks"]] == ["DEEPSPEED zero2"] * 2 and got["global_step"] == 4
    assert [p.name for p in root.iterdir() if p.is_dir() and "zero2" in p.name] == [out.name]  # one, none aside
    assert "already holds a run" not in log
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    want = step_losses(ddp[0])
    assert all(close(loss, want[step]) for step, loss in step_losses(out).items())


@pytest.mark.parametrize("engine", ["zero2", "zero3", "zero3_offload", "fsdp"])
def test_sharded_engine_trains_lora_resumes_matches_ddp_and_exports_its_merge(engine, train, ddp):
    """2 steps, then `resume=` to 4 from the step-2 checkpoint (zero3_offload, not asked to resume: 4 steps in one
    go, a launch less for the suite's time): DDP's losses and adapter, and a merged export that is the
    single-process merge of that adapter."""
    resumes = engine != "zero3_offload"
    out, _ = train(f"{engine}-lora", *LORA, f"distributed={engine}", *(["train.max_steps=2"] if resumes else []))
    if summary(out)["global_step"] == 2:  # not resumed yet in this module
        launch([*LORA, f"distributed={engine}", f"resume={out}"], out.with_name(f"{out.name}-resumed"))
    got = summary(out)
    assert got["global_step"] == 4
    if resumes:
        assert got["resumed_from"].endswith("checkpoint-2")
    assert [r["engine"] for r in got["ranks"]] == [ENGINE[engine]] * 2
    want = step_losses(ddp[0])
    assert sorted(step_losses(out)) == [1, 2, 3, 4]
    assert all(close(loss, want[step]) for step, loss in step_losses(out).items()), (step_losses(out), want)

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    reference = load_file(ddp[0] / "adapter" / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(reference) and all(t.numel() for t in adapter.values())  # ZeRO-3: gathered
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, reference[name], rtol=REL_TOL, atol=1e-6)
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at zero: it trained

    # the export equals PEFT's own merge of the saved adapter in this process (no engine), in the export's 16-bit
    # dtype (the run is fp32: f16), bit for bit; and the adapter moved the weights the export holds
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported, base_dir = export_merged(out), RunDir(out).base().directory
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16)
    merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload().state_dict()
    assert sorted(exported) == sorted(merged)
    for name, tensor in exported.items():
        assert torch.equal(tensor, merged[name]), name
    start = safetensors(base_dir)
    assert any(not torch.equal(tensor, start[name].to(tensor.dtype)) for name, tensor in exported.items())


FULL_ENGINES = ("zero2", "zero3", "fsdp")


@pytest.fixture(scope="module")
def ddp_full(train) -> Path:
    """The full fine-tuning reference: 2-process DDP on one machine, 4 steps uninterrupted."""
    return train("ddp-full", *FULL, "distributed=ddp")[0]


@pytest.fixture(scope="module")
def full_runs(train) -> dict[str, Path]:
    """Each engine's full fine-tune: 2 steps, then `resume=` to 4 from the step-2 checkpoint (the engine's own
    sharded optimizer state: DeepSpeed's partitions, FSDP's sharded state dict)."""
    runs = {}
    for engine in FULL_ENGINES:
        out, _ = train(f"{engine}-full", *FULL, f"distributed={engine}", "train.max_steps=2")
        if summary(out)["global_step"] == 2:  # not resumed yet in this module
            launch([*FULL, f"distributed={engine}", f"resume={out}"], out.with_name(f"{out.name}-resumed"))
        runs[engine] = out
    return runs


@pytest.mark.parametrize("engine", FULL_ENGINES)
def test_sharded_full_fine_tune_resumes_matches_ddp_and_exports_its_checkpoint(engine, full_runs, ddp_full):
    """Stopped at 2 and resumed to 4: DDP's step losses and weights; model/ (written from sharded state under ZeRO-3
    and FSDP) is an ordinary transformers checkpoint, and its export is model/ rounded to f16, bit for bit."""
    from transformers import AutoModelForCausalLM

    out = full_runs[engine]
    got = summary(out)
    assert got["resumed_from"].endswith("checkpoint-2") and got["global_step"] == 4
    assert [r["engine"] for r in got["ranks"]] == [ENGINE[engine]] * 2
    want = step_losses(ddp_full)
    assert sorted(step_losses(out)) == [1, 2, 3, 4]
    assert all(close(loss, want[step]) for step, loss in step_losses(out).items()), (step_losses(out), want)
    mine = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    start = AutoModelForCausalLM.from_pretrained(json.loads((out / "base.json").read_text())["path"]).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(ddp_full / "model").state_dict()
    assert all(mine[name].shape == start[name].shape for name in start)  # whole tensors, not shards
    assert any(not torch.equal(mine[name], start[name]) for name in start)  # it trained
    # Adam's step is ~lr whatever the gradient's size, so where a gradient is near zero its last bits (summation
    # order) move the step: measured 1.8e-5 on 2 of 9.7M embedding weights that moved up to 4 x lr = 8e-3. The
    # engines must agree with DDP to ~1% of that movement.
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor, reference[name], rtol=REL_TOL, atol=1e-4)

    # a full model's "merge" is the checkpoint itself: the export holds model/'s weights, rounded to f16 once
    exported, saved = export_merged(out), safetensors(out / "model")
    assert sorted(exported) == sorted(saved)
    for name, tensor in exported.items():
        assert torch.equal(tensor, saved[name].to(tensor.dtype)), name


def test_qlora_trains_under_fsdp_with_4_bit_storage_in_the_compute_dtype(train):
    """FSDP shards the 4-bit weights as a float tensor: bnb_4bit_quant_storage is the compute dtype when the engine
    shards weights (train/model.py), so FSDP has no integer tensor to flatten."""
    out, _ = train("fsdp-qlora", "recipe=tiny_qwen2_5_qlora", *ARGS, "distributed=fsdp")
    got = summary(out)
    assert [r["engine"] for r in got["ranks"]] == ["FSDP2"] * 2 and got["global_step"] == 4
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)
