"""Open calls on disk: checkpoints of the correlator plus a journal of what changed
since, so that a call answered before a crash (SIGKILL, OOM kill, power loss) still
gets its correct CDR when its BYE arrives after the restart, and a CDR closed before
it but not yet in the spool is still written.

Files in the state directory, numbered by generation g, each created 0600:

    dialogs.<g>.json      checkpoint: the correlator's snapshot as generation g began,
                          and the CDRs closed but not yet on disk then
    dialogs.<g>.journal   what changed during generation g

The journal holds four kinds of record. Batched (the daemon's default), the records of
one event loop turn are appended in one `write` at the end of the turn, or sooner:
before any CDR reaches the sinks (the barrier `ahead` puts first among them: no CDR is
in the spool before the records that closed it), before an fsync, before a
checkpoint switches journals, and past 512 records or 256 KiB (the memory a burst
holds); otherwise each is appended with a `write` of its own. A write cut short goes on
with the rest; what a full disk still refuses is cut back to the last whole record:
- a message the correlator reported as `changed` (a first INVITE, the first ringing,
  answer or final response to it, a CANCEL, an auth retry, a BYE), before any CDR it
  closes goes to the spool;
- a close decision for a CDR no replayed message would close the same way (a timer, an
  eviction): the call, its end time and reason, before the CDR goes to the spool, so
  replay closes it exactly as then;
- a timer run that closed or forgot anything, after its decisions;
- a close, once the CDR is in the spool file (`closed`, the spool writer's hook),
  written then, batched or not: held to the end of the turn, a kill would have the start
  write that CDR again, through the stages anew and so without the fraud flags its call
  had gathered (the fraud stage's state is not journaled). A CDR the disk refused waits
  in the spool's reserve and gets its close record only when the reserve is written.
Written records survive a killed process at once; a kill within a turn loses what that
turn took in and had not written, as datagrams still in the socket buffer are lost (a
kill in the middle of a turn's write can cut its last record short: cut off at start,
counted as a torn tail);
the journal is fsynced every `fsync_interval_s`,
which bounds what a power loss takes. Retransmissions and in-dialog requests other
than BYE change nothing but a call's last-message time and are not journaled: the
checkpoints carry that time.

A checkpoint starts generation g+1: the snapshot is taken, with the CDRs the spool
still holds in memory (`held`), journal g+1 opened, the snapshot written to
`dialogs.<g+1>.tmp` (in a thread, while messages go on into the new journal), fsynced
and renamed, then the files of older generations deleted. The snapshot and the switch
of journals run between two messages on the one event loop, so the snapshot is
exactly the state journal g+1 starts from. A checkpoint file is JSON followed by a
CRC-32 trailer line, so damage is recognised rather than restored. If the checkpoint
cannot be written (a full disk), the older checkpoint and journals stay and still
rebuild the state; nothing half-written is left; attempts are then spaced out,
doubling up to `CHECKPOINT_RETRY_MAX_S`.

Recovery restores the newest checkpoint and replays the journals from its generation
on through the correlator, in order: the same messages and decisions in the same order
rebuild the same state, with no second encoding of it. A CDR closed by a replayed
record, or carried unwritten by the checkpoint, whose close record follows was written
before the crash and is dropped; one without is handed back to be written again: the
same record under the same `cdr_id`, which the sinks deduplicate. A close record for a
call that replay left open (journals of versions without close decisions) closes it
without a CDR.

A full disk: a write refused for want of space asks `on_no_space` to make room (the
daemon's spare file) and is tried once more. At start, a journal that cannot be
created for want of space leaves the store running without one (counted, ERROR):
every due checkpoint tries again. A file recovery cannot read at all is renamed
`.unreadable` and deleted after `UNREADABLE_RETENTION_S` by a later good checkpoint.
"""

from sipcdr.dialogstore.checkpoint import _unwritten_cdrs, _unwritten_json, read_checkpoint
from sipcdr.dialogstore.journal import _FRAME, MAGIC
from sipcdr.dialogstore.stats import DialogStoreStats
from sipcdr.dialogstore.store import DEFAULT_CHECKPOINT_INTERVAL_S, DialogStore

__all__ = [
    "DEFAULT_CHECKPOINT_INTERVAL_S",
    "MAGIC",
    "_FRAME",
    "DialogStore",
    "DialogStoreStats",
    "_unwritten_cdrs",
    "_unwritten_json",
    "read_checkpoint",
]
