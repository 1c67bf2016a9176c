"""Which onnxruntime execution providers can really run here, and why the others not.

`onnxruntime.get_available_providers()` lists what the *build* was compiled with: the
onnxruntime-gpu wheel lists TensorRT and CUDA on a machine without TensorRT's
libraries, or without any GPU. Asked for such a provider, onnxruntime prints an "EP
Error" banner on stderr and falls back on its own, so the agent would believe it runs
on TensorRT. Before asking, this module checks that the provider's shared library
(`libonnxruntime_providers_<x>.so` beside onnxruntime's own) and every library it
names in its ELF `DT_NEEDED` entries (libnvinfer, libcudart, libcublas, libcudnn...,
exactly the sonames that build links against) load, and that the CUDA runtime sees a
device; each provider skipped carries the reason. After the session opens, the
runtime compares what it asked for with `session.get_providers()` (`fallbacks`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

# The shared library onnxruntime loads for a provider (Linux names, in onnxruntime/capi).
PROVIDER_LIBRARY = {
    CUDA: "libonnxruntime_providers_cuda.so",
    TENSORRT: "libonnxruntime_providers_tensorrt.so",
}
# onnxruntime's own libraries, which it has loaded before any provider library.
_ORT_OWN_PREFIX = "libonnxruntime"
# TensorRT runs on CUDA: its provider also needs the CUDA provider's libraries.
_ALSO_NEEDS = {TENSORRT: (CUDA,)}

Loader = Callable[[str], object]


class ElfError(ValueError):
    """Not an ELF shared object this reader understands."""


def elf_needed(path: Path) -> list[str]:
    """The `DT_NEEDED` sonames of an ELF shared object, in file order."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise ElfError(f"{path.name} is not an ELF file")
    klass, order = data[4], data[5]
    if klass not in (1, 2) or order not in (1, 2):
        raise ElfError(f"{path.name}: unknown ELF class/byte order")
    e = "<" if order == 1 else ">"
    is64 = klass == 2
    try:
        if is64:
            (shoff,) = struct.unpack_from(e + "Q", data, 0x28)
            shentsize, shnum = struct.unpack_from(e + "HH", data, 0x3A)
            sh_fmt, dyn_fmt = e + "IIQQQQIIQQ", e + "qQ"
        else:
            (shoff,) = struct.unpack_from(e + "I", data, 0x20)
            shentsize, shnum = struct.unpack_from(e + "HH", data, 0x2E)
            sh_fmt, dyn_fmt = e + "IIIIIIIIII", e + "iI"
        sections = [struct.unpack_from(sh_fmt, data, shoff + i * shentsize) for i in range(shnum)]
        needed: list[str] = []
        dyn_size = struct.calcsize(dyn_fmt)
        for sh in sections:
            if sh[1] != 6:  # SHT_DYNAMIC
                continue
            offset, size, link = sh[4], sh[5], sh[6]
            strtab = sections[link][4]
            for pos in range(offset, offset + size, dyn_size):
                tag, value = struct.unpack_from(dyn_fmt, data, pos)
                if tag == 0:  # DT_NULL
                    break
                if tag == 1:  # DT_NEEDED
                    end = data.index(b"\x00", strtab + value)
                    needed.append(data[strtab + value : end].decode("ascii", "replace"))
        return needed
    except (struct.error, IndexError, ValueError) as exc:
        raise ElfError(f"{path.name}: truncated or malformed ELF ({exc})") from exc


def capi_directory() -> Path | None:
    """onnxruntime's `capi` folder, found without importing onnxruntime."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "capi"


def _dlopen(name: str) -> object:
    return ctypes.CDLL(name)


def first_line(exc: BaseException) -> str:
    """The error's first line, capped (a loader's message may carry a whole log)."""
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def library_problem(provider: str, capi: Path | None, load: Loader = _dlopen) -> str | None:
    """None when `provider`'s libraries all load here, else why not (one line)."""
    for dependency in _ALSO_NEEDS.get(provider, ()):
        why = library_problem(dependency, capi, load)
        if why is not None:
            return why
    library = PROVIDER_LIBRARY.get(provider)
    if library is None or capi is None:
        return None  # a provider without a separate library (CPU, Azure...)
    path = capi / library
    if not path.is_file():
        return f"{library} is not in {capi} (a CPU-only onnxruntime build)"
    try:
        needed = elf_needed(path)
    except (OSError, ElfError) as exc:
        return f"cannot read {library}: {exc}"
    for soname in needed:
        if soname.startswith(_ORT_OWN_PREFIX):
            continue
        try:
            load(soname)
        except OSError as exc:
            return f"{library} needs {soname}, which does not load: {first_line(exc)}"
    return None


def cuda_device_problem(capi: Path | None, load: Loader = _dlopen) -> str | None:
    """None when the CUDA runtime the CUDA provider links against sees a device."""
    if capi is None or not (capi / PROVIDER_LIBRARY[CUDA]).is_file():
        return None
    try:
        cudart = next(
            n for n in elf_needed(capi / PROVIDER_LIBRARY[CUDA]) if n.startswith("libcudart")
        )
    except (OSError, ElfError, StopIteration):
        return None  # cannot tell; the session will say
    try:
        lib = load(cudart)
        count = ctypes.c_int(0)
        status = int(lib.cudaGetDeviceCount(ctypes.byref(count)))  # type: ignore[attr-defined]
    except (OSError, AttributeError) as exc:
        return f"{cudart}: {first_line(exc)}"
    if status != 0:
        return f"no usable GPU: cudaGetDeviceCount returned CUDA error {status}"
    if count.value < 1:
        return "no GPU: the CUDA runtime sees 0 devices"
    return None


@dataclass(frozen=True)
class ProviderPlan:
    """What to ask onnxruntime for, and why each other preferred provider was dropped."""

    asked: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)


def plan_providers(
    preferred: Iterable[str],
    available: Iterable[str],
    problem: Callable[[str], str | None],
    *,
    cpu_fallback: bool = True,
) -> ProviderPlan:
    """Keep the preference order; drop a provider the build lacks or whose libraries
    or device `problem` reports; CPU is the last fallback unless `cpu_fallback` is
    off (a forced provider list)."""
    have = list(available)
    asked: list[str] = []
    skipped: dict[str, str] = {}
    for provider in preferred:
        if provider in asked or provider in skipped:
            continue
        if provider not in have:
            skipped[provider] = (
                f"not in this onnxruntime build (it has {', '.join(have) or 'nothing'})"
            )
            continue
        why = problem(provider)
        if why is not None:
            skipped[provider] = why
            continue
        asked.append(provider)
    if cpu_fallback and CPU not in asked:
        asked.append(CPU)
    return ProviderPlan(tuple(asked), skipped)


def system_problem(capi: Path | None) -> Callable[[str], str | None]:
    """The real check for `plan_providers`: libraries, then (CUDA-based) a device.
    Each provider is checked once per process: a library that did not load will not
    load later either, and the device count does not change under a running agent."""

    def problem(provider: str) -> str | None:
        key = (provider, capi)
        if key not in _CHECKED:
            why = library_problem(provider, capi)
            if why is None and provider in (CUDA, TENSORRT):
                why = cuda_device_problem(capi)
            _CHECKED[key] = why
        return _CHECKED[key]

    return problem


_CHECKED: dict[tuple[str, Path | None], str | None] = {}


def fallbacks(asked: Iterable[str], got: Iterable[str]) -> list[str]:
    """Providers asked for that the session does not use: onnxruntime dropped them on
    its own (a library or device failure it only printed on stderr)."""
    have = set(got)
    return [p for p in asked if p not in have]


__all__ = [
    "CPU",
    "CUDA",
    "PROVIDER_LIBRARY",
    "TENSORRT",
    "ElfError",
    "ProviderPlan",
    "capi_directory",
    "cuda_device_problem",
    "elf_needed",
    "fallbacks",
    "first_line",
    "library_problem",
    "plan_providers",
    "system_problem",
]
