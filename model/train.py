"""Train the built-in Parcae on the running interpreter's own standard library, on the CPU.

    python -m parcae_serve.model.train --minutes 60 --out model/builtin/parcae-stdlib

Corpus: every `.py` file of the stdlib (no site-packages), split by file into train / held-out.
Tokenizer: byte-level BPE trained on the train split. Length curriculum: most of the run uses
short windows (`short_seq`, 256) in larger batches (in a 14-minute A/B, 16 x 256 was 0.66 nats
ahead of 4 x 1024, bench/RESULTS.md); the last `long_fraction` of the time uses windows as long
as the context the server advertises (`seq` = `block_size`, 1024), so served positions are
trained positions.

Depth is drawn per sequence, as in the paper, from a log-normal Poisson (Huginn's sampler,
Geiping et al. 2025, arXiv 2502.05171 sec. 3.3: tau ~ N(log mu - sigma^2/2, sigma),
T ~ Poisson(e^tau), here clipped to [1, 4 mu]), and a `deep_fraction` of sequences drawn
uniformly from [mu, 4 mu]: that tail puts enough mass at deep T that the model learns to hold
its state there instead of drifting. A settling penalty (`settle_weight`) adds, for sequences at
least mu deep, the last loop's relative state change |h_T - h_(T-1)|^2 / |h_T|^2 to the loss, so
the recurrence converges to a fixed point (a saturating depth curve) rather than creeping on
(the change per loop of a model trained without it decays only about like T^-1.3). Only the last
`backprop_depth` loops of each sequence are differentiated (truncated backprop). Sequences are
run right-aligned (every one ends on the same loop) and sorted deepest first, so each loop runs
only the rows still looping: a batch costs the sum of its depths, not its maximum.

The learning-rate schedule runs on wall-clock time, so the run ends on time whatever the
machine's speed.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.model.depth_curve import fit_saturating_law
from parcae_serve.model.loading import save_checkpoint
from parcae_serve.model.parcae import CausalContext, Parcae
from parcae_serve.model.tokenizer import Tokenizer

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]  # ids 0 / 1 / 2, as the released tokenizer reports


@dataclass
class TrainSettings:
    out: Path
    minutes: float = 60.0
    vocab: int = 4096
    d: int = 256
    heads: int = 4
    prelude: int = 1
    recurrent: int = 2
    coda: int = 1
    mu_rec: int = 6
    backprop_depth: int = 3
    depth_sigma: float = 0.5  # log-normal spread of the per-sequence depth (0: plain Poisson)
    max_depth: int = 24  # 4 * mu_rec
    deep_fraction: float = 0.5  # sequences whose depth is uniform in [mu_rec, max_depth]
    settle_weight: float = 20.0  # weight of the last loop's state change, rows >= mu_rec deep
    seq: int = 1024
    batch: int = 4
    short_seq: int = 256  # window length of the curriculum's first phase
    short_batch: int = 16
    long_fraction: float = 0.2  # last fraction of the time trained at `seq`
    lr: float = 2e-3
    heldout_fraction: float = 0.05
    eval_tokens: int = 32_768
    seed: int = 0
    threads: int = 2


@functools.cache
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's .py files, sorted; site-packages (gigabytes of installed
    packages in many set-ups) is pruned from the walk, not walked and filtered."""
    found = []
    for directory, subdirectories, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subdirectories[:] = [d for d in subdirectories if d != "site-packages"]
        found.extend(Path(directory) / n for n in names if n.endswith(".py"))
    return tuple(sorted(found))


def is_heldout(path: Path, fraction: float) -> bool:
    """A stable per-file split: the same files are held out on every machine."""
    digest = hashlib.sha256(path.name.encode() + str(path.parent.name).encode()).digest()
    return digest[0] / 256 < fraction


def read_texts(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def train_tokenizer(texts: list[str], vocab: int) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def write_tokenizer_files(directory: Path, context: int) -> None:
    """Make `directory/tokenizer.json` what Hugging Face tools expect beside a checkpoint: a
    post-processor that starts every encoding with BOS (as the server does), and a
    tokenizer_config.json naming bos/eos/pad, add_bos_token and the context length."""
    path = directory / "tokenizer.json"
    tok = HFTokenizer.from_file(str(path))
    bos, eos, pad = SPECIALS
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B:1",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )
    tok.save(str(path))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_corpus(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents joined as BOS text EOS, matching how the server prompts (BOS first)."""
    ids: list[int] = []
    for enc in tok.tok.encode_batch(texts, add_special_tokens=False):
        ids += [tok.bos_id, *enc.ids, tok.eos_id]
    return torch.tensor(ids, dtype=torch.long)


def model_config(s: TrainSettings, vocab_size: int) -> ParcaeConfig:
    n_layers = s.prelude + s.recurrent + s.coda
    return ParcaeConfig(
        block_size=max(1024, s.seq),
        vocab_size=vocab_size,
        padding_multiple=64,
        n_embd=s.d,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        intermediate_size=4 * s.d,
        n_layers_in_prelude=s.prelude,
        n_layers_in_recurrent_block=s.recurrent,
        n_layers_in_coda=s.coda,
        mean_recurrence=s.mu_rec,
        mean_backprop_depth=s.backprop_depth,
        value_embed_layers=list(range(n_layers)),
    )


def init_weights(model: Parcae, seed: int) -> None:
    """Small normal init, zero output projections (the residual stream starts as identity)."""
    g = torch.Generator().manual_seed(seed)
    d = model.cfg.n_embd
    for name, p in model.named_parameters():
        if name.endswith(("c_proj.weight", "mlp.proj.weight")):
            torch.nn.init.zeros_(p)
        elif name.endswith("norm_1.weight") or name.endswith("norm_2.weight") or "ln_" in name:
            torch.nn.init.ones_(p)
        elif name.endswith("A_log"):
            p.data.copy_(torch.log(torch.empty_like(p).uniform_(1, 16, generator=g)))
        elif name.endswith("dt_bias"):
            dt = torch.exp(
                torch.empty_like(p).uniform_(math.log(1e-3), math.log(1e-1), generator=g)
            )
            p.data.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif name.endswith("ve_gate.weight"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, 0.0, 1.0 / math.sqrt(d) if p.dim() > 1 else 0.02, generator=g)


def sample_depths(
    mu: int, sigma: float, cap: int, deep: float, n: int, g: torch.Generator
) -> list[int]:
    """`n` per-sequence depths: a log-normal Poisson with mean `mu` clipped to [1, cap], except a
    fraction `deep` (in expectation) drawn uniformly from [mu, cap]."""
    tau = torch.randn(n, generator=g) * sigma + (math.log(mu) - sigma**2 / 2)
    body = torch.poisson(tau.exp(), generator=g).long().clamp(1, cap)
    tail = torch.randint(mu, cap + 1, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < deep, tail, body).tolist()


def forward_per_sequence(
    model: Parcae, ids: torch.Tensor, depths: list[int], g: torch.Generator, backprop: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward where row i loops `depths[i]` times; returns (logits, row order, last
    loop's relative state change per row: mean over positions of |h_T - h_{T-1}|^2 / |h_T|^2).

    Rows are sorted deepest first and right-aligned, so at loop t the rows still looping are a
    prefix h[:n_t]; the last `backprop` loops (the same for every row) carry gradients."""
    order = torch.tensor(depths).argsort(descending=True, stable=True)
    ids = ids[order]
    depth = torch.tensor(depths)[order]
    B, L = ids.shape
    positions = torch.arange(L).expand(B, L)
    rots, ctx = model.rotations(positions), CausalContext()
    e = model.prelude(ids, rots, ctx)
    prepared = model.transformer["adapter"].prepare(e)
    h = model.initial_state(B, L, [g] * B, e)
    deepest = int(depth[0])
    for t in range(deepest):
        n = int((depth >= deepest - t).sum())
        with torch.set_grad_enabled(t >= deepest - backprop):
            part = {hd: r[:n] for hd, r in rots.items()}
            stepped = model.core(h[:n], prepared[:n], ids[:n], part, ctx, t)
        if t == deepest - 1:  # every row takes the last loop
            change = (stepped - h).square().sum(-1) / stepped.square().sum(-1).clamp_min(1e-6)
        h = stepped if n == B else torch.cat([stepped, h[n:]])
    return model.coda(h, ids, rots, ctx), order, change.mean(-1)


def settle_penalty(change: torch.Tensor, depths: torch.Tensor, s: TrainSettings) -> torch.Tensor:
    """Mean last-loop state change of the rows at least mu_rec deep (0 if none).

    The earlier recipe's state change per loop decays only about like t^-1.3 (|h_t - h_(t-1)|
    measured on v1: 9.4% of |h| at loop 6, 3.8% at 12, 1.5% at 24), so h keeps moving past mu
    and the coda reads a state it was not trained on: the NLL drift at 2mu and 4mu. Penalising
    the change once a row is mu deep pushes the recurrence toward a fixed point, a saturating
    curve. (The ratio's denominator is differentiated too, as the built-in model was trained.)"""
    deep = depths >= s.mu_rec
    return change[deep].mean() if bool(deep.any()) else change.sum() * 0


@torch.no_grad()
def heldout_loss(model: Parcae, data: torch.Tensor, depth: int, seq: int, tokens: int) -> float:
    """Mean next-token NLL over the first `tokens` held-out tokens, fixed seed for h_0."""
    model.eval()
    n = min(tokens // seq, (len(data) - 1) // seq)
    x = data[: n * seq].view(n, seq)
    y = data[1 : n * seq + 1].view(n, seq)
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for i in range(0, n, 16):
        logits = model(x[i : i + 16], depth, g)
        total += F.cross_entropy(
            logits.flatten(0, 1), y[i : i + 16].flatten(), reduction="sum"
        ).item()
    model.train()
    return total / (n * seq)


def lr_at(frac: float, peak: float) -> float:
    warm = 0.03
    if frac < warm:
        return peak * frac / warm
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm)))))


def window_shape(s: TrainSettings, frac: float) -> tuple[int, int]:
    """(window length, batch) at fraction `frac` of the run: short windows first, then `seq`."""
    return (s.seq, s.batch) if frac >= 1 - s.long_fraction else (s.short_seq, s.short_batch)


def train(s: TrainSettings) -> None:
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    files = stdlib_files()
    train_files = [p for p in files if not is_heldout(p, s.heldout_fraction)]
    held_files = [p for p in files if is_heldout(p, s.heldout_fraction)]
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    log(f"corpus: {len(train_files)} train files, {len(held_files)} held-out files")

    s.out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(train_texts, s.vocab).save(str(s.out / "tokenizer.json"))
    write_tokenizer_files(s.out, max(1024, s.seq))
    tok = Tokenizer.from_dir(s.out)
    train_ids, held_ids = encode_corpus(tok, train_texts), encode_corpus(tok, held_texts)
    log(f"tokens: {len(train_ids):,} train, {len(held_ids):,} held-out")

    cfg = model_config(s, tok.vocab_size)
    model = Parcae(cfg)
    init_weights(model, s.seed)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(s.seed)
    start, step, seen, curve = time.time(), 0, 0, []
    budget = s.minutes * 60
    while (elapsed := time.time() - start) < budget:
        for group in opt.param_groups:
            group["lr"] = lr_at(elapsed / budget, s.lr)
        seq, batch = window_shape(s, elapsed / budget)
        starts = torch.randint(0, len(train_ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([train_ids[i : i + seq] for i in starts])
        y = torch.stack([train_ids[i + 1 : i + seq + 1] for i in starts])
        depths = sample_depths(s.mu_rec, s.depth_sigma, s.max_depth, s.deep_fraction, batch, g)
        logits, order, change = forward_per_sequence(model, x, depths, g, s.backprop_depth)
        nll = F.cross_entropy(logits.flatten(0, 1), y[order].flatten())
        settle = settle_penalty(change, torch.tensor(depths)[order], s)
        loss = nll + s.settle_weight * settle if s.settle_weight else nll
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, seen = step + 1, seen + x.numel()
        if step % 50 == 0:
            log(
                f"step {step} tokens {seen:,} T={depths} loss {nll.item():.4f}"
                f" settle {settle.item():.4f} {elapsed / 60:.1f}m"
            )
        if step % 250 == 0:
            probe = (1, s.mu_rec, 4 * s.mu_rec)
            pair = {t: heldout_loss(model, held_ids, t, s.seq, 8192) for t in probe}
            curve.append({"step": step, "tokens": seen, **{f"T{t}": v for t, v in pair.items()}})
            log(f"held-out (8k tokens) {pair}")

    train_minutes = round((time.time() - start) / 60, 1)
    save_checkpoint(model, s.out, dtype=torch.bfloat16)
    table = loss_table(model, held_ids, s)
    log(f"held-out loss by depth and context: {table}")
    save_checkpoint(model, s.out, dtype=torch.bfloat16)
    report = {
        "steps": step,
        "train_tokens": seen,
        "minutes": train_minutes,
        "train_files": len(train_files),
        "heldout_files": len(held_files),
        "heldout_tokens": min(s.eval_tokens, len(held_ids)),
        "eval_contexts": list(table),
        "loss_by_depth": {str(t): round(v, 4) for t, v in table[s.seq].items()},
        "loss_by_depth_and_context": {
            str(c): {str(t): round(v, 4) for t, v in row.items()} for c, row in table.items()
        },
        "fit": fit_saturating_law(list(table[s.seq]), list(table[s.seq].values())),
        "curve_during_training": curve,
        "settings": {k: str(v) for k, v in vars(s).items()},
    }
    (s.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log("saved", s.out)


def loss_table(model: Parcae, held: torch.Tensor, s: TrainSettings) -> dict[int, dict[int, float]]:
    """Held-out NLL at T = 1, 2, 4, mu, 2mu, 4mu, 8mu over the same tokens cut into windows of
    256 and of the trained length: {context: {T: nll}}. Evaluated from the bf16 weights that ship."""
    shipped = Parcae(model.cfg)
    shipped.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    depths = sorted({1, 2, 4, s.mu_rec, 2 * s.mu_rec, 4 * s.mu_rec, 8 * s.mu_rec})
    contexts = sorted({256, s.seq})
    return {
        c: {t: heldout_loss(shipped, held, t, c, s.eval_tokens) for t in depths} for c in contexts
    }


def log(*args: object) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    defaults = TrainSettings(out=Path("model/builtin/parcae-stdlib"))
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    train(TrainSettings(**vars(parser.parse_args())))


if __name__ == "__main__":
    main()
