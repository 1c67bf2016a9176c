"""Every MQTT topic edgerun uses, built, validated and parsed in this one module.

The device and the fleet console both import it; no other module spells a topic.

Command names on topics (portable spelling): a command's name is lower-case words
joined by dots (`config.get`, in the body's `name`), but brokers that map topic
levels to subjects refuse a `.` in a topic (NATS: a subscription is refused, a
publish closes the connection). So the topic level spells the name with `-` for
each `.` (`cmd/config-get`); `-` is never part of a command name, so the mapping is
one to one. Consoles publish only that spelling; the device also subscribes to the
legacy dotted one (`cmd/config.get`) for older consoles, and a broker that refuses
those legacy subscriptions is normal (`is_legacy_command_filter`). Agents of the earlier
release subscribe only to the dotted spelling, so the device advertises what it takes in
its retained `status` (`"topics": TOPICS_PORTABLE`; absent: TOPICS_DOTTED) and a console
sends a device that does not advertise it the dotted spelling (`command_topic`). Device ids, group
names, console ids and transfer ids with a `.` cannot travel on such brokers at all:
`portability_problem` says so, for a warning at start.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

ROOT = "edgerun/v1"
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
COMMAND_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
# Words right under ROOT that are not device ids (group commands, console replies).
RESERVED_IDS = frozenset({"group", "console"})
# Kubernetes names: a namespace is a DNS label, a device a DNS subdomain.
K8S_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
K8S_NAME_RE = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
MAX_TOPIC_BYTES = 65535
# The retained status's `topics`: which command-topic spellings a device takes.
TOPICS_DOTTED = 1  # `cmd/config.get` only (agents before the field existed)
TOPICS_PORTABLE = 2  # `cmd/config-get` too (and the dotted one unless on NATS)


class TopicError(ValueError):
    """A topic, filter or name that MQTT or edgerun does not accept."""


def _check_levels(value: str, what: str) -> None:
    if not value:
        raise TopicError(f"{what} is empty")
    if "\x00" in value:
        raise TopicError(f"{what} {value!r} contains a NUL character")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise TopicError(f"{what} is longer than {MAX_TOPIC_BYTES} bytes")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TopicError(f"{what} {value!r} is not valid UTF-8") from exc


@dataclass(frozen=True, slots=True)
class Topic:
    """A concrete topic one can publish to: no wildcards."""

    value: str

    def __post_init__(self) -> None:
        _check_levels(self.value, "topic")
        if "+" in self.value or "#" in self.value:
            raise TopicError(f"topic {self.value!r} contains a wildcard (+ or #)")

    def __str__(self) -> str:
        return self.value

    @property
    def levels(self) -> list[str]:
        return self.value.split("/")


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """A subscription filter; `+` stands for one level, a final `#` for the rest."""

    value: str

    def __post_init__(self) -> None:
        _check_levels(self.value, "topic filter")
        levels = self.value.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise TopicError(f"filter {self.value!r}: # must be a whole, last level")
            if "+" in level and level != "+":
                raise TopicError(f"filter {self.value!r}: + must be a whole level")

    def __str__(self) -> str:
        return self.value

    def matches(self, topic: Topic | str) -> bool:
        name = str(topic)
        want, got = self.value.split("/"), name.split("/")
        # $-topics are never matched by a wildcard in the first level (MQTT 4.7.2).
        if name.startswith("$") and want[0] in ("+", "#"):
            return False
        for i, level in enumerate(want):
            if level == "#":
                return True
            if i >= len(got) or (level != "+" and level != got[i]):
                return False
        return len(want) == len(got)


def device_id(value: str) -> str:
    """Validate a device id (1-64 of A-Za-z0-9._-, not a reserved word)."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise TopicError(f"device id {value!r} must be 1-64 of A-Za-z0-9._-")
    if value in RESERVED_IDS or value in (".", ".."):
        raise TopicError(f"device id {value!r} is reserved")
    return value


def group_name(value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise TopicError(f"group name {value!r} must be 1-64 of A-Za-z0-9._-")
    return value


PORTABLE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def portability_problem(what: str, value: str) -> str | None:
    """Why `value` (a device id, group, console id, transfer id) cannot be a topic level
    on NATS and similar clustered brokers, or None when it can."""
    if PORTABLE_RE.fullmatch(value):
        return None
    return (
        f"{what} {value!r} contains '.', which brokers that map topic levels to subjects "
        "(NATS) refuse in topics: there its subscriptions are refused and a publish closes "
        "the connection; use only A-Za-z0-9_- for a fleet that may run on such a broker"
    )


def command_name(value: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not COMMAND_RE.fullmatch(value):
        raise TopicError(
            f"command name {value!r} must be lower-case words joined by dots (e.g. config.get)"
        )
    return value


@dataclass(frozen=True, slots=True)
class DeviceTopics:
    """The topics under `edgerun/v1/{device_id}`."""

    device: str

    def __post_init__(self) -> None:
        device_id(self.device)

    @property
    def root(self) -> str:
        return f"{ROOT}/{self.device}"

    @property
    def status(self) -> Topic:
        return Topic(f"{self.root}/status")

    @property
    def state(self) -> Topic:
        return Topic(f"{self.root}/state")

    @property
    def telemetry(self) -> Topic:
        return Topic(f"{self.root}/telemetry")

    @property
    def events(self) -> Topic:
        return Topic(f"{self.root}/events")

    def command(self, name: str) -> Topic:
        """Where a console sends `name` (portable spelling: `cmd/config-get`)."""
        return Topic(f"{self.root}/cmd/{command_level(name)}")

    def legacy_command(self, name: str) -> Topic:
        """The dotted spelling (`cmd/config.get`) that older consoles publish."""
        return Topic(f"{self.root}/cmd/{command_name(name)}")

    def bundle(self, transfer_id: str) -> Topic:
        """Chunks of one MQTT bundle transfer, console -> device."""
        return Topic(f"{self.root}/bundle/{transfer_name(transfer_id)}")

    def need(self, transfer_id: str) -> Topic:
        """Which chunks the device still lacks, device -> console. Under the device's own
        root, so the recommended ACL (`pattern write edgerun/v1/%u/...`) covers it."""
        return Topic(f"{self.root}/bundle/{transfer_name(transfer_id)}/need")


def command_topic(device: str, name: str, topics: int | None) -> Topic:
    """Where a console sends `name` to `device`, given the `topics` its retained status
    advertises (None: no status seen yet, the portable spelling). A device that does not
    advertise the portable spelling is an older agent: it gets the dotted one."""
    names = DeviceTopics(device)
    if topics is not None and topics < TOPICS_PORTABLE:
        return names.legacy_command(name)
    return names.command(name)


def transfer_name(value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise TopicError(f"transfer id {value!r} must be 1-64 of A-Za-z0-9._-")
    return value


def need_filter(device: str = "+") -> TopicFilter:
    """What a console subscribes to for the need messages of one device or of all."""
    return TopicFilter(f"{ROOT}/{device}/bundle/+/need")


def parse_need_topic(topic: str) -> tuple[str, str] | None:
    """`edgerun/v1/{device}/bundle/{transfer_id}/need` -> (device, transfer_id)."""
    levels = topic.split("/")
    prefix = ROOT.split("/")
    rest = levels[len(prefix) :]
    if levels[: len(prefix)] != prefix or len(rest) != 4 or rest[1] != "bundle":
        return None
    if rest[3] != "need":
        return None
    try:
        return device_id(rest[0]), transfer_name(rest[2])
    except TopicError:
        return None


def command_level(name: str) -> str:
    """A command name as a topic level: `.` spelt `-` (NATS refuses `.` in topics)."""
    return command_name(name).replace(".", "-")


def name_of_level(level: str) -> str:
    """The command name a topic level spells, in either spelling; TopicError if none."""
    if "." in level and "-" in level:
        raise TopicError(f"command level {level!r} mixes '.' and '-'")
    return command_name(level.replace("-", "."))


def group_command(group: str, name: str) -> Topic:
    return Topic(f"{ROOT}/group/{group_name(group)}/cmd/{command_level(name)}")


def legacy_group_command(group: str, name: str) -> Topic:
    return Topic(f"{ROOT}/group/{group_name(group)}/cmd/{command_name(name)}")


def console_reply(console_id: str) -> Topic:
    """Where a console asks replies to go (MQTT v5 response topic or 3.1.1 `reply_to`)."""
    if not NAME_RE.fullmatch(console_id):
        raise TopicError(f"console id {console_id!r} must be 1-64 of A-Za-z0-9._-")
    return Topic(f"{ROOT}/console/{console_id}/reply")


def is_reply_topic(value: object) -> bool:
    """True for `edgerun/v1/console/{console_id}/reply`: the only topics a device ever
    answers a command on (MQTT v5 response topic or 3.1.1 `reply_to`)."""
    if not isinstance(value, str):
        return False
    levels = value.split("/")
    prefix = ROOT.split("/")
    return (
        len(levels) == len(prefix) + 3
        and levels[: len(prefix)] == prefix
        and levels[len(prefix)] == "console"
        and levels[-1] == "reply"
        and NAME_RE.fullmatch(levels[len(prefix) + 1]) is not None
        and levels[len(prefix) + 1] not in (".", "..")
    )


GROUP_PREFIX = "group:"


def target_name(value: object) -> str | None:
    """A command's `to`: a device id or `group:NAME`; the value itself when valid."""
    if not isinstance(value, str):
        return None
    try:
        if value.startswith(GROUP_PREFIX):
            group_name(value[len(GROUP_PREFIX) :])
        else:
            device_id(value)
    except TopicError:
        return None
    return value


def command_subscriptions(
    device: str,
    groups: Iterable[str],
    names: Iterable[str],
    legacy: bool = True,
    portable: bool = True,
) -> list[TopicFilter]:
    """One filter per command a device handles, for itself and each of its groups, in
    the portable spelling; with `legacy`, also the dotted spelling of names with a `.`
    (for older consoles; a broker such as NATS refuses those, which is fine). `portable`
    False: what an agent of the earlier release took, the dotted spelling only."""
    topics = DeviceTopics(device)
    names = sorted(names)
    groups = list(groups)
    filters: list[TopicFilter] = []
    if portable:
        filters += [TopicFilter(str(topics.command(n))) for n in names]
        for group in groups:
            filters += [TopicFilter(str(group_command(group, n))) for n in names]
    if legacy or not portable:
        dotted = [n for n in names if "." in n or not portable]
        filters += [TopicFilter(str(topics.legacy_command(n))) for n in dotted]
        for group in groups:
            filters += [TopicFilter(str(legacy_group_command(group, n))) for n in dotted]
    return filters


def is_legacy_command_filter(value: str) -> bool:
    """True for a dotted-spelling command filter (`…/cmd/config.get`) whose portable
    twin the device subscribes to as well."""
    levels = value.split("/")
    return len(levels) >= 2 and levels[-2] == "cmd" and "." in levels[-1]


@dataclass(frozen=True, slots=True)
class CommandRoute:
    """Where a command arrived: for one device or for a group."""

    scope: str  # "device" or "group"
    target: str  # the device id or group name
    name: str


def parse_command_topic(topic: str) -> CommandRoute | None:
    """`edgerun/v1/{id}/cmd/{name}` or `edgerun/v1/group/{g}/cmd/{name}`, the name in
    either spelling (`config-get` or `config.get`); None otherwise."""
    levels = topic.split("/")
    prefix = ROOT.split("/")
    if levels[: len(prefix)] != prefix:
        return None
    rest = levels[len(prefix) :]
    try:
        if len(rest) == 3 and rest[1] == "cmd":
            return CommandRoute("device", device_id(rest[0]), name_of_level(rest[2]))
        if len(rest) == 4 and rest[0] == "group" and rest[2] == "cmd":
            return CommandRoute("group", group_name(rest[1]), name_of_level(rest[3]))
    except TopicError:
        return None
    return None


# What a console subscribes to, for every device at once.
def fleet_filter(kind: str) -> TopicFilter:
    if kind not in ("status", "state", "telemetry", "events"):
        raise TopicError(f"no per-device stream called {kind!r}")
    return TopicFilter(f"{ROOT}/+/{kind}")


def device_of(topic: str) -> str | None:
    """The device id a device-stream topic belongs to, or None."""
    levels = topic.split("/")
    prefix = ROOT.split("/")
    if len(levels) < len(prefix) + 2 or levels[: len(prefix)] != prefix:
        return None
    try:
        return device_id(levels[len(prefix)])
    except TopicError:
        return None


@dataclass(frozen=True, slots=True)
class TwinTopics:
    """KubeEdge device twin topics, `$hw/events/device/{namespace}/{name}/twin/...`."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        if not K8S_LABEL_RE.fullmatch(self.namespace):
            raise TopicError(f"namespace {self.namespace!r} is not a Kubernetes DNS label")
        if not K8S_NAME_RE.fullmatch(self.name):
            raise TopicError(f"device name {self.name!r} is not a Kubernetes object name")

    @property
    def base(self) -> str:
        return f"$hw/events/device/{self.namespace}/{self.name}/twin"

    @property
    def update(self) -> Topic:
        return Topic(f"{self.base}/update")

    @property
    def update_delta(self) -> Topic:
        return Topic(f"{self.base}/update/delta")

    @property
    def get(self) -> Topic:
        return Topic(f"{self.base}/get")

    @property
    def get_result(self) -> Topic:
        return Topic(f"{self.base}/get/result")
