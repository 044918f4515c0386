"""`sipcdr import FILE...`: capture files through the daemon's own pipeline, offline.

Time is the capture's: timers run on packet timestamps, and at the end every call
still open is closed by the dialog rules (`Correlator.drain`), since no later message
can come. A summary of what was read, found, rejected and written can go to JSON.

CDRs go to the configured sinks by the daemon's own path (`sinks.outputs`), through a
spool of the import's own, so an import never contends with a running daemon's
spool; for a large capture the sinks are written from a process of their own while
the import reads (`sipcdr.import_delivery`). The import ends when every sink has every
record, or after `DELIVERY_TIMEOUT_S` with the undelivered counts in the summary;
re-running it then is safe, since CDR and message ids are deterministic and every
sink deduplicates.

The chain is the daemon's own (`sipcdr.engine`): enrich, rate and, when `[fraud]` is
enabled and a sink keeps records, the fraud detectors, on the capture's time and
starting from nothing learnt. Their alerts go where the import's outputs put the
records, next to the CDRs.
"""

from __future__ import annotations

import asyncio
import fcntl
import heapq
import os
import shutil
import sys
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Final

import orjson
import structlog

from sipcdr.capture.pcapfile import CaptureFileError, iter_packet_batches
from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.command_loop import run_command
from sipcdr.config import Config, output_settings
from sipcdr.decode.extract import CaptureStats
from sipcdr.engine import EXPIRE_EVERY_S, Destinations, build_engine
from sipcdr.import_delivery import ImportDelivery, delivers_apart
from sipcdr.model import Packet
from sipcdr.pipeline import CdrSink
from sipcdr.privacy.import_list import apply_restrictions, drain, undelivered
from sipcdr.private import prepare_state_dir, private_dir
from sipcdr.sinks.outputs import Outputs
from sipcdr.storage.embedded import EMBEDDED_DATA_SUBDIR

# Long enough for a large capture into a remote database; a sink down longer than
# this fails the import, which can simply be run again.
DELIVERY_TIMEOUT_S = 600.0
YIELD_EVERY = 2000  # packets between turns for the sinks: ~0.1 s of parsing
_log = structlog.get_logger("sipcdr.import")


def import_files(
    config: Config,
    files: Sequence[Path],
    summary_json: Path | None = None,
    sinks: Sequence[CdrSink] | None = None,
    progress: bool | None = None,
    delivery_timeout_s: float = DELIVERY_TIMEOUT_S,
) -> dict[str, object]:
    """Run `files` through parse and correlation into the configured sinks (or into
    `sinks`, which then replace them)."""
    if sinks is None:
        return run_command(
            _import_to_outputs(config, files, summary_json, progress, delivery_timeout_s)
        )
    summary: dict[str, object] = {}
    for _ in _import(config, files, Destinations(sinks), progress, summary):
        pass
    if summary_json is not None:
        summary_json.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return summary


async def _import_to_outputs(
    config: Config,
    files: Sequence[Path],
    summary_json: Path | None,
    progress: bool | None,
    timeout_s: float,
) -> dict[str, object]:
    prepare_state_dir(Path(config.state.dir), leave=(EMBEDDED_DATA_SUBDIR,))
    spools = private_dir(Path(config.state.dir) / "import-spool")
    _remove_abandoned(spools)
    spool_dir = spools / str(os.getpid())
    # "block" on both streams: an import can wait for its sinks, so it never drops. The
    # reserve holds at least what is closed between two turns: one call per message of
    # a slice, and one slice of what a timer run closes (`_import` emits those in
    # slices too), so on a disk that refuses CDRs the import waits instead of losing
    # them. Below the signaling floor it waits for its sinks rather than refuse
    # signaling (`Outputs.wait_reason`).
    reserve = max(config.spool.cdr_reserve_records, 2 * YIELD_EVERY)
    config = replace(config, spool=replace(config.spool, cdr_reserve_records=reserve))
    apart = delivers_apart(config, files)
    outputs = Outputs(
        output_settings(config),
        spool_dir=spool_dir,
        full_policy="block",
        wait_below_floor=True,
        restrictions=True,
        role="capture" if apart else "all",
    )
    await outputs.open()
    remote = ImportDelivery(config, spool_dir, outputs) if apart else None
    summary: dict[str, object] = {}
    reading: asyncio.Task[None] | None = None
    try:
        # Before the first packet: the spool is new and empty, so nothing left unfiltered.
        if remote is not None:
            await remote.start()
        else:
            reading = await apply_restrictions(outputs)
        steps = _import(config, files, Destinations.of(outputs), progress, summary)
        ended = None if remote is None else remote.has_ended
        for _ in steps:
            # Every few thousand packets the sinks get their turn; while a spool is at
            # its limit or the disk refuses records, parsing waits for them rather than
            # outgrow the disk, as long as they make progress.
            outputs.flush()
            await asyncio.sleep(0)
            stuck = await _wait_for_room(outputs, timeout_s, ended=ended)
            if stuck is None and ended is not None and ended():
                stuck = "delivery_ended"
            if stuck is not None:
                summary["aborted"] = _STUCK[stuck].format(timeout_s)
                steps.close()  # fills the summary with what was read so far
                break
        outputs.flush()
        aborted = "aborted" in summary
        if remote is not None:
            # Written (flushed above): the other process reads them from the files.
            missing = await remote.finish(_next_seqs(outputs), 0 if aborted else timeout_s)
            if not remote.answered and not aborted:
                summary["aborted"] = _STUCK["delivery_ended"]
        else:
            delivered = await drain(outputs, 0 if aborted else timeout_s)
            missing = {} if delivered else undelivered(outputs)
        summary["undelivered"] = missing
    finally:
        if reading is not None:
            reading.cancel()
        try:
            if remote is not None:
                await remote.close()
        finally:  # a second Ctrl-C cuts that wait short, not the clean-up
            try:
                await outputs.close(drain_timeout_s=0)
            finally:  # nor, cut short itself, the spool's removal
                shutil.rmtree(spool_dir, ignore_errors=True)
    # After the close: CDRs a reserve still held then are lost, and counted there.
    summary["spool_refused"] = {
        stream: dict(spool.stats.dropped)
        for stream, spool in outputs.spools.items()
        if spool.stats.dropped
    }
    if summary_json is not None:
        summary_json.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return summary


# Why an import gave up, by `Outputs.wait_reason`; formatted with the timeout.
_STUCK = {
    "spool_full": "the spool stayed full and the sinks took nothing for {:.0f} s",
    "write_error": "neither the sinks nor the disk took anything for {:.0f} s",
    "disk_floor": (
        "the state disk stayed below [spool] signaling_min_free_bytes and the sinks "
        "took nothing for {:.0f} s"
    ),
    "delivery_ended": "the delivery process ended, or stopped answering, before the import did",
}


def _next_seqs(outputs: Outputs) -> dict[str, int]:
    return {stream: spool.next_seq for stream, spool in outputs.spools.items()}


async def _wait_for_room(
    outputs: Outputs,
    timeout_s: float,
    clock: Clock = SYSTEM_CLOCK,
    ended: Callable[[], bool] | None = None,
) -> str | None:
    """Wait while a spool is full, the disk refuses CDRs (they wait in the reserve, and
    are written again here) or signaling is below its free-space floor with records
    the sinks do not have yet; the reason when nothing moved for `timeout_s`, None
    once the import may read on."""
    delivery = outputs.delivery
    deadline = clock.monotonic() + timeout_s
    progress = -1
    while (reason := outputs.wait_reason) is not None:
        if ended is not None and ended():  # no one left to make room
            return "delivery_ended"
        outputs.flush()  # writes the reserve and reads the free space again, if due
        now_progress = sum(spool.next_seq for spool in outputs.spools.values())
        if delivery is not None:
            now_progress += sum(r.confirmed_seq for _s, r in delivery.readers())
        elif outputs.remote is not None:  # delivering apart: its last counts
            now_progress += sum(loop.confirmed_seq for loop in outputs.remote.loops)
        if now_progress != progress:  # a sink or the disk is moving: the full time again
            progress = now_progress
            deadline = clock.monotonic() + timeout_s
        if clock.monotonic() >= deadline:
            return reason
        await clock.sleep(0.05)
    return None


def _remove_abandoned(spools: Path) -> None:
    """Spools of imports that were killed: their records are re-made by importing the
    same files again (ids are deterministic), so they are only in the way. A spool is
    abandoned when no process holds its lock (a process id could be reused, or belong
    to another container sharing the state directory)."""
    if not spools.is_dir():
        return
    for directory in spools.iterdir():
        if directory.is_dir() and not _locked(directory):
            _log.warning("import_spool_abandoned", dir=str(directory))
            shutil.rmtree(directory, ignore_errors=True)


def _locked(directory: Path) -> bool:
    for lock in directory.glob("*/lock"):
        try:
            with lock.open("rb") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            continue
    return False


def _import(
    config: Config,
    files: Sequence[Path],
    destinations: Destinations,
    progress: bool | None,
    summary: dict[str, object],
) -> Generator[None, None, None]:
    """Runs the import, yielding every `YIELD_EVERY` packets so a caller can let its
    sinks work; fills `summary` at the end."""
    engine = build_engine(config, destinations)
    pipeline = engine.pipeline
    per_file: list[CaptureStats] = []
    errors: dict[str, str] = {}
    warnings: dict[str, str] = {}
    show = sys.stderr.isatty() if progress is None else progress
    next_expiry = 0.0
    packets = 0
    try:
        with _Progress(show, len(files)) as bar:

            def batches_of(path: Path) -> Iterator[Sequence[Packet]]:
                # Each file's own counters, so a warning can say what that file held.
                stats = CaptureStats()
                per_file.append(stats)
                try:
                    yield from iter_packet_batches(path, stats=stats)
                except CaptureFileError as exc:
                    errors[str(path)] = str(exc)
                except OSError as exc:
                    errors[str(path)] = f"{path}: cannot be read ({exc.strerror or exc})"
                else:
                    warning = file_warning(path, stats)
                    if warning is not None:
                        warnings[str(path)] = warning
                bar.advance()

            # All files merged by capture time: rotated captures (cap1, cap10, cap2...)
            # and overlapping ones from two sensors both play as the one link they
            # recorded. One file needs no merging, and its packets come in the batches
            # the file's chunks give: no generator resumed per packet (~0.2 µs each).
            sources = [batches_of(path) for path in files]
            batches: Iterable[Iterable[Packet]] = (
                sources[0]
                if len(sources) == 1
                else (heapq.merge(*map(chain.from_iterable, sources), key=_capture_time),)
            )
            for batch in batches:
                for packet in batch:
                    packets += 1
                    # Timers due before this packet fire first, as they would have
                    # live; what they close goes out in slices, a turn after each,
                    # like the drain.
                    if packet.timestamp >= next_expiry:
                        expired = engine.expired(packet.timestamp)
                        for start in range(0, len(expired), YIELD_EVERY):
                            engine.emit(expired[start : start + YIELD_EVERY])
                            yield
                        engine.tick_stages(packet.timestamp)
                        next_expiry = packet.timestamp + EXPIRE_EVERY_S
                    pipeline.process(packet)
                    if packets % YIELD_EVERY == 0:
                        yield
        # Every call still open closes now: in slices, so a disk that refuses them
        # has the caller wait rather than outrun the reserve; and the caller waits
        # once more at the end, for what the disk refused since the last turn.
        closing = engine.drain()
        for start in range(0, len(closing), YIELD_EVERY):
            pipeline.emit(closing[start : start + YIELD_EVERY])
            yield
        pipeline.flush()
        yield
    finally:
        # Also when the caller stops early (an aborted import): what was read so far.
        stats = pipeline.correlator.stats
        requests: dict[str, int] = {}
        responses: dict[str, int] = {}
        for (method, kind), count in pipeline.stats.messages.items():
            target = requests if kind == "request" else responses
            target[method] = target.get(method, 0) + count
        summary.update(
            {
                "files": [str(p) for p in files],
                "file_errors": errors,
                "file_warnings": warnings,
                "capture": (capture := _added(stats.as_dict() for stats in per_file)),
                "encapsulations": {
                    name: capture.get(f"decap_{name}", 0) for name in ENCAPSULATIONS
                },
                "sip_messages": packets,
                "requests_by_method": requests,
                "responses_by_cseq_method": responses,
                "rejected_by_reason": dict(pipeline.stats.parse_errors),
                "cdrs_written": pipeline.cdrs_written,
                # Faults that cost a message or a CDR: not silent, and not a success.
                "internal_errors": dict(pipeline.stats.internal_errors),
                "cdr_write_failures": dict(pipeline.stats.cdr_write_failures),
                "cdrs_by_disposition": dict(stats.cdrs),
                "retransmissions": stats.retransmissions,
                "late_messages": stats.late,
                "orphan_messages": stats.orphans,
            }
        )


# The layers decoding removes, each counted per frame (MPLS per label stack; "tunnelled"
# is IP-in-IP, GRE and ERSPAN together).
ENCAPSULATIONS: Final = ("pppoe", "mpls", "gtpu", "vxlan", "geneve", "tzsp", "tunnelled")

NO_SIP: Final = "no SIP found"  # in a file's warning when the file held none

# What a capture without SIP held instead, by CaptureStats counter, in the words of the
# warning: the first counters that are not zero say why nothing was found.
_INSTEAD: Final = (
    ("decap_non_ip", "non-IP frames"),
    ("decap_unsupported_tunnel", "frames in a tunnel or encapsulation not read here"),
    ("decap_other_protocol", "IP packets of other protocols (ICMP, ESP, ...)"),
    ("non_sip_payloads", "UDP/SCTP payloads that are not SIP"),
    ("decap_tcp", "TCP segments without SIP"),
    ("hep_non_sip", "HEP packets of other types than SIP"),
    ("decap_malformed", "malformed frames"),
    ("decap_truncated", "frames cut short by the capture's snap length"),
    ("keepalives", "keepalives"),
)


def file_warning(path: Path, stats: CaptureStats) -> str | None:
    """One line for a file that was read but is not all it should be: cut short (and
    where), or without any SIP (and what it held instead); None when it is fine."""
    problems: list[str] = []
    if stats.truncated_file:
        at = f" at byte {stats.truncated_at}" if stats.truncated_at >= 0 else ""
        problems.append(
            f"truncated: the file ends inside a record{at}; what came before it was read"
        )
    # pcapng packet blocks that could not be read at all: never frames, never silent.
    if stats.unknown_interface:
        problems.append(
            f"{stats.unknown_interface} packet blocks name an interface the file "
            "never described, not read"
        )
    if stats.unsupported_link:
        problems.append(
            f"{stats.unsupported_link} packet blocks of interfaces whose link type is not read here"
        )
    if stats.bad_time:
        problems.append(
            f"{stats.bad_time} packet blocks timed before 1970 or after 9999 (if_tsoffset?), "
            "not read"
        )
    if not stats.sip_messages:
        counts = stats.as_dict()
        found = [f"{counts[key]} {words}" for key, words in _INSTEAD if counts.get(key)]
        if stats.frames_read:
            instead = ", ".join(found) if found else "nothing else either"
            problems.append(f"{NO_SIP} in {stats.frames_read} frames: {instead}")
        else:
            problems.append(f"{NO_SIP}: the capture holds no frames")
    return f"{path}: {'; '.join(problems)}" if problems else None


def _added(counters: Iterator[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in counters:
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    return total


def _capture_time(packet: Packet) -> float:
    return packet.timestamp


class _Progress:
    """A rich progress bar on a terminal, silence elsewhere (logs, CI)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._enabled = enabled
        self._total = total
        self._bar: object | None = None
        self._task: object | None = None

    def __enter__(self) -> _Progress:
        if self._enabled:
            from rich.progress import Progress  # noqa: PLC0415 - only on a terminal

            bar = Progress(transient=True)
            bar.start()
            self._task = bar.add_task("importing", total=self._total)
            self._bar = bar
        return self

    def advance(self) -> None:
        self._update(advance=1)

    def _update(self, **changes: object) -> None:
        if self._bar is not None:
            from rich.progress import Progress, TaskID  # noqa: PLC0415

            assert isinstance(self._bar, Progress)
            assert isinstance(self._task, int)
            self._bar.update(TaskID(self._task), **changes)  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            from rich.progress import Progress  # noqa: PLC0415

            assert isinstance(self._bar, Progress)
            self._bar.stop()
