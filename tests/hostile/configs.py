"""Hostile configs (issue 7, section 5): generated at run time, judged by real processes.

Every leaf of the typed config model gets a wrong value (NaN/inf for floats, out of
range or the wrong type for the rest), from agent.toml or from EDGERUN_*, plus
unknown keys in every section, files that are not TOML, not UTF-8, too deep, too
big or not files at all, paths the machine refuses and addresses it cannot listen
on. Each runs through ``python -m agent.cli check-config``; a representative subset
also through ``run``. A correct refusal exits 1, carries its stable code in brackets
(``[config.invalid]`` ...), names the key path and shows no traceback.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import types
import typing
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from tests.hostile import TRACEBACK_MARKERS, Case, Outcome, run_measured

CHECK = "config.check"
RUN = "config.run"
CLASSES = (CHECK, RUN)

ROOT = Path(__file__).resolve().parents[2]
DEMO_PUB = ROOT / "models/keys/demo-INSECURE.pub"
SAMPLE_BUNDLE = ROOT / "models/digits/digits-1.0.0.edgebundle"

INVALID, SYNTAX, UNREADABLE = "config.invalid", "config.syntax", "config.unreadable"
FAILED, LOCKED = "start.failed", "start.locked"
_HANG_GUARD_S = 120


@dataclass
class Spec:
    """One hostile config: what to write, how to run it, and what must come back."""

    name: str
    expect: tuple[str, ...]
    key: str  # the key path the message must name ("" for file-level problems)
    data: dict[str, Any] | None = None  # merged over the base config, or...
    raw: bytes | None = None  # ...the file's bytes, or...
    path: Path | None = None  # ...a path given as the config (no file written)
    env: dict[str, str] = field(default_factory=dict)
    run: bool = False  # also judge `edge-agent run`
    note: str = ""
    # Specs of one group share one config and one check-config process (each still
    # gets its own outcome, from the line naming its key): check-config reports every
    # problem at once, and a process per leaf would cost minutes on a small CI box.
    group: str | None = None


# ------------------------------------------------------------------ TOML writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(value)


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data.items() if not _is_table(v)]
    out = "\n".join(lines) + "\n"
    for key, value in data.items():
        if _is_table(value):
            name = f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key)
            out += f"\n[{name}]\n" + to_toml(value, name)
    return out


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _nest(path: str, value: Any) -> dict[str, Any]:
    *tables, leaf = path.split(".")
    data: dict[str, Any] = {leaf: value}
    for table in reversed(tables):
        data = {table: data}
    return data


def _env_name(path: str) -> str:
    return "EDGERUN_" + "__".join(p.upper() for p in path.split("."))


# ------------------------------------------------------------------ the model's leaves


def _leaves(cls: Any, prefix: str = "") -> Iterator[tuple[str, Any, Mapping[str, Any]]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f.metadata


def _sections(cls: Any, prefix: str = "") -> Iterator[str]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield f"{prefix}{f.name}"
            yield from _sections(hints[f.name], f"{prefix}{f.name}.")


def _core(tp: Any) -> Any:
    if get_origin(tp) in (types.UnionType, typing.Union):
        non_none = [a for a in get_args(tp) if a is not type(None)]
        return non_none[0]
    return tp


_ENV_NON_FINITE = ("inf", "-inf", "nan", "1e999", "-NaN", "Infinity")


def _value_specs() -> Iterator[Spec]:
    """One or two wrong values for every leaf of AgentConfig."""
    from agent.config.model import AgentConfig

    members: dict[str, int] = {}
    for i, (path, tp, meta) in enumerate(_leaves(AgentConfig)):
        for n, spec in enumerate(_wrong_values(i, path, tp, meta)):
            group = f"{'env' if spec.env else 'toml'}{n}"
            count = members[group] = members.get(group, 0) + 1
            # check-config lists at most 50 problems (typed.MAX_ISSUES): stay under.
            spec.group = f"{group}-{count // 40}"
            yield spec
    for section in _sections(AgentConfig):
        key = f"{section}.no_such_key"
        yield Spec(
            f"unknown key in [{section}]", (INVALID,), key, data=_nest(key, 1), group="unknown"
        )
    yield Spec("unknown top-level key", (INVALID,), "colour", data={"colour": "red"})
    yield Spec("section is a string", (INVALID,), "memory", data={"memory": "lots"})


def _wrong_values(i: int, path: str, tp: Any, meta: Mapping[str, Any]) -> Iterator[Spec]:
    """Wrong values for one leaf: its type's hostile values, from TOML and EDGERUN_*."""
    core = _core(tp)
    ge, le = meta.get("ge"), meta.get("le")
    if core is float:
        yield Spec(f"{path}=nan", (INVALID,), path, data=_nest(path, math.nan))
        text = _ENV_NON_FINITE[i % len(_ENV_NON_FINITE)]
        yield Spec(f"env {path}={text}", (INVALID,), path, env={_env_name(path): text})
    elif core is int:
        if ge is not None:
            yield Spec(f"{path} below {ge}", (INVALID,), path, data=_nest(path, int(ge) - 1))
        if le is not None:
            over = str(int(le) + 1)
            yield Spec(f"env {path} above {le}", (INVALID,), path, env={_env_name(path): over})
        yield Spec(f"{path}=1.5", (INVALID,), path, data=_nest(path, 1.5))
    elif core is bool:
        yield Spec(f"{path}='yes'", (INVALID,), path, data=_nest(path, "yes"))
        yield Spec(f"env {path}=maybe", (INVALID,), path, env={_env_name(path): "maybe"})
    elif get_origin(core) is Literal:
        yield Spec(f"{path}='bogus'", (INVALID,), path, data=_nest(path, "bogus"))
    elif get_origin(core) is list:
        yield Spec(f"{path}=str", (INVALID,), path, data=_nest(path, "not a list"))
        yield Spec(f"{path}=[[...]]", (INVALID,), path, data=_nest(path, [[[[1]]]]))
    elif core is str and meta.get("pattern"):
        yield Spec(f"{path}=NUL", (INVALID,), path, data=_nest(path, "a\x00b"))
        yield Spec(f"{path}=table", (INVALID,), path, data=_nest(path, {"x": 1}))
    else:  # str without pattern, Path
        yield Spec(f"{path}=NUL", (INVALID,), path, data=_nest(path, "/tmp/a\x00b"))
        yield Spec(f"{path}=42", (INVALID,), path, data=_nest(path, 42))


def _file_specs(work: Path) -> Iterator[Spec]:
    deep = 100_000
    yield Spec(
        "deep arrays", (SYNTAX,), "", raw=b"a = " + b"[" * deep + b"]" * deep + b"\n", run=True
    )
    yield Spec(
        "deep inline tables", (SYNTAX,), "", raw=b"a = " + b"{b = " * 3000 + b"1" + b"}" * 3000
    )
    yield Spec("deep table header", (SYNTAX,), "", raw=b"[" + b".".join([b"t"] * 200) + b"]\nk=1\n")
    yield Spec(
        "deep list under a real key",
        (SYNTAX,),
        "",
        raw=b"[model]\npreference = " + b"[" * 40 + b"]" * 40,
    )
    yield Spec("non-UTF-8 bytes", (UNREADABLE,), "", raw=b'device_id = "caf\xe9"\n', run=True)
    yield Spec("UTF-16 with BOM", (UNREADABLE,), "", raw='device_id = "x"\n'.encode("utf-16"))
    yield Spec("binary noise", (UNREADABLE, SYNTAX), "", raw=bytes(range(256)) * 8)
    yield Spec("NUL byte in the text", (SYNTAX,), "", raw=b'device_id = "a"\x00\n')
    yield Spec("not TOML", (SYNTAX,), "", raw=b"[memory\nmax_mb = 1\n")
    yield Spec("duplicate key", (SYNTAX,), "", raw=b"device_id = 'a'\ndevice_id = 'b'\n")
    yield Spec("2 MiB of comment", (UNREADABLE,), "", raw=b"#" + b"x" * (2 << 20) + b"\n")
    fifo = work / "config.fifo"
    os.mkfifo(fifo)
    yield Spec("config is a FIFO", (UNREADABLE,), "", path=fifo, run=True)
    yield Spec("config is a directory", (UNREADABLE,), "", path=work)
    yield Spec("config is /dev/zero", (UNREADABLE,), "", path=Path("/dev/zero"), run=True)
    yield Spec("config does not exist", (UNREADABLE,), "", path=work / "missing.toml")
    loop = work / "loop.toml"
    loop.symlink_to(loop)
    yield Spec("config is a symlink loop", (UNREADABLE,), "", path=loop)


def _machine_specs(work: Path, busy_port: int, live_socket: Path, locked: Path) -> Iterator[Spec]:
    a_file = work / "a-file"
    a_file.write_text("")
    fifo = work / "bundle.fifo"
    os.mkfifo(fifo)
    key_fifo = work / "key.fifo"
    os.mkfifo(key_fifo)
    garbage_key = work / "garbage.pub"
    garbage_key.write_bytes(os.urandom(200))
    api = lambda **kw: {"api": kw}  # noqa: E731
    yield Spec(
        "NaN from TOML at start",
        (INVALID,),
        "memory.soft_limit_fraction",
        data={"memory": {"soft_limit_fraction": math.nan}},
        run=True,
    )
    yield Spec(
        "NaN from EDGERUN_* at start",
        (INVALID,),
        "api.idle_timeout_s",
        env={"EDGERUN_API__IDLE_TIMEOUT_S": "nan"},
        run=True,
    )
    yield Spec(
        "bad env override",
        (INVALID,),
        "memory.max_mb",
        env={"EDGERUN_MEMORY__MAX_MB": "many"},
        run=True,
    )
    yield Spec(
        "env list item",
        (INVALID,),
        "model.preference[1]",
        env={"EDGERUN_MODEL__PREFERENCE": "onnxruntime,tvm"},
    )
    yield Spec("tcp port 99999", (INVALID,), "api.tcp", data=api(tcp="127.0.0.1:99999"), run=True)
    yield Spec(
        "tcp host unresolvable",
        (INVALID,),
        "api.tcp",
        data=api(tcp="no-such-host.invalid:8080"),
        run=True,
    )
    yield Spec("tcp address not here", (INVALID,), "api.tcp", data=api(tcp="192.0.2.7:8080"))
    yield Spec("tcp bad IPv6", (INVALID,), "api.tcp", data=api(tcp="[::zz]:8080"))
    yield Spec(
        "tcp port in use", (FAILED,), "api.tcp", data=api(tcp=f"127.0.0.1:{busy_port}"), run=True
    )
    yield Spec(
        "socket path 150 bytes",
        (INVALID,),
        "api.socket",
        data=api(socket=str(work / ("s" * 140))),
        run=True,
    )
    yield Spec(
        "socket path is a regular file",
        (FAILED,),
        "api.socket",
        data=api(socket=str(a_file)),
        run=True,
    )
    yield Spec(
        "socket of a live server",
        (FAILED,),
        "api.socket",
        data=api(socket=str(live_socket)),
        run=True,
    )
    yield Spec(
        "socket dir under a file",
        (FAILED,),
        "api.socket",
        data=api(socket=str(a_file / "api.sock")),
    )
    yield Spec(
        "state_dir under a file",
        (FAILED,),
        "state_dir",
        data={"state_dir": str(a_file / "state")},
        run=True,
    )
    yield Spec(
        "state_dir locked by another agent",
        (LOCKED,),
        "state_dir",
        data={"state_dir": str(locked)},
        run=True,
        note="check-config only warns; run refuses",
    )
    odd_bundles = work / "odd-bundles-state"
    odd_bundles.mkdir()
    (odd_bundles / "bundles").write_text("")
    yield Spec(
        "state_dir/bundles is a file",
        (FAILED,),
        "state_dir",
        data={"state_dir": str(odd_bundles)},
        run=True,
    )
    odd_lock = work / "odd-lock-state"
    odd_lock.mkdir()
    os.mkfifo(odd_lock / "agent.lock")
    yield Spec(
        "agent.lock is a FIFO",
        (FAILED,),
        "state_dir",
        data={"state_dir": str(odd_lock)},
        run=True,
    )
    tls_fifo = work / "ca.fifo"
    os.mkfifo(tls_fifo)
    no_signing = {"require_signature": False}
    yield Spec(
        "mqtt.tls.ca_file is a FIFO",
        (INVALID,),
        "mqtt.tls.ca_file",
        data={
            "mqtt": {"enabled": True, "tls": {"enabled": True, "ca_file": str(tls_fifo)}},
            "commands": no_signing,
        },
        run=True,
    )
    yield Spec(
        "mqtt.tls.ca_file is noise",
        (INVALID,),
        "mqtt.tls.ca_file",
        data={
            "mqtt": {"enabled": True, "tls": {"enabled": True, "ca_file": str(garbage_key)}},
            "commands": no_signing,
        },
        run=True,
        note="check-config builds the same TLS context the link builds at start",
    )
    yield Spec(
        "mqtt.password is /dev/zero",
        (INVALID,),
        "mqtt.password",
        data={
            "mqtt": {"enabled": True, "username": "u", "password": "/dev/zero"},
            "commands": no_signing,
        },
        run=True,
    )
    yield Spec(
        "model.bundle is a FIFO", (INVALID,), "model.bundle", data={"model": {"bundle": str(fifo)}}
    )
    yield Spec(
        "model.bundle is a directory",
        (INVALID,),
        "model.bundle",
        data={"model": {"bundle": str(work)}},
    )
    yield Spec(
        "model.bundle is /dev/zero",
        (INVALID,),
        "model.bundle",
        data={"model": {"bundle": "/dev/zero"}},
    )
    yield Spec(
        "trust key is a FIFO",
        (INVALID,),
        "trust.public_keys[0]",
        data={"trust": {"public_keys": [str(key_fifo)]}},
    )
    yield Spec(
        "trust key is /dev/urandom",
        (INVALID,),
        "trust.public_keys[0]",
        data={"trust": {"public_keys": ["/dev/urandom"]}},
    )
    yield Spec(
        "trust key is noise",
        (INVALID,),
        "trust.public_keys[0]",
        data={"trust": {"public_keys": [str(garbage_key)]}},
        run=True,
    )
    yield Spec(
        "credential outside the directory",
        (INVALID,),
        "trust.public_keys[0]",
        data={"trust": {"public_keys": ["credential:../../etc/shadow"]}},
        env={"CREDENTIALS_DIRECTORY": str(work)},
    )


# ------------------------------------------------------------------ judging


def _write(spec: Spec, work: Path, base: dict[str, Any], name: str) -> Path:
    if spec.path is not None:
        return spec.path
    path = work / f"{name}.toml"
    if spec.raw is not None:
        path.write_bytes(spec.raw)
    else:
        path.write_text(to_toml(_merge(base, spec.data or {})))
    return path


def _measured(args: list[str], env: dict[str, str]) -> tuple[int, str, float]:
    """Run the CLI; return its exit status, its output and its own peak RSS (MiB)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERUN_")}
    full_env.update(env)
    return run_measured([sys.executable, "-m", "agent.cli", *args], full_env, ROOT, _HANG_GUARD_S)


_ERROR_LINE = re.compile(r"^  \[([a-z_.]+)\] (.*)$", re.MULTILINE)


@dataclass
class Job:
    klass: str
    config: Path
    specs: list[Spec]

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for spec in self.specs:
            env.update(spec.env)
        return env


def _verdict(spec: Spec, klass: str, rc: int, out: str) -> tuple[str | None, str]:
    if rc == 0:
        # Accepted; with a warning is the right answer for a few (a held lock).
        warned = re.search(r"^warning \[([a-z_.]+)\]", out, re.MULTILINE)
        return (f"warning {warned.group(1)}" if warned else None), out
    if rc != 1:
        return f"exit {rc}", out
    if any(marker in out for marker in TRACEBACK_MARKERS):
        return "traceback", out
    if klass == RUN:
        found = re.search(r"cannot start \[([a-z_.]+)\]", out)
        code = found.group(1) if found else "no cannot-start line"
        if spec.key and spec.key not in out:
            return f"{code} (key {spec.key} not named)", out
        return code, out
    lines = _ERROR_LINE.findall(out)
    if not lines:
        return "no error line", out
    if spec.group is None:
        if spec.key and spec.key not in out:
            return f"{lines[0][0]} (key {spec.key} not named)", out
        return lines[0][0], out
    for code, text in lines:
        if text.startswith((f"{spec.key}: ", f"{spec.key}[")):
            return code, text
    return f"key {spec.key} not reported", out


def _judge(job: Job) -> list[Outcome]:
    args = ["check-config", str(job.config)]
    if job.klass == RUN:
        args = ["run", "--config", str(job.config)]
    start = time.perf_counter()
    rc, out, rss = _measured(args, job.env)
    seconds = time.perf_counter() - start
    outcomes = []
    for spec in job.specs:
        code, message = _verdict(spec, job.klass, rc, out)
        case = Case(job.klass, spec.name, spec.expect, spec.note)
        outcomes.append(Outcome(case, code, message, seconds, round(rss, 1)))
    return outcomes


def _check_only_expect(spec: Spec) -> Spec:
    # A held state-dir lock is a warning for check-config (the running agent holds
    # it during a routine check before a restart); only `run` refuses it.
    if LOCKED in spec.expect:
        return dataclasses.replace(spec, expect=(f"warning {LOCKED}",))
    return spec


def run_corpus(workdir: Path) -> list[Outcome]:
    """Generate every case under `workdir`, judge them in real processes."""
    from agent.bundle import Limits
    from agent.signing import load_public_key
    from agent.store import Store

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    state = work / "state"
    # A state dir with a model in `current`, as on a device: the refusals must leave
    # it as it was (test_configs starts an agent on it afterwards).
    store = Store(state)
    verified = store.install(SAMPLE_BUNDLE, [load_public_key(DEMO_PUB)], Limits())
    assert verified.directory is not None
    store.activate(verified.directory)
    base: dict[str, Any] = {
        "device_id": "hostile-config",
        "state_dir": str(state),
        "trust": {"public_keys": [str(DEMO_PUB)]},
        "api": {"socket": str(work / "api.sock")},
    }
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    live_path = work / "live.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(live_path))
    live.listen(8)
    locked = work / "locked-state"
    locked.mkdir()
    lock_fd = os.open(locked / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    os.write(lock_fd, f"{os.getpid()}\n".encode())
    try:
        specs = [
            *_value_specs(),
            *_file_specs(work),
            *_machine_specs(work, busy.getsockname()[1], live_path, locked),
        ]
        groups: dict[str, list[Spec]] = {}
        singles: list[Spec] = []
        for spec in specs:
            if spec.group is None:
                singles.append(spec)
            else:
                groups.setdefault(spec.group, []).append(spec)
        checks: list[Job] = []
        runs: list[Job] = []
        for i, (name, members) in enumerate(groups.items()):
            data: dict[str, Any] = {}
            for spec in members:
                data = _merge(data, spec.data or {})
            merged = Spec(name, (), "", data=data)
            checks.append(Job(CHECK, _write(merged, work, base, f"group-{i:03d}"), members))
        for i, spec in enumerate(singles):
            config = _write(spec, work, base, f"case-{i:03d}")
            checks.append(Job(CHECK, config, [_check_only_expect(spec)]))
            if spec.run:
                # Each refused agent gets its own copy of the device's state dir, so
                # one that holds the lock for an instant cannot turn another's refusal
                # into start.locked, and each copy can be checked for damage.
                own = work / f"run-state-{i:03d}"
                shutil.copytree(state, own, symlinks=True)
                run_base = {**base, "state_dir": str(own)}
                config = _write(spec, work, run_base, f"run-{i:03d}")
                runs.append(Job(RUN, config, [spec]))
        with ThreadPoolExecutor(max_workers=2) as pool:
            outcomes = [o for batch in pool.map(_judge, checks + runs) for o in batch]
    finally:
        busy.close()
        live.close()
        os.close(lock_fd)
    assert live_path.exists(), "a refused agent unlinked a live server's socket"
    for own in sorted(work.glob("run-state-*")):
        assert os.readlink(own / "current") == os.readlink(state / "current"), own
        assert not list((own / "bundles").glob(".unpack-*")), own
    return outcomes


def run_state_dirs(workdir: Path) -> list[Path]:
    """The state dirs the `run` cases were pointed at (after run_corpus)."""
    return sorted(Path(workdir).glob("run-state-*"))


__all__ = ["CHECK", "CLASSES", "RUN", "run_corpus", "to_toml"]
