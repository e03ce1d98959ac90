"""benchmarks/profile_merge.py's summary of an Nsight Compute source page: per-line sums of the
SASS rows under each CUDA line, and phases found in the kernel source by name."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_merge  # noqa: E402

HEAD = ["Line No", "Source", "Address", "Source", "Warp Stall Sampling (All Samples)",
        "Warp Stall Sampling (Not-issued Samples)", "# Samples", "Instructions Executed"]


def write_page(path, lines):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["File Path", "/x/token_merge.cu"])
        w.writerow(HEAD)
        for line, text, sass in lines:
            w.writerow([str(line), text, "-", "-", "-", "-", "-", "-"])
            for samples, executed in sass:
                w.writerow(["", "", "0x7f00", "      FFMA R1, R2, R3, R4", str(samples), "0", "", f"{executed:,}"])
                w.writerow(["", "", "...", "...", "-", "-", "", ""])


def test_per_line_sums_the_sass_rows_under_each_line(tmp_path):
    page = tmp_path / "lines.csv"
    write_page(page, [(10, "a = b;", [(3, 1000), (1, 24)]), (12, "c = d;", [(0, 5)])])
    totals, text = profile_merge.per_line(str(page))
    assert totals[10] == [4.0, 1024.0] and totals[12] == [0.0, 5.0]
    assert text == {10: "a = b;", 12: "c = d;"}


def test_phases_are_found_in_the_kernel_source_and_cover_the_lines(tmp_path, capsys):
    bounds = profile_merge.phase_bounds(profile_merge.KERNEL.read_text())
    assert [name for name, _ in bounds] == [name for name, _ in profile_merge.PHASE_STARTS]
    page = tmp_path / "lines.csv"
    first, last = bounds[0][1], bounds[-1][1]
    write_page(page, [(first, "x", [(1, 10)]), (last + 1, "y", [(3, 30)])])
    profile_merge.summarize(str(page), top=2)
    out = capsys.readouterr().out
    assert f"| {bounds[0][0]} | 25.0% | 25.0% |" in out and f"| {bounds[-1][0]} | 75.0% | 75.0% |" in out


def test_a_page_without_metrics_is_a_one_line_error(tmp_path):
    page = tmp_path / "lines.csv"
    page.write_text('"Line No","Source"\n"1","// x"\n')
    with pytest.raises(SystemExit, match="no stall-sampling column"):
        profile_merge.per_line(str(page))
