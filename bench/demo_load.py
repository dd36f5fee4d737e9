"""Load test of the Gradio demo: N concurrent `gradio_client` clients asking about the example images.

    python bench/demo_load.py                       # starts the demo (default model) on a free local port
    python bench/demo_load.py --url http://127.0.0.1:7860/ --clients 20 --requests 3 --max-new-tokens 32
    python bench/demo_load.py --smoke               # a tiny random model, 2 clients: the same path in seconds

Each client streams every answer from `/ask_stream`, so it measures what a user waits for: latency
(submit -> last piece), time to first token (submit -> first non-empty piece; waiting included: the demo
batches concurrent questions, and a question that arrives while a batch decodes joins it at the next token)
and throughput (answers per minute of wall time). The run fails (exit 1)
unless every request was answered.

`--smoke` serves a tiny random model of the default's design (a 2-layer Llama with SmolLM2's tokenizer, a
32-wide tower, pixel shuffle and the pooled token) to 2 clients, 1 question each, 4 new tokens: the same
server, clients and table in seconds, so tests/test_bench.py can check that the benchmark still runs. Its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import smoke  # bench/smoke.py: the --smoke stand-ins (this folder is on sys.path)
from gradio_client import Client, handle_file

from demo.app import EXAMPLES, ModelInfo, launch


@dataclass
class Result:
    latency: float  # seconds, submit -> complete answer
    first_token: float | None  # seconds, submit -> first non-empty piece; None if nothing came
    answer: str
    error: str | None = None


def ask(client: Client, example_index: int, max_new_tokens: int) -> Result:
    example = EXAMPLES[example_index % len(EXAMPLES)]
    start = time.perf_counter()
    first = None
    answer = ""
    try:
        job = client.submit(
            handle_file(str(example.path)), example.question, max_new_tokens, 0.0, 1.0, api_name="/ask_stream"
        )
        for answer in job:  # one item per streamed update: the answer so far
            if first is None and answer:
                first = time.perf_counter() - start
        answer = job.result()  # raises if the job failed
    except Exception as err:  # counted, reported, and fails the run at the end
        return Result(time.perf_counter() - start, first, answer or "", f"{type(err).__name__}: {err}")
    return Result(time.perf_counter() - start, first, answer)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run(url: str, clients: int, requests: int, max_new_tokens: int) -> list[Result]:
    """`clients` threads, each with its own Client (its own session), each asking `requests` questions."""
    barrier = threading.Barrier(clients)

    def one_client(i: int) -> list[Result]:
        client = Client(url, verbose=False)
        barrier.wait()  # everyone starts together
        return [ask(client, i * requests + r, max_new_tokens) for r in range(requests)]

    with ThreadPoolExecutor(clients) as pool:
        return [result for batch in pool.map(one_client, range(clients)) for result in batch]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running demo; without it one is started here")
    parser.add_argument("--model", help="model folder for the demo started here (default: the project's)")
    parser.add_argument("--clients", type=int, default=None, help="default 8, --smoke 2")
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="questions per client, one after another (default 3, --smoke 1)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 32, --smoke 4")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="serve a tiny random model to 2 clients: checks the benchmark runs (seconds), measures nothing",
    )
    args = parser.parse_args(argv)
    if args.smoke and (args.url or args.model):
        parser.error("--smoke serves its own tiny model: it takes neither --url nor --model")
    args.clients = args.clients or (2 if args.smoke else 8)
    args.requests = args.requests or (1 if args.smoke else 3)
    args.max_new_tokens = args.max_new_tokens or (4 if args.smoke else 32)

    app = None
    url = args.url
    if url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if args.smoke:
            info = ModelInfo("tiny random model (smoke run: its figures mean nothing)", "nothing")
            app, url = launch(model=smoke.default_model(), model_info=info, port=port, block=False)
        else:
            app, url = launch(args.model, port=port, block=False)
    try:
        # One warm-up answer: the first generate pays one-off costs (allocations, kernel selection).
        ask(Client(url, verbose=False), 0, 4)
        start = time.perf_counter()
        results = run(url, args.clients, args.requests, args.max_new_tokens)
        wall = time.perf_counter() - start
    finally:
        if app is not None:
            app.close()

    answered = [r for r in results if r.error is None and r.answer]
    latencies = [r.latency for r in answered]
    firsts = [r.first_token for r in answered if r.first_token is not None]
    rows = [
        ("clients x requests", f"{args.clients} x {args.requests}"),
        ("max new tokens", f"{args.max_new_tokens}"),
        ("answered", f"{len(answered)} / {len(results)}"),
        ("wall time", f"{wall:.1f} s"),
        ("answers / min", f"{60 * len(answered) / wall:.1f}"),
        ("latency p50 / p95", f"{percentile(latencies, 50):.2f} / {percentile(latencies, 95):.2f} s"),
        ("first token p50 / p95", f"{percentile(firsts, 50):.2f} / {percentile(firsts, 95):.2f} s"),
        (
            "mean answer length",
            f"{statistics.mean(len(r.answer.split()) for r in answered):.1f} words" if answered else "-",
        ),  # fmt: skip
    ]
    width = max(len(name) for name, _ in rows)
    print(f"demo load test against {url}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for r in results:
        if r.error is not None:
            print(f"  failed: {r.error}", file=sys.stderr)
    return 0 if len(answered) == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
