"""MQTT chunk transfers end to end: the real link client and adapter, a real mosquitto,
the console's ChunkSender; lossy senders, bad chunks, a broker crash, a fetcher restart."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from agent.protocol.transfer import (
    HEADER_BYTES,
    Chunk,
    Need,
    TransferError,
    chunks_of,
    decode_chunk,
    decode_need,
    ranges_of,
)
from agent.protocol.update import DeployRequest
from agent.update.errors import UpdateCode, UpdateError
from agent.update.fetch import MqttFetcher, MqttSettings, complete_path
from agent.update.fetch.mqtt import Bitmap
from fleet.transfer import ChunkSender
from tests.agent.update.fetch.mqttside import DEVICE, Console, Device
from tests.agent.update.fetch.test_http import blob
from tests.mqtt_broker import Broker, Listener, device_acl

CHUNK = 4096


def deploy(data: bytes, transfer: str = "t1") -> DeployRequest:
    return DeployRequest.from_args(
        {"transfer": transfer, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
         "version": "2.0.0"}
    )  # fmt: skip


def fetcher(
    device: Device, chunk_timeout_s: float = 0.3, transfer_timeout_s: float = 60
) -> MqttFetcher:
    return MqttFetcher(device.transfers, MqttSettings(chunk_timeout_s, transfer_timeout_s))


def fetch(f: MqttFetcher, req: DeployRequest, part: Path) -> Path:
    return f.fetch(req, part, lambda done, total: None, threading.Event())


class Background:
    """Run a fetch on its own thread (as the job runner does)."""

    def __init__(self, f: MqttFetcher, req: DeployRequest, part: Path) -> None:
        self.result: Path | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(f, req, part), daemon=True)
        self.thread.start()

    def _run(self, f: MqttFetcher, req: DeployRequest, part: Path) -> None:
        try:
            self.result = fetch(f, req, part)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 60) -> Path:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "fetch hung"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def wait_for(cond: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_chunk_and_need_round_trip() -> None:
    data = blob(10_000)
    chunks = chunks_of(data, 4096)
    assert [len(c.payload) for c in chunks] == [4096, 4096, 1808]
    for c in chunks:
        assert decode_chunk(c.encode()) == c
    assert len(chunks[0].encode()) == HEADER_BYTES + 4096
    need = Need("t1", chunks[0].bundle_sha256, len(data), 3, ranges_of([0, 2]), "silence")
    assert decode_need(need.encode()) == need and need.indexes() == [0, 2]
    assert ranges_of([1, 2, 3, 7, 9, 10]) == ((1, 4), (7, 8), (9, 11))
    assert len(ranges_of(list(range(0, 10_000, 2)))) == 256


def test_lossy_sender_every_seventh_chunk_dropped_first_time_completes(tmp: Path) -> None:
    data = blob(200_000)
    with Broker(tmp) as broker, Device(broker) as device:
        console = Console(broker)
        sender = console.add(ChunkSender(console.client, DEVICE, "t1", data, CHUNK,
                                         skip=lambda i, before: i % 7 == 0 and before == 0))  # fmt: skip
        f = fetcher(device)
        got = fetch(f, deploy(data), tmp / "p.part")
        console.close()
    assert got == complete_path(tmp / "p.part") and got.read_bytes() == data
    assert f.needs_sent["gap"] >= 1 and len(sender.needs) >= 2  # asked when round 1 ended
    assert sender.needs[-1].indexes() and all(i % 7 == 0 for i in sender.needs[-1].indexes())
    assert not (tmp / "p.part.bitmap").exists()


def test_bad_chunks_are_dropped_counted_and_asked_again(tmp: Path) -> None:
    data = blob(60_000)
    other = blob(60_000, seed=5)
    stranger = chunks_of(other, CHUNK)

    def corrupt(chunk: Chunk) -> bytes | None:
        raw = chunk.encode()
        kinds = {1: raw[:50], 2: raw[:-1] + bytes([raw[-1] ^ 1]), 3: raw + b"x",
                 4: stranger[chunk.index].encode(), 5: raw[:6] + (999).to_bytes(4, "big") + raw[10:]}  # fmt: skip
        return kinds.get(chunk.index) if sender.sent[chunk.index] == 1 else None

    with Broker(tmp) as broker, Device(broker) as device:
        console = Console(broker)
        sender = console.add(
            ChunkSender(console.client, DEVICE, "t1", data, CHUNK, corrupt=corrupt)
        )
        f = fetcher(device)
        got = fetch(f, deploy(data), tmp / "p.part")
        console.close()
    assert got.read_bytes() == data
    assert f.dropped["truncated"] == 1 and f.dropped["hash"] == 1
    assert f.dropped["length"] == 1 and f.dropped["other_bundle"] == 1 and f.dropped["index"] == 1
    assert all(sender.sent[i] >= 2 for i in range(1, 6))


def test_broker_killed_mid_transfer_and_restarted(tmp: Path) -> None:
    data = blob(120_000)
    hold = threading.Event()
    hold.set()
    with Broker(tmp) as broker, Device(broker) as device:
        console = Console(broker)
        half = 15
        console.add(ChunkSender(console.client, DEVICE, "t1", data, CHUNK,
                                skip=lambda i, before: i >= half and hold.is_set()))  # fmt: skip
        f = fetcher(device, chunk_timeout_s=5.0)
        run = Background(f, deploy(data), tmp / "p.part")
        wait_for(lambda: (tmp / "p.part").exists() and (tmp / "p.part").stat().st_size > 0)
        time.sleep(0.5)
        broker.kill()
        hold.clear()
        time.sleep(0.3)
        broker.start()
        got = run.join()
        console.close()
    assert got.read_bytes() == data
    assert f.needs_sent["reconnect"] >= 1


def test_fetcher_restarted_mid_transfer_resumes_from_the_bitmap(tmp: Path) -> None:
    data = blob(100_000)
    hold = threading.Event()
    hold.set()
    part = tmp / "p.part"
    with Broker(tmp) as broker, Device(broker) as device:
        console = Console(broker)
        sender = console.add(ChunkSender(console.client, DEVICE, "t1", data, CHUNK,
                                         skip=lambda i, before: i >= 10 and hold.is_set()))  # fmt: skip
        with pytest.raises(UpdateError) as info:
            fetch(fetcher(device, transfer_timeout_s=1.5), deploy(data), part)
        assert info.value.code == UpdateCode.TRANSFER_FAILED
        assert (
            "10 of 25 chunks" in info.value.message
            and "update.transfer_timeout_s" in info.value.message
        )
        bitmap = Bitmap.load(part.with_name("p.part.bitmap"), len(data), deploy(data).sha256)
        assert bitmap is not None and bitmap.count == 10
        hold.clear()
        f = fetcher(device)  # a new instance, as after an agent restart
        got = fetch(f, deploy(data), part)
        console.close()
    assert got.read_bytes() == data and f.resumed_chunks == 10
    assert sender.needs[-1].total == 25 and sender.needs[-1].missing == ((10, 25),)


def test_damaged_bitmap_starts_over(tmp: Path) -> None:
    data = blob(20_000)
    part = tmp / "p.part"
    part.write_bytes(b"\0" * 8192)
    (tmp / "p.part.bitmap").write_bytes(b"ERB1garbage")
    with Broker(tmp) as broker, Device(broker) as device:
        console = Console(broker)
        console.add(ChunkSender(console.client, DEVICE, "t1", data, CHUNK))
        f = fetcher(device)
        assert fetch(f, deploy(data), part).read_bytes() == data
        console.close()
    assert f.resumed_chunks == 0


def test_cancel_ends_a_silent_transfer(tmp: Path) -> None:
    data = blob(20_000)
    cancel = threading.Event()
    with Broker(tmp) as broker, Device(broker) as device:
        threading.Timer(0.3, cancel.set).start()
        with pytest.raises(UpdateError) as info:
            fetcher(device).fetch(deploy(data), tmp / "p.part", lambda d, t: None, cancel)
    assert info.value.code == UpdateCode.CANCELLED


def test_decoder_errors_name_the_rule() -> None:
    raw = chunks_of(blob(5000), 4096)[1].encode()
    for bad, reason in [(raw[:10], "truncated"), (b"XXXX" + raw[4:], "magic"),
                        (raw[:4] + b"\x02" + raw[5:], "version")]:  # fmt: skip
        with pytest.raises(TransferError) as info:
            decode_chunk(bad)
        assert info.value.reason == reason and info.value.message


def test_the_recommended_acl_lets_a_device_fetch_only_its_own_transfers(tmp: Path) -> None:
    data = blob(30_000)
    users = {DEVICE: "pw", "intruder": "pw", "console": "pw"}
    with Broker(tmp, users=users, acl=device_acl(["console"])) as broker:
        console = Console(broker, user=("console", "pw"))
        sender = console.add(ChunkSender(console.client, DEVICE, "t1", data, CHUNK))
        # Another device, logged in as itself, tries to ask for and read this device's chunks.
        intruder = Listener(broker, [f"edgerun/v1/{DEVICE}/bundle/#"], username="intruder",
                            password="pw")  # fmt: skip
        need = Need("t1", deploy(data).sha256, len(data), None, (), "start").encode()
        intruder.client.publish(f"edgerun/v1/{DEVICE}/bundle/t1/need", need, qos=1)
        time.sleep(0.5)
        assert sender.needs == []  # the ACL dropped it
        with Device(broker, DEVICE, password="pw") as device:
            got = fetch(fetcher(device), deploy(data), tmp / "p.part")
        time.sleep(0.3)
        intruder.client.loop_stop()
        console.close()
    assert got.read_bytes() == data and sender.needs
    assert intruder.messages == []  # not one chunk reached the other device
