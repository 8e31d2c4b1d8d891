"""Host (CPU-side) overhead of the sharded strategies, on a launch-bound model: step-time ratios fsdp/none and
zero3/none measured in one run.

    torchrun --standalone --nproc_per_node 1 benchmarks/host_overhead.py [--rounds 5] [--steps 30] [--compile]
        [--bare] [--profile TOP]
    python benchmarks/host_overhead.py --fake-world 2 [...]      # sharded cells take the multi-rank code path

A ViT of 24 blocks at width 64 on 32 px images with batch 2 does almost no arithmetic, so its step time is what
the framework spends on the host per step: module hooks, DTensor dispatch, DeepSpeed's per-parameter bookkeeping,
synchronisations. That is the overhead that dominates a GPU step at small per-GPU batches (the small-batch regime
of BiT-HyperRule's batch 512 on 16+ GPUs), made measurable on a CPU. One rank under torchrun: a real process group
(gloo) with world size 1, so every strategy runs with its hooks and collectives; in a world of one, though, FSDP2
(torch 2.14) copies each parameter into its unsharded buffer instead of all-gathering, and DeepSpeed partitions
nothing, which ``--fake-world`` (below) checks against.

The strategies alternate within each round (none, fsdp, zero3, none, fsdp, zero3, ...) so load from other processes
on a shared machine hits all alike; each cell's per-step time is the Trainer's own timer over its steps after the
first (wall and CPU time of this process, one thread), reported as the median over rounds, and the wall time of its
fastest single step, reported as the minimum over rounds. On the shared 2-core CPU machine (a virtual machine whose
CPU time also stretches under load: per-step medians moved 10x within one run) the fastest step is the figure that
stays put: it is the step that ran without being preempted. ``log_every`` is larger than the run, so no step reads a
value back from the device. Goals: fsdp <= 1.5x and zero3 <= 2.5x the step time of none. ``fsdp:N`` in
``--strategies`` adds fsdp with N blocks per FSDP unit (``sharding.blocks_per_unit``).

``--fake-world N`` runs every sharded cell as rank 0 of N ranks in torch's fake process group (``fake_world.py``:
collectives move no data; outputs are filled as if every rank held rank 0's data), each rank with the same ``--batch``
images, while ``none`` keeps a real group of one; the process group is rebuilt before every cell. So a sharded cell
holds 1/N of the model and takes the code path of a multi-GPU rank (all-gather copy-in/copy-out, reduce-scatter, the
partitioned optimizer) without its communication, which on GPUs runs on its own streams. Use it to check that the
one-rank figures are not an artefact of the world-size-1 paths of FSDP2 and DeepSpeed. ``ddp`` cannot run there (its
gradient hook needs a real all-reduce result).

``--bare`` also times, in every round, plain training loops on the same model, batch and update without the
Trainer (``bare_cell``): the bare model, FSDP2 per block, the legacy flat-parameter ``FullyShardedDataParallel``
per block and ``deepspeed.initialize`` with the Trainer's ZeRO-3 config. Trainer / bare is the Trainer's own
overhead per strategy; bare / bare none is what the framework alone costs on this proxy.

``zero3`` needs DeepSpeed; without it that strategy is skipped with a message.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaling.config import ShardingConfig, TrainConfig  # noqa: E402
from scaling.data.dataset import split_key  # noqa: E402

GOALS = {"fsdp": 1.5, "zero3": 2.5}


class Data(torch.utils.data.Dataset):
    """Random 32 px images, 5 multi-label targets."""

    def __init__(self, n: int, img: int = 32, labels: int = 5):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, img, img, generator=g)
        self.y = (torch.rand(n, labels, generator=g) < 0.4).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        i, _ = split_key(key)  # the Trainer's keys are (position, draw_seed); nothing here is random
        return {"image": self.x[i], "target": self.y[i], "index": i}


def make_model(depth: int, width: int):
    """A ViT with many thin blocks: patch 8 on 32 px (16 tokens), width ``width``, 2 heads."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             embed_dim=width, depth=depth, num_heads=2)


def sharding_of(cell: str) -> ShardingConfig:
    """``fsdp`` -> strategy fsdp; ``fsdp:4`` -> strategy fsdp with 4 blocks per FSDP unit."""
    strategy, _, per_unit = cell.partition(":")
    return ShardingConfig(strategy=strategy, blocks_per_unit=int(per_unit or 1))


def cell_world(strategy: str, args) -> int:
    """The world size a cell runs in: 1 without ``--fake-world``; else ``none`` in a real group of one and every
    sharded cell in a fake group of ``args.fake_world`` ranks (rebuilt here)."""
    if args.fake_world < 2:
        return 1
    from fake_world import enter_world as enter

    world = 1 if sharding_of(strategy).strategy == "none" else args.fake_world
    enter(world)
    return world


def _environment(strategy: str, ds_config: Path) -> None:
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    if strategy == "zero3":
        # What `accelerate launch --use_deepspeed` sets; the Trainer builds the plugin from the strategy.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ds_config)


def profile_cell(strategy: str, args, ds_config: Path, top: int) -> None:
    """Where one strategy's host time goes: Python function calls and profiler op events per step (counts, which
    the load on a shared machine does not change) and the ``top`` ops by self CPU time. The Trainer is fitted twice
    on the same data; the second fit (warm: no first-call initialisation) is the one profiled."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from scaling.engine import Trainer

    world = cell_world(strategy, args)
    _environment(sharding_of(strategy).strategy, ds_config)
    cfg = TrainConfig(batch_size=args.batch * world, steps=args.steps, lr=0.01, warmup_steps=0, schedule="constant",
                      log_every=args.steps + 1)
    linear = torch.nn.functional.linear
    trainer = Trainer(make_model(args.depth, args.width), cfg, sharding_of(strategy))
    trainer.fit(Data(args.batch * world * args.steps))
    calls = cProfile.Profile()
    calls.enable()
    trainer.fit(Data(args.batch * world * args.steps))
    calls.disable()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        trainer.fit(Data(args.batch * world * args.steps))
    trainer.close()
    torch.nn.functional.linear = linear
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n{strategy}: {pstats.Stats(calls).total_calls / args.steps:,.0f} Python calls / step, "
          f"{sum(e.count for e in events) / args.steps:,.0f} profiler events / step, self CPU "
          f"{total / args.steps / 1e3:.1f} ms / step (profiled)")
    print("| op | calls / step | self CPU ms / step | share |")
    print("|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"| `{e.key[:70]}` | {e.count / args.steps:.0f} | {e.self_cpu_time_total / args.steps / 1e3:.2f} | "
              f"{e.self_cpu_time_total / total:.0%} |")


BARE = ("none", "fsdp", "fsdp1", "zero3")
"""``--bare`` loops: the same model, batch and update written as plain PyTorch / DeepSpeed, no Trainer."""


def bare_cell(kind: str, args, ds_config: Path) -> tuple[float, float, float]:
    """(median, fastest) wall seconds per step, after the first, and the last loss of a plain training loop on the same model, images
    and update as the Trainer's cells (SGD momentum 0.9, lr 0.01, foreach, BCE with logits, the batch made once):

    * ``none``: the bare model;
    * ``fsdp``: FSDP2 ``fully_shard`` on every block, then on the root (what the Trainer's ``fsdp`` does);
    * ``fsdp1``: the legacy ``FullyShardedDataParallel`` with one flat parameter per block
      (``use_orig_params=False``), the design FSDP2 replaced: shows what per-parameter bookkeeping costs;
    * ``zero3``: ``deepspeed.initialize`` with the Trainer's DeepSpeed config and block leaves.

    So ``Trainer / bare`` is the Trainer's own overhead per strategy, and ``bare / bare none`` the frameworks'. Every
    bare loop does the same arithmetic on the same batch each step, so their last losses agree."""
    model = make_model(args.depth, args.width)
    block = type(model.blocks[0])
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for b in model.blocks:
            fully_shard(b)
        fully_shard(model)
    elif kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({block}), use_orig_params=False,
                                         device_id=torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    engine = None
    if kind == "zero3":
        import deepspeed

        from scaling.engine.strategies.zero import (deepspeed_config, set_block_leaves, unlink_shm_allreduce_buffer,
                                                    zero3_sizes)

        sizes = zero3_sizes(model, (block,))
        set_block_leaves(model, (block,))
        cfg = deepspeed_config(TrainConfig(batch_size=args.batch, steps=args.steps), ShardingConfig(strategy="zero3"),
                               1, json.loads(ds_config.read_text()), str(ds_config), sizes)
        cfg["zero_allow_untested_optimizer"] = True  # a torch optimizer, as Accelerate's DeepSpeed plugin sets it
        engine, optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
        # A Trainer cell before this one set LOCAL_SIZE, so DeepSpeed's CPU backend, started again here, mapped a
        # 69 MB /dev/shm buffer that nothing removes (see unlink_shm_allreduce_buffer): remove its name, as the
        # Trainer does.
        unlink_shm_allreduce_buffer(0)
    data = Data(args.batch)
    x, y = data.x, data.y
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        if engine is not None:
            loss = loss_fn(engine(x), y)
            engine.backward(loss)
            engine.step()
        else:
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if engine is not None:
        engine.destroy()
    if not torch.isfinite(loss):
        raise RuntimeError(f"bare {kind}: the loss is not finite")
    return statistics.median(times[1:]), min(times[1:]), float(loss)


def report_bare(bare: dict[str, list[tuple]], times: dict[str, list[tuple]]) -> None:
    """Bare loops against each other and against the Trainer's cells of the same strategy (one block per unit)."""
    print("\nBare loops (no Trainer): median and fastest step, ratios to bare none; Trainer / bare: the Trainer's own "
          "overhead (fastest steps)")
    print("| bare loop | wall ms/step (median) | ratio | fastest step ms | ratio | Trainer fastest / bare fastest |")
    print("|---|---|---|---|---|---|")
    fastest = {k: min(x[1] for x in v) for k, v in bare.items()}
    for k, v in bare.items():
        med = statistics.median(x[0] for x in v)
        base_med = statistics.median(x[0] for x in bare["none"]) if "none" in bare else float("nan")
        ratio = fastest[k] / fastest["none"] if "none" in bare else float("nan")
        own = f"{min(x[2] for x in times[k]) / fastest[k]:.2f}" if k in times else "—"
        print(f"| {k} | {med * 1e3:.1f} | {med / base_med:.2f} | {fastest[k] * 1e3:.1f} | {ratio:.2f} | {own} |")


PHASES = ("forward", "backward", "step")
"""The strategy plan's pieces of a step, timed around their calls (under ZeRO the optimizer steps inside
``backward``; its ``step`` does nothing)."""


def run_cell(strategy: str, args, ds_config: Path) -> tuple[float, float, float, dict[str, float], int, int, float]:
    """(wall, CPU, fastest step) seconds per step of one Trainer run (its own timers, first step excluded; the
    fastest step is the wall time of the quickest whole step after the first), the seconds per step spent in
    each of :data:`PHASES` (steps after the first), the number of FSDP units (0 outside FSDP), the world size the
    cell ran in and the share of the model's parameters (ZeRO: optimizer state) this rank held."""
    from scaling.engine import Trainer

    world = cell_world(strategy, args)
    _environment(sharding_of(strategy).strategy, ds_config)
    cfg = TrainConfig(batch_size=args.batch * world, steps=args.steps, lr=0.01, warmup_steps=0, schedule="constant",
                      log_every=args.steps + 1, **({"compile": "blocks"} if args.compile else {}))
    linear = torch.nn.functional.linear
    trainer = Trainer(make_model(args.depth, args.width), cfg, sharding_of(strategy))
    # The loop sets the learning rate once at the start of every step: its call times delimit the steps.
    starts: list[float] = []
    set_lr = trainer.plan.set_lr
    trainer.plan.set_lr = lambda lr: (starts.append(time.perf_counter()), set_lr(lr))[1]
    spent = {p: [0.0] * (args.steps + 1) for p in PHASES}
    for phase in PHASES:
        def timed(*a, _call=getattr(trainer.plan, phase), _spent=spent[phase], **k):
            t0 = time.perf_counter()
            try:
                return _call(*a, **k)
            finally:
                _spent[len(starts)] += time.perf_counter() - t0
        setattr(trainer.plan, phase, timed)
    summary = trainer.fit(Data(args.batch * world * args.steps))
    share = trainer.shard.share
    trainer.close()
    # DeepSpeed's ZeRO-3 default (memory_efficient_linear) replaces F.linear for the whole process; scaling turns
    # it off, but an older engine left it patched and every later cell of the run paid for it. Isolate the cells.
    torch.nn.functional.linear = linear
    steps = [b - a for a, b in zip(starts[1:], starts[2:])]  # whole steps after the first
    phases = {p: sum(v[2:]) / (args.steps - 1) for p, v in spent.items()}  # v[k]: step k (1-based); skip step 1
    return (summary["seconds"] / (args.steps - 1), summary["cpu_seconds"] / (args.steps - 1), min(steps), phases,
            summary["fsdp_units"], summary["world_size"], share)


def report(times: dict[str, list[tuple]], args) -> None:
    """The table of median wall and CPU times and of the fastest steps, with their ratios to ``none``."""
    world = (f"sharded cells as rank 0 of a fake world of {args.fake_world} (no communication)"
             if args.fake_world > 1 else "1 rank")
    print(f"ViT depth {args.depth} width {args.width} @32 px, batch {args.batch} per rank, {world}, torch "
          f"{torch.__version__}, compile={'blocks' if args.compile else 'off'}, {args.rounds} alternating rounds")
    print("| strategy | wall ms/step (median) | ratio | CPU ms/step (median) | ratio | fastest step ms (min) | ratio "
          "| FSDP units | world | share held | goal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {s: [statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), min(x[2] for x in v)]
               for s, v in times.items()}
    for s in times:
        row = summary[s]
        ratios = [row[i] / summary["none"][i] if "none" in summary else float("nan") for i in range(3)]
        goal = f"<= {GOALS[s]}" if s in GOALS else ""  # the goals are for the defaults (one block per unit)
        print(f"| {s} | " + " | ".join(f"{row[i] * 1e3:.1f} | {ratios[i]:.2f}" for i in range(3))
              + f" | {times[s][-1][4]} | {times[s][-1][5]} | {times[s][-1][6]:.2f} | {goal} |")
    print("On a shared machine the fastest step (the one least disturbed by other processes) is the robust figure; "
          "medians move with the load.")
    print("\nWhere a step goes: the strategy plan's pieces, ms per step (median over rounds; under ZeRO the optimizer "
          "steps inside backward)")
    print("| strategy | " + " | ".join(PHASES) + " | rest of the loop |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    for s, v in times.items():
        ph = {p: statistics.median(x[3][p] for x in v) for p in PHASES}
        rest = summary[s][0] - sum(ph.values())
        print(f"| {s} | " + " | ".join(f"{ph[p] * 1e3:.1f}" for p in PHASES) + f" | {rest * 1e3:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default="none,fsdp,zero3",
                   help="comma-separated; fsdp:N = fsdp with N blocks per FSDP unit (sharding.blocks_per_unit)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="train.compile=blocks for every strategy")
    p.add_argument("--ds-config", default=str(REPO / "launch" / "ds_zero3.json"), help="DeepSpeed JSON for zero3")
    p.add_argument("--fake-world", type=int, default=1, metavar="N",
                   help="N >= 2: sharded cells run as rank 0 of N in torch's fake process group (see above)")
    p.add_argument("--bare", action="store_true",
                   help="also time plain loops (no Trainer) in every round: none, fsdp (FSDP2), fsdp1 (flat "
                        "parameters) and zero3, as far as --strategies asks for them (fsdp1 with fsdp); one rank")
    p.add_argument("--json", default="", help="also write the per-round times here (bare loops under \"bare\")")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="after the rounds, profile one warm fit per strategy: calls per step and the TOP ops")
    args = p.parse_args()
    strategies = args.strategies.split(",")
    if args.fake_world > 1:
        if "ddp" in strategies:
            raise SystemExit("ddp cannot run in a fake process group (its gradient hook needs real all-reduce results)")
    elif "RANK" not in os.environ:
        raise SystemExit("launch with `torchrun --standalone --nproc_per_node 1 benchmarks/host_overhead.py` "
                         "(or pass --fake-world N)")
    elif int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise SystemExit("one rank: `torchrun --standalone --nproc_per_node 1` (more ranks measure gloo, not the "
                         "host; --fake-world N shards over N ranks without communication)")
    # One compute thread in every cell. Accelerate sets torch's thread count to the physical cores per local process
    # whenever OMP_NUM_THREADS is unset (accelerate/state.py, MULTI_CPU), and torchrun leaves it unset for one
    # process: that undid set_num_threads(1), and the idle OpenMP thread spun on the second core.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if "zero3" in strategies and importlib.util.find_spec("deepspeed") is None:
        print("deepspeed is not installed: zero3 skipped")
        strategies.remove("zero3")
    if args.bare and args.fake_world > 1:
        raise SystemExit("--bare runs in the real group of one rank; leave out --fake-world")
    wanted = {sharding_of(s).strategy for s in strategies}
    bare: dict[str, list[tuple]] = {k: [] for k in BARE if args.bare and k in wanted | ({"fsdp1"} if "fsdp" in wanted
                                                                                          else set())}
    times: dict[str, list[tuple]] = {s: [] for s in strategies}
    ds_config = Path(args.ds_config)
    for r in range(args.rounds):
        for s in strategies:
            times[s].append(run_cell(s, args, ds_config))
        for k in bare:
            _environment(k, ds_config)
            bare[k].append(bare_cell(k, args, ds_config))
        print(f"round {r}: " + ", ".join(f"{s} {times[s][-1][0] * 1e3:.1f} ms wall / {times[s][-1][1] * 1e3:.1f} "
                                         f"ms CPU / {times[s][-1][2] * 1e3:.1f} ms fastest" for s in strategies),
              flush=True)
    if args.rounds:
        report(times, args)
        if bare:
            report_bare(bare, times)
    for s in strategies if args.profile else ():
        profile_cell(s, args, ds_config, args.profile)
    if args.json:
        Path(args.json).write_text(json.dumps({**times, **({"bare": bare} if bare else {})}))


if __name__ == "__main__":
    main()
