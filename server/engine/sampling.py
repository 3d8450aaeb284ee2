"""Engine sampling parameters and batched sampling over the logits of one step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def is_greedy(temperature: float) -> bool:
    """Whether a temperature means argmax (as vLLM: tinier temperatures only overflow)."""
    return temperature < 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per sampled token
    prompt_logprobs: int | None = None  # score the prompt (echo)
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


def banned_before_min_tokens(
    stop_ids: list[int], eos_id: int | None, ignore_eos: bool
) -> list[int]:
    """The tokens a sequence may not sample until it has min_tokens (vLLM's rule): its stop ids,
    and EOS unless ignore_eos."""
    return [*stop_ids, *([eos_id] if eos_id is not None and not ignore_eos else [])]


@dataclass
class SampleRow:
    """What sampling needs to know about one sequence this step."""

    params: SamplingParams
    generator: torch.Generator
    prompt: list[int]
    output: list[int]
    banned: list[int]  # tokens that may not be sampled yet (EOS / stop ids before min_tokens)


@dataclass
class Sampled:
    token: int
    logprob: float
    top: list[tuple[int, float]]


def apply_penalties(logits: Tensor, row: SampleRow) -> Tensor:
    """OpenAI presence/frequency penalties on generated tokens; vLLM's repetition penalty on
    prompt and generated tokens."""
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt) | set(row.output)), dtype=torch.long)
        if len(seen):
            vals = logits[seen]
            logits[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
    if row.output and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(row.output).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


def filter_logits(logits: Tensor, p: SamplingParams) -> Tensor:
    """Temperature, then top-k, top-p (nucleus) and min-p on one row of logits."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if p.min_p > 0:
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > p.top_p  # keep the first to cross
        logits = logits.masked_fill(outside.scatter(0, order, outside), float("-inf"))
    return logits


def plain_greedy(row: SampleRow) -> bool:
    """The token is the raw logits' argmax (nothing reshapes the distribution first)."""
    p = row.params
    return p.greedy and not p.penalised and not row.banned and not p.logit_bias


def sample(logits: Tensor, rows: list[SampleRow]) -> list[Sampled]:
    """Sample one token per row. Logprobs are those of the model's distribution (before
    logit_bias, temperature and filters), as OpenAI and vLLM report them."""
    logits = logits.float().cpu()  # per-request CPU generators; one small copy per step
    if all(plain_greedy(r) for r in rows):
        tokens = logits.argmax(-1).tolist()
    else:
        tokens = [_sample_row(logits[i].clone(), row) for i, row in enumerate(rows)]
    return describe(logits, tokens, [r.params.logprobs or 0 for r in rows])


def describe(logits: Tensor, tokens: list[int], top_k: list[int]) -> list[Sampled]:
    """What the response reports of chosen tokens: their logprob under the model's distribution
    (fp32 CPU logits (N, V)) and the `top_k[i]` most likely alternatives (the chosen one always
    listed, as OpenAI does)."""
    logprobs = torch.log_softmax(logits, -1)
    chosen = logprobs.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()
    out = []
    k_max = max(top_k, default=0)
    top_vals, top_ids = logprobs.topk(k_max, -1) if k_max else (None, None)
    for i, k in enumerate(top_k):
        top = list(zip(top_ids[i, :k].tolist(), top_vals[i, :k].tolist(), strict=True)) if k else []
        if k and all(t != tokens[i] for t, _ in top):
            top.append((tokens[i], chosen[i]))
        out.append(Sampled(tokens[i], chosen[i], top))
    return out


def _shaped(logits: Tensor, row: SampleRow) -> Tensor:
    """logit_bias (OpenAI's: added before everything else), bans and penalties, in place."""
    if row.params.logit_bias:
        ids = torch.tensor(list(row.params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(row.params.logit_bias.values()), dtype=logits.dtype)
    if row.banned:
        logits[row.banned] = float("-inf")
    return apply_penalties(logits, row)


def _sample_row(logits: Tensor, row: SampleRow) -> int:
    logits = _shaped(logits, row)
    if row.params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(filter_logits(logits, row.params), -1)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def distribution(logits: Tensor, row: SampleRow) -> Tensor:
    """The distribution `sample` draws this row's token from, (V,) fp32: one-hot at the shaped
    argmax under greedy. `logits` (V,) fp32 CPU, left unchanged."""
    logits = _shaped(logits.clone(), row)
    if row.params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(), len(logits)).float()
    return torch.softmax(filter_logits(logits, row.params), -1)


def prompt_scores(
    logprobs: Tensor, targets: list[int], k: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each position, the logprob of the next prompt token and the top-k alternatives."""
    logprobs = logprobs.float().cpu()
    idx = torch.tensor(targets).unsqueeze(1)
    chosen = logprobs.gather(1, idx).squeeze(1).tolist()
    if not k:
        return [(c, []) for c in chosen]
    vals, ids = logprobs.topk(k, -1)
    return [
        (c, list(zip(ids[i].tolist(), vals[i].tolist(), strict=True))) for i, c in enumerate(chosen)
    ]
