"""aio-pika (aiormq underneath): the asyncio client most Python services use."""

import asyncio

import aio_pika
import aiormq.exceptions
import pytest

from conftest import uniq


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 25))


def test_handshake_and_roundtrip(amqp_url):
    async def main():
        async with await aio_pika.connect(amqp_url) as conn:
            props = conn.transport.connection.server_properties
            assert props["capabilities"]["publisher_confirms"] is True
            ch = await conn.channel()  # publisher confirms on by default
            q = await ch.declare_queue(exclusive=True)
            await ch.default_exchange.publish(
                aio_pika.Message(b"hello", headers={"k": "v"}, message_id="m1", content_type="text/plain"),
                routing_key=q.name,
            )
            msg = await q.get(timeout=5)
            assert msg.body == b"hello"
            assert msg.headers == {"k": "v"}
            assert msg.message_id == "m1" and msg.content_type == "text/plain"
            await msg.ack()

    run(main())


def test_consume_iterator_fifo_and_ack(amqp_url):
    async def main():
        async with await aio_pika.connect(amqp_url) as conn:
            ch = await conn.channel()
            await ch.set_qos(prefetch_count=10)
            q = await ch.declare_queue(uniq("aio"), auto_delete=True)
            for i in range(100):
                await ch.default_exchange.publish(aio_pika.Message(str(i).encode()), routing_key=q.name)
            got = []
            async with q.iterator() as it:
                async for msg in it:
                    async with msg.process():
                        got.append(msg.body.decode())
                    if len(got) == 100:
                        break
            assert got == [str(i) for i in range(100)]

    run(main())


def test_topic_exchange(amqp_url):
    async def main():
        async with await aio_pika.connect(amqp_url) as conn:
            ch = await conn.channel()
            x = await ch.declare_exchange(uniq("aio"), aio_pika.ExchangeType.TOPIC, auto_delete=True)
            q = await ch.declare_queue(exclusive=True)
            await q.bind(x, "logs.*.error")
            await q.bind(x, "audit.#")
            for key in ["logs.db.error", "logs.db.info", "audit", "audit.a.b", "logs.error"]:
                await x.publish(aio_pika.Message(key.encode()), routing_key=key)
            got = []
            while (msg := await q.get(no_ack=True, fail=False)) is not None:
                got.append(msg.body.decode())
            assert got == ["logs.db.error", "audit", "audit.a.b"]

    run(main())


def test_channel_error_is_soft(amqp_url):
    async def main():
        async with await aio_pika.connect(amqp_url) as conn:
            ch = await conn.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity) as exc:
                await ch.declare_queue("rilltest.none", passive=True)
            assert exc.value.args[0] == "NOT_FOUND - no queue 'rilltest.none' in vhost '/'"
            # The connection survives; a new channel works.
            ch2 = await conn.channel()
            await ch2.declare_queue(exclusive=True)

    run(main())


def test_exclusive_queue_locked(amqp_url):
    async def main():
        async with await aio_pika.connect(amqp_url) as c1, await aio_pika.connect(amqp_url) as c2:
            q = await (await c1.channel()).declare_queue(uniq("excl"), exclusive=True)
            with pytest.raises(aiormq.exceptions.ChannelLockedResource):
                await (await c2.channel()).declare_queue(q.name, passive=True)

    run(main())


def test_mandatory_return_with_confirms(amqp_url):
    async def main():
        async with await aio_pika.connect(amqp_url) as conn:
            ch = await conn.channel(on_return_raises=True)
            with pytest.raises(aio_pika.exceptions.DeliveryError) as exc:
                await ch.default_exchange.publish(aio_pika.Message(b"x"), routing_key=uniq("none"), mandatory=True)
            assert exc.value.message.body == b"x"

    run(main())


def test_nack_requeue_redelivers(amqp_url):
    async def main():
        async with await aio_pika.connect(amqp_url) as conn:
            ch = await conn.channel()
            q = await ch.declare_queue(exclusive=True)
            await ch.default_exchange.publish(aio_pika.Message(b"again"), routing_key=q.name)
            msg = await q.get(timeout=5)
            assert not msg.redelivered
            await msg.nack(requeue=True)
            msg = await q.get(timeout=5)
            assert msg.redelivered and msg.body == b"again"
            await msg.reject(requeue=False)
            assert await q.get(fail=False) is None

    run(main())


def test_transaction_commit_and_rollback(amqp_url):
    async def main():
        async with await aio_pika.connect(amqp_url) as conn:
            ch = await conn.channel(publisher_confirms=False)
            q = await ch.declare_queue(exclusive=True)
            tx = ch.transaction()
            await tx.select()
            await ch.default_exchange.publish(aio_pika.Message(b"rolled back"), routing_key=q.name)
            await tx.rollback()
            await ch.default_exchange.publish(aio_pika.Message(b"committed"), routing_key=q.name)
            await tx.commit()
            msg = await q.get(timeout=5, no_ack=True)
            assert msg.body == b"committed"
            assert await q.get(fail=False) is None

    run(main())


def test_server_cancel_on_queue_delete(amqp_url):
    async def main():
        async with await aio_pika.connect(amqp_url) as conn:
            ch = await conn.channel()
            q = await ch.declare_queue(uniq("aio-cancel"))
            async def ignore(message):
                pass

            tag = await q.consume(ignore)
            underlay = await ch.get_underlay_channel()
            assert tag in underlay.consumers
            other = await conn.channel()
            await other.queue_delete(q.name)
            # aiormq drops the consumer when the broker sends basic.cancel.
            for _ in range(250):
                if tag not in underlay.consumers:
                    break
                await asyncio.sleep(0.02)
            assert tag not in underlay.consumers
            assert not ch.is_closed

    run(main())


def test_large_message(amqp_url):
    async def main():
        async with await aio_pika.connect(amqp_url) as conn:
            ch = await conn.channel()
            q = await ch.declare_queue(exclusive=True)
            body = bytes(range(256)) * 8192  # 2 MiB
            await ch.default_exchange.publish(aio_pika.Message(body), routing_key=q.name)
            msg = await q.get(timeout=10, no_ack=True)
            assert msg.body == body

    run(main())
