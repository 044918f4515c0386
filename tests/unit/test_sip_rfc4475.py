"""RFC 4475 torture messages: the verdict sipcdr gives each of the 49, and why.

A passive monitor sees what endpoints were sent, not what they accepted. The rule:
a message an RFC 3261 endpoint MUST discard or answer 400 because its framing or its
dialog-identifying fields are unusable (request line, version, CSeq, Content-Length,
From/To) is rejected with a reason, since no dialog state changed because of it. A
message whose defect is in a field the CDR does not depend on (Date, display names,
Contact syntax, Request-URI headers, empty Via elements) is parsed and the defect is
recorded, because the call it belongs to did happen.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pcapdata import require_shared_data
from sipcdr.sip import SipParseError, parse


@dataclass(frozen=True)
class Parsed:
    call_id: str
    cseq: int
    from_tag: str | None
    via_branch: str | None
    to_tag: str | None = None
    defects: tuple[str, ...] = ()
    checks: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejected:
    reason: str


VERDICTS: dict[str, Parsed | Rejected] = {
    # 3.1.1 valid messages: parsed, with the fields the correlator keys on.
    "wsinv": Parsed(
        "wsinv.ndaksdj@192.0.2.1",
        9,
        "98asjd8",
        "390skdjuw",
        to_tag="1918181833n",
        checks={
            "via_count": 3,
            "content_length": 150,
            "from_display": 'J Rosenberg \\"',
            "to_uri": "sip:vivekg@chair-dnrc.example.com",
            "content_type": "application/sdp",
        },
    ),
    # The escaped NUL in the To display name is legal; sipcdr replaces NUL with U+FFFD
    # so no downstream store ever receives it, and says so.
    "intmeth": Parsed(
        "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{",
        139122385,
        "_token~1'+`*%!-.",
        "z9hG4bK-.!%66*_+`'~",
        defects=("nul_in_headers",),
        checks={"method": "!interesting-Method0123456789_*+`.%indeed'~"},
    ),
    "esc01": Parsed(
        "esc01.239409asdfakjkn23onasd0-3234",
        234234,
        "938",
        "z9hG4bKkdjuw",
        checks={"request_uri": "sip:sips%3Auser%40example.com@example.net"},
    ),
    "escnull": Parsed(
        "escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd", 14398234, "839923423", "z9hG4bKkdjuw"
    ),
    "esc02": Parsed(
        "esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf",
        29344,
        "f232jadfj23",
        "z9hG4bK209%fzsnel234",
        checks={"method": "RE%47IST%45R"},
    ),
    "lwsdisp": Parsed(
        "lwsdisp.1234abcd@funky.example.com",
        60,
        "323",
        "z9hG4bKkdjuw",
        checks={"from_display": "caller"},
    ),
    # The topmost of 34 Via values carries no branch (RFC 2543 style hop).
    "longreq": Parsed(
        "longreq.one" + "really" * 20 + "longcallid",
        3882340,
        "12" + "982" * 50 + "424",
        None,
        checks={"via_count": 34, "content_length": 150},
    ),
    # Octets after Content-Length (a second request) are not part of the message.
    "dblreq": Parsed(
        "dblreq.0ha0isndaksdj99sdfafnl3lk233412",
        8,
        "43251j3j324",
        "z9hG4bKkdjuw23492",
        checks={"body": b""},
    ),
    "semiuri": Parsed(
        "semiuri.0ha0isndaksdj",
        8,
        "33242",
        "z9hG4bKkdjuw",
        checks={"request_uri": "sip:user;par=u%40example.net@example.com"},
    ),
    "transports": Parsed(
        "transports.kijh4akdnaqjkwendsasfdj", 60, "323", "z9hG4bKkdjuw", checks={"via_count": 5}
    ),
    "mpart01": Parsed(
        "3d9485ad0c49859b@Zmx1ZmZ5LW1hYy0xNi5sb2NhbA..",
        1,
        "2fb0dcc9",
        "z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-",
        checks={"content_length": 553},
    ),
    "unreason": Parsed(
        "unreason.1234ksdfak3j2erwedfsASdf",
        35,
        "11141343",
        "z9hG4bK1324923",
        to_tag="2229",
        checks={
            "status_code": 200,
            "reason_phrase": "= 2**3 * 5**2 но сто девяносто девять - простое",
        },
    ),
    "noreason": Parsed(
        "noreason.asndj203insdf99223ndf",
        35,
        "39ansfi3",
        "z9hG4bK2398ndaoe",
        to_tag="902jndnke3",
        checks={"status_code": 100, "reason_phrase": ""},
    ),
    # 3.1.2 invalid messages.
    # Empty Via params and list elements: the call is real; the Via defect is recorded.
    "badinv01": Parsed(
        "badinv01.0ha0isndaksdjasdf3234nas", 8, "134161461246", None, defects=("empty_via_element",)
    ),
    # A UDP message with a body shorter than Content-Length MUST be discarded.
    "clerr": Rejected("body_truncated"),
    "ncl": Rejected("bad_content_length"),
    # CSeq of 2**65: RFC 3261 8.1.1.5 requires < 2**31; the dialog cannot be ordered.
    "scalar02": Rejected("bad_cseq"),
    "scalarlg": Rejected("bad_cseq"),
    # Unterminated quote: the To URI cannot be located, so neither can the dialog.
    "quotbal": Rejected("bad_to"),
    "ltgtruri": Rejected("bad_request_uri"),
    "lwsruri": Rejected("bad_request_line"),
    "lwsstart": Rejected("bad_request_line"),
    "trws": Rejected("bad_request_line"),
    "escruri": Parsed(
        "escruri.23940-asdfhj-aje3br-234q098w-fawerh2q-h4n5",
        149209342,
        "341518",
        "z9hG4bKkdjuw",
        defects=("request_uri_headers",),
    ),
    "baddate": Parsed(
        "baddate.239423mnsadf3j23lj42--sedfnm234",
        1392934,
        "2234923",
        "z9hG4bKkdjuw",
        defects=("bad_date",),
    ),
    "regbadct": Parsed(
        "regbadct.k345asrl3fdbv@10.0.0.1",
        1,
        "998332",
        "z9hG4bKkdjuw",
        defects=("unbracketed_contact_uri",),
    ),
    "badaspec": Parsed(
        "badaspec.sdf0234n2nds0a099u23h3hnnw009cdkne3",
        3923239,
        "433423",
        "z9hG4bKkdju43234",
        defects=("bad_to_addr_spec",),
        checks={"to_uri": "sip:t.watson@example.org"},
    ),
    "baddn": Parsed(
        "baddn.31415@c.example.com",
        3923239,
        "43",
        "z9hG4bKkdjuw",
        defects=("bad_from_display_name", "bad_to_display_name", "missing_blank_line"),
    ),
    "badvers": Rejected("bad_version"),
    "mismatch01": Rejected("cseq_method_mismatch"),
    "mismatch02": Rejected("cseq_method_mismatch"),
    "bigcode": Rejected("bad_status_line"),
    # 3.2 / 3.3 / 3.4: syntactically valid; transaction and application layers decide.
    "badbranch": Parsed("badbranch.sadonfo23i420jv0as0derf3j3n", 8, "33242", "z9hG4bK"),
    "insuf": Parsed(
        "",
        193942,
        None,
        "z9hG4bKkdj.insuf",
        defects=("missing_call_id", "missing_from", "missing_to"),
    ),
    "unkscm": Parsed(
        "unkscm.nasdfasser0q239nwsdfasdkl34",
        3923423,
        "384",
        "z9hG4bKkdjuw39234",
        checks={"request_uri": "nobodyKnowsThisScheme:totallyopaquecontent"},
    ),
    "novelsc": Parsed("novelsc.asdfasser0q239nwsdfasdkl34", 3923423, "384", "z9hG4bKkdjuw39234"),
    "unksm2": Parsed(
        "unksm2.daksdj@hyphenated-host.example.com", 234902, "3234233", "z9hG4bKkdjuw"
    ),
    "bext01": Parsed("bext01.0ha0isndaksdj", 8, "242etr", "z9hG4bKkdjuw"),
    "invut": Parsed(
        "invut.0ha0isndaksdjadsfij34n23d",
        235448,
        "8392034",
        "z9hG4bKkdjuw",
        checks={"content_type": "application/unknownformat"},
    ),
    "regaut01": Parsed("regaut01.0ha0isndaksdj", 9338, "87321hj23128", "z9hG4bKkdjuw"),
    # Duplicated single-valued headers: the first of each is used and the rest flagged.
    "multi01": Parsed(
        "multi01.98asdh@192.0.2.1",
        5,
        "3413415",
        "z9hG4bKkdjuw",
        defects=("duplicate_call_id", "duplicate_cseq", "duplicate_from", "duplicate_to"),
        checks={"to_uri": "sip:user@example.com"},
    ),
    # Two different Content-Lengths: the first decides the body, the conflict is flagged.
    "mcl01": Parsed(
        "mcl01.fhn2323orihawfdoa3o4r52o3irsdf",
        15932,
        "3923942",
        "z9hG4bK293423",
        defects=("duplicate_content_length",),
        checks={"content_length": 13, "body": b"There's no wa"},
    ),
    "bcast": Parsed(
        "bcast.0384840201234ksdfak3j2erwedfsASdf",
        35,
        "11141343",
        "z9hG4bK1324923",
        to_tag="2229",
        checks={"via_count": 2},
    ),
    "zeromf": Parsed("zeromf.jfasdlfnm2o2l43r5u0asdfas", 39234321, "3ghsd41", "z9hG4bKkdjuw2349i"),
    "cparam01": Parsed(
        "cparam01.70710@saturn.example.com", 2, "DkfVgjkrtMwaerKKpe", "z9hG4bKkdjuw"
    ),
    "cparam02": Parsed("cparam02.70710@saturn.example.com", 3, "838293", "z9hG4bKkdjuw"),
    "regescrt": Parsed("regescrt.k345asrl3fdbv@192.0.2.1", 14398234, "8", "z9hG4bKkdjuw"),
    "sdp01": Parsed("sdp01.ndaksdj9342dasdd", 8, "234", "z9hG4bKkdjuw"),
    # RFC 2543 peers send no branch and no Content-Length: the datagram is the body.
    "inv2543": Parsed(
        "inv2543.1717@ift.client.example.com",
        56,
        None,
        None,
        checks={"content_length": None, "body_len": 105},
    ),
}


def _index() -> list[dict[str, str]]:
    path = require_shared_data() / "rfc4475" / "INDEX.tsv"
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_every_rfc4475_message_has_a_written_verdict() -> None:
    names = {row["name"] for row in _index()}
    assert len(names) == 49
    assert names == set(VERDICTS)


def test_invalid_section_messages_are_all_rejected_or_flagged() -> None:
    for row in _index():
        if row["expected"] != "invalid":
            continue
        verdict = VERDICTS[row["name"]]
        assert isinstance(verdict, Rejected) or verdict.defects, row["name"]


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_rfc4475_verdict(name: str) -> None:
    data = (require_shared_data() / "rfc4475" / f"{name}.dat").read_bytes()
    verdict = VERDICTS[name]
    if isinstance(verdict, Rejected):
        with pytest.raises(SipParseError) as caught:
            parse(data)
        assert caught.value.reason == verdict.reason
        return
    msg = parse(data)
    assert msg.call_id == verdict.call_id
    assert msg.cseq == verdict.cseq
    assert msg.from_tag == verdict.from_tag
    assert msg.to_tag == verdict.to_tag
    assert msg.via_branch == verdict.via_branch
    assert sorted(msg.defects) == sorted(verdict.defects)
    for attribute, expected in verdict.checks.items():
        if attribute == "body_len":
            assert len(msg.body) == expected
        else:
            assert getattr(msg, attribute) == expected, attribute


def test_extra_test_dat_without_version_is_rejected() -> None:
    path: Path = require_shared_data() / "rfc4475" / "extra" / "test.dat"
    with pytest.raises(SipParseError) as caught:
        parse(path.read_bytes())
    assert caught.value.reason == "bad_request_line"
