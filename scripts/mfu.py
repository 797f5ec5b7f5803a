"""Model FLOPs utilisation for the benchmarks: the work a training step must do, over what this device's matmuls
reach in the same dtype, measured in the same run (a datasheet peak says nothing about a shared 2-core VM, and a
measured one moves with the load the run itself sees).

FLOPs per trained token follow the usual convention (Kaplan et al.; PaLM appendix B): 2 per weight in a matmul
forward, 2 more for the gradient of the input, 2 more for the gradient of the weight — so 6N for trained weights and
4N for a frozen base under adapters — plus attention's two sequence-long matmuls, 12·layers·hidden·seq (forward and
backward, no discount for the causal mask). Embedding lookups are not matmuls and do not count; the output head
does. Recomputation under gradient checkpointing is not useful work and does not count either (that would be HFU).
"""

from __future__ import annotations

import time

import torch


def matmul_weights(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen, trained) weight elements that take part in matmuls: every Linear (bitsandbytes' too) and the
    output head, counted once even when tied to the embeddings."""
    frozen = trained = 0
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) and type(module).__name__ not in ("Linear4bit", "Linear8bitLt"):
            continue
        if weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        n = module.in_features * module.out_features
        if weight.requires_grad:
            trained += n
        else:
            frozen += n
    return frozen, trained


def flops_per_token(model: torch.nn.Module, seq: float) -> float:
    """Training FLOPs per token of a model whose sequences attend over `seq` tokens on average."""
    frozen, trained = matmul_weights(model)
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq if cfg is not None else 0
    return 4 * frozen + 6 * trained + attention


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of the best n×n matmul repetition on `device` in `dtype` (after a warm-up)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
