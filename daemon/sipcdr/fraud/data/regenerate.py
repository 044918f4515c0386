"""Rebuild the two shipped number tables from Google's libphonenumber metadata.

Not part of the daemon: run by hand when the tables are refreshed, in a throwaway
environment that has the two libraries the daemon does not depend on:

    python -m venv /tmp/tables && /tmp/tables/bin/pip install phonenumbers regex
    /tmp/tables/bin/python daemon/sipcdr/fraud/data/regenerate.py

It writes `nsn_lengths.csv` (possible lengths of national significant numbers per
country code) and `high_risk_prefixes.csv` (the ITU-T non-geographic codes that
revenue-share fraud targets, and every country's premium-rate ranges) beside itself,
each with its source, version and date in the header.
"""

from __future__ import annotations

import datetime
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MAX_PREFIX_DIGITS = 6  # after the country code; deeper ranges are listed by their first 6

# ITU-T E.164 codes of international (non-geographic) services whose numbers are sold
# as revenue-share destinations. Source: ITU-T, "List of ITU-T Recommendation E.164
# assigned country codes", https://www.itu.int/pub/T-SP-E.164D
ITU_GLOBAL_SERVICES = {
    "870": "inmarsat",  # Inmarsat single network access code
    "881": "satellite",  # Global Mobile Satellite System (Iridium, Globalstar, ...)
    "882": "international_network",  # International Networks, shared code
    "883": "international_network",  # International Networks, shared code
    "979": "international_premium_rate",  # International Premium Rate Service (E.169.2)
}


def main() -> int:
    import phonenumbers  # noqa: PLC0415 - only this script needs them
    import regex  # noqa: PLC0415
    from phonenumbers.phonemetadata import PhoneMetadata  # noqa: PLC0415

    version = phonenumbers.__version__
    today = datetime.date.today().isoformat()
    source = (
        f"libphonenumber metadata as packaged in the Python phonenumbers {version} "
        "(https://github.com/google/libphonenumber, Apache-2.0), which compiles the "
        "national numbering plans administrations notify to the ITU-T (Rec. E.129)"
    )

    lengths: dict[str, set[int]] = defaultdict(set)
    regions: dict[str, list[str]] = defaultdict(list)
    premium: dict[str, set[str]] = defaultdict(set)
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        meta: Any = PhoneMetadata.metadata_for_region(region)
        code = str(meta.country_code)
        lengths[code].update(meta.general_desc.possible_length)
        regions[code].append(region)
        pattern = meta.premium_rate.national_number_pattern if meta.premium_rate else None
        if pattern:
            for prefix in _leading_digits(regex.compile(pattern)):
                premium[code + prefix].add(region)
    for code_number in sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS):
        meta = PhoneMetadata.metadata_for_nongeo_region(code_number)
        code = str(code_number)
        lengths[code].update(meta.general_desc.possible_length)
        regions[code].append("001")  # libphonenumber's name for "no region"

    header = [
        f"# Source: {source}.",
        f"# Generated {today} by daemon/sipcdr/fraud/data/regenerate.py.",
    ]
    _write(
        HERE / "nsn_lengths.csv",
        [
            "# Possible lengths of the national significant number (digits after the",
            "# country code) for every assigned E.164 country code; codes shared by",
            "# several countries (1, 7, 44, ...) list the union of their lengths.",
            *header,
            "country_code,regions,lengths",
            *(
                f"{code},{' '.join(regions[code])},{' '.join(map(str, sorted(lengths[code])))}"
                for code in sorted(lengths, key=lambda c: (len(c), c))
            ),
        ],
    )
    rows = {prefix: ("001", kind) for prefix, kind in ITU_GLOBAL_SERVICES.items()}
    for prefix in _merge(set(premium)):
        owners = sorted({r for p, rs in premium.items() if p.startswith(prefix) for r in rs})
        rows.setdefault(prefix, (" ".join(owners), "premium_rate"))
    _write(
        HERE / "high_risk_prefixes.csv",
        [
            "# E.164 prefixes (no '+') that international revenue share fraud (IRSF)",
            "# pays out on: the ITU-T non-geographic service codes sold as premium",
            "# destinations (source: ITU-T, List of ITU-T Recommendation E.164 assigned",
            "# country codes, https://www.itu.int/pub/T-SP-E.164D) and every country's",
            f"# premium-rate ranges, cut to at most {MAX_PREFIX_DIGITS} digits after the code.",
            *header,
            "prefix,regions,kind",
            *(f"{prefix},{owners},{kind}" for prefix, (owners, kind) in sorted(rows.items())),
        ],
    )
    return 0


def _leading_digits(pattern: Any) -> list[str]:
    """The shortest digit prefixes after which `pattern` (a national number) accepts any
    digits: a prefix is kept once every one- and two-digit extension can still match."""
    digits = "0123456789"
    found: list[str] = []

    def viable(text: str) -> bool:
        return pattern.fullmatch(text, partial=True) is not None

    def walk(prefix: str) -> None:
        children = [prefix + d for d in digits if viable(prefix + d)]
        if prefix and len(children) == 10 and all(viable(c + d) for c in children for d in digits):
            found.append(prefix)
            return
        if len(prefix) == MAX_PREFIX_DIGITS:
            found.append(prefix)
            return
        for child in children:
            walk(child)

    walk("")
    return found


def _merge(prefixes: set[str]) -> list[str]:
    """Drop prefixes covered by a shorter one and fold ten siblings into their parent."""
    changed = True
    while changed:
        changed = False
        for prefix in sorted(prefixes, key=len, reverse=True):
            parent = prefix[:-1]
            if len(parent) > 1 and all(parent + d in prefixes for d in "0123456789"):
                prefixes -= {parent + d for d in "0123456789"}
                prefixes.add(parent)
                changed = True
                break
    kept = sorted(prefixes)
    return [p for p in kept if not any(p != q and p.startswith(q) for q in kept)]


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {path} ({len(lines)} lines)")


if __name__ == "__main__":
    sys.exit(main())
