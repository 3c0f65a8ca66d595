"""A real server on a free loopback port over a tiny model saved with the byte tokenizer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import pytest
import torch

from nosa.tokenizer import ByteTokenizer
from tests.helpers import tiny_model

MODEL_NAME = "tiny-nosa"


def save_tiny_model(directory) -> str:
    # vocab 259 = the byte tokenizer's 256 bytes + pad, bos, eos; eos 258 so EOS can end a request.
    model = tiny_model("nosa", seed=3, vocab_size=259, eos_token_id=258, max_position_embeddings=256)
    model.save_pretrained(directory)
    ByteTokenizer().save_pretrained(directory)
    return str(directory)


class RunningServer:
    """uvicorn in a thread of this process, on a socket bound to 127.0.0.1:0 (so the port is free)."""

    def __init__(self, app, service):
        import uvicorn

        self.service, self.llm = service, service.llm
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        with contextlib.suppress(OSError):
            self.sock.close()


def start_server(model_dir, max_queue=None, queue_full="reject", max_num_seqs=8, max_model_len=128, **llm_kwargs):
    from nosa.engine import LLM
    from nosa.serve.app import create_app
    from nosa.serve.engine_service import EngineService
    from nosa.serve.text import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    llm = LLM(model_dir, device="cpu", max_model_len=max_model_len, max_num_seqs=max_num_seqs, tokenizer=tokenizer, **llm_kwargs)
    service = EngineService(llm, max_queue=max_queue, queue_full=queue_full)
    return RunningServer(create_app(service, tokenizer, MODEL_NAME), service)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def server(model_dir):
    torch.set_num_threads(1)
    with start_server(model_dir) as running:
        yield running


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_until(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
