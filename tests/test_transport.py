"""The transports the broker URL selects: kombu's Redis one with one client per connection pool, and
kombu's file-system one with messages that appear whole."""

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
    assert broker_transport("filesystem://localhost//") == "workflows_app.transport:FilesystemTransport"


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


def test_a_file_system_message_appears_only_once_written_whole(tmp_path):
    """kombu's `_get` takes only files named `<...>.<queue>.msg` (so a partial file under another name is
    left alone) and moves each away before reading it; `FilesystemChannel._put` overrides kombu's
    `_put(queue, payload, **kwargs)`. A message published through the project's transport round-trips,
    and a file still being written is never taken."""
    import inspect

    from kombu.transport import filesystem

    assert list(inspect.signature(filesystem.Channel._put).parameters) == ["self", "queue", "payload", "kwargs"]
    folder = tmp_path / "queue"
    folder.mkdir()
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(tmp_path / "control"),
        "store_processed": False,
    }
    name = "fs-test"
    queue = Queue(name, Exchange(name), routing_key=name)
    with Connection(
        "filesystem://", transport="workflows_app.transport:FilesystemTransport", transport_options=options
    ) as conn:
        channel = conn.channel()
        assert isinstance(channel, transport.FilesystemChannel)
        (folder / f"~1_x.{name}.msg.part").write_bytes(b"")  # a message being written
        Producer(channel).publish({"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue])
        assert [p.name for p in folder.glob("~*")] == [f"~1_x.{name}.msg.part"]  # the publish left none
        message = queue(channel).get(no_ack=True)
        assert message.payload == {"n": 1}
        assert queue(channel).get(no_ack=True) is None  # the partial file is not a message
