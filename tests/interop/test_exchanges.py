"""Exchanges: built-ins, declare/delete semantics, e2e bindings, and routing per type."""

import pika
import pytest

from conftest import channel_closed, connection_closed, drain, uniq

BUILTIN = {
    "amq.direct": "direct",
    "amq.fanout": "fanout",
    "amq.topic": "topic",
    "amq.headers": "headers",
    "amq.match": "headers",
}


def bodies(ch, queue):
    return [body.decode() for _, _, body in drain(ch, queue)]


def temp_queue(ch) -> str:
    return ch.queue_declare("", exclusive=True).method.queue


# ----------------------------------------------------------------- built-ins and declare


@pytest.mark.parametrize("exchange", sorted(BUILTIN))
def test_builtin_exchanges_exist(ch, exchange):
    ch.exchange_declare(exchange, passive=True)
    # Redeclaring with the same properties (all are durable) is fine.
    ch.exchange_declare(exchange, BUILTIN[exchange], durable=True)


def test_default_exchange_routes_by_queue_name(ch):
    q = temp_queue(ch)
    ch.basic_publish("", q, b"via default")
    assert bodies(ch, q) == ["via default"]


def test_default_exchange_cannot_be_bound(ch):
    q = temp_queue(ch)
    with channel_closed(403, "ACCESS_REFUSED - operation not permitted on the default exchange"):
        ch.queue_bind(q, "", "k")


def test_default_exchange_cannot_be_deleted(ch):
    with channel_closed(403, "ACCESS_REFUSED - operation not permitted on the default exchange"):
        ch.exchange_delete("")


def test_builtin_exchange_cannot_be_deleted(ch):
    with channel_closed(403, "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed"):
        ch.exchange_delete("amq.direct")


def test_publish_to_amq_default_name_is_404(ch):
    # 'amq.default' is only how the management UI labels the default exchange.
    ch.basic_publish("amq.default", "k", b"x")
    with channel_closed(404, "NOT_FOUND - no exchange 'amq.default' in vhost '/'"):
        ch.queue_declare("", exclusive=True)


def test_passive_declare_missing_is_404(conn):
    ch = conn.channel()
    with channel_closed(404, "NOT_FOUND - no exchange 'rilltest.nope' in vhost '/'"):
        ch.exchange_declare("rilltest.nope", passive=True)
    # Only the channel died.
    assert conn.is_open
    conn.channel().exchange_declare("amq.direct", passive=True)


@pytest.mark.parametrize("kind", ["direct", "fanout", "topic", "headers"])
def test_declare_each_type_then_passive(ch, kind):
    x = uniq(kind)
    ch.exchange_declare(x, kind, auto_delete=False)
    ch.exchange_declare(x, passive=True)
    # A passive declare ignores every other field.
    ch.exchange_declare(x, "fanout" if kind != "fanout" else "direct", passive=True, durable=True)
    ch.exchange_delete(x)
    with channel_closed(404, f"NOT_FOUND - no exchange '{x}' in vhost '/'"):
        ch.exchange_declare(x, passive=True)


def test_redeclare_same_properties_is_ok(ch):
    x = uniq("x")
    args = {"alternate-exchange": "amq.fanout"}
    ch.exchange_declare(x, "topic", durable=True, arguments=args)
    ch.exchange_declare(x, "topic", durable=True, arguments=args)
    ch.exchange_delete(x)


@pytest.mark.parametrize(
    "first, second, text",
    [
        ({"exchange_type": "direct"}, {"exchange_type": "fanout"},
         "inequivalent arg 'type' for exchange '{x}' in vhost '/': received 'fanout' but current is 'direct'"),
        ({}, {"durable": True},
         "inequivalent arg 'durable' for exchange '{x}' in vhost '/': received 'true' but current is 'false'"),
        ({}, {"auto_delete": True},
         "inequivalent arg 'auto_delete' for exchange '{x}' in vhost '/': received 'true' but current is 'false'"),
        ({}, {"internal": True},
         "inequivalent arg 'internal' for exchange '{x}' in vhost '/': received 'true' but current is 'false'"),
        ({}, {"arguments": {"alternate-exchange": "y"}},
         "inequivalent arg 'alternate-exchange' for exchange '{x}' in vhost '/': "
         "received the value 'y' of type 'longstr' but current is none"),
    ],
    ids=["type", "durable", "auto_delete", "internal", "alternate-exchange"],
)
def test_redeclare_mismatch_is_406(conn, first, second, text):
    x = uniq("x")
    ch = conn.channel()
    ch.exchange_declare(x, **{"exchange_type": "direct", **first})
    try:
        with channel_closed(406, "PRECONDITION_FAILED - " + text.format(x=x)):
            ch.exchange_declare(x, **{"exchange_type": "direct", **second})
    finally:
        conn.channel().exchange_delete(x)


def test_amq_prefix_is_reserved(ch):
    with channel_closed(403, "ACCESS_REFUSED - exchange name 'amq.rilltest' contains reserved prefix 'amq.*'"):
        ch.exchange_declare("amq.rilltest", "direct")


def test_unknown_type_closes_connection_503(conn):
    ch = conn.channel()
    with connection_closed(503, "COMMAND_INVALID - unknown exchange type 'no-such-type'"):
        ch.exchange_declare(uniq("x"), "no-such-type")
    assert not conn.is_open


def test_delete_missing_exchange_is_ok(ch):
    # RabbitMQ 3.x: exchange.delete of a missing exchange succeeds (no 404).
    ch.exchange_delete(uniq("missing"))


def test_delete_if_unused(ch):
    x = uniq("x")
    ch.exchange_declare(x, "direct")
    q = temp_queue(ch)
    ch.queue_bind(q, x, "k")
    with channel_closed(406, f"PRECONDITION_FAILED - exchange '{x}' in vhost '/' in use"):
        ch.exchange_delete(x, if_unused=True)


def test_delete_if_unused_after_unbind(ch):
    x = uniq("x")
    ch.exchange_declare(x, "direct")
    q = temp_queue(ch)
    ch.queue_bind(q, x, "k")
    ch.queue_unbind(q, x, "k")
    ch.exchange_delete(x, if_unused=True)
    with channel_closed(404):
        ch.exchange_declare(x, passive=True)


def test_delete_removes_bindings(ch):
    x = uniq("x")
    ch.exchange_declare(x, "fanout")
    q = temp_queue(ch)
    ch.queue_bind(q, x)
    ch.exchange_delete(x)
    ch.exchange_declare(x, "fanout")
    ch.basic_publish(x, "", b"after")
    assert bodies(ch, q) == []
    ch.exchange_delete(x)


def test_auto_delete_exchange_goes_with_last_binding(ch):
    x = uniq("x")
    ch.exchange_declare(x, "direct", auto_delete=True)
    # Declared but never bound: stays.
    ch.exchange_declare(x, passive=True)
    q = temp_queue(ch)
    ch.queue_bind(q, x, "k")
    ch.queue_unbind(q, x, "k")
    with channel_closed(404, f"NOT_FOUND - no exchange '{x}' in vhost '/'"):
        ch.exchange_declare(x, passive=True)


def test_internal_exchange_refuses_publish(ch):
    x = uniq("x")
    ch.exchange_declare(x, "fanout", internal=True)
    try:
        ch.basic_publish(x, "", b"x")
        with channel_closed(403, f"ACCESS_REFUSED - cannot publish to internal exchange '{x}' in vhost '/'"):
            ch.queue_declare("", exclusive=True)
    finally:
        ch.connection.channel().exchange_delete(x)


def test_internal_exchange_receives_via_e2e_binding(ch):
    src, inner = uniq("src"), uniq("inner")
    ch.exchange_declare(src, "fanout", auto_delete=True)
    ch.exchange_declare(inner, "fanout", internal=True, auto_delete=True)
    ch.exchange_bind(inner, src)
    q = temp_queue(ch)
    ch.queue_bind(q, inner)
    ch.basic_publish(src, "", b"through")
    assert bodies(ch, q) == ["through"]


def test_publish_to_missing_exchange_is_404(conn):
    ch = conn.channel()
    ch.basic_publish("rilltest.missing", "k", b"x")
    with channel_closed(404, "NOT_FOUND - no exchange 'rilltest.missing' in vhost '/'"):
        ch.queue_declare("", exclusive=True)
    assert conn.is_open


# ----------------------------------------------------------------- exchange-to-exchange


def test_exchange_to_exchange_bind_unbind(ch):
    src, dst = uniq("src"), uniq("dst")
    ch.exchange_declare(src, "topic")
    ch.exchange_declare(dst, "direct")
    ch.exchange_bind(destination=dst, source=src, routing_key="a.*")
    q = temp_queue(ch)
    ch.queue_bind(q, dst, "a.b")
    ch.queue_bind(q, dst, "a.c")
    ch.basic_publish(src, "a.b", b"1")   # src topic matches, dst direct matches
    ch.basic_publish(src, "a.x", b"2")   # src matches, dst has no 'a.x'
    ch.basic_publish(src, "b.b", b"3")   # src does not match
    ch.basic_publish(dst, "a.c", b"4")   # straight into dst
    assert bodies(ch, q) == ["1", "4"]
    ch.exchange_unbind(destination=dst, source=src, routing_key="a.*")
    ch.basic_publish(src, "a.b", b"5")
    assert bodies(ch, q) == []
    ch.exchange_delete(src)
    ch.exchange_delete(dst)


def test_auto_delete_source_goes_with_last_e2e_binding(ch):
    src, dst = uniq("src"), uniq("dst")
    ch.exchange_declare(src, "fanout", auto_delete=True)
    ch.exchange_declare(dst, "fanout")
    ch.exchange_bind(dst, src)
    ch.exchange_unbind(dst, src)
    with channel_closed(404, f"NOT_FOUND - no exchange '{src}' in vhost '/'"):
        ch.exchange_declare(src, passive=True)
    ch.connection.channel().exchange_delete(dst)


def test_exchange_bind_missing_source_is_404(ch):
    dst = uniq("dst")
    ch.exchange_declare(dst, "fanout", auto_delete=True)
    with channel_closed(404, "NOT_FOUND - no exchange 'rilltest.nosrc' in vhost '/'"):
        ch.exchange_bind(dst, "rilltest.nosrc")


def test_exchange_binding_cycle_delivers_once(ch):
    a, b = uniq("a"), uniq("b")
    ch.exchange_declare(a, "fanout", auto_delete=True)
    ch.exchange_declare(b, "fanout", auto_delete=True)
    ch.exchange_bind(b, a)
    ch.exchange_bind(a, b)
    q = temp_queue(ch)
    ch.queue_bind(q, a)
    ch.queue_bind(q, b)
    ch.basic_publish(a, "", b"once")
    assert bodies(ch, q) == ["once"]


def test_message_reaches_queue_once_via_two_bindings(ch):
    x = uniq("x")
    ch.exchange_declare(x, "topic", auto_delete=True)
    q = temp_queue(ch)
    ch.queue_bind(q, x, "a.*")
    ch.queue_bind(q, x, "#")
    ch.queue_bind(q, x, "a.b")
    ch.basic_publish(x, "a.b", b"once")
    assert bodies(ch, q) == ["once"]


# ----------------------------------------------------------------- direct and fanout


def test_direct_routing(ch):
    x = uniq("x")
    ch.exchange_declare(x, "direct", auto_delete=True)
    q1, q2 = temp_queue(ch), temp_queue(ch)
    ch.queue_bind(q1, x, "red")
    ch.queue_bind(q1, x, "")
    ch.queue_bind(q2, x, "red")
    ch.queue_bind(q2, x, "blue")
    for key in ["red", "blue", "green", "", "Red", "red.x"]:
        ch.basic_publish(x, key, key.encode())
    assert bodies(ch, q1) == ["red", ""]
    assert bodies(ch, q2) == ["red", "blue"]


def test_fanout_ignores_routing_key(ch):
    x = uniq("x")
    ch.exchange_declare(x, "fanout", auto_delete=True)
    qs = [temp_queue(ch) for _ in range(3)]
    for q in qs:
        ch.queue_bind(q, x, "whatever")
    ch.basic_publish(x, "k1", b"1")
    ch.basic_publish(x, "", b"2")
    for q in qs:
        assert bodies(ch, q) == ["1", "2"]


# ----------------------------------------------------------------- topic


def topic_words(s: str) -> list[str]:
    # RabbitMQ: "" is zero words; "a." is ["a", ""].
    return [] if s == "" else s.split(".")


def topic_match(pattern: str, key: str) -> bool:
    """Reference matcher; test_topic_cross_product checks the broker agrees on many cases."""

    def go(p, k):
        if not p:
            return not k
        if p[0] == "#":
            return any(go(p[1:], k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (p[0] == "*" or p[0] == k[0]) and go(p[1:], k[1:])

    return go(topic_words(pattern), topic_words(key))


# (pattern, routing key, routed?) written out by hand and checked against RabbitMQ 3.10.
TOPIC_CASES = [
    ("a.b.c", "a.b.c", True),
    ("a.b.c", "a.b", False),
    ("a.b.c", "a.b.c.d", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a..c", True),
    ("a.*.c", "a.c", False),
    ("a.*", "a.", True),
    ("a.*", "a", False),
    ("*", "", False),
    ("*", "a", True),
    ("*", ".", False),
    ("*.*", ".", True),
    ("#", "", True),
    ("#", "a.b.c", True),
    ("#", ".", True),
    ("a.#", "a", True),
    ("a.#", "a.b.c", True),
    ("a.#", "ab", False),
    ("#.a", "a", True),
    ("#.a", "b.a", True),
    ("#.a", "b.a.c", False),
    ("a.#.b", "a.b", True),
    ("a.#.b", "a.x.y.b", True),
    ("a.#.b", "a.x.y.c", False),
    ("#.#", "", True),
    ("#.#", "a.b", True),
    ("#.*", "", False),
    ("#.*", "a", True),
    ("*.#", "a.b.c", True),
    ("*.#.*", "a", False),
    ("*.#.*", "a.b", True),
    ("", "", True),
    ("", "a", False),
    (".", ".", True),
    (".", "", False),
    ("a..b", "a..b", True),
    ("a..b", "a.b", False),
    ("a.#.#.b", "a.b", True),
    ("#.b.#", "b", True),
    ("#.b.#", "a.b.c", True),
    ("#.b.#", "a.c", False),
    ("a*", "ab", False),
    ("a*", "a*", True),
    ("a#", "a#", True),
    ("a#", "ab", False),
]


def test_reference_matcher_agrees_with_table():
    for pattern, key, routed in TOPIC_CASES:
        assert topic_match(pattern, key) == routed, (pattern, key)


def test_topic_routing_table(ch):
    patterns = sorted({p for p, _, _ in TOPIC_CASES})
    x = {}
    q = {}
    for p in patterns:
        x[p] = uniq("topic")
        ch.exchange_declare(x[p], "topic", auto_delete=True)
        q[p] = temp_queue(ch)
        ch.queue_bind(q[p], x[p], p)
    for p, key, _ in TOPIC_CASES:
        ch.basic_publish(x[p], key, key.encode())
    mismatches = []
    for p in patterns:
        expected = [k for pp, k, routed in TOPIC_CASES if pp == p and routed]
        got = bodies(ch, q[p])
        if got != expected:
            mismatches.append((p, expected, got))
    assert mismatches == []


def test_topic_cross_product(ch):
    # Every pattern against every key through one exchange: many bindings, shared words.
    patterns = ["#", "*", "a.#", "#.c", "a.*.c", "*.b.*", "a.#.c", "#.b.#", "*.*", "", ".",
                "a..c", "a.*", "#.*.#", "a.b.c", "*.#.*.c"]
    keys = ["", "a", "a.b", "a.b.c", "a..c", ".", "a.", ".c", "x.b.y", "a.b.b.c", "c", "b",
            "a.c", "a.x.y.z.c"]
    xname = uniq("topic")
    ch.exchange_declare(xname, "topic", auto_delete=True)
    q = {}
    for p in patterns:
        q[p] = temp_queue(ch)
        ch.queue_bind(q[p], xname, p)
    for k in keys:
        ch.basic_publish(xname, k, k.encode())
    got = {p: bodies(ch, q[p]) for p in patterns}
    expected = {p: [k for k in keys if topic_match(p, k)] for p in patterns}
    assert got == expected


def test_topic_unbind_leaves_other_patterns(ch):
    x = uniq("topic")
    ch.exchange_declare(x, "topic", auto_delete=True)
    q = temp_queue(ch)
    ch.queue_bind(q, x, "a.*")
    ch.queue_bind(q, x, "*.b")
    ch.queue_unbind(q, x, "a.*")
    ch.basic_publish(x, "a.x", b"gone")
    ch.basic_publish(x, "x.b", b"kept")
    assert bodies(ch, q) == ["kept"]


# ----------------------------------------------------------------- headers

HEADER_BINDINGS = {
    "all": {"x-match": "all", "a": "1", "b": "2"},
    "any": {"x-match": "any", "a": "1", "b": "2"},
    "default-is-all": {"a": "1", "b": "2"},
    "all-with-x": {"x-match": "all-with-x", "x-k": "v", "a": "1"},
    "any-with-x": {"x-match": "any-with-x", "x-k": "v", "a": "1"},
    "all-ignores-x": {"x-match": "all", "x-k": "v", "a": "1"},
    "any-only-x": {"x-match": "any", "x-k": "v"},
    "void-means-present": {"x-match": "all", "a": None},
    "int": {"x-match": "all", "n": 1},
    "empty-all": {"x-match": "all"},
    "empty-any": {"x-match": "any"},
    "no-args": {},
}
HEADER_MESSAGES = {
    "a1b2": {"a": "1", "b": "2"},
    "a1": {"a": "1"},
    "a1b3": {"a": "1", "b": "3"},
    "a9": {"a": "9"},
    "xk": {"x-k": "v"},
    "xk-a1": {"x-k": "v", "a": "1"},
    "no-headers": None,
    "empty": {},
    "n1": {"n": 1},
    "n-str": {"n": "1"},
    "a-int": {"a": 1},
}
# Observed on RabbitMQ 3.10.
HEADER_EXPECTED = {
    "all": ["a1b2"],
    "any": ["a1b2", "a1", "a1b3", "xk-a1"],
    "default-is-all": ["a1b2"],
    "all-with-x": ["xk-a1"],
    "any-with-x": ["a1b2", "a1", "a1b3", "xk", "xk-a1"],
    "all-ignores-x": ["a1b2", "a1", "a1b3", "xk-a1"],
    "any-only-x": [],
    "void-means-present": ["a1b2", "a1", "a1b3", "a9", "xk-a1", "a-int"],
    "int": ["n1"],
    "empty-all": list(HEADER_MESSAGES),
    "empty-any": [],
    "no-args": list(HEADER_MESSAGES),
}


@pytest.mark.parametrize("exchange", ["new", "amq.headers", "amq.match"])
def test_headers_routing(ch, exchange):
    if exchange == "new":
        exchange = uniq("headers")
        ch.exchange_declare(exchange, "headers", auto_delete=True)
    q = {}
    for label, args in HEADER_BINDINGS.items():
        q[label] = temp_queue(ch)
        ch.queue_bind(q[label], exchange, "ignored", arguments=args)
    for label, headers in HEADER_MESSAGES.items():
        ch.basic_publish(exchange, "any-key", label.encode(), pika.BasicProperties(headers=headers))
    got = {label: bodies(ch, q[label]) for label in HEADER_BINDINGS}
    assert got == HEADER_EXPECTED


def test_headers_unbind_needs_same_arguments(ch):
    x = uniq("headers")
    ch.exchange_declare(x, "headers", auto_delete=True)
    q = temp_queue(ch)
    ch.queue_bind(q, x, "", arguments={"a": "1"})
    ch.queue_bind(q, x, "", arguments={"b": "2"})
    ch.queue_unbind(q, x, "", arguments={"a": "1"})
    ch.basic_publish(x, "", b"a", pika.BasicProperties(headers={"a": "1"}))
    ch.basic_publish(x, "", b"b", pika.BasicProperties(headers={"b": "2"}))
    assert bodies(ch, q) == ["b"]


# ----------------------------------------------------------------- alternate exchange


def test_alternate_exchange(ch):
    x, ae = uniq("x"), uniq("ae")
    ch.exchange_declare(ae, "fanout", auto_delete=True)
    ch.exchange_declare(x, "direct", auto_delete=True, arguments={"alternate-exchange": ae})
    routed, unrouted = temp_queue(ch), temp_queue(ch)
    ch.queue_bind(routed, x, "known")
    ch.queue_bind(unrouted, ae)
    ch.basic_publish(x, "known", b"1")
    ch.basic_publish(x, "unknown", b"2")
    assert bodies(ch, routed) == ["1"]
    assert bodies(ch, unrouted) == ["2"]


def test_alternate_exchange_avoids_mandatory_return(ch):
    x, ae = uniq("x"), uniq("ae")
    ch.exchange_declare(ae, "fanout", auto_delete=True)
    ch.exchange_declare(x, "direct", auto_delete=True, arguments={"alternate-exchange": ae})
    q = temp_queue(ch)
    ch.queue_bind(q, ae)
    ch.confirm_delivery()
    # With confirms on, pika raises UnroutableError if the broker returns the message.
    ch.basic_publish(x, "nowhere", b"saved", mandatory=True)
    assert bodies(ch, q) == ["saved"]


def test_missing_alternate_exchange_drops(ch):
    x = uniq("x")
    ch.exchange_declare(x, "direct", auto_delete=True, arguments={"alternate-exchange": uniq("none")})
    q = temp_queue(ch)
    ch.queue_bind(q, x, "k")
    ch.basic_publish(x, "other", b"dropped")
    ch.basic_publish(x, "k", b"kept")
    assert bodies(ch, q) == ["kept"]
