"""`megamoe bench` at EP = 1 (`megamoe/bench/run.py`): the table rows (the timing itself needs a GPU)."""

from megamoe.bench.run import TABLE_HEADER, BenchRow, format_row

COLUMNS = ["shape", "routing", "tokens", "ours", "fp32sf", "fp8mma", "bf16", "fp8", "loop", "floor", "%floor",
           "x_bf16", "tflops", "gbps", "err", "err8"]


def test_header_names_every_column():
    names = TABLE_HEADER.replace("ours us", "ours").replace("bf16 us", "bf16").replace("fp8 us", "fp8") \
        .replace("loop us", "loop").replace("x bf16", "x_bf16").replace("rel err", "err").split()
    assert len(names) == len(COLUMNS) and names[5] == "fp8mma" and names[-1] == "err8"


def test_row_lists_every_variant_in_its_column():
    row = BenchRow("v4-flash", "uniform", 1, ours_us=61.1, ours_fp32sf_us=62.0, torch_bf16_us=205.8,
                   torch_fp8_us=171.9, loop_us=None, floor_hbm_us=19.1, floor_compute_us=0.1, tflops=4.0,
                   hbm_gbps=1200.0, rel_err=1.9e-3, rel_err_fp32sf=2.0e-3, ours_fp8mma_us=86.0, rel_err_fp8mma=0.0)
    cells = dict(zip(COLUMNS, format_row(row).split()))
    assert (cells["ours"], cells["fp32sf"], cells["fp8mma"], cells["bf16"]) == ("61.1", "62.0", "86.0", "205.8")
    assert (cells["loop"], cells["x_bf16"], cells["err"], cells["err8"]) == ("-", "3.37", "1.90e-03", "0.00e+00")


def test_row_marks_variants_that_did_not_run():
    row = BenchRow("gpt-oss-120b", "skewed", 8, 100.0, None, None, None, None, 10.0, 1.0, 1.0, 1.0, 3e-3, None)
    cells = dict(zip(COLUMNS, format_row(row).split()))
    assert [cells[c] for c in ("fp32sf", "fp8mma", "bf16", "fp8", "loop", "err8")] == ["-"] * 6
