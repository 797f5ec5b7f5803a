"""A training run's lifecycle, shared by every stage (sft.py, dpo.py): what happens before and after the trainer.

    start()          ranks, the memory estimate (refuses before any weight is read), the model's local
                     directory, the run directory (new, or the one being resumed), base.json, estimate.json
    trainer_args()   the TRL config (SFTConfig / DPOConfig) from the recipe
    before_samples() held-out prompts answered by the untrained model
    finish()         train (or resume), evaluate, save adapter or full model + tokenizer, summary, report.md

`python -m finetune recipe=X` runs one process; `accelerate launch -m finetune recipe=X` (or torchrun) runs the
same code once per process: only rank 0 writes, everyone trains. Rank 0 holds the run directory's lock from
start() to the end of finish() (rundir.Claim). `discarded_on_failure` removes a new run's directory when it fails
before training, and puts back the run it replaced (overwrite=true moves the old run aside; it is deleted only once
the new one has started training).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import PartialState
from rich.console import Console
from transformers import set_seed
from transformers.trainer_callback import ProgressCallback

from finetune import atomic, config, kernels, rundir
from finetune.config import Recipe, to_yaml
from finetune.engines import ENGINES
from finetune.errors import UserError, WontFitError
from finetune.estimate import gpu
from finetune.estimate.report import estimate_report
from finetune.models import chat, gguf_base, hub, registry
from finetune.models.hub import ResolvedModel
from finetune.models.registry import ModelSpec
from finetune.plan import OPTIMIZERS
from finetune.rundir import RunDir
from finetune.runfiles import RunBase
from finetune.schema import trains_weights
from finetune.train import callbacks, distributed, report
from finetune.train.distributed import Launch
from finetune.train.model import LORA_INIT, converts_init, lora_plus

GIB = 2**30

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "*.tiktoken",
                   "vocab.json", "merges.txt")


@dataclass
class Session:
    """Everything decided before training starts, shared by every rank."""

    recipe: Recipe
    launch: Launch
    spec: Optional[ModelSpec]
    model: ResolvedModel
    run: RunDir
    checkpoint: Optional[Path]  # resume from here
    estimate: dict[str, Any]
    console: Console
    started: float
    claim: Optional[rundir.Claim]  # rank 0's lock on the run directory (None on the other ranks)
    trust_remote_code: bool = False  # --trust-remote-code: transformers may run the model repository's code

    @property
    def template(self) -> str:
        if self.spec is None:
            raise UserError(f"model {self.recipe.model} is not a known family, so its chat format is unknown; "
                            f"use a registry model (`finetune list models`)")
        return self.spec.family.template


def start(recipe: Recipe, *, force: bool, trust_remote_code: bool = False) -> Session:
    """Everything that can refuse a run happens here, before a single weight is read."""
    started = time.monotonic()
    where = distributed.launch(recipe)
    distributed.check(recipe, where)
    if refused := kernels.problem(recipe, gpu=not where.use_cpu and torch.cuda.is_available()):
        raise UserError(refused)
    console = Console(stderr=True, highlight=False, quiet=not where.is_main, soft_wrap=True)  # paths copied whole
    spec = gguf_base.named(recipe.model).spec if gguf_base.is_gguf(recipe.model) \
        else registry.spec(recipe.model, recipe.variant) if recipe.model in registry.models() else None
    estimate = on_main(where, lambda: check_fit(recipe, spec, where, force)) if spec else None
    with PartialState().local_main_process_first():  # one download/conversion per machine
        model = hub.resolve(recipe, progress=where.is_main)
    if estimate is None:  # a hub id or directory: its config is here now, still no weight is loaded
        spec = model.spec
        estimate = on_main(where, lambda: check_fit(recipe, spec, where, force))
    claims: list[rundir.Claim] = []

    def claim_run_dir() -> tuple[Path, Optional[Path]]:
        claimed, checkpoint = open_run_dir(recipe)
        claims.append(claimed)
        return claimed.run.path, checkpoint

    run_dir, checkpoint = on_main(where, claim_run_dir)
    session = Session(recipe, where, spec, model, RunDir(run_dir), checkpoint, estimate, console, started,
                      claims[0] if claims else None, trust_remote_code)
    if where.is_main:
        try:
            session.run.write_base(base_info(recipe, spec, model))
            atomic.write_json(session.run.estimate_file, estimate)
        except BaseException:
            session.claim.failed()
            raise
        report.announce(session)
        if trust_remote_code:
            console.print("[bold yellow]remote code[/] --trust-remote-code: transformers may run Python files from the "
                          "model's repository")
    set_seed(recipe.seed)
    return session


@contextmanager
def discarded_on_failure(session: Session) -> Iterator[None]:
    """A new run that fails before its first step (a broken data line, weights that will not load) leaves no
    directory behind: it holds only what start() just wrote, and the run it replaced comes back. A resumed run is
    never touched. Past this point the replaced run is deleted."""
    try:
        yield
    except BaseException:
        if session.claim is not None:
            session.claim.failed()
        raise
    if session.claim is not None:
        session.claim.started()


def on_main(where: Launch, work) -> Any:
    """Run `work` on rank 0 only and give every rank its result — or its UserError, so no rank waits forever."""
    outcome: Any = None
    if where.is_main:
        try:
            outcome = work()
        except UserError as exc:
            outcome = exc
    outcome = where.share(outcome)
    if isinstance(outcome, UserError):
        raise outcome
    return outcome


def check_fit(recipe: Recipe, spec: Optional[ModelSpec], where: Launch, force: bool) -> dict[str, Any]:
    """`finetune estimate`'s verdict for the processes actually launched; a refusal names the cheapest fixes."""
    if spec is None:
        return {"fits": None, "verdict": f"{recipe.model} is not in the registry: no memory estimate"}
    planned = config.with_overrides(recipe, [f"num_gpus={where.world_size}"])
    estimate = estimate_report(planned, spec, [] if where.use_cpu else gpu.detect(), gpu_mem=recipe.gpu_mem)
    estimate["forced"] = bool(force and estimate["fits"] is False)
    if estimate["fits"] is False and not force:
        fixes = "; ".join(f"{s['change']} → {s['peak_bytes'] / GIB:.1f} GiB" for s in estimate["suggestions"][:3])
        raise WontFitError(f"{spec.name} method={recipe.method}: {estimate['verdict']}. "
                           f"{f'Try: {fixes}. ' if fixes else ''}`finetune recipe=... --dry-run` shows the "
                           f"breakdown and every suggestion; --force starts anyway")
    return estimate


def open_run_dir(recipe: Recipe) -> tuple[rundir.Claim, Optional[Path]]:
    """(the run directory, locked; checkpoint to resume from): a new run, or the run `resume=` names (auto: the
    newest unfinished run of this recipe, else a new one). Lines a killed run logged after its checkpoint are
    dropped."""
    target = resume_target(recipe)
    if target is None:
        return rundir.claim(recipe), None
    checkpoint = target.last_checkpoint()
    if checkpoint is None:
        raise UserError(f"resume={recipe.resume}: {target.path} has no complete checkpoint yet (one is saved every "
                        f"train.save_steps={recipe.train.save_steps} steps and on Ctrl-C); start a new run instead")
    held = rundir.RunLock(target.path, "train (resumed)")  # a run still training is refused here
    atomic.write_text(target.recipe_file, to_yaml(recipe))
    callbacks.keep_metrics_until(target.metrics_file, int(checkpoint.name.split("-")[-1]))
    return rundir.Claim(target, held, new=False), checkpoint


def resume_target(recipe: Recipe) -> Optional[RunDir]:
    if not recipe.resume:
        return None
    if recipe.resume != "auto":
        return rundir.open_run(recipe.resume)
    if recipe.output_dir:
        candidates = [Path(recipe.output_dir)]
    else:
        prefix = rundir.default_output_dir(recipe).name.rsplit("-", 2)[0]
        candidates = sorted(Path("outputs").glob(f"{prefix}-*"), reverse=True)  # timestamps sort by time
    for path in candidates:
        found = RunDir(path)
        if rundir.is_run(path) and found.last_checkpoint() and not found.summary_file.is_file():
            return found
    return None


def base_info(recipe: Recipe, spec: Optional[ModelSpec], model: ResolvedModel) -> RunBase:
    """base.json: what export needs to find and format the base model again."""
    return RunBase(path=str(model.path), source=model.source, model=spec.name if spec else recipe.model,
                   variant=spec.variant.name if spec else None, family=spec.family.name if spec else None,
                   template=spec.family.template if spec else None,
                   native_class=spec.native_class if spec else None, method=recipe.method)


def trainer_args(config_class: type, session: Session, *, has_eval: bool, **extra: Any):
    """The TRL config (SFTConfig / DPOConfig) from the recipe: every knob a practitioner tunes, in one place.

    report_to=tensorboard logs under <run>/checkpoints/runs/ (or $TENSORBOARD_LOGGING_DIR); report_to=wandb
    follows wandb's own settings (WANDB_PROJECT, WANDB_DIR, WANDB_MODE=offline without an account)."""
    recipe, t = session.recipe, session.recipe.train
    return config_class(
        output_dir=str(session.run.checkpoints_dir), run_name=session.run.path.name,
        seed=recipe.seed, data_seed=recipe.seed,
        learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio,
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch, per_device_eval_batch_size=t.micro_batch,
        gradient_accumulation_steps=t.grad_accum,
        bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        optim=OPTIMIZERS[t.optimizer], weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no", eval_steps=t.eval_steps or t.save_steps,
        report_to=recipe.report_to, remove_unused_columns=False, neftune_noise_alpha=t.neftune_alpha,
        use_liger_kernel=t.kernels == "liger",
        **{"gradient_checkpointing": t.gradient_checkpointing,  # FSDP turns it off: it checkpoints itself
           **distributed.trainer_kwargs(recipe, session.launch), **extra})


def before_samples(session: Session, model: torch.nn.Module, tokenizer: Any, splits: Any) -> list[report.Sample]:
    """Held-out prompts answered by the untrained model (rank 0; skipped when an engine shards the weights)."""
    if not session.launch.is_main or ENGINES[session.recipe.distributed].shards_weights:
        return []
    samples = report.held_out(splits, session.recipe.train.sample_prompts)
    report.generate(model, tokenizer, samples, stop_ids(session, tokenizer), "before")
    return samples


def stop_ids(session: Session, tokenizer: Any) -> list[int]:
    return chat.get(session.template).stop_token_ids(tokenizer)


def finish(session: Session, trainer: Any, samples: list[report.Sample]) -> RunDir:
    """Train (or resume), evaluate, save the weights and tokenizer, write summary.json and report.md; the run's
    lock is released however it ends."""
    try:
        return _finish(session, trainer, samples)
    finally:
        if session.claim is not None:
            session.claim.lock.release()


def _finish(session: Session, trainer: Any, samples: list[report.Sample]) -> RunDir:
    run, where = session.run, session.launch
    stop, peak = callbacks.GracefulStop(), callbacks.PeakMemory()
    for callback in (stop, peak, callbacks.MetricsLog(run.metrics_file)):
        trainer.add_callback(callback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(callbacks.Progress(session.estimate.get("peak_bytes")))
    distributed.engage(session.recipe, trainer, where)
    report.announce_model(session.console, trainer)
    lora_plus(session, trainer)
    if converts_init(session.recipe) and where.is_main:
        trainer.model.save_pretrained(str(run.path / LORA_INIT))  # the adapter as initialised, before any step
    result = trainer.train(resume_from_checkpoint=str(session.checkpoint) if session.checkpoint else None)
    if stop.interrupted and trainer.state.global_step < trainer.state.max_steps:
        session.console.print(f"[yellow]stopped[/] at step {trainer.state.global_step}, checkpoint saved; continue "
                              f"with: finetune recipe={run.recipe_file} resume={run.path}",
                              soft_wrap=True)  # one line however long the paths: it is copied as a command
        raise KeyboardInterrupt
    if trainer.eval_dataset is not None and not any(
            "eval_loss" in row and row.get("step") == trainer.state.global_step for row in trainer.state.log_history):
        trainer.evaluate()
    weights = save_weights(session, trainer)
    if where.is_main and samples:
        report.generate(trainer.model, trainer.processing_class, samples, stop_ids(session, trainer.processing_class),
                        "after")
    summary = report.summarize(session, trainer, result.metrics, peak.peak,
                               where.gather(distributed.rank_info(trainer)), weights)
    if where.is_main:
        run.write_summary(summary)
        report.write(run, summary, samples, trainer.processing_class)
        report.say_goodbye(session.console, summary, run)
    where.barrier()
    return run


def save_weights(session: Session, trainer: Any) -> Path:
    """adapter/ (LoRA, QLoRA) or model/ (full), with the base's own tokenizer files; appears complete or not at all.

    Every rank calls save_model (ZeRO-3 and FSDP gather the shards for it); only rank 0 writes."""
    run, where = session.run, session.launch
    final = run.model_dir if trains_weights(session.recipe.method) else run.adapter_dir
    tmp = on_main(where, lambda: atomic.temp_path(final))  # rank 0's name for all: each rank saves its part there
    try:
        if converts_init(session.recipe):
            # PiSSA / OLoRA changed the base in memory: save the adapter as (trained - initial) in rank 2r, which
            # applies to the ORIGINAL base, so merge and every adapter loader see an ordinary LoRA adapter
            trainer.model.save_pretrained(str(tmp), is_main_process=where.is_main,
                                          path_initial_model_for_weight_conversion=str(run.path / LORA_INIT))
        else:
            trainer.save_model(str(tmp))
        if where.is_main:
            shutil.rmtree(tmp / "ref", ignore_errors=True)  # DPO's frozen reference copy of the adapter
            copy_tokenizer(session.model.path, tmp)
            shutil.rmtree(final, ignore_errors=True)  # a resumed run trained further than its first finish
            os.replace(tmp, final)
    except BaseException:
        if where.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    where.barrier()
    return final


def copy_tokenizer(base: Path, dst: Path) -> None:
    """The base model's own tokenizer files, in place of what the trainer saved: TRL sets a pad token on the
    tokenizer it is given, and export must see the tokenizer the base ships (incl. its original files)."""
    for pattern in TOKENIZER_FILES:
        for path in dst.glob(pattern):
            path.unlink()
    for pattern in TOKENIZER_FILES:
        for path in base.glob(pattern):
            shutil.copy2(path, dst / path.name)
