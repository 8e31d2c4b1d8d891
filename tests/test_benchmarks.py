"""The GPU benchmark scripts run end to end before GPU time is spent on them.

``benchmarks/gpu_throughput.py`` and ``gpu_determinism.py`` are meant for a lent GPU whose minutes are few; a
plumbing error found there costs them. Their ``--cpu-smoke`` runs the same orchestration (fresh processes per run,
every strategy, the result files, the tables) on the CPU (ranks over gloo) with a tiny ViT. Timings are not asserted
(tests never are); the tables' shape, world sizes, ratios and bit-identity on the CPU are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

from launcher import reserved_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _rows(stdout: str) -> list[list[str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| smoke |")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_gpu_throughput_script_runs_every_strategy_on_cpu_ranks():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--cpu-smoke",
                           "--batches", "8", "--compile", "off", "--strategies", "none,fsdp,fsdp:3,zero3", "--warmup",
                           "1", "--steps", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    # model, px, strategy, compile, GPUs, ranks, micro-batch/GPU, images/s/GPU, ratio to none, MFU, peak GiB, syncs,
    # card
    assert [(r[2], r[4], r[5], r[6]) for r in rows] == [("none", "1", "1", "2"), ("fsdp", "2", "2", "2"),
                                                        ("fsdp:3", "2", "2", "2"), ("zero3", "2", "2", "2")], \
        proc.stdout[-3000:]
    for r in rows:
        assert "failed" not in r[7] and float(r[7]) > 0, r
        assert r[9] == "n/a" and r[12] == "CPU (smoke run: no timings)", r  # no MFU without a known card
    # each run's result line: ViT-Ti's 12 blocks + root as FSDP units, or 4 units of 3 + root
    results = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{"model"')]
    assert [(r["strategy"], r["fsdp_units"]) for r in results] == [("none", 0), ("fsdp", 13), ("fsdp:3", 5),
                                                                   ("zero3", 0)]
    # the ratio column divides images/s per GPU by none's at the same micro-batch (from the unrounded result lines:
    # the table's one-decimal images/s of a slow CPU run can move a ratio by more than its own rounding)
    ips = {r["strategy"]: r["images_per_s"] / r["world"] for r in results}
    assert rows[0][8] == "1.00"
    for r in rows[1:]:
        assert abs(float(r[8]) - ips[r[2]] / ips["none"]) <= 0.0051, r


def test_gpu_throughput_fake_world_runs_rank_0_of_n_on_one_device():
    """``--fake-world 4``: fsdp and zero3 run in one plain process as rank 0 of 4 (a quarter of the model each, the
    multi-rank code path), none as before; images/s per GPU divides the Trainer's global rate by the 4 ranks."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--cpu-smoke",
                           "--fake-world", "4", "--batches", "8", "--compile", "off", "--strategies",
                           "none,fsdp,zero3", "--warmup", "1", "--steps", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert [(r[2], r[4], r[5]) for r in rows] == [("none", "1", "1"), ("fsdp", "1", "4 (fake)"),
                                                  ("zero3", "1", "4 (fake)")], proc.stdout[-3000:]
    results = {r["strategy"]: r for r in (json.loads(ln) for ln in proc.stdout.splitlines()
                                          if ln.startswith('{"model"'))}
    assert [(results[s]["world"], results[s]["fake_world"]) for s in ("none", "fsdp", "zero3")] == [
        (1, False), (4, True), (4, True)]
    assert results["fsdp"]["fsdp_units"] == 13
    for r in rows[1:]:
        assert abs(float(r[7]) - results[r[2]]["images_per_s"] / 4) <= 0.06, r


def test_gpu_throughput_script_without_cuda_says_not_measured():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "GPU throughput not measured" in proc.stdout


def test_gpu_throughput_budget_skips_what_would_not_fit_and_still_prints_the_table():
    """``--budget``: after the first run (a few seconds), a budget of 1 s leaves no room for another of its length;
    the rest is skipped, named, and the table shows the run that was made."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--cpu-smoke",
                           "--batches", "8", "--compile", "off", "--strategies", "none,fsdp", "--warmup", "1",
                           "--steps", "2", "--budget", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r[2] for r in _rows(proc.stdout)] == ["none"]
    assert "--budget 1 s:" in proc.stdout and "skipped ['smoke 2 off fsdp']" in proc.stdout, proc.stdout[-2000:]


def test_gpu_throughput_timeout_kills_the_ranks_not_only_the_launcher(tmp_path):
    """A launch that runs past ``--timeout`` is killed with the processes it started (torchrun's ranks), which
    otherwise live on under init and keep their GPU memory for the rest of the benchmark. Here the launcher is a
    Python process whose child sleeps for a minute and writes its pid first."""
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("gpu_throughput", REPO / "benchmarks" / "gpu_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pid_file = tmp_path / "rank.pid"
    launcher = ("import subprocess, sys; rank = subprocess.Popen([sys.executable, '-c', 'import time; "
                "time.sleep(60)']); open(sys.argv[1], 'w').write(str(rank.pid)); rank.wait()")
    assert bench.launch([sys.executable, "-c", launcher, str(pid_file)], dict(os.environ), timeout=5) == "timeout"

    def running(pid: str) -> bool:
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while running(pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)  # the SIGKILL is sent; a killed process lingers as a zombie until init reaps it
    assert not running(pid_file.read_text()), "the rank outlived its launch"


def test_gpu_determinism_script_runs_on_cpu():
    """``gpu_determinism.py --cpu-smoke``: four fresh processes (two per ``train.deterministic`` setting) and the
    SIGTERM + resume check, on the CPU with a tiny ViT. On the CPU every pair must end bit-identical, and so must
    the resumed run."""
    import json

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_determinism.py"), "--cpu-smoke", "--steps",
                           "4", "--batch", "8"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in proc.stdout.splitlines()
            if ln.startswith("| vit_tiny")]
    assert [(r[1], r[4]) for r in rows] == [("False", "True"), ("True", "True")], proc.stdout[-2000:]
    checks = json.loads(proc.stdout.split("checks: ", 1)[1].splitlines()[0])
    assert checks == {"resumed_from": 5, "resume_bit_identical": True}


def test_host_overhead_proxy_runs_and_groups_blocks_per_fsdp_unit(tmp_path):
    """``host_overhead.py`` (one rank under torchrun) with ``fsdp:2``: 4 blocks as 2 units + the root, against 5
    units with one block each; the ratio column divides by none's median in the same run. ``--bare``: the plain
    loops (none, FSDP2, flat-parameter FSDP, DeepSpeed ZeRO-3) do the same arithmetic, so they end at the same loss,
    and the Trainer / bare column divides the two fastest steps of one strategy."""
    out = tmp_path / "times.json"
    # The rendezvous port, held for the launch, names this launch's DeepSpeed /dev/shm buffers:
    # deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>; no other launch on the machine has it.
    with reserved_port() as port:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                               "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(REPO / "benchmarks" / "host_overhead.py"), "--strategies", "none,fsdp,fsdp:2,zero3",
                               "--bare", "--rounds", "1", "--steps", "4", "--depth", "4", "--json", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in proc.stdout.splitlines()
                              if ln.startswith(("| none |", "| fsdp |", "| fsdp:2 |")) and ln.count("|") == 12)}
    assert [rows[s][7] for s in ("none", "fsdp", "fsdp:2")] == ["0", "5", "3"], proc.stdout[-3000:]
    assert [rows[s][8] for s in ("none", "fsdp", "fsdp:2")] == ["1", "1", "1"]  # world sizes
    times = json.loads(out.read_text())
    assert rows["none"][2] == "1.00"
    assert abs(float(rows["fsdp:2"][2]) - times["fsdp:2"][0][0] / times["none"][0][0]) <= 0.006
    bare = {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in
                              proc.stdout.split("Bare loops")[1].splitlines() if ln.count("|") == 7)}
    assert set(bare) - {"bare loop", "---"} == {"none", "fsdp", "fsdp1", "zero3"}, proc.stdout[-3000:]
    losses = {k: v[0][2] for k, v in times["bare"].items()}
    assert all(abs(loss - losses["none"]) <= 1e-5 for loss in losses.values()), losses
    own = min(x[2] for x in times["fsdp"]) / min(x[1] for x in times["bare"]["fsdp"])
    assert abs(float(bare["fsdp"][5]) - own) <= 0.006 and bare["fsdp1"][5] == "—"
    # DeepSpeed's CPU backend, restarted for the plain ZeRO-3 loop, leaves no 69 MB buffer in /dev/shm (other
    # launches on the machine, this suite's other worker included, have buffers of their own names).
    assert not left, left


def test_host_overhead_fake_world_shards_over_two_ranks_in_one_process():
    """``--fake-world 2``: fsdp and zero3 run as rank 0 of two (each holds half of the model) in torch's fake process
    group, ``none`` in a real group of one; two rounds, so the group is rebuilt around DeepSpeed twice (its cached
    group references must be released with the old group, or the second zero3 engine fails). Every cell ran on one
    compute thread: CPU time stays within wall time (Accelerate would otherwise raise the thread count)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_overhead.py"), "--fake-world", "2",
                           "--strategies", "none,fsdp,zero3", "--rounds", "2", "--steps", "4", "--depth", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in proc.stdout.splitlines()
                              if ln.startswith(("| none |", "| fsdp |", "| zero3 |")) and ln.count("|") == 12)}
    assert {s: (rows[s][8], rows[s][9]) for s in rows} == {"none": ("1", "1.00"), "fsdp": ("2", "0.50"),
                                                           "zero3": ("2", "0.50")}, proc.stdout[-3000:]
    assert rows["fsdp"][7] == "5"  # 4 blocks + root
    for s, r in rows.items():
        wall, cpu = float(r[1]), float(r[3])
        assert cpu <= 1.3 * wall, (s, wall, cpu)


FAKE_WORLD_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from fake_world import enter_world

out = {}
enter_world(4)
out["world"], out["backend"] = dist.get_world_size(), dist.get_backend()
x = torch.arange(3.0)
gathered = torch.full((12,), float("nan"))
dist.all_gather_into_tensor(gathered, x)                  # every rank seems to hold rank 0's data
out["gather"] = gathered.tolist()
inplace = torch.full((12,), float("nan"))
inplace[:3] = x
dist.all_gather_into_tensor(inplace, inplace[:3])         # FSDP2's in-place form: the input is slot 0
out["inplace"] = inplace.tolist()
scattered = torch.full((3,), float("nan"))
dist.reduce_scatter_tensor(scattered, torch.arange(12.0))  # rank 0's chunk
out["scatter"] = scattered.tolist()

from torch.distributed.fsdp import fully_shard               # the multi-rank path, with finite numbers
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
fully_shard(model[0]); fully_shard(model)
out["local_rows"] = model[0].weight.to_local().shape[0]
loss = model(torch.randn(4, 8)).square().mean()
loss.backward()
out["finite"] = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad.to_local()).all())
                                                   for p in model.parameters())
import fake_world                                         # the wrappers for a fake backend that leaves outputs unset
fake_world._install_loopback()
again = torch.full((12,), float("nan"))
dist.all_gather_into_tensor(again, x)
scattered = torch.full((3,), float("nan"))
dist.reduce_scatter_tensor(scattered, torch.arange(12.0))
direct = torch.full((12,), float("nan"))
fake_world._fill_gather(direct, x)
direct_inplace = torch.full((12,), float("nan"))
direct_inplace[:3] = x
fake_world._fill_gather(direct_inplace, direct_inplace[:3])
direct_scatter = torch.full((3,), float("nan"))
fake_world._fill_scatter(direct_scatter, torch.arange(12.0))
out["wrapped"] = [again.tolist(), scattered.tolist(), direct.tolist(), direct_inplace.tolist(), direct_scatter.tolist()]
enter_world(1)                                            # a real group of one: collectives are real again
one = torch.zeros(3)
dist.all_gather_into_tensor(one, x)
out["one"] = [dist.get_world_size(), dist.get_backend(), one.tolist()]
print(json.dumps(out))
"""


def test_fake_world_collectives_act_as_if_every_rank_held_rank_0s_data():
    """``benchmarks/fake_world.py``: rank 0 of 4 fake ranks; an all-gather fills every slot with the local shard (also
    in place, as FSDP2 gathers), a reduce-scatter returns rank 0's chunk, so FSDP2 over the fake world computes finite
    numbers on a quarter of the parameters — from the fake backend itself (torch 2.14) or from the wrappers installed
    for one that leaves outputs unset; switching back to a world of one restores real collectives."""
    proc = subprocess.run([sys.executable, "-c", FAKE_WORLD_CHECK, str(REPO / "benchmarks")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["world"], out["backend"]) == (4, "fake")
    assert out["gather"] == [0.0, 1.0, 2.0] * 4
    assert out["inplace"] == [0.0, 1.0, 2.0] * 4
    assert out["scatter"] == [0.0, 1.0, 2.0]
    assert out["local_rows"] == 2 and out["finite"]
    tiled, chunk = [0.0, 1.0, 2.0] * 4, [0.0, 1.0, 2.0]
    assert out["wrapped"] == [tiled, chunk, tiled, tiled, chunk]
    assert out["one"] == [1, "gloo", [0.0, 1.0, 2.0]]


def test_report_speed_builds_a_store_and_times_every_section(tmp_path):
    """``report_speed.py`` on a tiny study: every run of the grid is written complete (real metric rows), each
    section is timed, and the report's comparisons find the bigger backbone that the generator made better."""
    out = tmp_path / "store"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report_speed.py"), "--backbones", "2",
                           "--sources", "2", "--fractions", "1.0", "--seeds", "2", "--labels", "2", "--val-images",
                           "200", "--test-images", "300", "--ood-images", "300", "--n-boot", "10", "--eval-boot",
                           "10", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "older definition" not in proc.stderr  # the runs are recorded as scored now, as the runner records them
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and "wall s" not in ln]
    assert [r.split("|")[1].split("(")[0].strip() for r in rows] == [
        "load_study", "fit_table", "effective_robustness", "pairwise_comparisons", "subgroup_comparisons",
        "brier_comparisons", "build_report"]
    from scaling.study.aggregate import load_results, run_status
    from scaling.study.compare import pairwise_comparisons

    status = run_status(out)
    assert len(status) == 2 * 2 * 2 and (status["status"] == "complete").all()
    comp = pairwise_comparisons(out, load_results(out), ["test"])
    big = comp[(comp["axis"] == "backbone") & (comp["label"] == "macro")]
    assert len(big) == 2 and (big["diff"] > 0).all()  # bb1 is 0.03 AUROC better than bb0 by construction
    assert all(float(r.split("|")[5]) > 50 for r in rows), rows  # peak RSS in MB: a Python process with pandas
    # the same store arguments again (another --n-boot): the store is reused, not rewritten
    args = list(proc.args)
    args[args.index("--n-boot") + 1] = "5"
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "reusing the store" in again.stdout, again.stderr[-3000:]


def test_interval_coverage_compares_plain_and_rescaled_intervals_on_the_same_studies():
    """``interval_coverage.py`` on a few studies: every interval is there, and on the same data each is wider than
    the plain seed bootstrap by more than the rescaling alone (√(5/4) at five seeds): the widening to Student's
    tails is on too (data efficiency: 4 degrees of freedom, 1.42×; the pooled statistics: fewer than that)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "interval_coverage.py"), "--studies", "4",
                           "--n-boot", "50"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {ln[:21].strip(): [float(v) for v in ln[21:].split()] for ln in proc.stdout.splitlines()[3:]}
    assert list(rows) == ["effective robustness", "law exponent b", "law floor c", "data efficiency"], proc.stdout
    for name in ("effective robustness", "law exponent b", "law floor c"):
        assert 1.15 < rows[name][2] < (5 / 4) ** 0.5 * 1.42, (name, proc.stdout)
    assert rows["data efficiency"][2] > 1.3, proc.stdout
    assert all(0 <= v <= 1 for plain, now, _ in rows.values() for v in (plain, now))


def test_or_type1_error_prints_every_rule_per_number_of_seeds():
    """``or_type1_error.py`` on a few studies: one row per τ and number of seeds, the library's p-value that of r − 1
    below ``HILLIS_MIN_SEEDS`` seeds and Hillis's from there on (the same studies, so the rates agree exactly)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "or_type1_error.py"), "--studies", "30",
                           "--seeds", "2,5", "--taus", "0.3", "--gap", "0"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[1] == "type-I error (true null):" and "power" not in proc.stdout, proc.stdout
    header, rows = lines[2].split(), [ln.split() for ln in lines[3:]]
    got = [dict(zip(header, row)) for row in rows]
    assert [(r["seeds"], r["method"]) for r in got] == [("2", "or"), ("5", "or-hillis")], proc.stdout
    assert got[0]["library"] == got[0]["r-1"] and got[1]["library"] == got[1]["hillis"], proc.stdout
    assert all(0 <= float(r[k]) <= 1 for r in got for k in ("hillis", "r-1", "library")), proc.stdout

