"""Data-parallel statistics: the same merge with 1 and with 2 processes.

    python -m benchmarks.bench_distributed [--examples 5000] [--batch-size 500] [--processes 2]

Merges two BatchNorm ResNet20s of width 2 at 32x32 (activation matching, exact REPAIR) over the
same ``--examples`` random images, once in one process and once in ``--processes`` processes
(gloo on the CPU, started here with the rendezvous environment torchrun sets), every process on
one thread. Each rank passes its share of the examples (``Examples.shard``) to
``graphrepair.merge_models``. Printed per run: the merge's wall time (the slowest rank, from a
barrier just before ``merge_models`` to its return, after a warm-up merge of a few examples), and
per rank the bytes it sent into collectives and the seconds spent inside them, by kind:

    reduce     the statistics of each pass, one flat float64 all_reduce per pass
    sync       the ends of steps (a flag per rank; waiting there for a slower rank counts here)
    broadcast  the example every rank traces with, the permutations

then the speed-up (one process / N processes) and the reduction's share of the merge
(``reduce`` seconds / merge seconds). Goal: speed-up >= 1.7 with 2 processes, share < 5%.
On a machine whose cores other work is using, the wall-time speed-up says little (N processes
share the same busy cores); the CPU-time speed-up (one process's CPU seconds / the busiest
rank's) printed with the load average is what it would be on free cores. For steady figures on
glibc run it with GLIBC_TUNABLES as ``bench_merge`` explains (no page churn).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def worker(out: str, examples: int, batch_size: int, warm: int) -> None:
    """One rank (or the single process): build, warm up, time one merge, write the figures."""
    import torch.distributed as dist

    import graphrepair as gr
    from fixtures.zoo import resnet20
    from graphrepair import distributed
    from graphrepair.io.examples import Examples

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(resnet20("bn", width=2).eval())
    x = torch.randn(examples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small = Examples(x[:warm], warm, batch_size).shard(distributed.rank(), world)
    gr.merge_models(models, small, num_examples=small.count, batch_size=batch_size)  # warm-up
    mine = Examples(x, examples, batch_size).shard(distributed.rank(), world)
    count = mine.count
    counters = distributed.counters()
    if counters is not None:
        counters.reset()
        dist.barrier()
    t, cpu = time.perf_counter(), time.process_time()
    result = gr.merge_models(models, mine, num_examples=count, batch_size=batch_size)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    figures = {"rank": distributed.rank(), "world": world, "seconds": seconds, "cpu_seconds": cpu, "examples": count,
               "merged_examples": result.examples,
               "bytes": dict(counters.bytes) if counters else {},
               "collective_seconds": dict(counters.seconds) if counters else {},
               "calls": dict(counters.calls) if counters else {}}
    Path(out, f"rank{figures['rank']}.json").write_text(json.dumps(figures))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, args) -> list[dict]:
    """Start ``world`` processes (one thread each) and collect their figures."""
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for rank in range(world):
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            if world > 1:
                env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            else:
                for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                    env.pop(k, None)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.bench_distributed", "--worker", out,
                 "--examples", str(args.examples), "--batch-size", str(args.batch_size), "--warm", str(args.warm)],
                cwd=ROOT, env=env))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"a benchmark process failed: exit codes {codes}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def report(world: int, ranks: list[dict]) -> tuple[float, float]:
    seconds, cpu = max(r["seconds"] for r in ranks), max(r["cpu_seconds"] for r in ranks)
    print(f"{world} process{'es' if world > 1 else ''}: merge {seconds:.2f} s, CPU time of the busiest "
          f"process {cpu:.2f} s (examples per rank {[r['examples'] for r in ranks]}, merged over "
          f"{ranks[0]['merged_examples']})")
    for r in ranks if world > 1 else []:
        kinds = sorted(r["bytes"])
        sent = ", ".join(f"{k} {r['bytes'][k]:,} B in {r['calls'][k]} calls" for k in kinds)
        inside = ", ".join(f"{k} {r['collective_seconds'][k]:.3f} s" for k in kinds)
        print(f"  rank {r['rank']}: merge {r['seconds']:.2f} s (CPU {r['cpu_seconds']:.2f} s); sent into "
              f"collectives: {sent}; time inside them: {inside}")
    return seconds, cpu


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--warm", type=int, default=64, help="examples of the warm-up merge in each process")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.examples, args.batch_size, args.warm)
        return
    print(f"torch {torch.__version__}; ResNet20 (BN) width 2 at 32x32, {args.examples} examples, batches of "
          f"{args.batch_size}; activation matching + exact REPAIR; one thread per process")
    load = os.getloadavg()[0]
    t1, cpu1 = report(1, run(1, args))
    ranks = run(args.processes, args)
    tn, cpun = report(args.processes, ranks)
    reduce_share = max(r["collective_seconds"].get("reduce", 0.0) for r in ranks) / tn
    all_share = max(sum(r["collective_seconds"].values()) for r in ranks) / tn
    per_rank = max(r["bytes"].get("reduce", 0) for r in ranks)
    print(f"speed-up {t1 / tn:.2f} with {args.processes} processes (goal >= 1.7); bytes reduced per rank "
          f"{per_rank:,} ({per_rank / 2**20:.2f} MiB); the reduction's share of the merge {100 * reduce_share:.2f}% "
          f"(goal < 5%), all collectives incl. waiting at the ends of steps {100 * all_share:.2f}%")
    print(f"CPU-time speed-up {cpu1 / cpun:.2f} (one process's CPU time / the busiest rank's: what the wall "
          f"speed-up is on cores no other work uses); load average {load:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
