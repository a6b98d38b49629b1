"""formats: canonical bytes, round trips, field-naming errors, and fuzzing (only UpdaterError escapes)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rackboot.initramfs.updater import formats, report
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import Manifest, Phase, Report, Slot, SlotState

PLAN = {
    "format": 1,
    "node": "worker-1",
    "layout": {
        "partitions": [
            {"name": "boot", "start_mib": 4, "size_mib": 128, "type": "0c"},
            {"name": "a", "size_mib": 512, "type": "83"},
            {"name": "b", "size_mib": 512, "type": "83"},
            {"name": "data", "size_mib": "rest", "type": "83"},
        ],
        "repartition": "allowed",
    },
    "image": "/images/example/2/manifest.json",
    "mount": "ro+overlay:tmpfs",
}
MANIFEST = {
    "format": 1,
    "image": "example",
    "version": 2,
    "label": "v2",
    "created": 1700000000,
    "fstype": "ext4",
    "size": 67108864,
    "sha256": "ab" * 32,
    "crc32": "0badcafe",
    "compression": "gzip",
    "stream": "rootfs.ext4.gz",
    "stream_size": 1234,
    "stream_sha256": "cd" * 32,
    "kernel_release": "6.1.0-50-arm64",
}
HOOK = {"name": "post-install", "file": "post-install.sh", "size": 12, "sha256": "c" * 64, "timeout": 60}
STATE = {
    "format": 1,
    "seq": 7,
    "slots": {
        "a": {"image": "example", "version": 1, "sha256": "11" * 32, "state": "good"},
        "b": {"image": "example", "version": 2, "sha256": "22" * 32, "state": "good"},
    },
    "primary": "b",
    "last_good": "b",
}
REPORT = {
    "node": "52-54-00-12-34-56",
    "phase": "download",
    "bytes": 10,
    "seconds": 1.5,
    "error": None,
    "slot": "a",
    "version": 2,
    "time": 12.0,
}
PARSERS = [
    formats.parse_plan,
    formats.parse_manifest,
    formats.parse_slot_state,
    formats.parse_report,
    formats.parse_latest,
]


def raw(obj) -> bytes:
    return json.dumps(obj).encode()


def test_plan_from_the_spec_resolves_starts():
    plan = formats.parse_plan(raw(PLAN))
    assert [(p.name, p.start_mib, p.size_mib) for p in plan.layout.partitions] == [
        ("boot", 4, 128),
        ("a", 132, 512),
        ("b", 644, 512),
        ("data", 1156, "rest"),
    ]
    assert plan.layout.number("b") == 3 and plan.image == PLAN["image"]


def test_dump_is_canonical_and_round_trips():
    for parse, obj in [
        (formats.parse_plan, PLAN),
        (formats.parse_manifest, MANIFEST),
        (formats.parse_slot_state, STATE),
        (formats.parse_report, REPORT),
    ]:
        doc = parse(raw(obj))
        data = formats.dump(doc)
        assert data.endswith(b"}\n") and b" " not in data.replace(b"ro+overlay:tmpfs", b"")
        assert list(json.loads(data)) == sorted(json.loads(data))
        assert parse(data) == doc and formats.dump(parse(data)) == data


def test_manifest_dump_is_exactly_sorted_compact():
    m = formats.parse_manifest(raw(MANIFEST))
    assert formats.dump(m) == (json.dumps({**MANIFEST}, sort_keys=True, separators=(",", ":")) + "\n").encode()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sha256": "AB" * 32}, "manifest: sha256: "),
        ({"version": 0}, "manifest: version: must be >= 1"),
        ({"version": True}, "manifest: version: expected an integer, got a boolean"),
        ({"compression": "lz4"}, "manifest: compression: must be one of gzip, none"),
        ({"stream": "../etc/passwd"}, "manifest: stream: "),
        ({"image": "Bad Name"}, "manifest: image: "),
        ({"format": 2}, "manifest: format: unsupported format 2"),
        ({"crc32": "123"}, "manifest: crc32: "),
    ],
)
def test_manifest_errors_name_the_field(change, message):
    with pytest.raises(UpdaterError) as e:
        formats.parse_manifest(raw({**MANIFEST, **change}))
    assert str(e.value).startswith(message)


def test_missing_field_is_named():
    obj = dict(MANIFEST)
    del obj["stream_sha256"]
    with pytest.raises(UpdaterError, match="^manifest: stream_sha256: missing$"):
        formats.parse_manifest(raw(obj))


@pytest.mark.parametrize(
    "parts, message",
    [
        (
            [
                {"name": "a", "start_mib": 4, "size_mib": "rest", "type": "83"},
                {"name": "b", "size_mib": 8, "type": "83"},
            ],
            'partitions\\[0\\]: size_mib: "rest" is only allowed',
        ),
        (
            [
                {"name": "a", "start_mib": 4, "size_mib": 8, "type": "83"},
                {"name": "b", "start_mib": 13, "size_mib": 8, "type": "83"},
            ],
            "partitions\\[1\\]: start_mib: 13 leaves a gap",
        ),
        (
            [{"name": "a", "start_mib": 1, "size_mib": 8, "type": "83"}, {"name": "b", "size_mib": 8, "type": "83"}],
            "partitions\\[0\\]: start_mib: must be >= 4",
        ),
        ([{"name": "a", "start_mib": 4, "size_mib": 8, "type": "83"}], "must include the slots"),
        (
            [{"name": "a", "start_mib": 4, "size_mib": 8, "type": "00"}, {"name": "b", "size_mib": 8, "type": "83"}],
            "type: 00 marks an unused entry",
        ),
        ([{"name": "a", "start_mib": 4, "size_mib": 8, "type": "83"}] * 5, "1 to 4 MBR primaries"),
    ],
)
def test_layout_errors(parts, message):
    with pytest.raises(UpdaterError, match=message):
        formats.parse_plan(raw({**PLAN, "layout": {"partitions": parts, "repartition": "never"}}))


def test_slot_state_requires_primary_to_be_bootable():
    bad = {
        **STATE,
        "slots": {**STATE["slots"], "b": {"state": "writing", "image": None, "version": None, "sha256": None}},
    }
    with pytest.raises(UpdaterError, match="slot state: primary: 'b' is not a good or trial slot"):
        formats.parse_slot_state(raw(bad))


def test_trial_slots_and_only_trial_slots_count_tries():
    trial = {"state": "trial", "image": "example", "version": 2, "sha256": "a" * 64, "tries": 2}
    on_trial = {**STATE, "slots": {**STATE["slots"], "b": trial}, "primary": "b", "last_good": "a"}
    assert formats.parse_slot_state(raw(on_trial)).slots["b"].tries == 2
    for slot in ({**trial, "tries": None}, {**trial, "state": "good"}):
        with pytest.raises(UpdaterError, match="slots.b: tries"):
            formats.parse_slot_state(raw({**on_trial, "slots": {**STATE["slots"], "b": slot}}))
    with pytest.raises(UpdaterError, match="last_good: 'b' is not a good slot"):
        formats.parse_slot_state(raw({**STATE, "slots": {**STATE["slots"], "b": trial}, "last_good": "b"}))


def test_good_slot_must_name_its_image():
    with pytest.raises(UpdaterError, match="slot state: slots.a: state: a good slot must name"):
        formats.parse_slot_state(raw({**STATE, "slots": {"a": {"state": "good"}}, "primary": None, "last_good": None}))


def test_slot_holds_compares_image_version_and_hash():
    m = formats.parse_manifest(raw(MANIFEST))
    slot = Slot("good", "example", 2, "ab" * 32)
    assert slot.holds(m)
    assert not Slot("writing", "example", 2, "ab" * 32).holds(m)
    assert not Slot("good", "example", 1, "ab" * 32).holds(m)
    assert not Slot("good", "example", 2, "cd" * 32).holds(m)


def test_report_rejects_multiline_error():
    with pytest.raises(UpdaterError, match="report: error: must be one line"):
        formats.parse_report(raw({**REPORT, "error": "a\nb"}))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("error", "clean \x1b[2J\x1b[Hwiped"),  # ESC: a terminal escape
        ("error", "done\r2026-01-01 master: all good"),  # CR: a forged log line
        ("error", "nul\x00"),
        ("error", "tab\tinside"),  # one line of printable text: no tab either
        ("error", "c1 \x9b31m"),  # C1 CSI
        ("delta", "delta: \x07"),
        ("output", "ok\n\x1b[31mred"),  # output keeps newlines and tabs, nothing else
        ("output", "50%\r100%"),
        ("output", "del\x7f"),
    ],
)
def test_report_refuses_control_characters(key, value):
    with pytest.raises(UpdaterError, match=rf"^report: {key}: control character '\\") as caught:
        formats.parse_report(raw({**REPORT, key: value}))
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


def test_report_output_keeps_its_tabs_and_newlines():
    assert formats.parse_report(raw({**REPORT, "output": "a\tb\nc\n"})).output == "a\tb\nc\n"


def test_the_updater_writes_control_characters_out_so_its_reports_are_taken():
    made = report.make(
        "52-54-00-12-34-56",
        Phase.HOOK,
        error="hook: \x1b[31mfailed\x1b[0m\r\n",
        output="step 1\n\x1b[32mok\x1b[0m\tdone\r",
        delta="delta: \x07",
    )
    assert made.error == "hook: \\x1b[31mfailed\\x1b[0m"
    assert made.output == "step 1\n\\x1b[32mok\\x1b[0m\tdone\\x0d"
    assert made.delta == "delta: \\x07"
    assert formats.parse_report(formats.dump(made)) == made


def test_node_id():
    assert formats.node_id("52:54:00:AB:cd:56") == "52-54-00-ab-cd-56"
    with pytest.raises(UpdaterError, match="identity: 'nope' is not a MAC"):
        formats.node_id("nope")


def test_stream_path_is_beside_the_manifest():
    m = formats.parse_manifest(raw(MANIFEST))
    assert m.stream_path("/images/example/2/manifest.json") == "/images/example/2/rootfs.ext4.gz"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[" * 50000,
        b"NaN",
        b"1e999",
        b"{" + b'"a":' * 3,
        b'{"format":1e400}',
        b"9" * 5000,
        b'"\\ud800"',
        b"null",
    ],
)
def test_hostile_bytes_raise_only_updater_error(data):
    for parse in PARSERS:
        with pytest.raises(UpdaterError):
            parse(data)


def test_oversized_document_is_refused():
    with pytest.raises(UpdaterError, match="larger than"):
        formats.parse_plan(b" " * (formats.MAX_DOCUMENT + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    for parse in PARSERS:
        try:
            parse(data)
        except UpdaterError:
            pass


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2, 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["rest", "good", "gzip", "a", "b", "83", "example", "ab" * 32]),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


def _mutations(base: dict):
    keys = st.sampled_from(sorted(base) + ["partitions", "slots", "layout", "hooks", "output"])
    return st.lists(st.tuples(keys, json_values), max_size=4).map(lambda kv: {**base, **dict(kv)})


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        _mutations(PLAN),
        _mutations({**PLAN, "hostname": "worker-01", "persist": ["/etc/ssh", "/var/lib/x"]}),
        _mutations(MANIFEST),
        _mutations(STATE),
        _mutations(REPORT),
        _mutations({**REPORT, "phase": "hook", "hostname": "worker-01", "hook": "first-boot"}),
        _mutations({**PLAN, "layout": {**PLAN["layout"], "partitions": [{"name": 1}]}}),
        st.builds(lambda hook: {**MANIFEST, "hooks": [hook]}, _mutations(HOOK)),
    )
)
def test_fuzz_structured_mutations(obj):
    data = json.dumps(obj).encode()
    for parse in PARSERS:
        try:
            doc = parse(data)
        except UpdaterError:
            continue
        assert parse(formats.dump(doc)) == doc  # whatever parses, round trips


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "boot", "data", "x"]), json_values), max_size=6))
def test_fuzz_partitions(items):
    parts = [
        {"name": n, "start_mib": v, "size_mib": v, "type": v} if i % 2 else {"name": n, "size_mib": v, "type": "83"}
        for i, (n, v) in enumerate(items)
    ]
    try:
        formats.parse_plan(raw({**PLAN, "layout": {"partitions": parts, "repartition": "allowed"}}))
    except UpdaterError:
        pass


def test_empty_slot_state_defaults():
    s = SlotState()
    assert s.seq == 0 and s.primary is None and s.slot("a") == Slot()
    assert formats.parse_slot_state(formats.dump(s)) == s


def test_report_make_round_trips():
    r = Report(node="n-1", phase="boot", bytes=3, seconds=0.25)
    assert formats.parse_report(formats.dump(r)) == r


def test_manifest_constructed_in_code_dumps_all_fields():
    m = Manifest(
        image="x",
        version=1,
        size=1,
        sha256="0" * 64,
        crc32="0" * 8,
        stream="s.gz",
        stream_size=1,
        stream_sha256="0" * 64,
    )
    assert set(json.loads(formats.dump(m))) == set(MANIFEST)


def test_hooks_round_trip_and_old_manifests_dump_as_before():
    with_hooks = formats.parse_manifest(raw({**MANIFEST, "hooks": [HOOK]}))
    assert with_hooks.hook("post-install").timeout == 60 and with_hooks.hook("pre-install") is None
    assert formats.parse_manifest(formats.dump(with_hooks)) == with_hooks
    assert b"hooks" not in formats.dump(formats.parse_manifest(raw(MANIFEST)))  # signed bytes unchanged


@pytest.mark.parametrize(
    "hooks, message",
    [
        ([{**HOOK, "name": "pre-boot"}], "manifest: hooks[0]: name: must be one of pre-install, post-install"),
        ([HOOK, HOOK], "manifest: hooks: each hook may appear once"),
        ([HOOK] * 4, "manifest: hooks: expected a list of at most 3 hooks"),
        ({"name": "x"}, "manifest: hooks: expected a list"),
        ([{**HOOK, "file": "../../sbin/init"}], "manifest: hooks[0]: file: '../../sbin/init' is not a plain file"),
        ([{**HOOK, "file": "manifest.json"}], "manifest: hooks: a hook cannot be the manifest"),
        ([{**HOOK, "size": 1 << 20}], "manifest: hooks[0]: size: 1048576 bytes is larger than"),
        ([{**HOOK, "timeout": 0}], "manifest: hooks[0]: timeout: must be >= 1"),
        ([{**HOOK, "timeout": 86400}], "manifest: hooks[0]: timeout: 86400 s is longer than"),
    ],
)
def test_bad_hooks_name_the_field(hooks, message):
    with pytest.raises(UpdaterError) as e:
        formats.parse_manifest(raw({**MANIFEST, "hooks": hooks}))
    assert str(e.value).startswith(message)


def test_report_output_is_bounded():
    formats.parse_report(raw({**REPORT, "output": "line\n" * 800}))
    with pytest.raises(UpdaterError, match="report: output: must be at most 4000 characters"):
        formats.parse_report(raw({**REPORT, "output": "x" * 4001}))
