"""The OpenAI-compatible server, started with `fp8-backend serve ... --quantization fp8` on
127.0.0.1, answers /v1/completions, and is stopped."""

import json
import urllib.request

import pytest
from server import running_server


@pytest.mark.slow
def test_server_completions_with_fp8(tiny_model, tmp_path):
    with running_server(tiny_model, tmp_path / "server.log", "--quantization", "fp8", "--dtype", "bfloat16",
                        "--kv-cache-memory-bytes", str(64 << 20), "--served-model-name", "tiny") as (base, proc, log):
        req = urllib.request.Request(
            base + "/v1/completions",
            data=json.dumps({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            body = json.loads(r.read())
        assert body["object"] == "text_completion"
        assert body["usage"]["completion_tokens"] == 6
        assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["text"]
        log.seek(0)
        text = log.read()
        assert "quantization=fp8" in text
        assert "fp8-backend" in text  # our config announced itself in the server's log
    assert proc.returncode is not None
