"""What the dialog store counts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class DialogStoreStats:
    """Cumulative counts the daemon exports."""

    journal_messages: int = 0
    journal_closes: int = 0
    journal_decisions: int = 0  # close decisions and timer runs
    journal_write_errors: int = 0  # records not journaled: not rebuilt after a crash
    checkpoints: int = 0
    checkpoint_failures: int = 0
    torn_tails: int = 0  # journals that ended in a partial or damaged record at recovery
    torn_bytes: int = 0
    bad_records: int = 0  # well-framed records recovery could not apply
    unreadable_checkpoints: int = 0
    unreadable_journals: int = 0
    internal_errors: int = 0  # the background task's own failures, survived
    replayed_records: int = 0
