"""The training check's harness (tests/test_based_training.py): a small Based language model trained on
multi-query associative recall (MQAR), with based_prefill's kernel or with the PyTorch reference in its place.

The task (Zoology's MQAR, Arora et al. 2023, as in the Based paper): a sequence starts with ``kv_pairs``
key-value pairs ``k1 v1 k2 v2 ...`` (keys distinct, from the lower half of the vocabulary; values from the
upper half), then queries: a key seen in the pairs, followed by its value. The loss is taken only where the
next token is a query's answer (the value): predicting it needs recall of the pair seen earlier; without
recall it is at chance, 1 / (vocab / 2). Variant: the query region is dense (every other token a query, keys
drawn with repeats) rather than a few queries among filler tokens; with the sparse layout this one-layer model
stayed at chance for 200 steps in development (reference attention: the loss sat at ln 128), with the dense
one it learns (99 % of held-out queries after 200 steps). seq_len 128 spans two of the kernel's 64-token
chunks, so later queries recall pairs through the carried state.

The model: one-hot embedding -> a short causal depthwise convolution (the Based architecture's, which lets a
value's token see the key before it) -> q, k (H x 16), v (H x 64) projections -> the attention (normalized
Based) -> output projection, residual, LayerNorm, logits. float32 parameters and activations; the attention
gets bf16 q, k, v (rounded from the float32 projections, as (B, H, N, .) strided views) and its output goes
back to float32. Only the attention differs between runs: the weights start equal and the batches are equal
(both from fixed-seed CPU generators). The other ops are deterministic (a one-hot matmul instead of an
embedding's scatter-add backward, the convolution as shifted sums), so two runs of one attention agree
exactly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from attn_kernels import reference as ref

BF16 = torch.bfloat16
IGNORE = -100  # cross_entropy's ignore_index: every position but the queries' answers
FEAT, VALUE = 16, 64


@dataclass(frozen=True)
class TrainConfig:
    vocab: int = 256
    seq_len: int = 128
    kv_pairs: int = 8
    batch: int = 64
    d_model: int = 128
    heads: int = 4
    conv: int = 3  # short convolution's width
    steps: int = 200
    lr: float = 3e-3
    weight_decay: float = 0.1
    eval_batches: int = 8
    seed: int = 0  # weights: seed; training batches: seed + 1; evaluation batches: seed + 2

    def queries(self) -> int:
        """Answers (supervised positions) per sequence."""
        return (self.seq_len - 2 * self.kv_pairs) // 2

    def as_dict(self) -> dict:
        return asdict(self)


GPU_CONFIG = TrainConfig()
# CPU: the same code path at a size the CPU suite affords (not expected to learn in 20 steps)
TINY_CONFIG = TrainConfig(vocab=64, kv_pairs=4, batch=4, d_model=32, heads=2, steps=20, eval_batches=2)


def mqar_batch(cfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets), (batch, seq_len) int64 on the CPU; targets = the answer at each query key, IGNORE
    elsewhere."""
    B, N, n, half = cfg.batch, cfg.seq_len, cfg.kv_pairs, cfg.vocab // 2
    keys = torch.rand(B, half - 1, generator=gen).argsort(-1)[:, :n] + 1  # distinct, from [1, half)
    values = torch.randint(half, cfg.vocab, (B, n), generator=gen)
    x = torch.zeros(B, N, dtype=torch.long)
    x[:, 0:2 * n:2], x[:, 1:2 * n:2] = keys, values
    which = torch.randint(0, n, (B, cfg.queries()), generator=gen)
    pos = 2 * n + 2 * torch.arange(cfg.queries())
    x[:, pos], x[:, pos + 1] = keys.gather(1, which), values.gather(1, which)
    y = torch.full((B, N), IGNORE, dtype=torch.long)
    y[:, pos] = values.gather(1, which)
    return x, y


def init_params(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """float32 CPU weights from a generator seeded cfg.seed (projections ~ PyTorch Linear's default scale)."""
    g = torch.Generator().manual_seed(cfg.seed)
    D, H = cfg.d_model, cfg.heads

    def linear(n_in, n_out):
        return torch.randn(n_in, n_out, generator=g) / math.sqrt(3 * n_in)

    return {"emb": torch.randn(cfg.vocab, D, generator=g),
            "conv": torch.randn(cfg.conv, D, generator=g) / math.sqrt(cfg.conv),
            "wq": linear(D, H * FEAT), "wk": linear(D, H * FEAT), "wv": linear(D, H * VALUE),
            "wo": linear(H * VALUE, D), "ln_w": torch.ones(D), "ln_b": torch.zeros(D),
            "head": linear(D, cfg.vocab)}


Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (B, H, N, 16/16/64) -> o


def logits(p: dict[str, torch.Tensor], x: torch.Tensor, attn: Attention, cfg: TrainConfig) -> torch.Tensor:
    B, N = x.shape
    h = F.one_hot(x, cfg.vocab).float() @ p["emb"]
    padded = F.pad(h, (0, 0, cfg.conv - 1, 0))  # causal: token t sees t - conv + 1 .. t
    mixed = h + sum(p["conv"][j] * padded[:, cfg.conv - 1 - j:cfg.conv - 1 - j + N]  # x_{t-j}
                    for j in range(cfg.conv))

    def heads(w, e):  # (B, N, H*e) -> (B, H, N, e), a strided view (as models hold it)
        return (mixed @ w).view(B, N, cfg.heads, e).transpose(1, 2)

    o = attn(heads(p["wq"], FEAT), heads(p["wk"], FEAT), heads(p["wv"], VALUE))
    out = h + o.transpose(1, 2).reshape(B, N, cfg.heads * VALUE) @ p["wo"]
    return F.layer_norm(out, (cfg.d_model,), p["ln_w"], p["ln_b"]) @ p["head"]


# ---- the attentions compared -------------------------------------------------------------------------------
def op_attention(q, k, v):
    """attn_kernels.based_prefill with bf16 q, k, v (the CUDA kernel on a GPU, the CPU op on the CPU)."""
    import attn_kernels as ak

    return ak.based_prefill(q.to(BF16), k.to(BF16), v.to(BF16)).float()


def reference_attention(dtype: torch.dtype) -> Attention:
    """reference.based_quadratic through autograd, computing in dtype from the same bf16-rounded q, k, v;
    the gradients reach the model through the bf16 cast, rounded to bf16 as the op's are."""

    def attn(q, k, v):
        q, k, v = (t.to(BF16).to(dtype) for t in (q, k, v))
        return ref.based_quadratic(q, k, v)[0].float()

    return attn


# ---- training ----------------------------------------------------------------------------------------------
@dataclass
class TrainRun:
    loss: list[float]  # training loss at each step (the step's batch, before its update)
    eval_accuracy: float  # after training, on cfg.eval_batches held-out batches
    eval_queries: int

    def as_dict(self) -> dict:
        return {"loss": self.loss, "eval_accuracy": self.eval_accuracy, "eval_queries": self.eval_queries}


def train(cfg: TrainConfig, attn: Attention, device) -> TrainRun:
    """cfg.steps AdamW steps from init_params(cfg) on the batches of a generator seeded cfg.seed + 1."""
    params = {k: t.to(device).requires_grad_() for k, t in init_params(cfg).items()}
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.steps):
        x, y = (t.to(device) for t in mqar_batch(cfg, gen))
        out = logits(params, x, attn, cfg)
        loss = F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    eval_gen = torch.Generator().manual_seed(cfg.seed + 2)
    right = total = 0
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            x, y = (t.to(device) for t in mqar_batch(cfg, eval_gen))
            mask = y != IGNORE
            right += (logits(params, x, attn, cfg).argmax(-1)[mask] == y[mask]).sum().item()
            total += mask.sum().item()
    return TrainRun(losses, right / total, total)


# ---- the agreement rule ------------------------------------------------------------------------------------
EPS_BF16 = 2.0**-7  # eps(bf16) = 2 u_bf16: one rounding step (tests/README.md, section 1)


def curve_ratio(run: list[float], ref64: list[float], lowp: list[float]) -> float:
    """max over steps of |run - ref64| / (2 max_steps |lowp - ref64| + EPS_BF16 |ref64|): <= 1 passes."""
    spread = max(abs(a - b) for a, b in zip(lowp, ref64))
    return max(abs(a - b) / (2 * spread + EPS_BF16 * abs(b)) for a, b in zip(run, ref64))


def accuracy_margin(ref64: TrainRun, lowp: TrainRun) -> float:
    """2 |acc_lowp - acc_ref64| + sqrt(2 / n): the lowp run's distance doubled, plus two standard deviations
    of the difference of two independent accuracy estimates on n queries (each <= 1 / (2 sqrt(n))); two
    models that err on the same queries differ by less."""
    return 2 * abs(lowp.eval_accuracy - ref64.eval_accuracy) + math.sqrt(2 / ref64.eval_queries)
