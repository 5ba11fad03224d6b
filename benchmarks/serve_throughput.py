"""Throughput of `dsft serve` at 1, 8, 32 (and 64) concurrent clients against a one-request-at-a-time loop.

The model is random-init (weights do not change the speed; random weights rarely end a reply early, so every request
generates about max_tokens): a dsft preset (tiny-deepseek-v3, tiny-qwen2, tiny-llama) for a CPU, or a published shape
(deepseek-r1-distill-qwen-1.5b, ...: dsft.bench.suites.PUBLISHED_SHAPES, which a test keeps equal to
../shared/arch_shapes.json) built as `dsft bench` builds it, in bf16 on a CUDA GPU. Prompts are chat messages
rendered by the deepseek_v3 template with a byte-level BPE tokenizer trained here.

The baseline is the loop a script without a server would run: `generate` for one prompt after another (batch 1,
the same decode settings). Then the server (uvicorn in a thread on a loopback port, the response cache off) gets
requests from N concurrent clients, each sending its requests one after another; tokens/s counts the completion
tokens the server reports (usage) over the wall time of the whole level. Clients stream (--no-stream: plain
requests), so each level also records what a client sees: time to first token (request sent to the first chunk of
generated text) and per-token latency ((last chunk - first chunk) / (tokens - 1)), median and 95th percentile.
The JSON is rewritten after the baseline and after each level, so a run cut short keeps what it measured.

Run (CPU):  python benchmarks/serve_throughput.py --shape tiny-deepseek-v3 --clients 1,8,32
Run (GPU):  python benchmarks/serve_throughput.py --shape deepseek-r1-distill-qwen-1.5b --clients 1,8,32,64 \
                --max-tokens 128 --set serve.batching.max_batch=64
Writes benchmarks/results/serve_throughput_<shape>_<engine>.json (or --output).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

PRESET_NAMES = ("tiny-deepseek-v3", "tiny-qwen2", "tiny-llama")
TEMPLATE = "deepseek_v3"


def make_prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    units = [("km", "m"), ("m", "cm"), ("kg", "g"), ("元", "角")]
    return [f"Convert {rng.randrange(1, 10_000)} {a} to {b}, then explain the steps." for a, b in
            (rng.choice(units) for _ in range(count))]


def build(shape: str, seed: int = 0):
    """(model in eval mode on the GPU if there is one, tokenizer, parameter count) of a random-init shape."""
    import torch

    from dsft.data.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(make_prompts(2000, seed + 1), vocab_size=1024)
    cuda = torch.cuda.is_available()
    if shape in PRESET_NAMES:
        from dsft.models.presets import build_preset

        model = build_preset(shape, tokenizer, seed, torch.bfloat16 if cuda else torch.float32)
        model = model.to("cuda") if cuda else model
    else:
        from dsft.bench.recipes import build_model
        from dsft.bench.suites import PUBLISHED_SHAPES, Setup

        if shape not in PUBLISHED_SHAPES:
            raise SystemExit(f"unknown shape {shape!r}; allowed: {', '.join((*PRESET_NAMES, *PUBLISHED_SHAPES))}")
        model = build_model(Setup(shape, shape, PUBLISHED_SHAPES[shape], "full", 16, 64, 0, 0), seed)
        cover_vocabulary(tokenizer, model.config.vocab_size)
    model.eval()
    return model, tokenizer, sum(p.numel() for p in model.parameters())


def cover_vocabulary(tokenizer, vocab_size: int) -> None:
    """Give every id of a published shape's vocabulary (151,936 for Qwen2) a text: the tokenizer trained here knows a
    few hundred, a random-init model samples from all, and the ids it does not know decode to nothing, so a streamed
    reply would carry almost no text and its first-token time would be the first known id's."""
    tokenizer.add_tokens([f" t{index}" for index in range(len(tokenizer), vocab_size)])


def loop_baseline(model, tokenizer, prompts: list[str], max_tokens: int) -> dict:
    """One request at a time through generate (what a loop without a server does)."""
    from dsft.data.formats import Message
    from dsft.models.generate import DecodeSettings, prompt_ids

    settings = DecodeSettings(max_new_tokens=max_tokens)
    ids = [prompt_ids([Message("user", p)], TEMPLATE, tokenizer) for p in prompts]
    _generate_one(model, tokenizer, ids[0], settings)  # warm-up
    started_s, tokens = time.perf_counter(), 0
    for prompt in ids:
        tokens += _generate_one(model, tokenizer, prompt, settings)
    wall_s = time.perf_counter() - started_s
    return {"requests": len(ids), "completion_tokens": tokens, "wall_s": round(wall_s, 3),
            "tokens_per_s": round(tokens / wall_s, 1), "requests_per_s": round(len(ids) / wall_s, 2)}


def _generate_one(model, tokenizer, ids: list[int], settings) -> int:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(
            1, len(ids), dtype=torch.long, device=device), pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, **settings.generate_kwargs())
    new = out[0, len(ids):].tolist()
    return new.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in new else len(new)


def client_level(url: str, clients: int, prompts: list[str], max_tokens: int, stream: bool = True) -> dict:
    """clients concurrent clients, each sending its share of prompts one after another, from a process of their own
    (clients in the server's process would take its interpreter lock from it); counts, wall time, latencies, and for
    streamed requests the time to first token and the per-token latency each client saw."""
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        wall_s, results = pool.submit(run_clients, url, clients, prompts, max_tokens, stream).result()
    tokens = sum(result["tokens"] for result in results)
    return {"clients": clients, "requests": len(results), "stream": stream, "completion_tokens": tokens,
            "wall_s": round(wall_s, 3), "tokens_per_s": round(tokens / wall_s, 1),
            "requests_per_s": round(len(results) / wall_s, 2),
            **percentiles_ms("latency", [result["latency_s"] for result in results]),
            **percentiles_ms("ttft", [result["ttft_s"] for result in results if result["ttft_s"] is not None]),
            **percentiles_ms("per_token", per_token_latencies_s(results))}  # both None for plain requests


def per_token_latencies_s(results: list[dict]) -> list[float]:
    """Each streamed request's mean gap between generated tokens: (last token - first token) / (tokens - 1)."""
    return [(r["last_token_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in results
            if r["ttft_s"] is not None and r["tokens"] >= 2]


def percentiles_ms(name: str, values_s: list[float]) -> dict:
    """{name_p50_ms, name_p95_ms} of values in seconds (None when there are none)."""
    ordered = sorted(value * 1000 for value in values_s)
    if not ordered:
        return {f"{name}_p50_ms": None, f"{name}_p95_ms": None}
    return {f"{name}_p50_ms": round(statistics.median(ordered), 2),
            f"{name}_p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 2)}


def run_clients(url: str, clients: int, prompts: list[str], max_tokens: int, stream: bool) -> tuple[float, list]:
    """(wall seconds, one dict per request: latency_s, tokens, and when streamed ttft_s and last_token_s, the times
    of the first and last chunks that carried generated text) of clients asyncio tasks sharing prompts."""
    import asyncio

    import httpx

    async def one_request(http, prompt: str) -> dict:
        body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": max_tokens}
        started_s = time.perf_counter()
        if not stream:
            response = await http.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            tokens = response.json()["usage"]["completion_tokens"]
            latency_s = time.perf_counter() - started_s
            return {"latency_s": latency_s, "tokens": tokens, "ttft_s": None, "last_token_s": None}
        result = {"ttft_s": None, "last_token_s": None, "tokens": 0}
        body.update(stream=True, stream_options={"include_usage": True})
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                read_event(line, time.perf_counter() - started_s, result)
        return {**result, "latency_s": time.perf_counter() - started_s}

    async def one_client(http, share: list[str]) -> list[dict]:
        return [await one_request(http, prompt) for prompt in share]

    async def everyone() -> list:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            shares = await asyncio.gather(*(one_client(http, prompts[i::clients]) for i in range(clients)))
        return [result for share in shares for result in share]

    started_s = time.perf_counter()
    results = asyncio.run(everyone())
    return time.perf_counter() - started_s, results


def read_event(line: str, elapsed_s: float, result: dict) -> None:
    """Fold one server-sent-event line of a streamed chat completion into result: the first and last times a chunk
    carried generated text (answer or reasoning), and the completion tokens of the closing usage chunk."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    chunk = json.loads(line[len("data: "):])
    if "error" in chunk:
        raise RuntimeError(f"the server failed a streamed request: {chunk['error']}")
    if chunk.get("usage"):
        result["tokens"] = chunk["usage"]["completion_tokens"]
    if any(choice["delta"].get("content") or choice["delta"].get("reasoning_content") for choice in chunk["choices"]):
        result["ttft_s"] = elapsed_s if result["ttft_s"] is None else result["ttft_s"]
        result["last_token_s"] = elapsed_s


SERVER_SERIES = ("dsft_serve_batch_size_sum", "dsft_serve_batch_size_count", "dsft_serve_step_latency_seconds_sum",
                 "dsft_serve_step_latency_seconds_count", "dsft_serve_batch_limit")


def server_series(url: str) -> dict:
    """The batch-size and step-latency sums and counts, and the controller's batch limit, from /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
            for s in f.samples if s.name in SERVER_SERIES}


def batching_row(before: dict, after: dict) -> dict:
    """Mean batch size and step latency over a level, and the batch limit at its end."""
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in SERVER_SERIES}
    batches = delta["dsft_serve_batch_size_count"]
    return {"batches": int(batches),
            "mean_batch_size": round(delta["dsft_serve_batch_size_sum"] / batches, 2) if batches else None,
            "mean_step_latency_ms": round(1000 * delta["dsft_serve_step_latency_seconds_sum"] / batches, 2)
            if batches else None,
            "batch_limit_at_end": after.get("dsft_serve_batch_limit")}


def serve_levels(model, tokenizer, args, levels: list[int], keep) -> None:
    """Serve the model and measure each level of clients; keep(row) gets each level's row as soon as it is done."""
    from dsft.config.serve import load_serve_config
    from dsft.serve.models import ServedModel, ServedModels
    from dsft.serve.server import create_app, serve_in_thread

    overrides = [f"serve.batching.max_batch={max(levels)}", "serve.cache.max_entries=0",
                 f"serve.limits.max_tokens={args.max_tokens}", "serve.limits.request_timeout_s=600",
                 "serve.batching.max_queue=100000", f"serve.batching.engine={args.engine}", *args.set]
    config = load_serve_config(None, overrides)
    served = ServedModels(model, tokenizer, [ServedModel("bench", None, TEMPLATE, f"random-init {args.shape}")])
    with serve_in_thread(create_app(served, config)) as url:
        client_level(url, 2, make_prompts(4, seed=99), args.max_tokens, args.stream)  # warm-up
        for clients in levels:
            before = server_series(url)
            prompts = make_prompts(max(args.min_requests, clients * args.requests_per_client), seed=clients)
            row = client_level(url, clients, prompts, args.max_tokens, args.stream)
            row.update(batching_row(before, server_series(url)))
            keep(row)


def machine() -> dict:
    import torch
    import transformers

    info = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2)}  # the machine may be shared: high load, slower numbers
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny-deepseek-v3")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=16, help="fewest requests per level")
    parser.add_argument("--baseline-requests", type=int, default=16)
    parser.add_argument("--engine", default="static", choices=["static", "continuous"])
    parser.add_argument("--set", action="append", default=[], help="serve config override, e.g. "
                        "serve.batching.target_latency_ms=100 (repeatable)")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="clients stream their replies (time to first token and per-token latency measured "
                        "as a client sees them); --no-stream sends plain requests")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    levels = [int(level) for level in args.clients.split(",")]
    output = args.output or Path(__file__).parent / "results" / f"serve_throughput_{args.shape}_{args.engine}.json"

    model, tokenizer, parameters = build(args.shape)
    baseline = loop_baseline(model, tokenizer, make_prompts(args.baseline_requests, seed=7), args.max_tokens)
    print(json.dumps({"baseline_loop": baseline}))
    report = {"shape": args.shape, "parameters": parameters, "engine": args.engine, "max_tokens": args.max_tokens,
              "overrides": args.set, **machine(), "baseline_loop": baseline, "levels": []}
    write_report(output, report)

    def keep(row: dict) -> None:  # each finished level is on disk at once: a run cut short keeps what it measured
        row["speedup_vs_loop"] = round(row["tokens_per_s"] / baseline["tokens_per_s"], 2)
        report["levels"].append(row)
        write_report(output, report)
        print(json.dumps(row))

    serve_levels(model, tokenizer, args, levels, keep)
    print(json.dumps({level["clients"]: level["speedup_vs_loop"] for level in report["levels"]}), "->", output)


def write_report(output: Path, report: dict) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
