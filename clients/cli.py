"""`parcae`: talk to a parcae-serve server from the shell.

    parcae complete "def fib(n):" --depth 8 --exit kl:0.001 --stream
    parcae models | parcae health
    parcae models --path                (the built-in checkpoint's directory)
    parcae bench --requests 64 --concurrency 16 --depths 1,4,8,16
    parcae calibrate --model DIR [--out FILE]

--url and --api-key default to $PARCAE_URL and $PARCAE_API_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from parcae_serve.clients.client import (
    DEFAULT_URL,
    AsyncParcaeClient,
    ParcaeAPIError,
    ParcaeClient,
    RecurrenceExit,
    Speculation,
    SpeculativeUsage,
    Usage,
)


def exit_rule(text: str) -> RecurrenceExit:
    """`criterion:threshold[:min_depth]` (kl, residual, learned), e.g. `kl:0.001` or
    `residual:0.03:2`; or `auto:max_nll_cost[:min_depth]`, e.g. `auto:0.01`."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("kl", "residual", "learned", "auto"):
        raise argparse.ArgumentTypeError(
            "expected kl|residual|learned:THRESHOLD[:MIN_DEPTH] or auto:MAX_NLL_COST[:MIN_DEPTH]"
        )
    try:
        value, min_depth = float(parts[1]), int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number in {text!r}") from None
    if parts[0] == "auto":
        return RecurrenceExit("auto", min_depth=min_depth, max_nll_cost=value)
    return RecurrenceExit(parts[0], value, min_depth)


def speculation(text: str) -> Speculation:
    """`draft_depth:tokens`, e.g. `1:4`."""
    d, _, k = text.partition(":")
    if not (d.isdigit() and k.isdigit()):
        raise argparse.ArgumentTypeError("expected DRAFT_DEPTH:TOKENS, e.g. 1:4")
    return Speculation(int(d), int(k))


def at_least(low: int):
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def depth_list(text: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths, got {text!r}") from None


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"api_key": args.api_key, "timeout": args.timeout}


def print_usage(usage: Usage | None) -> None:
    """On stderr, so stdout stays the completion text alone."""
    if usage is not None:
        loops = usage.recurrence
        print(
            f"[{usage.completion_tokens} tokens, mean depth {loops.mean_depth:g}, "
            f"{loops.total_loops} loops{speculated(loops.speculative)}]",
            file=sys.stderr,
        )


def speculated(usage: SpeculativeUsage | None) -> str:
    if usage is None:
        return ""
    return f", {usage.accepted_tokens}/{usage.draft_tokens} drafts accepted"


def cmd_complete(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "depth": args.depth,
        "exit": args.exit,
        "speculative": args.speculative,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    with ParcaeClient(args.url, **client_options(args)) as client:
        if not args.stream:
            out = client.complete(args.prompt, **params)
            print(out.choices[0].text)
            print_usage(out.usage)
            return 0
        usage = None
        for chunk in client.stream(args.prompt, **params):
            for choice in chunk.choices:
                print(choice.text, end="", flush=True)
            usage = chunk.usage or usage
        print()
        print_usage(usage)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.path:
        # Imported here: the model package needs torch, which the client commands do not.
        from parcae_serve.model import builtin_checkpoint

        print(builtin_checkpoint())
        return 0
    with ParcaeClient(args.url, **client_options(args)) as client:
        print(json.dumps([asdict(m) for m in client.models()], indent=2))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with ParcaeClient(args.url, **client_options(args)) as client:
        status = client.health()
    print(status)
    return 0 if status == "ok" else 1


@dataclass(frozen=True)
class Timing:
    depth: int
    ttft: float  # seconds to the first chunk with text
    tpot: float | None  # seconds per output token after the first; None for one token
    tokens: int


class ProgressBar:
    """`[#####.....] 12/32` on stderr, redrawn in place."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.width, self.done = total, width, 0

    def advance(self) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if self.done == self.total else ""
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total}{end}")
        sys.stderr.flush()


async def timed_stream(client: AsyncParcaeClient, args: argparse.Namespace, i: int) -> Timing:
    depth = args.depths[i % len(args.depths)]
    start = time.perf_counter()
    first, tokens = None, 0
    # ignore_eos: every request generates exactly max_tokens, so depths compare fairly
    stream = client.stream(
        args.prompt, max_tokens=args.max_tokens, depth=depth, seed=i, ignore_eos=True
    )
    async for chunk in stream:
        if first is None and any(c.text for c in chunk.choices):
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = end if first is None else first
    tpot = (end - first) / (tokens - 1) if tokens > 1 else None
    return Timing(depth, first - start, tpot, tokens)


async def run_bench(args: argparse.Namespace) -> tuple[list[Timing], int, float]:
    """All requests, at most `concurrency` in flight: (timings, failures, wall seconds)."""
    gate, progress = asyncio.Semaphore(args.concurrency), ProgressBar(args.requests)
    failures: list[str] = []

    async def one(client: AsyncParcaeClient, i: int) -> Timing | None:
        async with gate:
            try:
                return await timed_stream(client, args, i)
            except (ParcaeAPIError, httpx.HTTPError) as err:
                failures.append(str(err))
                return None
            finally:
                progress.advance()

    async with AsyncParcaeClient(args.url, **client_options(args)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, i) for i in range(args.requests)))
        wall = time.perf_counter() - start
    for message in sorted(set(failures)):
        print(f"failed: {message}", file=sys.stderr)
    return [t for t in results if t is not None], len(failures), wall


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def bench_row(label: str, timings: list[Timing]) -> str:
    ttft = [t.ttft * 1e3 for t in timings]
    tpot = [t.tpot * 1e3 for t in timings if t.tpot is not None]
    cells = [percentile(ttft, 50), percentile(ttft, 99), percentile(tpot, 50), percentile(tpot, 99)]
    tokens = sum(t.tokens for t in timings)
    return f"{label:>6} {len(timings):>8} {tokens:>7} " + " ".join(f"{c:>10.1f}" for c in cells)


def cmd_bench(args: argparse.Namespace) -> int:
    timings, failed, wall = asyncio.run(run_bench(args))
    tokens = sum(t.tokens for t in timings)
    print(
        f"{args.url}: {args.requests} requests, concurrency {args.concurrency}, "
        f"depths {args.depths}, max_tokens {args.max_tokens}"
    )
    print(f"wall {wall:.2f} s, {tokens} tokens, {tokens / wall:.1f} tokens/s, {failed} failed")
    print(
        f"{'depth':>6} {'requests':>8} {'tokens':>7} {'TTFT p50':>10} {'TTFT p99':>10} "
        f"{'TPOT p50':>10} {'TPOT p99':>10}   (ms)"
    )
    for depth in sorted(set(args.depths)):
        print(bench_row(str(depth), [t for t in timings if t.depth == depth]))
    print(bench_row("all", timings))
    return 1 if failed else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    # Imported here: it needs torch and the model code, which the other commands do not.
    try:
        from parcae_serve.server.calibration.calibrate import calibrate
    except ImportError as err:
        print(
            f"error: calibrate needs parcae_serve.server.calibration.calibrate from a full parcae-serve install "
            f"(with torch), which failed to import: {err}",
            file=sys.stderr,
        )
        return 2
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    report = calibrate(args.model, args.out, args.sequences, args.length, args.policy, log=log)
    print(json.dumps({k: report[k] for k in ("loss_by_depth", "fit", "best_adaptive")}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--url",
        default=os.environ.get("PARCAE_URL", DEFAULT_URL),
        help="server base URL (env PARCAE_URL)",
    )
    server.add_argument(
        "--api-key",
        default=os.environ.get("PARCAE_API_KEY"),
        help="bearer key, if the server wants one (env PARCAE_API_KEY)",
    )
    server.add_argument("--timeout", type=float, default=120.0, help="seconds per request")

    parser = argparse.ArgumentParser(
        prog="parcae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    complete = commands.add_parser("complete", parents=[server], help="complete a prompt")
    complete.add_argument("prompt")
    complete.add_argument("--depth", type=int, help="loops per token (recurrence_depth)")
    complete.add_argument(
        "--exit",
        type=exit_rule,
        metavar="CRITERION:VALUE[:MIN_DEPTH]",
        help="adaptive depth, e.g. kl:0.001, residual:0.03:2, learned:0.9, or auto:0.01 (the "
        "fastest measured setting within 1%% of the best NLL)",
    )
    complete.add_argument(
        "--speculative",
        type=speculation,
        metavar="DRAFT_DEPTH:TOKENS",
        help="self-speculative decoding, e.g. 1:4 (same output, usually faster)",
    )
    complete.add_argument("--stream", action="store_true", help="print tokens as they come")
    complete.add_argument("--max-tokens", type=at_least(0), default=64)
    complete.add_argument("--temperature", type=float)
    complete.add_argument("--seed", type=int)
    complete.set_defaults(run=cmd_complete)

    models = commands.add_parser("models", parents=[server], help="list served models")
    models.add_argument(
        "--path", action="store_true", help="print the built-in model's directory and exit"
    )
    models.set_defaults(run=cmd_models)
    commands.add_parser("health", parents=[server], help="print readiness").set_defaults(
        run=cmd_health
    )

    bench = commands.add_parser("bench", parents=[server], help="concurrent mixed-depth load")
    bench.add_argument("--requests", type=at_least(1), default=32, help="requests in all")
    bench.add_argument(
        "--concurrency", type=at_least(1), default=8, help="requests in flight at once"
    )
    bench.add_argument(
        "--depths",
        type=depth_list,
        default=[1, 4, 8, 16],
        help="depths, cycled over the requests (default 1,4,8,16)",
    )
    bench.add_argument("--max-tokens", type=at_least(0), default=64)
    bench.add_argument("--prompt", default="def fibonacci(n):")
    bench.set_defaults(run=cmd_bench)

    calibrate = commands.add_parser("calibrate", help="measure loss by depth of a checkpoint")
    calibrate.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    calibrate.add_argument("--out", help="output JSON file (default: next to the checkpoint)")
    calibrate.add_argument("--sequences", type=int, default=16, help="held-out sequences")
    calibrate.add_argument("--length", type=int, default=128, help="tokens per sequence")
    calibrate.add_argument("--policy", default="per-loop", help="KV loop-slot policy to measure")
    calibrate.set_defaults(run=cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ParcaeAPIError as err:
        print(f"error: {err}", file=sys.stderr)
    except httpx.HTTPError as err:
        print(f"error: request to {args.url} failed: {err!r}", file=sys.stderr)
    except BrokenPipeError:  # `parcae models | head`: stdout closed; spare the exit-time flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
