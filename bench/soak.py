"""Soak test of the server (issue 17): one `prefixtune serve` process, a mixed bounded workload for
`--minutes` (default 30) at the rate this machine holds, then RSS growth, open files, threads and
the store's consistency, written to bench/results/soak-<date>-<time>.json.

    make soak                      # 30 minutes
    python bench/soak.py --minutes 10 --clients 4

Loopback only. The server runs a tiny random LLaMA (2 layers; the point is the server's own
memory, files and threads, not the model). Each client loops until the deadline, picking one of:
a completion (a prefix or the base model), a streamed completion, an upload of a new prefix, a
delete of one it uploaded, or a request it abandons mid-generation (a disconnect). Every answer is
checked (status, and text equal to the first answer to the same greedy request). At the end: the
store's rows against the uploads the clients know of, every file's sha256, no file without a row,
no temp file; the process's RSS, open files and threads after warm-up and at the end.
Exit status 1 if any check fails or RSS grew past --max-rss-growth-mb.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import prefixtune as pt  # noqa: E402
from prefixtune.prefix import MergedPrefix  # noqa: E402
from prefixtune.serve import PrefixStore  # noqa: E402
from prefixtune.serve.testing import char_tokenizer  # noqa: E402


def proc_stats(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "threads": int(status["Threads"]),
            "open_files": len(os.listdir(f"/proc/{pid}/fd"))}


def make_model(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return pt.load_model(str(folder))[0]


def prefix_bytes(model, length: int, seed: int, tmp: Path) -> bytes:
    g = torch.Generator().manual_seed(seed)
    kv = {k: torch.randn(layers, 2, heads, length, hd, generator=g)
          for k, (layers, heads, hd) in pt.layout_of(model).shapes.items()}
    path = pt.save_prefix(MergedPrefix(kv=kv, meta={"method": "prefix"}), tmp / f"s{seed}.safetensors", model=model)
    data = path.read_bytes()
    path.unlink()
    return data


class Workload:
    def __init__(self, url: str, key: str, model_id: str, fixed: list[str], uploads: list[bytes], seed: int):
        self.url, self.key, self.model_id, self.fixed, self.uploads = url, key, model_id, fixed, uploads
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.mine: set[str] = set()  # uploaded and not deleted: must be in the store at the end
        self.answers: dict[tuple, str] = {}
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []
        self.n = 0

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def fail(self, what: str) -> None:
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(what)
        self.count("failed")

    def check_text(self, key: tuple, text: str) -> None:
        with self.lock:
            want = self.answers.setdefault(key, text)
        if want != text:
            self.fail(f"{key}: {text!r} != first answer {want!r}")

    def client(self, deadline: float, seed: int) -> None:
        rng = random.Random(seed)
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=60) as c:
            while time.monotonic() < deadline:
                op = rng.choices(["complete", "stream", "upload", "delete", "disconnect"], [50, 20, 12, 10, 8])[0]
                try:
                    getattr(self, op)(c, rng)
                except httpx.HTTPError as e:
                    self.fail(f"{op}: {type(e).__name__}: {e}")

    def _target(self, rng) -> str:
        with self.lock:
            mine = sorted(self.mine)
        return rng.choice(self.fixed + mine[:4] + [self.model_id])

    def complete(self, c, rng) -> None:
        model, prompt, n = self._target(rng), rng.choice(["hello", "The quick brown fox", "data: 42", "x"]), rng.randint(1, 12)
        r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})
        if r.status_code == 404 and model not in self.fixed and model != self.model_id:
            self.count("complete 404 (deleted meanwhile)")
            return
        if r.status_code != 200:
            return self.fail(f"complete {model}: {r.status_code} {r.text[:200]}")
        if model in self.fixed or model == self.model_id:
            self.check_text((model, prompt, n), r.json()["choices"][0]["text"])
        self.count("complete")

    def stream(self, c, rng) -> None:
        model, n = rng.choice(self.fixed + [self.model_id]), rng.randint(1, 12)
        text = ""
        with c.stream("POST", "/v1/completions", json={"model": model, "prompt": "stream me", "max_tokens": n,
                                                       "temperature": 0, "stream": True}) as r:
            if r.status_code != 200:
                return self.fail(f"stream {model}: {r.status_code}")
            done = False
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return self.fail(f"stream {model}: {chunk}")
                    text += "".join(ch["text"] for ch in chunk["choices"])
        if not done:
            return self.fail(f"stream {model}: no [DONE]")
        self.check_text((model, "stream me", n), text)
        self.count("stream")

    def upload(self, c, rng) -> None:
        with self.lock:
            if len(self.mine) >= 20:
                return
            self.n += 1
            name = f"soak-{self.n}"
        r = c.post("/v1/prefixes", data={"name": name}, files={"file": ("p.safetensors", rng.choice(self.uploads))})
        if r.status_code != 201:
            return self.fail(f"upload {name}: {r.status_code} {r.text[:200]}")
        with self.lock:
            self.mine.add(name)
        self.count("upload")

    def delete(self, c, rng) -> None:
        with self.lock:
            if not self.mine:
                return
            name = rng.choice(sorted(self.mine))
            self.mine.discard(name)
        r = c.delete(f"/v1/prefixes/{name}")
        if r.status_code != 200:
            return self.fail(f"delete {name}: {r.status_code} {r.text[:200]}")
        self.count("delete")

    def disconnect(self, c, rng) -> None:
        try:
            c.post("/v1/completions", json={"model": rng.choice(self.fixed), "prompt": "leave", "max_tokens": 1000,
                                            "temperature": 0}, timeout=httpx.Timeout(60, read=0.05))
        except httpx.ReadTimeout:
            self.count("disconnect")
            return
        self.count("disconnect (finished first)")


def check_store(db: Path, expected: set[str], owner: str) -> dict:
    store = PrefixStore(db)
    rows = store.list(owner)
    names = {r.name for r in rows if r.owner == owner}
    problems = []
    for r in rows:
        data = r.file.read_bytes() if r.file.exists() else None
        if data is None or hashlib.sha256(data).hexdigest() != r.sha256:
            problems.append(f"{r.name}: file missing or changed")
    files = {p.name for p in store.files_dir.iterdir() if p.name != ".prefixtune-store"}
    used = {r.file.name for r in store.list()}
    if files - used:
        problems.append(f"files without a row: {sorted(files - used)}")
    soak_names = {n for n in names if n.startswith("soak-")}
    if soak_names != expected:
        problems.append(f"rows {sorted(soak_names ^ expected)} differ from the clients' record")
    store.close()
    return {"rows": len(rows), "files": len(files), "consistent": not problems, "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="How long the workload runs (default 30).")
    ap.add_argument("--clients", type=int, default=4, help="Concurrent client loops (default 4).")
    ap.add_argument("--warmup-fraction", type=float, default=0.1, help="RSS growth is measured from this point.")
    ap.add_argument("--max-rss-growth-mb", type=float, default=50.0, help="Fail above this RSS growth after warm-up.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="Folder for the results JSON.")
    args = ap.parse_args()
    if not 0 < args.minutes <= 24 * 60 or not 1 <= args.clients <= 64:
        ap.error("--minutes must be in (0, 1440] and --clients in [1, 64]")
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    tmp = Path(tempfile.mkdtemp(prefix="prefixtune-soak-"))
    model = make_model(tmp / "model")
    db = tmp / "store.db"
    store = PrefixStore(db, model=model)
    key = store.add_key("alice")
    fixed = []
    for i in range(4):
        (tmp / f"f{i}.safetensors").write_bytes(prefix_bytes(model, 2 + i, 100 + i, tmp))
        store.add(f"fixed-{i}", "alice", tmp / f"f{i}.safetensors")
        fixed.append(f"fixed-{i}")
    uploads = [prefix_bytes(model, 3 + i, 200 + i, tmp) for i in range(6)]
    store.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefixtune.cli", "serve", "--model", str(tmp / "model"),
                               "--store", str(db), "--host", "127.0.0.1", "--port", str(port), "--torch-threads", "1",
                               "--store-sweep-s", "30"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"the server exited; see {tmp / 'server.log'}")
            time.sleep(0.2)
        work = Workload(url, key, str(tmp / "model"), fixed, uploads, seed=0)
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60
        samples, warm = [], None
        threads = [threading.Thread(target=work.client, args=(deadline, i), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(min(10.0, max(0.5, args.minutes * 60 / 100)))
            s = {"t_s": round(time.monotonic() - t0, 1), **proc_stats(server.pid)}
            samples.append(s)
            if warm is None and s["t_s"] >= args.minutes * 60 * args.warmup_fraction:
                warm = s
        for t in threads:
            t.join()
        time.sleep(2)  # let cancelled rows leave and the worker go idle
        end = {"t_s": round(time.monotonic() - t0, 1), **proc_stats(server.pid)}
        metrics = httpx.get(url + "/metrics").text
        server.send_signal(signal.SIGTERM)
        server.wait(90)
    finally:
        if server.poll() is None:
            server.kill()
    store_check = check_store(db, work.mine, "alice")
    warm = warm or samples[0]
    growth = end["rss_mb"] - warm["rss_mb"]
    server_errors = [line for line in (tmp / "server.log").read_text().splitlines()
                     if " ERROR " in line or "Traceback" in line or "never retrieved" in line]
    requests = sum(v for k, v in work.counts.items() if k != "failed")
    result = {
        "started": started_at, "minutes": args.minutes, "clients": args.clients, "machine": platform.processor() or
        platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg(), "model": "tiny random LLaMA",
        "operations": work.counts, "operations_per_s": round(requests / (end["t_s"] or 1), 1),
        "failures": work.failures, "after_warmup": warm, "end": end, "rss_growth_mb": round(growth, 1),
        "max_rss_growth_mb": args.max_rss_growth_mb, "samples": samples, "store": store_check,
        "server_error_lines": server_errors[:20], "server_exit_code": server.returncode,
        "cancelled_metric": [line for line in metrics.splitlines() if line.startswith("prefixtune_cancelled")],
    }
    ok = (not work.failures and store_check["consistent"] and growth <= args.max_rss_growth_mb and not server_errors
          and end["open_files"] <= warm["open_files"] + 5 and end["threads"] <= warm["threads"] + 5)
    result["ok"] = ok
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"soak {started_at}, {args.minutes} min, {args.clients} clients: {requests} operations "
          f"({result['operations_per_s']}/s) {work.counts}")
    print(f"RSS {warm['rss_mb']:.0f} MB after warm-up -> {end['rss_mb']:.0f} MB at the end ({growth:+.1f} MB, bound "
          f"{args.max_rss_growth_mb:.0f}); open files {warm['open_files']} -> {end['open_files']}; threads "
          f"{warm['threads']} -> {end['threads']}")
    print(f"store: {store_check}; failures: {len(work.failures)}; server error lines: {len(server_errors)}")
    print(f"{'OK' if ok else 'FAILED'}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
