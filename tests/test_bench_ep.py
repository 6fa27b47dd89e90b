"""`megamoe bench --ep N` on the CPU: 2 gloo ranks, the tiny shape, the nccl backend and both
baselines, a few iterations. Checks the JSON's fields, that every path passed its accuracy check
and that every time is finite and positive; the GPU-only parts (symm, CUDA graphs, NVLink) are
covered by running the command on the GPU machines (docs/EP.md)."""

from __future__ import annotations

import json
import math
import time

import pytest

from megamoe.bench import ep
from megamoe.cli import main

TOKENS = (1, 2)


def _argv(out, *extra):
    return ["bench", "--ep", "2", "--device", "cpu", "--shapes", "tiny", "--tokens", ",".join(map(str, TOKENS)),
            "--backends", "nccl", "--warmup", "0", "--iters", "2", "--sets", "1", "--out", str(out), *extra]


def test_bench_ep_on_gloo_ranks(tmp_path, capfd):
    assert main(_argv(tmp_path)) == 0
    result = json.loads((tmp_path / "ep2.json").read_text())
    assert result["complete"] and result["num_ranks"] == 2 and result["device"] == "cpu"
    assert result["shape"] == {"name": "tiny", "num_experts": 8, "num_topk": 2, "hidden": 256, "intermediate": 128}
    for key in ("card", "date", "torch", "triton", "notes"):
        assert key in result, key
    assert result["paths"] == ["nccl", "torch", "ep1"] and result["nvlink"] == [None, None]
    assert (result["warmup"], result["iters"], result["sets"]) == (0, 2, 1)

    rows = result["rows"]
    assert sorted((r["tokens"], r["rank"]) for r in rows) == [(t, r) for t in TOKENS for r in (0, 1)]
    for row in rows:
        for path in ("nccl", "torch", "ep1"):
            assert row["status"][path] == "ok", (row["tokens"], row["rank"], path)
            assert row["rel_err"][path] <= ep.CHECK_TOLERANCE[path]
            assert math.isfinite(row[f"{path}_us"]) and row[f"{path}_us"] > 0
        assert row["symm_us"] is None and row["floor_us"] is None
        assert row["recv_rows_from_peers"] >= 0
        assert row["bytes_moved"] == row["recv_rows_from_peers"] * (256 + 256 // 32 + 4 + 2 * 256)
    # The nccl path in the interpreter takes the reference's rounding steps: exact.
    assert all(row["rel_err"]["nccl"] == 0 for row in rows)

    summary = {s["tokens"]: s for s in result["summary"]}
    assert sorted(summary) == list(TOKENS)
    for tokens, s in summary.items():
        mine = [r for r in rows if r["tokens"] == tokens]
        assert s["nccl_us"] == max(r["nccl_us"] for r in mine)
    # symm is not run on the CPU, so every target is reported as not measured.
    assert result["targets"] and all(t["met"] is None for t in result["targets"])

    out = capfd.readouterr().out   # rank 0 prints from its own process
    assert "nccl/symm" in out and "wrote" in out


@pytest.mark.parametrize("argv, message", [
    (["--ep", "1"], "--ep: expected a rank count >= 2"),
    (["--ep", "3"], "--ep: the tiny shape's 8 experts do not split evenly over 3 ranks"),
    (["--ep", "2", "--backends", "nccl,mpi"], "--backends: expected distinct names among symm,nccl"),
    (["--ep", "2", "--baselines", "ep1,ep1"], "--baselines: expected distinct names"),
    (["--ep", "2", "--iters", "0"], "--iters: expected an integer >= 1"),
    (["--ep", "2", "--tokens", "1,x"], "--tokens: expected comma-separated integers"),
    (["--ep", "2", "--tokens", "0"], "--tokens: expected positive token counts"),
    (["--ep", "2", "--shapes", "tiny,v4-flash"], "--shapes: the EP benchmark runs one shape per run"),
    (["--ep", "2", "--shapes", "huge"], "--shapes: expected one of"),
    (["--ep", "2", "--device", "tpu"], "--device: expected cuda or cpu"),
    (["--ep", "2", "--routing", "skewed"], "--routing: the EP benchmark routes uniformly"),
    (["--warmup", "3"], "--warmup: only with --ep N"),
])
def test_bench_ep_argument_errors(argv, message, tmp_path):
    base = ["bench", "--device", "cpu", "--shapes", "tiny", "--out", str(tmp_path)]
    if argv[0] == "--warmup":
        base.remove("--device")
        base.remove("cpu")
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        main(base + argv)


def test_bench_ep_deadline_kills_the_ranks(tmp_path):
    """A run past its deadline: each rank dumps its stacks and exits, and the launcher raises."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="all ranks killed"):
        main(_argv(tmp_path, "--deadline", "1"))
    assert time.monotonic() - start < 45
    assert not (tmp_path / "ep2.json").exists() or not json.loads((tmp_path / "ep2.json").read_text())["complete"]


def test_floor_ratios_and_targets():
    """The GPU-only arithmetic: floor = ep1 + bytes / NVLink, ratios, slowest rank, verdicts."""
    nvlink = {"gbps": 400.0}
    rows = []
    for rank, (symm, nccl, ep1) in enumerate(((30.0, 60.0, 20.0), (50.0, 50.0, 25.0))):
        row = {"tokens": 8, "rank": rank, "status": {"symm": "ok", "nccl": "ok"}, "bytes_moved": 4e6,
               "symm_us": symm, "nccl_us": nccl, "torch_us": None, "ep1_us": ep1}
        ep._derive(row, nvlink)
        rows.append(row)
    assert rows[0]["floor_us"] == pytest.approx(20.0 + 10.0)     # 4 MB at 400 GB/s: 10 us
    assert rows[0]["symm_over_floor"] == pytest.approx(1.0)
    assert rows[0]["symm_vs_nccl"] == pytest.approx(2.0)
    assert rows[1]["symm_gbps"] == pytest.approx(80.0)
    summary = ep._slowest(rows)
    assert (summary["symm_us"], summary["nccl_us"], summary["floor_us"]) == (50.0, 60.0, 35.0)
    targets = ep._targets(summary)
    assert [(t["what"], t["met"]) for t in targets] == [("nccl time / symm time", False), ("symm time / floor", False)]
    assert targets[0]["value"] == pytest.approx(1.2) and targets[1]["value"] == pytest.approx(50 / 35)
    assert "1.20" in ep.format_row(summary) and "max" in ep.format_row(summary)
    ep._derive(row := {"bytes_moved": 1.0, "symm_us": None, "nccl_us": 5.0, "ep1_us": 3.0}, None)
    assert row["floor_us"] is None and row["symm_vs_nccl"] is None and row["nccl_gbps"] > 0
