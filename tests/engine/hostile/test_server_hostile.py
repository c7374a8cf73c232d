"""`fp8-backend serve` (FP8 weights + FP8 KV cache) under load and bad requests: every good
request is answered in full, bad ones get a 4xx, the server keeps serving, and a request's
greedy output sent in a batch is compared with the same request sent alone."""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from server import running_server

pytestmark = pytest.mark.slow
MAX_TOKENS = 12
PROMPTS = [
    "The quick brown fox", "Quantization stores weights in", "Paris is the capital of",
    "FP8 numbers have a sign, four exponent bits and", "Water boils at", "The cat sat on the",
    "In the beginning there was only", "Numbers: 0 1 2 3",
]


def post(base: str, body, timeout: float = 300.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def complete(base: str, prompt: str) -> tuple[int, dict]:
    return post(base, {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                       "ignore_eos": True})


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(tiny_model, log, "--quantization", "fp8", "--kv-cache-dtype", "fp8", "--dtype", "bfloat16",
                        "--enforce-eager", "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20),
                        "--served-model-name", "tiny") as (base, proc, _):
        yield base, proc


def _full(status: int, body: dict) -> str:
    assert status == 200, body
    choice = body["choices"][0]
    assert body["usage"]["completion_tokens"] == MAX_TOKENS and choice["finish_reason"] == "length", body
    return choice["text"]


def test_load_waves_all_answered_and_batched_equals_alone(server):
    base, proc = server
    alone = {p: _full(*complete(base, p)) for p in PROMPTS}
    with ThreadPoolExecutor(64) as pool:
        first = list(pool.map(lambda i: complete(base, PROMPTS[i % len(PROMPTS)]), range(64)))
        waves = [list(pool.map(lambda i: complete(base, PROMPTS[i % len(PROMPTS)]), range(200))) for _ in range(2)]
    results = first + [r for w in waves for r in w]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)] + [PROMPTS[i % len(PROMPTS)] for _ in range(2) for i in range(200)]
    texts = [_full(*r) for r in results]  # 0 lost or malformed responses
    same = sum(t == alone[p] for t, p in zip(texts, prompts))
    # Batched requests run the GEMM paths (more rows per call) instead of the GEMV; fp32 sums in
    # another order can flip a near-tie of this random model's greedy choice. Measured: stated in
    # the output below; any larger drift than a rare tie would be a bug.
    print(f"greedy batched == alone: {same} of {len(texts)}")
    assert same >= 0.9 * len(texts), f"only {same} of {len(texts)} batched outputs equal the alone ones"
    assert proc.poll() is None


@pytest.mark.parametrize("body, what", [
    ({"model": "tiny", "prompt": "hi", "max_tokens": -5}, "negative max_tokens"),
    ({"model": "tiny", "prompt": "word " * 2000, "max_tokens": 4}, "prompt beyond max-model-len"),
    (b"{not json", "invalid JSON"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 4, "logprobs": 100000}, "absurd logprobs"),
    ({"model": "nope", "prompt": "hi", "max_tokens": 4}, "unknown model"),
], ids=["neg-max-tokens", "too-long", "bad-json", "logprobs", "unknown-model"])
def test_bad_requests_get_4xx_and_server_keeps_serving(server, body, what):
    base, proc = server
    status, reply = post(base, body)
    assert 400 <= status < 500, (what, status, reply)
    assert _full(*complete(base, PROMPTS[0]))
    assert proc.poll() is None
