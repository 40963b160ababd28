"""Publisher confirms (confirm.select) and transactions (tx.*)."""

import time

import amqp
import pika
import pika.exceptions
import pytest

from conftest import drain, ready, uniq, wait_until


@pytest.fixture
def amqp_conn(broker_addr):
    """A py-amqp connection that does not wait for confirms itself, so we see the raw acks."""
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}", confirm_publish=False)
    c.connect()
    yield c
    try:
        c.close()
    except Exception:
        c.collect()


def pump(conn, until, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.1)
        except TimeoutError:
            pass
        except OSError:  # socket.timeout on older Pythons
            pass
    return until()


class ConfirmLog:
    def __init__(self, ch):
        self.events = []
        ch.events["basic_ack"].add(lambda tag, multiple: self.events.append(("ack", tag, multiple)))
        ch.events["basic_nack"].add(lambda tag, multiple: self.events.append(("nack", tag, multiple)))
        ch.events["basic_return"].add(
            lambda exc, exchange, key, msg: self.events.append(("return", exc.reply_code, exc.reply_text, key, msg.body))
        )

    def settled(self):
        """{delivery tag: 'ack' | 'nack'}, expanding `multiple`; asserts nothing is settled twice."""
        out = {}
        for kind, tag, *rest in self.events:
            if kind == "return":
                continue
            multiple = rest[0]
            tags = [t for t in range(1, tag + 1) if t not in out] if multiple else [tag]
            for t in tags:
                assert t not in out, f"delivery tag {t} confirmed twice: {self.events}"
                out[t] = kind
        return out


def test_confirms_cover_every_publish(amqp_conn):
    ch = amqp_conn.channel()
    q, _, _ = ch.queue_declare("", exclusive=True)
    ch.confirm_select()
    log = ConfirmLog(ch)
    n = 500
    for i in range(n):
        ch.basic_publish(amqp.Message(str(i).encode()), routing_key=q)
    assert pump(amqp_conn, lambda: len(log.settled()) == n)
    assert log.settled() == {t: "ack" for t in range(1, n + 1)}
    # The broker may coalesce with multiple=true; whatever it does, every tag is acked once.
    assert all(kind == "ack" for kind, *_ in log.events)


def test_unroutable_mandatory_is_returned_then_confirmed(amqp_conn):
    ch = amqp_conn.channel()
    ch.confirm_select()
    log = ConfirmLog(ch)
    ch.basic_publish(amqp.Message(b"lost"), exchange="amq.direct", routing_key="nowhere", mandatory=True)
    ch.basic_publish(amqp.Message(b"dropped"), exchange="amq.direct", routing_key="nowhere")
    assert pump(amqp_conn, lambda: len(log.settled()) == 2)
    assert log.settled() == {1: "ack", 2: "ack"}
    ret = [e for e in log.events if e[0] == "return"]
    assert ret == [("return", 312, "NO_ROUTE", "nowhere", b"lost")]
    # basic.return precedes the basic.ack for the same message.
    ack1 = next(i for i, e in enumerate(log.events) if e[0] == "ack" and (e[1] == 1 or e[2]))
    assert log.events.index(ret[0]) < ack1


def test_confirm_nack_on_reject_publish_overflow(amqp_conn):
    ch = amqp_conn.channel()
    q, _, _ = ch.queue_declare(
        "", exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    ch.confirm_select()
    log = ConfirmLog(ch)
    ch.basic_publish(amqp.Message(b"fits"), routing_key=q)
    ch.basic_publish(amqp.Message(b"overflows"), routing_key=q)
    assert pump(amqp_conn, lambda: len(log.settled()) == 2)
    assert log.settled() == {1: "ack", 2: "nack"}


def test_pika_confirm_delivery(conn):
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.confirm_delivery()
    for i in range(20):
        ch.basic_publish("", q, str(i).encode())  # raises if nacked
    with pytest.raises(pika.exceptions.UnroutableError) as exc:
        ch.basic_publish("amq.direct", "nowhere", b"lost", mandatory=True)
    assert exc.value.messages[0].body == b"lost"
    assert len(drain(ch, q)) == 20


def test_confirm_select_twice_is_ok(ch):
    ch.confirm_delivery()
    ch._impl.confirm_delivery(lambda *a: None)  # a second confirm.select is harmless
    ch.queue_declare("", exclusive=True)


def test_tx_then_confirm_is_406(amqp_conn):
    ch = amqp_conn.channel()
    ch.tx_select()
    with pytest.raises(amqp.exceptions.PreconditionFailed) as exc:
        ch.confirm_select()
    assert exc.value.reply_text == "PRECONDITION_FAILED - cannot switch from tx to confirm mode"


def test_confirm_then_tx_is_406(amqp_conn):
    ch = amqp_conn.channel()
    ch.confirm_select()
    with pytest.raises(amqp.exceptions.PreconditionFailed) as exc:
        ch.tx_select()
    assert exc.value.reply_text == "PRECONDITION_FAILED - cannot switch from confirm to tx mode"


@pytest.mark.parametrize("op", ["commit", "rollback"])
def test_tx_without_select_is_406(amqp_conn, op):
    ch = amqp_conn.channel()
    with pytest.raises(amqp.exceptions.PreconditionFailed) as exc:
        getattr(ch, f"tx_{op}")()
    assert exc.value.reply_code == 406
    assert exc.value.reply_text == "PRECONDITION_FAILED - channel is not transactional"


# ----------------------------------------------------------------- transactions


def test_tx_publishes_held_until_commit(connect):
    conn = connect()
    tx, watch = conn.channel(), conn.channel()
    q = watch.queue_declare("", exclusive=True).method.queue
    tx.tx_select()
    tx.basic_publish("", q, b"1")
    tx.basic_publish("", q, b"2")
    conn.process_data_events(time_limit=0.2)
    assert ready(watch, q) == 0
    tx.tx_commit()
    assert wait_until(lambda: ready(watch, q) == 2)
    assert [b for _, _, b in drain(watch, q)] == [b"1", b"2"]


def test_tx_rollback_discards_publishes(connect):
    conn = connect()
    tx, watch = conn.channel(), conn.channel()
    q = watch.queue_declare("", exclusive=True).method.queue
    tx.tx_select()
    tx.basic_publish("", q, b"discarded")
    tx.tx_rollback()
    tx.basic_publish("", q, b"kept")
    tx.tx_commit()
    assert wait_until(lambda: ready(watch, q) == 1)
    assert [b for _, _, b in drain(watch, q)] == [b"kept"]


def test_tx_acks_held_until_commit(connect):
    conn = connect()
    keeper = conn.channel()
    q = uniq("tx")
    keeper.queue_declare(q)
    for b in (b"a", b"b", b"c"):
        keeper.basic_publish("", q, b)
    ch = conn.channel()
    ch.tx_select()
    tags = [ch.basic_get(q)[0].delivery_tag for _ in range(3)]
    ch.basic_ack(tags[0])
    ch.basic_reject(tags[1], requeue=False)
    ch.tx_rollback()               # both settlements forgotten; still unacked
    ch.basic_ack(tags[2])
    ch.tx_commit()                 # only 'c' is acked
    ch.close()                     # 'a' and 'b' go back to the queue
    assert wait_until(lambda: ready(keeper, q) == 2)
    got = [(b, m.redelivered) for m, _, b in drain(keeper, q)]
    assert got == [(b"a", True), (b"b", True)]
    keeper.queue_delete(q)


def test_tx_uncommitted_work_dropped_on_close(connect):
    conn = connect()
    keeper = conn.channel()
    q = uniq("tx")
    keeper.queue_declare(q)
    keeper.basic_publish("", q, b"x")
    ch = conn.channel()
    ch.tx_select()
    ch.basic_get(q)
    ch.basic_ack(1)
    ch.basic_publish("", q, b"never")
    ch.close()
    assert wait_until(lambda: ready(keeper, q) == 1)
    assert [(b, m.redelivered) for m, _, b in drain(keeper, q)] == [(b"x", True)]
    keeper.queue_delete(q)
