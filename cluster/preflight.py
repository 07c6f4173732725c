"""Preflight of a multi-node job, run on every rank before training (the SLURM training script runs it under the same
torchrun layout as training):

    torchrun ... -m cluster.preflight [--expect-gpus N] [--data DIR ...] [--checkpoint-dir DIR --keep-last K
        --checkpoint-gb X] [--min-allreduce-gbps F] [--min-p2p-gbps F] [--backend nccl|gloo] [--shared-dir DIR]

Checks, on every rank: `devices` (GPUs visible vs --expect-gpus; on gloo the CPU "devices" are the processes on the
node), `gpu health` (nvidia-smi: uncorrected ECC errors, hardware clock slowdown, memory already in use), `data`
(each --data path exists and is readable), `checkpoint dir` (writable) and `disk` (free space for keep-last + 1
checkpoints: a new one is written before the oldest is deleted), `shared fs` (rank 0 writes a nonce file into
--shared-dir, every rank reads it back), `versions` (torch, deepspeed, megatron-core, ray, transformer-engine, python
and the repository's git commit equal to rank 0's), `all-reduce` (bus bandwidth over all ranks vs
--min-allreduce-gbps, GB/s as nccl-tests report it) and `p2p` (send/recv from the rank one node away vs
--min-p2p-gbps). Rank 0 prints a table per node; each failure is one line,
`preflight FAILED on node <host> (rank <r>): <what>`, and every rank exits 1.

Paths may hold environment variables ($RANK, $SLURM_JOB_ID, ...), expanded on each rank. Rank, world size and the
rendezvous come from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or srun's (SLURM_PROCID,
SLURM_NTASKS; MASTER_ADDR and MASTER_PORT set by the caller).

Test hook: BITDANCE_PREFLIGHT_FAKE_VERSION="RANK:PACKAGE=VERSION[,...]" makes that rank report that version (how the
tests plant a version mismatch).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cluster.launch import OneLineParser, non_negative_int, positive_float, positive_int

REPO = Path(__file__).resolve().parents[1]
FAKE_VERSION_ENV = "BITDANCE_PREFLIGHT_FAKE_VERSION"
PACKAGES = {  # reported name: distribution names to try
    "torch": ("torch",),
    "deepspeed": ("deepspeed",),
    "megatron-core": ("megatron-core", "megatron_core"),
    "ray": ("ray",),
    "transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-cu12"),
}
GB = 1e9
MiB = 2**20


class PreflightError(RuntimeError):
    """This rank cannot take part (bad environment or arguments): one line, then exit."""


@dataclass
class Result:
    check: str
    status: str  # "ok" | "FAIL" | "skip"
    detail: str


def ok(check: str, detail: str) -> Result:
    return Result(check, "ok", detail)


def fail(check: str, detail: str) -> Result:
    return Result(check, "FAIL", detail)


def skip(check: str, detail: str) -> Result:
    return Result(check, "skip", detail)


def path_arg(text: str) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(text)))


# ---------------------------------------------------------------- local checks


def check_devices(backend: str, expect: int | None, local_world: int, local_rank: int) -> Result:
    if backend == "gloo":
        have, what = local_world, f"{local_world} CPU device(s) (processes on this node, backend gloo)"
    else:
        have = torch.cuda.device_count()
        what = f"{have} GPU(s) visible"
        if have and local_rank < have:
            free, total = torch.cuda.mem_get_info(local_rank)
            what += f", GPU {local_rank}: {total / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    if backend == "nccl" and local_world > have:
        return fail("devices", f"{what}, fewer than the {local_world} processes on this node")
    if expect is not None and have < expect:
        return fail("devices", f"{what}, expected {expect} (--expect-gpus)")
    return ok("devices", what + (f", {expect} expected" if expect is not None else ""))


def nvidia_smi(fields: list[str]) -> list[list[str]] | None:
    """Rows of `nvidia-smi --query-gpu=<fields>`, or None when nvidia-smi rejects a field or fails."""
    cmd = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return None
    return [[v.strip() for v in line.split(",")] for line in r.stdout.strip().splitlines() if line.strip()]


def check_gpu_health(backend: str, local_rank: int, max_used_gb: float) -> Result | None:
    """nvidia-smi on the node's first rank: uncorrected ECC errors, hardware slowdown, memory already in use."""
    if local_rank != 0:
        return None
    if backend == "gloo":
        return skip("gpu health", "backend gloo: no GPUs in use")
    if shutil.which("nvidia-smi") is None:
        return skip("gpu health", "nvidia-smi is not on PATH")
    rows = nvidia_smi(["index", "memory.used", "ecc.errors.uncorrected.volatile.total"])
    if rows is None:
        return fail("gpu health", "nvidia-smi --query-gpu failed; check the driver with `nvidia-smi`")
    # the reason's field name changed (clocks_throttle_reasons -> clocks_event_reasons); ask for either
    slow = nvidia_smi(["index", "clocks_event_reasons.hw_slowdown"]) or nvidia_smi(
        ["index", "clocks_throttle_reasons.hw_slowdown"]
    )
    slowed = {r[0] for r in slow or [] if r[1].lower() == "active"}
    problems = []
    for index, used, ecc in rows:
        if ecc.isdigit() and int(ecc) > 0:
            problems.append(f"GPU {index} has {ecc} uncorrected ECC error(s)")
        if index in slowed:
            problems.append(f"GPU {index} clocks are held down by a hardware slowdown")
        if used.isdigit() and int(used) * MiB > max_used_gb * GB:
            problems.append(f"GPU {index} already has {int(used) * MiB / GB:.1f} GB in use (another process?)")
    if problems:
        return fail("gpu health", "; ".join(problems))
    return ok("gpu health", f"{len(rows)} GPU(s): no uncorrected ECC errors, no hardware slowdown")


def check_data(paths: list[Path]) -> list[Result]:
    out = []
    for p in paths:
        if not p.exists():
            out.append(fail("data", f"data path {p} is missing"))
            continue
        try:
            if p.is_dir():
                n = len(os.listdir(p))
                out.append(ok("data", f"{p}: {n} entries"))
            else:
                with open(p, "rb") as f:
                    f.read(1)
                out.append(ok("data", f"{p}: readable file"))
        except OSError as e:
            out.append(fail("data", f"data path {p} is not readable: {e.strerror or e}"))
    return out


def check_checkpoint_dir(path: Path | None, host: str, rank: int) -> Result | None:
    if path is None:
        return None
    probe = path / f".preflight-{host}-{rank}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"preflight")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        return fail("checkpoint dir", f"checkpoint folder {path} is not writable: {e.strerror or e}")
    return ok("checkpoint dir", f"{path} is writable")


def check_disk(path: Path | None, keep_last: int, checkpoint_gb: float | None, writable: bool) -> Result | None:
    if path is None:
        return None
    if checkpoint_gb is None:
        return skip("disk", "no --checkpoint-gb given")
    if not writable:
        return skip("disk", "the checkpoint folder is not usable")
    free = shutil.disk_usage(path).free / GB
    need = (keep_last + 1) * checkpoint_gb
    what = f"(keep-last {keep_last} + 1) x {checkpoint_gb:g} GB"
    if free < need:
        return fail("disk", f"checkpoint folder {path} has {free:.1f} GB free, needs {need:.1f} GB {what}")
    return ok("disk", f"{free:.1f} GB free >= {need:.1f} GB {what}")


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
    except OSError:
        return "unknown (no git)"
    return r.stdout.strip() if r.returncode == 0 else "unknown (not a git checkout)"


def fake_versions(rank: int) -> dict[str, str]:
    """The test hook's versions for this rank (see the module docstring)."""
    out = {}
    for item in filter(None, os.environ.get(FAKE_VERSION_ENV, "").split(",")):
        r, _, spec = item.partition(":")
        pkg, _, version = spec.partition("=")
        if not (r.strip().isdigit() and pkg and version):
            raise PreflightError(f"{FAKE_VERSION_ENV} item {item!r} must look like RANK:PACKAGE=VERSION")
        if int(r) == rank:
            out[pkg.strip()] = version.strip()
    return out


def versions(rank: int) -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in PACKAGES.items():
        found[name] = None
        for d in dists:
            try:
                found[name] = importlib.metadata.version(d)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    found["git commit"] = git_commit()
    found.update(fake_versions(rank))
    return found


def compare_versions(mine: dict, reference: dict) -> Result:
    diffs = [
        f"{k} {mine.get(k) or 'absent'} (rank 0 has {reference.get(k) or 'absent'})"
        for k in sorted(set(mine) | set(reference))
        if mine.get(k) != reference.get(k)
    ]
    if diffs:
        return fail("versions", "versions differ from rank 0's: " + "; ".join(diffs))
    present = ", ".join(f"{k} {v[:12] if k == 'git commit' else v}" for k, v in mine.items() if v)
    return ok("versions", present)


# ---------------------------------------------------------------- checks across ranks


def check_shared(path: Path | None, rank: int, hosts: list[str]) -> Result | None:
    """Rank 0 writes a nonce file into `path`; after a barrier every rank reads it back from its own `path`."""
    if path is None:
        return None
    message = [None, None]  # (file name, nonce) or (None, rank 0's error)
    if rank == 0:
        name, nonce = f".preflight-shared-{secrets.token_hex(8)}", secrets.token_hex(16)
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(nonce)
            message = [name, nonce]
        except OSError as e:
            message = [None, e.strerror or str(e)]
    dist.broadcast_object_list(message, src=0)
    name, nonce = message
    if name is None:
        result = (fail if rank == 0 else skip)("shared fs", f"rank 0 cannot write into shared folder: {nonce}")
    else:
        try:
            seen = (path / name).read_text()
        except OSError:
            seen = None
        if seen == nonce:
            result = ok("shared fs", f"{path} shows rank 0's file")
        else:
            result = fail(
                "shared fs",
                f"shared folder {path} does not show the file rank 0 ({hosts[0]}) wrote there; "
                "it is not the same filesystem as rank 0's",
            )
    dist.barrier()
    if rank == 0 and name is not None:
        (path / name).unlink(missing_ok=True)
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_all_reduce(device, mb: float, iters: int, floor: float | None, rank: int, world: int) -> Result | None:
    """Sums of rank ids (correctness, on every rank), then the bus bandwidth of `iters` all-reduces of `mb` MiB (the
    slowest rank's time; bus bandwidth = bytes x 2(n-1)/n / time, as nccl-tests report it), reported by rank 0."""
    small = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(small)
    want = world * (world + 1) / 2
    wrong = bool((small != want).any())
    numel = int(mb * MiB) // 4
    x = torch.ones(numel, dtype=torch.float32, device=device)
    dist.all_reduce(x)  # warm-up (NCCL builds its communicator here)
    _synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    _synchronize(device)
    elapsed = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # on the CPU group
    busbw = numel * 4 * 2 * (world - 1) / world / float(elapsed) / GB
    if wrong:
        return fail("all-reduce", f"all-reduce over {world} ranks returned {small[0].item():g}, not {want:g}")
    if rank != 0:
        return None
    what = f"{mb:g} MiB over {world} ranks: {busbw:.2f} GB/s bus bandwidth"
    if floor is not None and busbw < floor:
        return fail("all-reduce", f"all-reduce {what}, below --min-allreduce-gbps {floor:g}")
    return ok("all-reduce", what)


def check_p2p(device, mb: float, iters: int, floor: float | None, rank: int, hosts: list[str]) -> Result:
    """Every rank sends to the rank `shift` ahead and receives from the rank `shift` behind, all at once; `shift` is
    the number of ranks on rank 0's node when there are several nodes (so every pair crosses nodes), else 1."""
    world = len(hosts)
    per_node = hosts.count(hosts[0])
    shift = per_node if len(set(hosts)) > 1 and per_node < world else 1
    to, frm = (rank + shift) % world, (rank - shift) % world
    numel = int(mb * MiB) // 4
    send = torch.full((numel,), float(rank), device=device)
    recv = torch.empty(numel, device=device)

    def exchange() -> None:
        ops = [dist.P2POp(dist.isend, send, to), dist.P2POp(dist.irecv, recv, frm)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    exchange()  # warm-up and correctness
    _synchronize(device)
    if not bool((recv == float(frm)).all()):
        return fail("p2p", f"p2p from rank {frm} ({hosts[frm]}) delivered wrong data")
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        exchange()
    _synchronize(device)
    gbps = numel * 4 / ((time.perf_counter() - t0) / iters) / GB
    what = f"from rank {frm} ({hosts[frm]}): {gbps:.2f} GB/s"
    if floor is not None and gbps < floor:
        return fail("p2p", f"p2p {what}, below --min-p2p-gbps {floor:g}")
    return ok("p2p", what)


# ---------------------------------------------------------------- driver


def environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, else srun's, else a single process."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise PreflightError("MASTER_ADDR and MASTER_PORT are not set; run under torchrun or export them for srun")
    if world == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    return rank, world, local


def table(rows: list[tuple[str, list[int], Result]]) -> str:
    head = ("node", "ranks", "check", "status", "detail")
    body = [(host, _ranks(ranks), r.check, r.status, r.detail) for host, ranks, r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(head[:-1])]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(cols, widths, strict=False)), cols[-1]]) for cols in [head, *body]]
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def per_node(gathered: list[tuple[str, int, list[Result]]]) -> list[tuple[str, list[int], Result]]:
    """One row per (node, check): FAIL if any rank failed (its detail), else the lowest rank's row."""
    rows: dict[tuple[str, str], tuple[list[int], Result]] = {}
    for host, rank, results in gathered:
        for r in results:
            key = (host, r.check)
            if key not in rows:
                rows[key] = ([rank], r)
                continue
            ranks, kept = rows[key]
            ranks.append(rank)
            if r.status == "FAIL" and kept.status != "FAIL":
                rows[key] = (ranks, Result(r.check, r.status, f"rank {rank}: {r.detail}"))
    return [(host, ranks, r) for (host, _), (ranks, r) in rows.items()]


def failure_lines(failures: list[tuple[str, int, Result]]) -> list[str]:
    """One line per failure; the ranks of one node that failed the same way share a line."""
    grouped: dict[tuple[str, str], list[int]] = {}
    for host, rank, r in failures:
        grouped.setdefault((host, r.detail), []).append(rank)
    return [
        f"preflight FAILED on node {host} ({'rank' if len(ranks) == 1 else 'ranks'} {_ranks(ranks)}): {detail}"
        for (host, detail), ranks in grouped.items()
    ]


def run(a: argparse.Namespace) -> int:
    rank, world, local_rank = environment()
    host = socket.gethostname()
    backend = a.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    cuda = backend == "nccl" and torch.cuda.is_available() and local_rank < torch.cuda.device_count()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    timeout = timedelta(seconds=a.timeout)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        hosts: list[str] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(hosts, host)
        local_world = hosts.count(host)

        results = [check_devices(backend, a.expect_gpus, local_world, local_rank)]
        results.append(check_gpu_health(backend, local_rank, a.max_gpu_mem_used_gb))
        results += check_data([path_arg(d) for d in a.data])
        ckpt = path_arg(a.checkpoint_dir) if a.checkpoint_dir else None
        writable = check_checkpoint_dir(ckpt, host, rank)
        usable_dir = writable is not None and writable.status == "ok"
        results += [writable, check_disk(ckpt, a.keep_last, a.checkpoint_gb, usable_dir)]
        results.append(check_shared(path_arg(a.shared_dir) if a.shared_dir else None, rank, hosts))

        # the bandwidth checks need a usable device on every rank
        usable: list[bool] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(usable, backend == "gloo" or cuda)
        if world == 1:
            results += [skip("all-reduce", "one rank: nothing to measure"), skip("p2p", "one rank: nothing to measure")]
        elif not all(usable):
            bad = ", ".join(f"rank {r} ({hosts[r]})" for r, u in enumerate(usable) if not u)
            results += [skip("all-reduce", f"no GPU on {bad}"), skip("p2p", f"no GPU on {bad}")]
        else:
            mb = a.allreduce_mb or (256 if cuda else 16)
            results.append(check_all_reduce(device, mb, a.iters, a.min_allreduce_gbps, rank, world))
            results.append(check_p2p(device, a.p2p_mb or (64 if cuda else 8), a.iters, a.min_p2p_gbps, rank, hosts))

        mine = (host, rank, [r for r in results if r is not None], versions(rank))
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        reference = gathered[0][3]
        per_rank = [(h, r, [*res, compare_versions(v, reference)]) for h, r, res, v in gathered]
        failures = [(h, r, x) for h, r, res in per_rank for x in res if x.status == "FAIL"]
        if rank == 0:
            nodes = len(set(hosts))
            print(f"preflight: {world} rank(s) on {nodes} node(s), backend {backend}", flush=True)
            print(table(per_node(per_rank)), flush=True)
            for line in failure_lines(failures):
                print(line, file=sys.stderr, flush=True)
            if not failures:
                print(f"preflight passed on {nodes} node(s), {world} rank(s)", flush=True)
        return 1 if failures else 0
    finally:
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m cluster.preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("--expect-gpus", type=positive_int, help="GPUs per node (CPU processes per node on gloo)")
    p.add_argument("--data", action="append", default=[], help="a folder or file the job reads (repeatable)")
    p.add_argument("--checkpoint-dir", help="where checkpoints go (created if missing; must be writable)")
    p.add_argument("--keep-last", type=non_negative_int, default=3, help="checkpoint.keep_last of the run")
    p.add_argument("--checkpoint-gb", type=positive_float, help="size of one checkpoint in GB, for the disk check")
    p.add_argument("--min-allreduce-gbps", type=positive_float, help="all-reduce bus-bandwidth floor, GB/s")
    p.add_argument("--min-p2p-gbps", type=positive_float, help="send/recv bandwidth floor per rank, GB/s")
    p.add_argument("--backend", choices=("nccl", "gloo"), help="default: nccl when CUDA is available, else gloo")
    p.add_argument("--shared-dir", help="a folder every node must see as the same filesystem (the run dir)")
    p.add_argument("--allreduce-mb", type=positive_float, help="all-reduce size in MiB (default 256 GPU, 16 CPU)")
    p.add_argument("--p2p-mb", type=positive_float, help="send/recv size in MiB (default 64 GPU, 8 CPU)")
    p.add_argument("--iters", type=positive_int, default=5, help="timed repetitions of each collective")
    p.add_argument("--max-gpu-mem-used-gb", type=positive_float, default=4.0, help="memory in use per GPU allowed")
    p.add_argument("--timeout", type=positive_int, default=300, help="seconds a collective may wait for the others")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PreflightError as e:
        host, rank = socket.gethostname(), os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        print(f"preflight FAILED on node {host} (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
