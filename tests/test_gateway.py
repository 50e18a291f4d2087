"""`ettin-export serve --artifact`: the rerank gateway with the runtime in its own process (no Triton),
as a user starts it; the in-process batching of concurrent requests; the command's refusals.
(/v1/rerank in front of a real Triton server: tests/test_deploy.py; the schema: tests/test_rerank_api.py.)"""

from __future__ import annotations

import asyncio
import json
import random
import threading

import numpy as np
import pytest

from ettin_export.cli import main as cli

pytest.importorskip("starlette", reason="the gateway needs: pip install 'ettin-export[serve]'")
pytest.importorskip("uvicorn", reason="the gateway needs: pip install 'ettin-export[serve]'")

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def local(tiny_artifact):
    from ettin_runtime import Reranker

    with Reranker.load(tiny_artifact) as reranker:
        yield reranker


def _texts(seed: int, count: int, low: int = 1, high: int = 40) -> list[str]:
    from ettin_export.synthetic.text import random_sentence

    rng = random.Random(seed)
    return [random_sentence(rng, rng.randint(low, high)) for _ in range(count)]


def test_serve_artifact_answers_v1_rerank_with_the_runtimes_scores(tiny_artifact, local, tmp_path):
    from .gateway_client import post, request, start_gateway

    seed = random.randrange(2**31)
    query, documents = _texts(seed, 1)[0], _texts(seed + 1, 25) + ["", "long " * 900]
    expected = local.predict([(query, d) for d in documents])
    with start_gateway(["--artifact", str(tiny_artifact), "--allow-random-weights", "--max-documents", "30"],
                       tmp_path / "gateway.log") as url:
        status, body = post(url + "/v1/rerank", {"query": query, "documents": documents, "raw_scores": True,
                                                 "top_n": 10})
        assert status == 200, body
        order = np.argsort(-expected, kind="stable")[:10]
        assert [r["index"] for r in body["results"]] == order.tolist()
        np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], expected[order], rtol=0,
                                   atol=TOLERANCE)
        status, body = post(url + "/v1/rerank", {"query": query, "documents": documents * 2})
        assert (status, body["error_type"]) == (413, "Validation") and "maximum allowed batch size 30" in body["error"]
        status, info = request(url + "/info")
        assert info["backend"] == "in-process" and info["max_client_batch_size"] == 30 and info["random_weights"]
        assert post(url + "/rerank", {"query": query, "texts": documents[:3]})[0] == 200  # still answering

        # A body over --payload-limit (2 MB) is a 413 the client can read, sent whole (Content-Length) or
        # chunked, even when it is far larger than the socket buffers (the gateway drains it, no broken pipe).
        big = json.dumps({"query": query, "documents": ["x" * 1_000_000] * 10}).encode()
        for body in (big, iter([big[i:i + 65536] for i in range(0, len(big), 65536)])):
            status, refusal = post(url + "/v1/rerank", body)
            assert (status, refusal["error_type"]) == (413, "Validation") and "2000000" in refusal["error"], refusal
        assert post(url + "/v1/rerank", {"query": query, "documents": documents[:2]})[0] == 200


def test_concurrent_requests_share_one_predict_call(local):
    """While one predict runs, arriving requests wait and are scored together in the next one; each gets
    exactly its own scores back."""
    from ettin_export.serving.gateway import InProcessBackend

    class Counting:
        max_length = local.max_length
        encoder = local.encoder

        def __init__(self):
            self.calls = []

        def predict(self, pairs):
            self.calls.append(len(pairs))
            return local.predict(pairs)

        def close(self):
            pass

    counting = Counting()
    backend = InProcessBackend(counting, {})
    seed = random.randrange(2**31)
    work = [(f"query {n}", _texts(seed + n, 1 + n % 7, 1, 12)) for n in range(12)]

    async def main():
        return await asyncio.gather(*(backend.scores(query, documents) for query, documents in work))

    results = asyncio.run(main())
    assert len(counting.calls) < len(work) and sum(counting.calls) == sum(len(d) for _, d in work), counting.calls
    for (query, documents), got in zip(work, results):
        np.testing.assert_allclose(got, local.predict([(query, d) for d in documents]), rtol=0, atol=TOLERANCE)

    # A call gathers at most PAIRS_PER_CALL pairs (a request larger than that goes alone).
    import ettin_export.serving.gateway as gateway

    counting.calls.clear()
    original, gateway.PAIRS_PER_CALL = gateway.PAIRS_PER_CALL, 8
    try:
        again = asyncio.run(main())
    finally:
        gateway.PAIRS_PER_CALL = original
    sizes = [len(d) for _, d in work]
    assert all(call <= 8 for call in counting.calls) and sum(counting.calls) == sum(sizes), counting.calls
    assert all(np.array_equal(a, b) for a, b in zip(again, results))


def test_serve_refuses_random_weights_a_dead_server_and_two_sources(tiny_artifact, capsys):
    assert cli(["serve", "--artifact", str(tiny_artifact)]) == 2
    assert "RANDOM weights" in capsys.readouterr().err
    from ettin_export.serving.triton_server import free_port

    assert cli(["serve", "--triton", f"127.0.0.1:{free_port()}"]) == 2
    assert "Cannot read the reranker model 'ettin_reranker'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["serve", "--artifact", str(tiny_artifact), "--triton", "localhost:8001"])
    assert cli(["serve", "--artifact", str(tiny_artifact), "--max-documents", "0"]) == 2


def test_the_serving_commands_import_nothing_heavy():
    import subprocess
    import sys

    heavy = ("torch", "onnx", "onnxruntime", "google.protobuf", "tritonclient", "starlette", "uvicorn")
    code = ("import sys, argparse, ettin_export.commands.serve as s, ettin_export.commands.bench_serving as b; "
            "[m.add_arguments(argparse.ArgumentParser()) for m in (s, b)]; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
