"""Every benchmark runs whole on a tiny input (RACKBOOT_BENCH_TINY=1: benchmarks/tiny.py),
through benchmarks/run.py as `make bench` runs it, so a benchmark that crashes fails the
suite and not the next `make bench` (bench_rack read serve's PID file as one number after
it came to hold two). The figures mean nothing here; only that each ran and reported.

Three are left to `make bench TINY=1`, which runs them whole, for the suite's time: the two
that boot QEMU and the one that builds the example from cold twice over. What they run the
e2e tests run too (every e2e module builds the example, and netboots it); bench_rack also
needs a rack network in a namespace (root, tc, the rack subnet another test may hold): its
parts that need none (the dnsmasq pid from the file serve writes, the figures' arithmetic
on given rounds) are tested here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rackboot.master import dnsmasq

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_rack  # noqa: E402
import run  # noqa: E402

SLOW = [pytest.mark.slow, pytest.mark.network]  # builds roots from Debian packages (cached)
IN_RUN = [
    pytest.param("inventory"),
    pytest.param("fleet"),  # 6 workers against a real rackboot serve: its publish makes a small ext4 image
    pytest.param("bootfiles"),
    pytest.param("stream", marks=pytest.mark.slow),  # a 32 MiB image published and streamed
    pytest.param("delta", marks=SLOW),  # root: its rsync method mounts the slot it fills
]
LEFT_TO_MAKE_BENCH = {"build", "netboot", "rack"}  # `make bench TINY=1` runs these: see the docstring
ALONE = [pytest.param("bench_cpio.py"), pytest.param("bench_rsync.py", marks=SLOW)]  # not in make bench's list


def tiny(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        env={**os.environ, "RACKBOOT_BENCH_TINY": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_every_benchmark_of_make_bench_is_run_here_but_three():
    assert {p.values[0] for p in IN_RUN} == set(run.BENCHMARKS) - LEFT_TO_MAKE_BENCH
    assert set(run.BENCHMARKS) >= LEFT_TO_MAKE_BENCH  # each still in `make bench`, TINY=1 or not


@pytest.mark.parametrize("name", IN_RUN)
def test_each_benchmark_runs_on_a_tiny_input_as_make_bench_runs_it(name):
    done = tiny(str(BENCHMARKS / "run.py"), name)
    assert done.returncode == 0, done.stderr[-3000:]
    title, *figures = done.stdout.splitlines()
    assert title.startswith("== ") and title.endswith(" ==") and figures, done.stdout  # its heading, then its figures


@pytest.mark.parametrize("script", ALONE)
def test_the_benchmarks_run_on_their_own_run_on_a_tiny_input(script):
    done = tiny(str(BENCHMARKS / script))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout or "fetched" in done.stdout, done.stdout


def test_unknown_benchmark_names_are_one_line_and_exit_2():
    done = tiny(str(BENCHMARKS / "run.py"), "nonesuch")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"run.py: no benchmark 'nonesuch'; known: {', '.join(run.BENCHMARKS)}\n"


def test_bench_rack_takes_the_dnsmasq_pid_from_the_file_serve_writes(tmp_path):
    dnsmasq.write_pids(tmp_path, 4242, 77)  # as NetbootService.start writes it: "<dnsmasq pid> <serve pid>"
    assert bench_rack.serve_dnsmasq(tmp_path) == 4242
    (tmp_path / dnsmasq.PID).unlink()
    with pytest.raises(SystemExit, match=r"^bench_rack: no dnsmasq pid in .*\.dnsmasq\.pid: is serve's netboot"):
        bench_rack.serve_dnsmasq(tmp_path)


def round_of(workers: int, image_mb: float, span: float, confirmed: float, **kw) -> bench_rack.Round:
    files = {"Image.lzma": 8_000_000, "initramfs.cpio.xz": 6_000_000}
    marks = {"script": 1.0, "file 1": 2.0, "file 2": 3.5, "kernel": 5.0, "confirmed": confirmed}
    return bench_rack.Round(
        workers=workers,
        rate_mbit=kw.get("rate_mbit", 0),
        seconds_to_all_confirmed=confirmed,
        image_bytes=int(image_mb * 1e6),
        download_span=span,
        serve_cpu=kw.get("serve_cpu", 1.0),
        dnsmasq_cpu=kw.get("dnsmasq_cpu", 0.5),
        tftp_bytes=sum(files.values()) * workers,
        netboot=marks,
        netboot_files=files,
    )


def test_bench_rack_figures_from_given_rounds():
    one = round_of(1, 10, 2.0, 20.0)  # 5 MB/s alone
    storm = round_of(4, 40, 5.0, 30.0)  # 8 MB/s together
    shaped = round_of(4, 36, 20.0, 50.0, rate_mbit=16)  # 1.8 MB/s of a 2 MB/s link
    lines = bench_rack.report([one, storm, shaped]).splitlines()
    assert lines[0] == "  one worker alone:      5.00 MB/s of image (the reference); power-on -> confirmed 20.0 s"
    assert lines[1] == (
        "  4 workers together:   8.00 MB/s aggregate, x1.60 of one worker's; power-on -> all confirmed 30.0 s, x1.50"
    )
    assert lines[2] == (
        "  4 workers, link 16 Mbit/s:   1.80 MB/s aggregate, 0.90 of the link's 2.00 MB/s (goal >= 0.8: ok); "
        "power-on -> all confirmed 50.0 s"
    )
    served, tftp = 86e6 / 2**30, 14e6 * 9 / 2**30  # image bytes of the three rounds; TFTP of 9 netboots
    assert lines[3] == (
        f"  master CPU: serve {3 / served:.1f} s per GiB of images ({served:.2f} GiB served); "
        f"its dnsmasq {1.5 / tftp:.1f} s per GiB over TFTP ({tftp:.2f} GiB)"
    )
    assert lines[4] == (
        "  one netboot over dnsmasq's TFTP: 14.00 MB (Image.lzma 8.00, initramfs.cpio.xz 6.00) in 2.50 s, "
        "5.60 MB/s; power-on -> script 1.00 s, -> kernel 5.00 s"
    )
