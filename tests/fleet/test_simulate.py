"""The simulator against a real mosquitto: the device's contract, seen from a console."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.messages import TelemetryMessage
from agent.protocol.state import ReportedState
from agent.protocol.update import DeployRequest, HttpSource, ShadowSpec, TrialSpec
from agent.signing import load_private_key, load_public_key
from fleet.bundle_source import HttpBundleSource, MqttBundleSource
from fleet.simulate import Simulator
from tests.fleet._sim import FINAL_KINDS, SimConsole, console_keypair
from tests.fleet.conftest import SecureBroker
from tests.helpers import DEMO_KEY, DEMO_PUB, make_bundle, unpack_sample
from tests.mqtt_broker import Broker, Listener, free_port

CLI = [sys.executable, "-m", "fleet.cli"]
FAST = {"latency": 0.02, "telemetry_interval_s": 0.3, "start_timeout_s": 15.0}


@pytest.fixture
def keys(console_key: Ed25519PrivateKey, console_pub: Path) -> tuple[Ed25519PrivateKey, Path]:
    return console_key, console_pub


@pytest.fixture(scope="module")
def bundle_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("bundles")
    parts = unpack_sample(work / "sample")
    return make_bundle(parts, work / "digits-2.0.0.edgebundle", load_private_key(DEMO_KEY),
                       version="2.0.0")  # fmt: skip


@pytest.fixture
def console(broker: Broker, keys: tuple[Ed25519PrivateKey, Path]) -> Iterator[SimConsole]:
    with SimConsole(broker, keys[0]) as c:
        yield c


def sim(broker: Broker, keys: tuple[Ed25519PrivateKey, Path], n: int, **kw: object) -> Simulator:
    prefix = kw.pop("prefix", f"s{time.monotonic_ns() % 10**8}")
    options = {**FAST, "model": ("digits", "1.0.0"), **kw}
    return Simulator(broker.host, broker.port, n, prefix=prefix, console_keys=[keys[1]], **options)  # type: ignore[arg-type]


def test_every_device_retains_status_and_state_and_reports_telemetry(
    broker: Broker, keys: tuple[Ed25519PrivateKey, Path], console: SimConsole
) -> None:
    with sim(broker, keys, 30, groups=["a", "b"]) as s:
        ids = s.device_ids
        assert console.wait(lambda c: set(ids) <= set(c.states()) and set(ids) <= set(c.statuses()))
        assert console.wait(lambda c: {t.device_id for t in c.telemetry()} >= set(ids))
        for d in ids:
            assert console.status(d).state == "online"  # type: ignore[union-attr]
            state = ReportedState.from_json(console.state(d))
            assert state.model is not None and state.model.version == "1.0.0"
            # A simulated device reports the variant it "chose", and why, like an agent.
            assert state.model.variant in ("fp32", "int8")
            assert state.model.variant_reason.startswith(f"simulated: {state.model.variant}")
            assert state.groups == (["a", "b"][ids.index(d) % 2],)
            assert state.health.word == "ready" and state.update is None
        # Each device's own baseline: gates must be relative to it.
        p95 = {t.device_id: t.model["live"]["p95_ms"] for t in console.telemetry() if t.model}
        assert len({round(v) for v in p95.values()}) > 5
        t = console.telemetry(ids[0])[-1]
        assert isinstance(t, TelemetryMessage) and t.inference["interval"]["requests"] > 0
        assert t.model is not None and t.model["variant"] in ("fp32", "int8")
        assert t.system["rss_mb"] > 0 and t.outbox["messages"] == 0
        seqs = [m.seq for m in console.telemetry(ids[0])]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        # Telemetry is retained like the agent's: a console opened later gets each
        # device's newest report at once.
        late = Listener(broker, ["edgerun/v1/+/telemetry"])
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                retained = {json.loads(p)["device_id"] for _, p, r, _ in late.messages if r}
                if retained >= set(ids):
                    break
                time.sleep(0.05)
            assert retained >= set(ids)
        finally:
            late.close()


def test_signed_commands_are_answered_and_bad_ones_refused_with_the_devices_codes(
    broker: Broker, keys: tuple[Ed25519PrivateKey, Path], console: SimConsole, tmp_path: Path
) -> None:
    other, _ = console_keypair(tmp_path, "intruder")
    with sim(broker, keys, 3, groups=["g"]) as s:
        a, b = s.device_ids[:2]
        pong = console.request(a, "ping")
        assert pong.ok and pong.result["device_id"] == a and pong.device_id == a

        def code(**fields: Any) -> str | None:
            reply = console.request(a, "ping", **fields)
            assert not reply.ok and reply.error is not None
            return reply.error.code

        assert code(sig=None) == "command.unsigned"
        assert code(to=b) == "command.wrong_target"
        assert code(to=None) == "command.no_target"
        assert code(expires_at=None) == "command.no_expiry"
        assert code(issued_at=time.time() - 120, lifetime_s=60) == "command.expired"
        assert code(lifetime_s=7200) == "command.lifetime_too_long"
        forged = console.body(a, "ping")
        forged["sig"] = console.body(a, "ping", {"x": 1}, id=forged["id"])["sig"]  # another body
        assert console.request(a, "ping", body=forged).error.code == "command.bad_signature"  # type: ignore[union-attr]
        intruder = SimConsole.body(console, a, "ping")  # signed by the console key...
        from agent.protocol.canonical import sign_body

        intruder = sign_body(intruder, other)  # ...then re-signed by an untrusted one
        assert console.request(a, "ping", body=intruder).error.code == "command.bad_signature"  # type: ignore[union-attr]
        # The same id and body again: the first reply again; another body: refused.
        body = console.body(a, "config.get", {"keys": ["telemetry.interval_s"]})
        first = console.request(a, "config.get", body=body)
        again = console.request(a, "config.get", body=body)
        assert first.ok and again.result == first.result
        changed = console.body(a, "config.get", {}, id=body["id"])
        assert console.request(a, "config.get", body=changed).error.code == "command.id_reused"  # type: ignore[union-attr]
        assert console.request(a, "deploy", {"url": "ftp://x"}).error.code == "update.bad_args"  # type: ignore[union-attr]
        assert console.request(a, "ping", {"x": 1}).error.code == "command.bad_args"  # type: ignore[union-attr]
        assert console.request(a, "ping", body=b"{not json").error.code == "command.malformed"  # type: ignore[union-attr]
        refused = console.wait_event(a, {"command.refused"})
        assert refused.data["code"] == "command.unsigned"
        # config.set changes the telemetry interval; a key that is not tunable is named.
        ok = console.request(a, "config.set", {"values": {"telemetry.interval_s": 5}})
        assert ok.ok and ok.result == {"applied": {"telemetry.interval_s": 5.0}}
        bad = console.request(a, "config.set", {"values": {"model.bundle": "x"}})
        assert bad.error.code == "config.not_tunable"  # type: ignore[union-attr]
        # A group command is answered by every member, each saying who it is.
        console.publish("group:g", "ping", console.body("group:g", "ping"))
        assert console.wait(
            lambda c: (
                {r.device_id for r, _ in c.replies() if r.ok and r.result.get("pong")}
                >= set(s.device_ids)
            )
        )


def test_mqtt_311_replies_go_to_reply_to_on_a_multiplexed_connection(
    broker: Broker, keys: tuple[Ed25519PrivateKey, Path]
) -> None:
    with (
        sim(broker, keys, 12, protocol="3.1.1", connections=3) as s,
        SimConsole(broker, keys[0], protocol=4) as c,
    ):
        for d in s.device_ids[::4]:
            reply = c.request(d, "ping")
            assert reply.ok and reply.device_id == d
        s.offline(s.device_ids[5])
        assert c.wait(lambda c: c.status(s.device_ids[5]).state == "offline")  # type: ignore[union-attr]
        s.online(s.device_ids[5])
        assert c.wait(lambda c: c.status(s.device_ids[5]).state == "online")  # type: ignore[union-attr]


def test_a_deploy_downloads_over_http_and_runs_every_phase(
    broker: Broker, keys: tuple[Ed25519PrivateKey, Path], console: SimConsole, bundle_v2: Path
) -> None:
    with (
        sim(broker, keys, 2) as s,
        HttpBundleSource(bundle_v2, trust=[load_public_key(DEMO_PUB)]) as source,
    ):
        d = s.device_ids[0]
        reply = console.request(d, "deploy", source.deploy_args(trial=TrialSpec(window_s=0.1)))
        assert reply.ok and reply.result["accepted"]
        done = console.wait_event(d, FINAL_KINDS)
        assert done.kind == "update.committed", done
        assert console.kinds(d) == [
            "update.accepted", "update.downloading", "update.downloading", "update.verifying",
            "update.validating", "update.swapping", "update.trial", "update.committed",
        ]  # fmt: skip
        assert done.data["download_s"] >= 0 and done.data["model"]["version"] == "2.0.0"
        assert source.served == 1
        state = console.wait_state(d, lambda st: st["update"]["phase"] == "committed")
        assert (
            state["model"]["version"] == "2.0.0" and state["last_known_good"]["version"] == "1.0.0"
        )
        assert state["model"]["sha256"] == source.info.sha256
        # Same version again: not newer, refused at once.
        again = console.request(d, "deploy", source.deploy_args())
        assert again.error.code == "update.not_newer"  # type: ignore[union-attr]
        # Roll back to the previous slot: the device serves 1.0.0 again.
        back = console.request(d, "rollback")
        assert back.ok and back.result["version"] == "1.0.0"
        state = console.wait_state(
            d,
            lambda st: (
                st["update"]["phase"] == "rolled_back" and st["update"]["kind"] == "rollback"
            ),
        )
        assert state["model"]["version"] == "1.0.0"
        # A sha256 that is not the bundle's: the device downloads and refuses it.
        e = s.device_ids[1]
        wrong = DeployRequest.from_args(source.deploy_args())
        args = {**wrong.to_args(), "sha256": "0" * 64}
        assert console.request(e, "deploy", args).ok
        failed = console.wait_event(e, FINAL_KINDS)
        assert failed.kind == "update.failed" and failed.data["code"] == "update.hash_mismatch"
        # A URL that answers 404: update.download_failed.
        args = DeployRequest(
            HttpSource(source.url + "x"), wrong.sha256, wrong.size, "2.0.0"
        ).to_args()
        last = console.events(e)[-1].seq
        assert console.request(e, "deploy", args).ok
        failed = console.wait_event(e, FINAL_KINDS, after=last)
        assert failed.data["code"] == "update.download_failed"


def test_a_deploy_over_mqtt_chunks(
    broker: Broker, keys: tuple[Ed25519PrivateKey, Path], console: SimConsole, bundle_v2: Path
) -> None:
    with sim(broker, keys, 2) as s:
        d = s.device_ids[1]
        paho = console.listener.client
        with MqttBundleSource(paho, bundle_v2, trust=[load_public_key(DEMO_PUB)]) as source:
            tid = source.transfer_for(d)
            assert source.transfer_for(d) == tid
            assert console.request(d, "deploy", source.deploy_args(tid)).ok
            done = console.wait_event(d, FINAL_KINDS)
            assert done.kind == "update.committed", done
            sender = source._senders[d]
            assert sender.needs and sender.needs[0].reason == "start"
            assert sum(sender.sent.values()) >= sender.total


def test_fail_crash_hang_and_profile_knobs(
    broker: Broker, keys: tuple[Ed25519PrivateKey, Path], console: SimConsole, bundle_v2: Path
) -> None:
    with (
        sim(broker, keys, 6, skip_download=True, crash_downtime_s=0.3) as s,
        HttpBundleSource(bundle_v2, trust=[load_public_key(DEMO_PUB)]) as source,
    ):
        failing, crashing, hanging, slow, good, crash_in_trial = s.device_ids
        s.set_knobs([failing], fail_rate=1.0)
        s.set_knobs([crashing], crash_rate=1.0, crash_phase="validating")
        s.set_knobs([crash_in_trial], crash_rate=1.0, crash_phase="trial")
        s.set_knobs([hanging], hang_rate=1.0, hang_phase="validating")
        s.set_profile("2.0.0", devices=[slow], p95_factor=3.0)
        args = source.deploy_args(trial=TrialSpec(window_s=0.1))
        for d in s.device_ids:
            assert console.request(d, "deploy", args).ok
        outcome = {d: console.wait_event(d, FINAL_KINDS) for d in (failing, crashing, slow, good)}
        assert outcome[failing].data["code"] == "update.validation_failed"
        assert outcome[failing].data["check"] == "latency"
        assert outcome[crashing].data["code"] == "update.interrupted"
        # Recovery: discarded before the swap, rolled back after it; 1.0.0 serves on.
        assert outcome[crashing].kind == "update.failed"
        in_trial = console.wait_event(crash_in_trial, FINAL_KINDS)
        assert in_trial.kind == "update.rolled_back"
        assert in_trial.data["code"] == "update.interrupted"
        for d, phase in ((crashing, "failed"), (crash_in_trial, "rolled_back")):

            def ended(st: dict[str, Any], phase: str = phase) -> bool:
                return bool(st["update"]["phase"] == phase)

            assert console.wait_state(d, ended)["model"]["version"] == "1.0.0"
        assert "model.rolled_back" in console.kinds(crash_in_trial, "model.")
        statuses = [e for e in console._bodies("status", crashing)]
        assert [b["state"] for _, b in statuses][-3:] == ["online", "offline", "online"]
        assert outcome[slow].kind == "update.rolled_back"
        assert outcome[slow].data["code"] == "update.trial_failed"
        assert outcome[slow].data["trial_p95_ratio"] > 2.0
        assert outcome[good].kind == "update.committed"
        assert console.state(slow)["model"]["version"] == "1.0.0"  # type: ignore[index]
        # Marked bad after its trial breach: refused at once unless forced.
        marked = console.request(slow, "deploy", args)
        assert marked.error.code == "update.marked_bad"  # type: ignore[union-attr]
        # The hanging device stays in its phase until cancelled.
        console.wait_state(hanging, lambda st: st["update"]["phase"] == "validating")
        assert "update.swapping" not in console.kinds(hanging)
        status = console.request(hanging, "update.status")
        assert status.result["running"] and status.result["job"]["phase"] == "validating"
        cancel = console.request(hanging, "update.cancel")
        assert cancel.ok and cancel.result["phase"] == "validating"
        assert console.wait_event(hanging, FINAL_KINDS).kind == "update.cancelled"
        nothing = console.request(hanging, "update.cancel")
        assert nothing.error.code == "update.nothing_to_cancel"  # type: ignore[union-attr]


def test_offline_device_leaves_its_last_will_and_does_not_answer(
    broker: Broker, keys: tuple[Ed25519PrivateKey, Path], console: SimConsole
) -> None:
    with sim(broker, keys, 3) as s:
        d = s.device_ids[2]
        assert console.wait(lambda c: c.status(d) is not None)
        s.offline(d)
        assert console.wait(lambda c: c.status(d).state == "offline")  # type: ignore[union-attr]
        assert console.status(d).reason == "connection lost (last will)"  # type: ignore[union-attr]
        with pytest.raises(AssertionError, match="no reply"):
            console.request(d, "ping", timeout=0.5)
        s.online(d)
        assert console.wait(lambda c: c.status(d).state == "online")  # type: ignore[union-attr]
        assert console.request(d, "ping").ok
    # A clean stop says so, as `edge-agent` does.
    assert console.wait(lambda c: c.status(d).reason == "agent stopped")  # type: ignore[union-attr]


def test_edge_fleet_simulate_runs_until_sigterm_and_devices_lists_them(
    broker: Broker, keys: tuple[Ed25519PrivateKey, Path], console: SimConsole
) -> None:
    url = f"mqtt://{broker.host}:{broker.port}"
    base = [*CLI, "--broker", url]
    bad = subprocess.run([*base, "--json", "simulate", "5", "--fail-rate", "2"],
                         check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert json.loads(bad.stdout)["error"]["code"] == "console.bad_input"
    nobody = subprocess.run(
        [*CLI, "--broker", f"mqtt://127.0.0.1:{free_port()}", "--json", "simulate", "2"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert nobody.returncode == 2 and "Traceback" not in nobody.stderr
    assert json.loads(nobody.stdout)["error"]["code"] == "console.broker_unreachable"
    proc = subprocess.Popen(
        [*base, "simulate", "12", "--prefix", "cli", "--connections", "3", "--groups", "x,y",
         "--console-key", str(keys[1]), "--telemetry-interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ids = [f"cli-{i:04d}" for i in range(12)]
        assert console.wait(
            lambda c: all(c.status(d) is not None and c.status(d).state == "online" for d in ids),  # type: ignore[union-attr]
            30,
        )
        assert console.request("cli-0003", "ping").ok
        listed = subprocess.run([*base, "--json", "devices", "--group", "y", "--settle", "5"],
                                check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        rows = rows["devices"] if isinstance(rows, dict) else rows
        assert (
            sorted(r["device_id"] for r in rows if r["device_id"].startswith("cli-")) == ids[1::2]
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.startswith("12 devices") and "status 12" in out
    assert console.wait(lambda c: all(c.status(d).reason == "agent stopped" for d in ids))  # type: ignore[union-attr]


def test_the_real_console_drives_simulated_devices_over_tls_with_the_device_acl(
    secure_broker: SecureBroker, console_key_file: Path, console_pub: Path, tmp_path: Path
) -> None:
    """Each simulated device logs in as itself (username = device id, docs/mqtt.md's ACL):
    a device that published outside its own topics would be refused by the broker."""
    from fleet.config import FleetConfig
    from fleet.mqtt import FleetClient
    from fleet.view import FleetView

    password = tmp_path / "pw"
    password.write_text(secure_broker.users[secure_broker.console_user] + "\n")
    config = FleetConfig.load(None, broker=secure_broker.url, username=secure_broker.console_user,
                              password_file=str(password), ca_file=str(secure_broker.pki.ca_cert),
                              key=str(console_key_file))  # fmt: skip
    ids = ["dev-1", "dev-2", "dev-3"]
    b = secure_broker.broker
    with (
        Simulator(
            "localhost",
            b.port,
            3,
            device_ids=ids,
            console_keys=[console_pub],
            username=lambda d: d,
            password=lambda d: secure_broker.users[d],
            tls=(secure_broker.pki.ca_cert, None, None),
            groups=["acl"],
            telemetry_interval_s=0.3,
            start_timeout_s=15,
        ),  # fmt: skip
        FleetClient(config) as client,
    ):
        view = FleetView(client)
        view.start()
        assert view.wait(lambda v: all((r := v.row(d)) is not None and r.online for d in ids), 15)
        assert view.wait(lambda v: all(v.row(d).p95_ms is not None for d in ids), 15)  # type: ignore[union-attr]
        for d in ids:
            reply = client.request(d, "ping", timeout_s=10)
            assert reply.ok and reply.device_id == d
        applied = client.request("dev-2", "config.set", {"values": {"log_level": "debug"}})
        assert applied.ok and applied.result == {"applied": {"log_level": "debug"}}
        assert [r.device_id for r in view.rows(group="acl")] == ids


def test_live_figures_follow_the_served_generation(
    broker: Broker, keys: tuple[Ed25519PrivateKey, Path], console: SimConsole, bundle_v2: Path
) -> None:
    with (
        sim(broker, keys, 1, skip_download=True, live_since_swap=True) as s,
        HttpBundleSource(bundle_v2, trust=[load_public_key(DEMO_PUB)]) as source,
    ):
        d = s.device_ids[0]

        def live(generation: int) -> dict[str, Any] | None:
            for t in reversed(console.telemetry(d)):
                if t.model and t.model["live"]["generation"] == generation:
                    return dict(t.model["live"])
            return None

        assert console.wait(lambda c: live(1) is not None)
        old = live(1)
        assert old is not None and old["requests"] >= 5 * 300 * 0.99  # a full window
        assert console.request(d, "deploy", source.deploy_args(trial=TrialSpec(window_s=0))).ok
        assert console.wait_event(d, FINAL_KINDS).kind == "update.committed"
        assert console.wait(lambda c: live(2) is not None)
        new = live(2)
        assert new is not None and new["requests"] < old["requests"] / 10  # only since the swap


def test_devices_come_back_after_a_broker_restart(
    tmp_path: Path, keys: tuple[Ed25519PrivateKey, Path]
) -> None:
    own = Broker(tmp_path).start()
    try:
        with sim(own, keys, 4, connections=2) as s, SimConsole(own, keys[0]) as c:
            ids = s.device_ids
            assert c.wait(lambda c: set(ids) <= set(c.states()))
            own.kill()  # no persistence: every retained message is gone with it
            own.start()
            seen = len(c.listener.messages)

            def back(c: SimConsole) -> bool:
                fresh = c.listener.messages[seen:]
                return {t.split("/")[2] for t, _, _, _ in fresh if t.endswith("/state")} >= set(ids)

            assert c.wait(back, 30)
            assert c.request(ids[3], "ping").ok
    finally:
        own.stop()


def test_simulated_commands_are_refused_like_the_agents_hostile_corpus() -> None:
    """Every hostile command of tests/hostile/commands.py (whose codes the agent's own
    dispatcher is held to) gets the same code from a simulated device, but the two
    `infer` cases that need the real model's input shape."""
    from concurrent.futures import ThreadPoolExecutor

    from fleet.simulate.commands import Incoming, SignatureCache
    from fleet.simulate.device import Knobs, Shared, Signal, SimDevice
    from tests.hostile import commands as hostile

    shared = Shared(SignatureCache([hostile.KEY.public_key()]), ThreadPoolExecutor(1), 0, 10.0,
                    "digits", "1.0.0", lambda d, v: Signal())  # fmt: skip
    device = SimDevice(hostile.DEVICE, (hostile.GROUP,), shared, Knobs())
    events: list[str] = []
    device.emit = lambda kind, reason, **data: events.append(data.get("code", kind))  # type: ignore[method-assign]
    device._refusal_at = _NoLimit()  # count every refusal, as the corpus judge does
    wrong = []
    for h in hostile.all_cases():
        if h.case.name in ("infer-wrong-shape", "infer-huge-shape"):
            continue
        before = len(events)
        out = device.dispatcher.handle(Incoming(h.topic, h.payload, h.response_topic, b"corr"))
        if out is not None:
            assert out.topic == hostile.CONSOLE_REPLY, h.case.name
            code = out.reply.error.code if out.reply.error else "accepted"
        else:
            code = events[-1] if len(events) > before else "nothing"
        if code not in h.case.expect:
            wrong.append((h.case.name, code, h.case.expect))
    shared.downloads.shutdown()
    assert wrong == []


class _NoLimit(dict[str, float]):
    def get(self, key: str, default: float | None = None) -> float:  # type: ignore[override]
        return -1e18


def test_a_shadow_reports_agreement_and_blocks_a_disagreeing_version(
    broker: Broker, keys: tuple[Ed25519PrivateKey, Path], console: SimConsole, bundle_v2: Path
) -> None:
    with (
        sim(broker, keys, 2, skip_download=True) as s,
        HttpBundleSource(bundle_v2, trust=[load_public_key(DEMO_PUB)]) as source,
    ):
        agree, disagree = s.device_ids
        s.set_profile("2.0.0", devices=[disagree], agreement=0.9)
        args = source.deploy_args(
            shadow=ShadowSpec(min_agreement=0.95), trial=TrialSpec(window_s=0)
        )
        for d in s.device_ids:
            assert console.request(d, "deploy", args).ok
        ok, refused = (
            console.wait_event(agree, FINAL_KINDS),
            console.wait_event(disagree, FINAL_KINDS),
        )
        assert ok.kind == "update.committed" and ok.data["shadow_agreement"] == 1.0
        assert "update.shadow" in console.kinds(agree)
        assert refused.kind == "update.failed" and refused.data["code"] == "update.shadow_disagreed"
        assert refused.data["shadow_agreement"] == 0.9
        assert console.wait(
            lambda c: any(t.model and t.model.get("shadow", {}).get("agreement") == 0.9
                          for t in c.telemetry(disagree))
        )  # fmt: skip


def test_a_console_reaches_an_old_agent_on_the_dotted_topic_and_a_new_one_on_the_portable(
    broker: Broker, keys: tuple[Ed25519PrivateKey, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Agents of the earlier release take only `cmd/config.get`; a new one advertises
    `"topics": 2` in its status and takes `cmd/config-get`. The console's real client
    picks the spelling from the view's row; sent blind (no row), the portable spelling
    gets no answer from the old agent, which is the break this guards against."""
    from fleet.config import FleetConfig
    from fleet.errors import FleetCode, FleetError
    from fleet.mqtt import FleetClient
    from fleet.view import FleetView

    config = FleetConfig.load(
        None, broker=f"mqtt://{broker.host}:{broker.port}", console_id="ops.topics", timeout_s=5
    )
    with pytest.raises(ValueError, match="not a simulated device"):
        Simulator(broker.host, broker.port, 1, old_agents=["nobody"])
    prefix = f"t{time.monotonic_ns() % 10**8}"
    old, new = f"{prefix}-0000", f"{prefix}-0001"
    with sim(broker, keys, 2, prefix=prefix, old_agents=[old]) as s:
        with caplog.at_level("WARNING", logger="fleet.mqtt"):
            client = FleetClient(config, key=keys[0]).connect()
        try:
            assert any("console_id 'ops.topics'" in r.getMessage() for r in caplog.records)
            view = FleetView(client).start(settle_s=5)
            assert view.wait(lambda v: all((r := v.row(d)) and r.online for d in (old, new)), 15)
            assert view.row(old).topics == 1 and view.row(new).topics == 2  # type: ignore[union-attr]
            for device in (old, new):
                reply = client.request(device, "config.get", {"keys": ["telemetry.interval_s"]})
                assert reply.ok and reply.device_id == device, reply
            lookup, client.device_lookup = client.device_lookup, None  # no row: portable
            try:
                assert client.request(new, "config.get").ok
                with pytest.raises(FleetError) as refused:
                    client.request(old, "config.get", timeout_s=1)
                assert refused.value.code == FleetCode.TIMEOUT
            finally:
                client.device_lookup = lookup
            view.close()
        finally:
            client.close()
        assert s.device_ids == [old, new]
