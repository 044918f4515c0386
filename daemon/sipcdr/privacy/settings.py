"""Retention periods and privacy settings: `[retention]`, `[privacy]`, a trunk's
`cdr_retention_days` and `[sinks.kafka] pseudonymize_numbers`, each default a named
constant with its reason.

The configuration loader hands each section to the functions here as a table reader
(`SettingsTable`), so the rules for these keys live with the code that uses them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Final, Protocol

# What a provider promises by default: header captures 90 days, CDRs 6 months, alerts a
# year (a fraud case is often found on the anniversary bill), the audit trail 3 years
# (longer than any record it speaks about, so every erasure can still be proven).
DEFAULT_CDRS_DAYS: Final = 180
DEFAULT_SIP_MESSAGES_DAYS: Final = 90
DEFAULT_FRAUD_ALERTS_DAYS: Final = 365
DEFAULT_AUDIT_LOG_DAYS: Final = 3 * 365
# Seven years, leap days included: the longest CDR retention jurisdictions ask for.
MAX_CDR_DAYS: Final = 7 * 365 + 2
# The audit log is never kept less than a year (sipcdr_audit_expire refuses too).
MIN_AUDIT_LOG_DAYS: Final = 365
# Signaling kept for an investigation: 12 months at most, the promise made to subjects
# (the database refuses longer too); a setting may only shorten it.
DEFAULT_SIGNALING_HOLD_MAX_DAYS: Final = 365
# No statutory retention unless a jurisdiction's is configured: erasure is allowed.
DEFAULT_STATUTORY_CDR_DAYS: Final = 0
# The daemon runs retention at start and then once a day.
DEFAULT_RUN_INTERVAL_S: Final = 24 * 3600.0

RETENTION_KEYS: Final = (
    "cdrs_days",
    "sip_messages_days",
    "fraud_alerts_days",
    "audit_log_days",
    "run_interval_s",
)
PRIVACY_KEYS: Final = ("statutory_cdr_days", "signaling_hold_max_days", "pseudonym_key_file")
TRUNK_KEY: Final = "cdr_retention_days"
KAFKA_KEY: Final = "pseudonymize_numbers"


class SettingsTable(Protocol):
    """What the configuration loader's table reader offers (sipcdr.config)."""

    def has(self, name: str) -> bool: ...
    def key(self, name: str) -> str: ...
    def integer(self, name: str, default: int, *, minimum: int) -> int: ...
    def positive_number(self, name: str, default: float, *, minimum: float = 0.0) -> float: ...
    def string(self, name: str, default: str) -> str: ...
    def boolean(self, name: str, default: bool) -> bool: ...
    def invalid(self, name: str, value: object, expected: str) -> Exception: ...
    def problem(self, name: str, value: object, problem: str, expected: str) -> Exception: ...


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    cdrs_days: int = DEFAULT_CDRS_DAYS
    sip_messages_days: int = DEFAULT_SIP_MESSAGES_DAYS
    fraud_alerts_days: int = DEFAULT_FRAUD_ALERTS_DAYS
    audit_log_days: int = DEFAULT_AUDIT_LOG_DAYS
    run_interval_s: float = DEFAULT_RUN_INTERVAL_S
    # trunk name -> its own CDR retention (`[[trunks]] cdr_retention_days`).
    trunk_cdr_days: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def days(self, table: str) -> int:
        """The retention of `table` (`cdrs`, `sip_messages`, `fraud_alerts`, `audit_log`);
        for `cdrs` the default class."""
        return int(getattr(self, f"{table}_days"))

    def cdr_classes(self) -> dict[int, int]:
        """Retention class -> days: class 0 follows `cdrs_days`, each other class is a
        trunk's own period in days."""
        return {0: self.cdrs_days} | {days: days for days in self.trunk_cdr_days.values()}

    def longest_cdr_days(self) -> int:
        return max(self.cdr_classes().values())

    def redacted(self) -> dict[str, object]:
        shown: dict[str, object] = {
            item.name: getattr(self, item.name)
            for item in fields(self)
            if item.name != "trunk_cdr_days"
        }
        shown["trunk_cdr_days"] = dict(self.trunk_cdr_days)
        return shown


@dataclass(frozen=True, slots=True)
class PrivacySettings:
    statutory_cdr_days: int = DEFAULT_STATUTORY_CDR_DAYS
    signaling_hold_max_days: int = DEFAULT_SIGNALING_HOLD_MAX_DAYS
    # The HMAC key of pseudonyms: a file (0600, the daemon's user's), never the config
    # itself, so the config may be shown and shared without it.
    pseudonym_key_file: Path | None = None
    pseudonymize_kafka: bool = False  # [sinks.kafka] pseudonymize_numbers

    def redacted(self) -> dict[str, object]:
        return {
            "statutory_cdr_days": self.statutory_cdr_days,
            "signaling_hold_max_days": self.signaling_hold_max_days,
            "pseudonym_key_file": (
                None if self.pseudonym_key_file is None else str(self.pseudonym_key_file)
            ),
            "pseudonymize_kafka": self.pseudonymize_kafka,
        }


def trunk_cdr_days(table: SettingsTable) -> int | None:
    """A `[[trunks]]` entry's `cdr_retention_days`, None when absent."""
    if not table.has(TRUNK_KEY):
        return None
    return _cdr_days(table, TRUNK_KEY, 0)


def parse_retention(
    table: SettingsTable, trunks: Iterable[tuple[str, int | None]]
) -> RetentionSettings:
    """`[retention]`, with the trunks' own CDR periods (name, days or None)."""
    audit_days = table.integer("audit_log_days", DEFAULT_AUDIT_LOG_DAYS, minimum=1)
    if audit_days < MIN_AUDIT_LOG_DAYS:
        raise table.problem(
            "audit_log_days",
            audit_days,
            "the audit log outlives the records it speaks about",
            f"at least {MIN_AUDIT_LOG_DAYS}",
        )
    return RetentionSettings(
        cdrs_days=_cdr_days(table, "cdrs_days", DEFAULT_CDRS_DAYS),
        sip_messages_days=table.integer("sip_messages_days", DEFAULT_SIP_MESSAGES_DAYS, minimum=1),
        fraud_alerts_days=table.integer("fraud_alerts_days", DEFAULT_FRAUD_ALERTS_DAYS, minimum=1),
        audit_log_days=audit_days,
        run_interval_s=table.positive_number(
            "run_interval_s", DEFAULT_RUN_INTERVAL_S, minimum=60.0
        ),
        trunk_cdr_days=MappingProxyType({name: days for name, days in trunks if days is not None}),
    )


def parse_privacy(table: SettingsTable, base_dir: Path, *, pseudonymize: bool) -> PrivacySettings:
    """`[privacy]`; `pseudonymize` is `[sinks.kafka] pseudonymize_numbers` of an enabled
    Kafka sink, which needs the key. A relative key path is taken from the config
    file's folder, as other input files are."""
    key_text = table.string("pseudonym_key_file", "")
    key_file = base_dir / key_text if key_text else None
    if pseudonymize and key_file is None:
        raise table.problem(
            "pseudonym_key_file",
            None,
            f"missing, and sinks.kafka.{KAFKA_KEY} needs the key",
            "a file holding the pseudonym key",
        )
    return PrivacySettings(
        statutory_cdr_days=table.integer(
            "statutory_cdr_days", DEFAULT_STATUTORY_CDR_DAYS, minimum=0
        ),
        signaling_hold_max_days=_hold_cap(table),
        pseudonym_key_file=key_file,
        pseudonymize_kafka=pseudonymize,
    )


def _hold_cap(table: SettingsTable) -> int:
    days = table.integer("signaling_hold_max_days", DEFAULT_SIGNALING_HOLD_MAX_DAYS, minimum=1)
    if days > DEFAULT_SIGNALING_HOLD_MAX_DAYS:
        raise table.invalid(
            "signaling_hold_max_days",
            days,
            f"at most {DEFAULT_SIGNALING_HOLD_MAX_DAYS} (12 months)",
        )
    return days


def _cdr_days(table: SettingsTable, name: str, default: int) -> int:
    days = table.integer(name, default, minimum=1)
    if days > MAX_CDR_DAYS:
        raise table.invalid(name, days, f"at most {MAX_CDR_DAYS} days (seven years)")
    return days
