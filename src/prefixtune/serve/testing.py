"""Helpers for tests, benchmarks and demos: a tiny character tokenizer, and a server in a thread."""

from __future__ import annotations

import string
import threading
import time

import uvicorn
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel


def char_tokenizer(vocab_size: int = 96):
    """A character-level fast tokenizer built in memory: ids 0-3 are <pad> <s> </s> <unk>, then one
    id per printable character (as many as fit in `vocab_size`). Decoding joins characters back."""
    # transformers: only char_tokenizer needs it; ServerThread users (benchmarks, store tests) do not (start-up time)
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    printable = " " + string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    chars = list(printable[: vocab_size - len(specials)])
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


class ServerThread:
    """Run an ASGI app with uvicorn on 127.0.0.1 in a background thread (port 0: a free port).

        with ServerThread(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **uvicorn_options):
        options = dict(log_level="warning", access_log=False, timeout_graceful_shutdown=30)
        options.update(uvicorn_options)
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host
        self.port = port  # the real one once started


    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful: uvicorn stops accepting, lets open requests finish, then runs the app's shutdown."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
