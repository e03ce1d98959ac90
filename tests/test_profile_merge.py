"""benchmarks/profile_merge.py's summary of an Nsight Compute source page: per-line sums of the
SASS rows under each CUDA line, and phases found in the kernel source by name."""

import re
import shutil
import subprocess
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


# The step timeline (-DTM_TRACE): the ring the kernel writes, read back on the host.

def ring(cluster, stamps):
    """Flattened [TRACE_LAUNCHES][cluster][TRACE_MARKS] arrays from {(slot, block, mark): (time, clock)}."""
    n = profile_merge.TRACE_LAUNCHES * cluster * profile_merge.TRACE_MARKS
    times, clocks = [0] * n, [0] * n
    for (slot, blk, m), (t, c) in stamps.items():
        i = (slot * cluster + blk) * profile_merge.TRACE_MARKS + m
        times[i], clocks[i] = t, c
    return times, clocks


def test_read_ring_orders_launches_and_leaves_out_marks_a_launch_did_not_reach():
    cluster, stamps = 2, {}
    # 10 launches so far: the ring holds launches 2..9; launch k in slot k % 8 starts at 1000 k.
    for k in range(2, 10):
        for blk in range(cluster):
            base = 1000 * k + 5 * blk  # block 1 starts 5 ns later
            for m, _ in profile_merge.MARKS:
                if m == 14 and k % 2:  # odd launches skip mark 14: it keeps a stamp from long ago
                    stamps[(k % 8, blk, m)] = (7, 7)
                    continue
                stamps[(k % 8, blk, m)] = (base + 10 * m, 2 * (10 * m))
    launches = profile_merge.read_ring(*ring(cluster, stamps), count=10, cluster=cluster)
    assert [r["start"] for r in launches] == [1000 * k for k in range(2, 10)]
    first = launches[0]
    assert first["at"][3] == 5 + 30 and first["cycles"][3] == 60  # the last block's stamp; block 0's clock
    assert 14 in first["at"] and 14 not in launches[1]["at"] and 14 not in launches[1]["cycles"]
    assert first["end"] == 2000 + 5 + 10 * profile_merge.END_MARK
    summary = profile_merge.summarize_launches([launches])
    assert summary["gap"] == 1000 - 5 - 10 * profile_merge.END_MARK
    assert summary["at"][14] == 5 + 140 and summary["at"][profile_merge.END_MARK] == 5 + 130


def test_a_ring_not_yet_full_holds_the_launches_so_far():
    stamps = {(k, 0, m): (100 * (k + 1) + m, m) for k in range(3) for m, _ in profile_merge.MARKS}
    launches = profile_merge.read_ring(*ring(1, stamps), count=3, cluster=1)
    assert [r["start"] for r in launches] == [100, 200, 300]


def test_the_table_names_every_mark_of_the_kernel_once():
    source = profile_merge.KERNEL.read_text()
    in_source = [int(m) for m in re.findall(r"TM_MARK\((\d+)\)", source)]
    assert sorted(in_source) == sorted(m for m, _ in profile_merge.MARKS)
    assert len(set(in_source)) == len(in_source)
    sizes = re.search(r"constexpr int TRACE_MARKS = (\d+), TRACE_LAUNCHES = (\d+);", source)
    assert (int(sizes.group(1)), int(sizes.group(2))) == (profile_merge.TRACE_MARKS, profile_merge.TRACE_LAUNCHES)
    assert max(in_source) < profile_merge.TRACE_MARKS


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_the_trace_is_compiled_in_only_on_request(tmp_path):
    from mame_deploy.plugins import merge_launch

    tuning = merge_launch.TINY_BATCH_TUNING
    opts = merge_launch.compile_options(merge_launch.Variant("float32", "float32"), tuning)
    ptx = {}
    for traced in (False, True):
        out = tmp_path / f"k{traced}.ptx"
        cmd = ["nvcc", "-arch=sm_90", "-ptx", "-o", str(out), *opts, *(["-DTM_TRACE"] if traced else []),
               str(merge_launch.KERNEL_SOURCE)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        ptx[traced] = out.read_text()
    assert "tm_trace" not in ptx[False]
    entries = profile_merge.TRACE_LAUNCHES * tuning.cluster * profile_merge.TRACE_MARKS
    for name in ("tm_trace_time", "tm_trace_clock"):  # unmangled, 8-byte stamps, the size the host reads
        assert re.search(rf"\.global \.align 8 \.b8 {name}\[{8 * entries}\]", ptx[True]), name
    assert re.search(r"\.global \.align 4 \.u32 tm_trace_count", ptx[True])


def test_kernel_source_swaps_the_compiled_file_and_restores_it(tmp_path):
    from mame_deploy.plugins import merge_launch

    tree = merge_launch.KERNEL_SOURCE
    other = tmp_path / "parent.cu"
    other.write_text("// a parent's kernel\n")
    with profile_merge.kernel_source(other):
        assert merge_launch.KERNEL_SOURCE == other.resolve()
    assert merge_launch.KERNEL_SOURCE == tree
    with pytest.raises(RuntimeError), profile_merge.kernel_source(other):
        raise RuntimeError("a failed run")
    assert merge_launch.KERNEL_SOURCE == tree  # restored after an error too
    with profile_merge.kernel_source(None):
        assert merge_launch.KERNEL_SOURCE == tree


@pytest.mark.parametrize("what", ["run", "timeline", "in-model"])
def test_a_missing_kernel_source_is_a_one_line_error(what, tmp_path, capsys):
    assert profile_merge.main([what, "--kernel-source", str(tmp_path / "none.cu")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such file" in err and "none.cu" in err and "\n" not in err


def test_the_gpu_subcommands_say_they_need_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert profile_merge.main(["in-model", "--ratio", "0.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: profile_merge.py in-model needs a CUDA GPU"


def test_bits_lists_cases_that_differ_in_any_output_or_exist_once():
    import torch

    same = {"a": [torch.tensor([1.0, 2.0]), torch.tensor([3])], "b": [torch.tensor([0.0])]}
    assert profile_merge.differing(same, {k: [x.clone() for x in v] for k, v in same.items()}) == []
    one_bit = {"a": [torch.tensor([1.0, 2.0]), torch.tensor([4])], "b": [torch.tensor([-0.0])]}
    assert profile_merge.differing(same, one_bit) == ["a", "b"]  # -0.0 is not 0.0's bits
    assert profile_merge.differing(same, {"a": same["a"], "c": same["b"]}) == ["b", "c"]
    assert profile_merge.differing(same, {"a": same["a"][:1], "b": same["b"]}) == ["a"]  # an output missing
    nan = {"n": [torch.tensor([float("nan")], dtype=torch.bfloat16)]}
    assert profile_merge.differing(nan, {"n": [nan["n"][0].clone()]}) == []  # the same NaN bits
    assert profile_merge.differing(nan, {"n": [nan["n"][0].float()]}) == ["n"]  # another dtype


def test_bits_needs_a_kernel_source_to_compare_against(capsys):
    assert profile_merge.main(["bits"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--kernel-source" in err and "\n" not in err


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_same_code_finds_a_copy_identical_and_a_changed_constant_different(tmp_path, capsys):
    from mame_deploy.plugins import merge_launch

    source = profile_merge.KERNEL.read_text()
    copy, changed = tmp_path / "copy.cu", tmp_path / "changed.cu"
    copy.write_text("// a comment changes no code\n" + source)
    depth = "constexpr int COPY_DEPTH = TM_MIN_BLOCKS > 1 ? 4 : 6;"
    assert depth in source
    changed.write_text(source.replace(depth, "constexpr int COPY_DEPTH = TM_MIN_BLOCKS > 1 ? 4 : 5;"))
    one = dict(tunings=[merge_launch.TINY_BATCH_TUNING], types=[("bfloat16", "float32")], capacities=[256], jobs=2)
    assert profile_merge.same_code(copy, **one) == 0
    assert "1 variants (splits x types x capacities): 0 compile to different code" in capsys.readouterr().out
    assert profile_merge.same_code(changed, **one) == 1
    assert "differs: 16x8x4x2x64x1x4x256x128" in capsys.readouterr().out


def test_same_code_refuses_a_missing_source_and_needs_one(tmp_path, capsys):
    assert profile_merge.main(["same-code"]) == 2
    assert "same-code needs --kernel-source F" in capsys.readouterr().err
    assert profile_merge.main(["same-code", "--kernel-source", str(tmp_path / "none.cu")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_same_code_says_in_one_line_when_a_source_does_not_compile(tmp_path, capsys):
    broken = tmp_path / "broken.cu"
    broken.write_text("this is not CUDA\n")
    assert profile_merge.main(["same-code", "--kernel-source", str(broken), "--jobs", "2"]) == 2
    assert "nvcc does not compile" in capsys.readouterr().err
