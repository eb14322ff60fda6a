"""Requests/s of one vs two server replicas sharing one PostgreSQL store, in the same run.

    python bench/bench_replicas.py [--requests 600] [--clients 20] [--max-tokens 8] [--model tiny|smollm2-135m]

A throwaway PostgreSQL cluster on 127.0.0.1, `prefixtune serve` processes (--torch-threads 1 each), 4
prefixes uploaded once. The same closed-loop load (each client sends its next request when the last
one is answered, keep-alive connections) goes to one replica, then round-robin to two (what any
load balancer does), then for reference to one replica on a SQLite store. Every answer is checked
against the first answer of the same request. Prints a Markdown table and the load average, and writes
bench/results/replicas-<date>-<time>.json (`--out`), from which `prefixtune report` makes docs/serving.md's
table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import common  # noqa: E402
import prefixtune as pt  # noqa: E402
from prefixtune.precision import device_model  # noqa: E402
from prefixtune.prefix import MergedPrefix  # noqa: E402
from prefixtune.serve import PrefixStore  # noqa: E402
from prefixtune.serve.testing_pg import Replica, ThrowawayPostgres  # noqa: E402

PROMPTS = ["hello", "The quick brown fox", "xy", "data: 42", "a much longer prompt, with commas"]


def make_model(kind: str, folder: Path) -> str:
    if kind == "tiny":
        from conftest import tiny

        from prefixtune.serve.testing import char_tokenizer

        tiny("llama").save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
        return str(folder)
    return kind


def load(replicas: list[Replica], key: str, names: list[str], n: int, clients: int, max_tokens: int,
         expected: dict) -> dict:
    jobs = [(replicas[i % len(replicas)], names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    counter, lock, latencies, wrong = itertools.count(), threading.Lock(), [], []
    local = threading.local()

    def one(_):
        i = next(counter)
        replica, name, prompt = jobs[i]
        if not hasattr(local, "clients"):
            local.clients = {}
        client = local.clients.setdefault(replica.url, httpx.Client(  # idle < the replica's 5 s keep-alive
            timeout=300, limits=httpx.Limits(keepalive_expiry=2)))
        t = time.monotonic()
        r = client.post(replica.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        dt = time.monotonic() - t
        r.raise_for_status()
        text = r.json()["choices"][0]["text"]
        with lock:
            latencies.append(dt)
            if expected.setdefault((name, prompt), text) != text:
                wrong.append((name, prompt))

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(n)))
    wall = time.monotonic() - started
    latencies.sort()
    return {"rps": n / wall, "wall": wall, "p50": statistics.median(latencies),
            "p95": latencies[int(0.95 * (len(latencies) - 1))], "wrong": len(wrong)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--model", default="tiny", help="tiny (random LLaMA, as in the tests) or a model name")
    ap.add_argument("--rounds", type=int, default=2, help="Interleaved rounds of one, then two replicas.")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    model_arg = make_model(args.model, tmp / "model")
    model = pt.load_model(model_arg)[0]
    torch.manual_seed(0)
    with ThrowawayPostgres() as pg:
        url, files = pg.create_database(), tmp / "files"
        stores = {"postgresql": PrefixStore(url, model=model, files_dir=files), "sqlite": PrefixStore(tmp / "p.db", model=model)}
        names = [model_arg]
        for i in range(4):
            kv = {k: torch.randn(layers, 2, heads, 4 + i, hd) for k, (layers, heads, hd) in pt.layout_of(model).shapes.items()}
            path = pt.save_prefix(MergedPrefix(kv=kv, meta={"method": "prefix"}), tmp / f"b{i}.safetensors", model=model)
            for store in stores.values():
                store.add(f"b{i}", "bench", path, public=True)
            names.append(f"b{i}")
        key = stores["postgresql"].add_key("bench")
        with stores["postgresql"]._connect() as db:
            row = db.execute("SELECT * FROM api_keys").fetchone()
        with stores["sqlite"]._write() as db:
            db.execute("INSERT INTO api_keys VALUES (?,?,?)", (row["key_hash"], row["owner"], row["created"]))
        serve_args = ["--model", model_arg, "--torch-threads", "1", "--max-queue", "1024"]
        pg_args = serve_args + ["--store", url, "--files-dir", files]
        expected: dict = {}
        results = {}
        reps = [Replica(pg_args, log_path=tmp / f"r{i}.log") for i in range(2)]
        sq = Replica(serve_args + ["--store", tmp / "p.db"], log_path=tmp / "sqlite.log")
        try:
            for r in reps + [sq]:
                r.start()
            load(reps, key, names, 2 * args.clients, args.clients, args.max_tokens, expected)  # warm up
            load([sq], key, names, args.clients, args.clients, args.max_tokens, expected)
            before = os.getloadavg()
            plan = [(f"round {i + 1}: {label}", targets) for i in range(args.rounds)
                    for label, targets in [("1 replica (PostgreSQL)", reps[:1]), ("2 replicas (PostgreSQL)", reps)]]
            for label, targets in plan + [("1 replica (SQLite store)", [sq])]:
                results[label] = load(targets, key, names, args.requests, args.clients, args.max_tokens, expected)
            after = os.getloadavg()
        finally:
            for r in reps + [sq]:
                r.stop()
            for store in stores.values():
                store.close()
    print(f"{args.requests} requests, {args.clients} clients, max_tokens {args.max_tokens}, model {args.model}, "
          f"{os.cpu_count()} CPUs, torch threads 1 per replica; load average before {before[0]:.2f}, "
          f"after {after[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| setup | requests/s | p50 s | p95 s | wrong |\n| --- | ---: | ---: | ---: | ---: |")
    for label, r in results.items():
        print(f"| {label} | {r['rps']:.1f} | {r['p50']:.3f} | {r['p95']:.3f} | {r['wrong']} |")
    rounds = []
    for i in range(args.rounds):
        one = results[f"round {i + 1}: 1 replica (PostgreSQL)"]
        two = results[f"round {i + 1}: 2 replicas (PostgreSQL)"]
        rounds.append({"one": one, "two": two})
        print(f"round {i + 1}: two / one replica = {two['rps'] / one['rps']:.2f}x")
    from prefixtune.files import atomic_write_bytes

    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": common.commit(),
              "cpu": device_model("cpu"),
              "cores": os.cpu_count(), "model": args.model, "requests": args.requests, "clients": args.clients,
              "max_tokens": args.max_tokens, "load_average": [round(before[0], 2), round(after[0], 2)],
              "rounds": rounds, "sqlite": results["1 replica (SQLite store)"]}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"replicas-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.json"
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
