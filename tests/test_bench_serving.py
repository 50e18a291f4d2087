"""`ettin-export bench-serving`: one short run on a tiny artifact, as a user runs it (its own Triton server
and gateway): every system measured on the same requests, scores through the server equal to the
in-process runtime's, the front's own cost read from the server."""

from __future__ import annotations

import json

from ettin_export.cli import main as cli

from .tritonserver import server_env_or_skip


def test_bench_serving_reports_every_system_on_the_same_requests(tiny_artifact, tmp_path, capsys):
    server_env_or_skip()
    out = tmp_path / "serving.json"
    status = cli(["bench-serving", str(tiny_artifact), "--requests", "6", "--documents", "5", "--concurrency", "3",
                  "--runs", "2", "--min-seconds", "0", "--lengths", "short", "--out", str(out), "--quiet"])
    assert status == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["schema"] == "ettin-export.bench-serving/1" and report["workload"]["pairs"] == 30
    assert set(report["systems"]) == {"in-process", "in-process-all", "triton-grpc", "v1-rerank", "front-null"}
    for name, entry in report["systems"].items():
        assert len(entry["seconds"]) == 2 and entry["pairs_per_s"] > 0, name
        assert abs(entry["us_per_pair"] * entry["pairs_per_s"] - 1e6) < 1e-3 * 1e6, name
    assert set(report["max_abs_diff_vs_in_process"]) == {"triton-grpc", "v1-rerank"}
    assert max(report["max_abs_diff_vs_in_process"].values()) <= 1e-5
    front = report["front_alone"]
    assert front["cpu_us_per_pair"] > 0 and front["tokenize_us_per_pair"] > 0
    assert abs(front["pairs_per_s_per_instance"] * front["cpu_us_per_pair"] - 1e6) < 1.0
    # The null front's CPU is its own stubs', attributed by model; the real engine did not run for it.
    cpu = report["systems"]["front-null"]["server_cpu_us_per_pair"]
    assert cpu["ettin_reranker_null"] > 0 and cpu.get("ettin_reranker_ort", 0) < cpu["ettin_reranker_null"]
    assert report["systems"]["triton-grpc"]["server_cpu_us_per_pair"]["ettin_reranker_ort"] > 0
    assert "front alone" in text and "v1-rerank" in text and report["machine"]["cores"] >= 1
