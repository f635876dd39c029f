"""The resumable shard loop shared by `fluid tokenize` and `fluid encode-text`.

Record slot i of the source order goes to shard i // R (R = --records-per-shard), bad slots
included, so a shard's content depends only on its slot range: an interrupted run resumed, or a run
split across processes, writes the same records as one uninterrupted run (bit-identical floats on
the same machine and threads; another process or CPU may round differently). A shard file exists only
when complete (shards.write_shard renames a temp file), so a re-run skips the shards present and
removes temp files left by a killed writer. Process `rank` of `world` writes the shards with
i % world == rank; whichever process finds every shard present writes the manifest. `plan.json`
records the settings the directory was started with, so a re-run with other settings cannot mix
shards of two different runs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from fluid_cli.errors import FluidError
from fluid_cli.shards import (
    MANIFEST,
    FieldSpec,
    Manifest,
    ShardInfo,
    atomic_write_bytes,
    clean_temp_files,
    read_shard_info,
    shard_name,
    write_manifest,
    write_shard,
)
from fluid_cli.stages.sources import Record, RecordSource

log = logging.getLogger(__name__)
PLAN = "plan.json"


@dataclass
class ShardOutput:
    """What a stage made of one shard's record slots (values stacked or listed per field)."""

    keys: list[str]
    values: dict[str, torch.Tensor | list[torch.Tensor]]
    skipped: list[dict]
    rows: list[dict] | None = None


class Stage(Protocol):
    fields: dict[str, FieldSpec]

    def prepare(self) -> None: ...  # load the model (before the progress bar starts timing)

    def encode_shard(self, records: list[Record], advance: Callable[[int], None]) -> ShardOutput: ...

    def manifest(
        self, shards: list[ShardInfo], skipped: list[dict], out_dir: Path, producer: dict
    ) -> Manifest: ...


def resolve_split(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(rank, world) from --num-shards/--shard-index, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if (num_shards is None) != (shard_index is None):
        raise FluidError("--num-shards and --shard-index go together")
    if num_shards is None:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    else:
        world, rank = num_shards, shard_index
    if world < 1 or not 0 <= rank < world:
        raise FluidError(f"shard index {rank} is not in [0, {world}) (--shard-index / RANK)")
    return rank, world


def _check_plan(out_dir: Path, settings: dict) -> None:
    path = out_dir / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [
            f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
            for k in sorted(old.keys() | settings.keys())
            if old.get(k) != settings.get(k)
        ]
        started = (out_dir / MANIFEST).is_file() or any(out_dir.glob("shard-*.safetensors"))
        if diff and not started:  # a start that failed before its first shard: nothing to mix up
            log.info("%s: no shard written yet; its plan is replaced (%s)", out_dir, "; ".join(diff))
            atomic_write_bytes(path, (json.dumps(settings, indent=1) + "\n").encode())
        elif diff:
            raise FluidError(
                f"{out_dir} was started with other settings ({'; '.join(diff)}); "
                "use another --out, or delete it to start over"
            )
    else:
        atomic_write_bytes(path, (json.dumps(settings, indent=1) + "\n").encode())


def _clean_temps(out_dir: Path, rank: int, world: int) -> None:
    if world == 1:
        n = clean_temp_files(out_dir)
    else:  # other ranks are writing now: remove only the temp files of this rank's shards
        n = 0
        for p in out_dir.glob("shard-*.tmp-*"):
            if p.name[6:11].isdigit() and int(p.name[6:11]) % world == rank:
                p.unlink(missing_ok=True)
                n += 1
    if n:
        log.info("removed %d temp file(s) left by an interrupted run", n)


def progress_bar(total: int, what: str):
    """A rich progress bar on stderr (stdout carries data only) showing records per second."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    rate = TextColumn("{task.fields[rate]}")
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        rate,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    task = bar.add_task(what, total=total, rate="")
    start, done = time.monotonic(), [0]

    def advance(n: int) -> None:
        # the mean rate since the start: rich's windowed speed is blank when updates are slow
        done[0] += n
        rate = done[0] / max(time.monotonic() - start, 1e-9)
        bar.update(task, advance=n, rate=f"{rate:.3g} {what}/s")

    def summary() -> str:
        secs = time.monotonic() - start
        return f"{done[0]} {what} in {secs:.1f} s: {done[0] / max(secs, 1e-9):.3g} {what}/s"

    return bar, advance, summary


def run_sharded(
    out_dir: Path,
    source: RecordSource,
    stage: Stage,
    settings: dict,
    records_per_shard: int,
    rank: int,
    world: int,
    what: str = "images",
) -> bool:
    """Write this process's missing shards, then the manifest if every shard exists. True: complete."""
    R = records_per_shard
    if R < 1:
        raise FluidError("--records-per-shard must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    n = source.count()
    if n == 0:
        raise FluidError(f"the sources hold no records: {', '.join(f.path for f in source.files)}")
    _check_plan(out_dir, {**settings, "records_per_shard": R, "num_records": n})
    if (out_dir / MANIFEST).is_file() and _complete_and_intact(out_dir):
        log.info("%s is already complete (%s exists, its shards verified); nothing to do", out_dir, MANIFEST)
        return True
    _clean_temps(out_dir, rank, world)
    num_shards = -(-n // R)
    mine = [i for i in range(num_shards) if i % world == rank]
    todo = [i for i in mine if not _present_and_readable(out_dir / shard_name(i))]
    log.info(
        "%d record slots -> %d shards of %d; this process (rank %d of %d): %d to write, %d already complete",
        n,
        num_shards,
        R,
        rank,
        world,
        len(todo),
        len(mine) - len(todo),
    )
    written: dict[int, ShardInfo] = {}
    if todo:
        written = _write_shards(out_dir, source, stage, todo, R, n, what)
    present = [i for i in range(num_shards) if (out_dir / shard_name(i)).is_file()]
    if len(present) < num_shards:
        log.info(
            "%d of %d shards present; the run that completes the last one writes the manifest",
            len(present),
            num_shards,
        )
        return False
    _assemble(out_dir, stage, num_shards, R, n, written)
    return True


def _complete_and_intact(out_dir: Path) -> bool:
    """A rerun over a complete directory: check every shard against the manifest (sizes and headers;
    sha256 the first time, then recorded). Damaged shards are removed with the manifest, so this run
    redoes just those and writes the manifest again. True: nothing to do."""
    from fluid_cli.artifact import Artifact

    try:
        art = Artifact.open(out_dir)
    except FluidError as e:  # a missing shard, or a manifest that does not parse: rebuild it
        log.warning("%s; the missing shards are made again and the manifest rewritten", e)
        (out_dir / MANIFEST).unlink(missing_ok=True)
        return False
    bad = art.problems()[0]
    if not bad:
        return True
    for i, why in sorted(bad.items()):
        log.warning("%s: %s; it is made again", art.describe_shard(i), why)
    art._handles.clear()  # close the memory maps before the files go
    for i in bad:
        (out_dir / art.shard_files[i]).unlink(missing_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    return False


def _present_and_readable(path: Path) -> bool:
    """A shard file exists and its header parses (cheap); one that does not is removed and redone."""
    if not path.is_file():
        return False
    try:
        read_shard_info(path, with_checksum=False)
        return True
    except Exception as e:  # SafetensorError, or metadata that is not ours
        log.warning("%s is damaged (%s); it is made again", path, " ".join(str(e).split())[:100])
        path.unlink(missing_ok=True)
        return False


def _write_shards(
    out_dir: Path, source: RecordSource, stage: Stage, todo: list[int], R: int, n: int, what: str
) -> dict[int, ShardInfo]:
    todo_set, last = set(todo), max(todo)
    total = sum(min(R, n - i * R) for i in todo)
    written: dict[int, ShardInfo] = {}
    buf: list[Record] = []
    stage.prepare()
    bar, advance, summary = progress_bar(total, what)
    with bar:
        for slot, rec in source.records(lambda i: i // R in todo_set):
            shard = slot // R
            if shard not in todo_set:
                continue
            buf.append(rec)
            if slot == min(n, (shard + 1) * R) - 1:  # the shard's last slot
                out = stage.encode_shard(buf, advance)
                written[shard] = write_shard(
                    out_dir, shard, out.keys, out.values, stage.fields, out.rows, out.skipped
                )
                buf = []
                if shard == last:
                    break  # the rest of the sources belongs to other processes or is done
    log.info(summary())
    return written


def _assemble(
    out_dir: Path, stage: Stage, num_shards: int, R: int, n: int, written: dict[int, ShardInfo]
) -> None:
    infos: list[ShardInfo] = []
    for i in range(num_shards):
        info = written.get(i) or read_shard_info(out_dir / shard_name(i))
        expect = min(R, n - i * R)
        if info.records + len(info.skipped) != expect:  # a shard of another run: never mix them
            raise FluidError(
                f"{out_dir / info.file} covers {info.records + len(info.skipped)} record slots, expected "
                f"{expect}: the directory mixes runs; delete it and run again"
            )
        infos.append(info)
    skipped = [s for info in infos for s in info.skipped]
    producer = json.loads((out_dir / PLAN).read_text())  # the settings, as the plan recorded them
    write_manifest(out_dir, stage.manifest(infos, skipped, out_dir, producer))
    log.info(
        "wrote %s: %d records in %d shards, %d skipped",
        out_dir / MANIFEST,
        sum(i.records for i in infos),
        num_shards,
        len(skipped),
    )
