"""Fuzz the config loader: agent.toml bytes plus EDGERUN_* overrides to a typed config.

Contract: any input either builds an AgentConfig whose every number is finite and
inside its bounds, or raises ConfigError (whose message is printable text). Any
other exception, or a config that breaks the bounds, is a bug.

    python tests/fuzz/fuzz_config.py -runs=100000 -max_len=4096 [corpus_dir]
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import typing
from typing import Any

import atheris

# Imported first, so not instrumented: the runtimes' config classes pull in numpy,
# which is not the parser and would only slow every run down.
import agent.runtimes.litert
import agent.runtimes.ort  # noqa: F401

with atheris.instrument_imports():
    import tomllib  # noqa: F401 - instrumented: its branches guide the fuzzer

    from agent.config.loader import parse_config, parse_toml
    from agent.config.model import AgentConfig
    from agent.config.typed import ConfigError


def _env_names(cls: Any, prefix: str = "EDGERUN_") -> list[str]:
    names = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            names += _env_names(tp, f"{prefix}{f.name.upper()}__")
        else:
            names.append(prefix + f.name.upper())
    return names


ENV_NAMES = _env_names(AgentConfig)


def _check_bounds(obj: Any, path: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        where = f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_bounds(value, where + ".")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise AssertionError(f"{where} = {value!r} passed the loader")
        if isinstance(value, int | float) and not isinstance(value, bool):
            ge, le = f.metadata.get("ge"), f.metadata.get("le")
            if (ge is not None and value < ge) or (le is not None and value > le):
                raise AssertionError(f"{where} = {value!r} is outside [{ge}, {le}]")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    environ = {}
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        name = ENV_NAMES[fdp.ConsumeIntInRange(0, len(ENV_NAMES) - 1)]
        if fdp.ConsumeBool():
            name += fdp.ConsumeUnicodeNoSurrogates(4).upper()
        environ[name] = fdp.ConsumeUnicode(24)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        config = parse_config(parse_toml(raw, "fuzz"), environ, "fuzz")
    except ConfigError as exc:
        str(exc).encode("utf-8", "backslashreplace")  # must render
        return
    _check_bounds(config)


def main() -> None:
    logging.disable(logging.WARNING)  # unknown EDGERUN_* names are logged, by design
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
