"""The Redis transport the broker URL selects: kombu's, with one client per connection pool."""

from __future__ import annotations

import uuid

import pytest
from django.conf import settings
from kombu import Connection, Exchange, Producer, Queue

from config.settings.base import broker_transport
from workflows_app import transport


@pytest.fixture
def connection():
    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        pytest.fail("these tests publish to the Redis broker the test settings name")
    with Connection(settings.CELERY_BROKER_URL, transport=settings.CELERY_BROKER_TRANSPORT) as conn:
        yield conn


def test_redis_broker_urls_select_the_transport_and_others_keep_kombus():
    assert settings.CELERY_BROKER_TRANSPORT == "workflows_app.transport:Transport"
    assert broker_transport("amqp://guest@localhost//") is None
    assert broker_transport("filesystem://localhost//") is None


def test_messages_published_on_a_channel_share_one_client_until_its_pool_is_replaced(connection, monkeypatch):
    name = f"transport-test-{uuid.uuid4().hex}"
    queue = Queue(name, Exchange(name), routing_key=name)
    channel = connection.channel()
    assert isinstance(channel, transport.Channel)
    built = []
    original = transport.Channel._create_client

    def create(self, *args, **kwargs):
        built.append(original(self, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(transport.Channel, "_create_client", create)
    producer = Producer(channel)
    try:
        for n in range(3):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue])
        assert len(built) == 1
        channel._pool = None  # as after a reconnect: the next command gets a client of the new pool
        producer.publish({"n": 3}, exchange=queue.exchange, routing_key=name, declare=[queue])
        assert len(built) == 2 and built[1].connection_pool is channel.pool
        received = []
        with connection.SimpleQueue(queue) as simple:
            for _ in range(4):
                message = simple.get(timeout=5)
                received.append(message.payload["n"])
                message.ack()
        assert sorted(received) == [0, 1, 2, 3]
    finally:
        queue(channel).delete()
        channel.close()
