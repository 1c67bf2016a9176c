"""Hostile tensors for models whose batch is not (only) on axis 0 (issue 7, section 8).

Three classes, all generated at run time from the real silero-vad model
(`input` [B, N], `state` [2, B, 128] with the batch on axis 1, 0-d int64 `sr`):

* ``models.request``: requests to a real agent serving it: wrong ranks, the batch
  on the wrong axis, batch sizes that disagree, empty batches, wrong dtypes, a
  batch over ``api.max_batch_size``. Refused with ``input.mismatch`` (or
  ``request.too_large``) and a message naming the input and the axis.
* ``models.manifest``: signed manifests whose ``batch_axis`` is out of range, of
  the wrong type, or names a fixed dimension: ``bundle.schema`` from the reader.
* ``models.package``: ``edge-export package`` given bad ``--batch-axis`` values or
  samples that do not fit the model: exit 2 with one ``error:`` line (reported
  here as code ``package.refused``), never a traceback, never a bundle.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from agent.api.client import ApiError
from agent.bundle import BundleError, verify_bundle
from agent.signing import load_private_key, load_public_key
from tests.helpers import (
    DEMO_KEY,
    DEMO_PUB,
    AgentProcess,
    base_config,
    file_info,
    raw_tar,
    running_agent,
    signed_manifest,
)
from tests.hostile import Case, Outcome, timed
from tests.real_models import real_model

CLASSES = ("models.request", "models.manifest", "models.package")
CLASS = "models"
MAX_BATCH = 16
CHUNK = 512
SR = np.array(16000, np.int64)


def good_feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input": (rng.standard_normal((batch, CHUNK)) * 0.1).astype(np.float32),
        "state": (rng.standard_normal((2, batch, 128)) * 0.1).astype(np.float32),
        "sr": SR,
    }


def _self_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_hwm_mb(pid: int) -> float | None:
    """Peak RSS of a process so far (VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ----------------------------------------------------------------- requests


def request_cases() -> list[tuple[Case, dict[str, np.ndarray]]]:
    k = "models.request"
    mismatch = ("input.mismatch",)
    ok = good_feeds(2)
    f32, i64 = np.float32, np.int64
    out: list[tuple[Case, dict[str, np.ndarray]]] = []

    def add(name: str, feeds: dict[str, np.ndarray], expect: tuple[str, ...] = mismatch) -> None:
        out.append((Case(k, name, expect), feeds))

    # The batch on the wrong axis, or disagreeing between inputs.
    add("state-batch-on-axis-0", {**ok, "input": np.zeros((3, CHUNK), f32),
                                  "state": np.zeros((3, 2, 128), f32)})  # fmt: skip
    add("state-transposed", {**ok, "state": np.zeros((128, 2, 2), f32)})
    for n in (1, 3, 7):
        add(f"state-batch-{n}-vs-input-2", {**ok, "state": np.zeros((2, n, 128), f32)})
        add(f"input-batch-{n}-vs-state-2", {**ok, "input": np.zeros((n, CHUNK), f32)})
    add("empty-batch", {**ok, "input": np.zeros((0, CHUNK), f32), "state": np.zeros((2, 0, 128), f32)})  # fmt: skip
    add("empty-state-batch-only", {**ok, "state": np.zeros((2, 0, 128), f32)})
    add("over-max-batch", good_feeds(MAX_BATCH + 1), ("request.too_large",))
    # Wrong ranks: sr is 0-d, state is 3-d, input is 2-d.
    for shape in [(1,), (2,), (1, 1), (0,)]:
        add(f"sr-shape-{list(shape)}", {**ok, "sr": np.full(shape, 16000, i64)})
    for shape in [(2, 128), (2, 2, 128, 1), (2 * 2 * 128,), ()]:
        add(f"state-rank-{len(shape)}", {**ok, "state": np.zeros(shape, f32)})
    for shape in [(2,), (2, CHUNK, 1), ()]:
        add(f"input-rank-{len(shape)}", {**ok, "input": np.zeros(shape, f32)})
    add("state-fixed-dim-wrong", {**ok, "state": np.zeros((3, 2, 128), f32)})
    add("state-last-dim-wrong", {**ok, "state": np.zeros((2, 2, 127), f32)})
    # Wrong dtypes.
    for dtype in (np.float64, np.float16, np.int32, np.uint8, np.bool_):
        add(f"sr-{np.dtype(dtype).name}", {**ok, "sr": np.array(1, dtype)})
        add(f"state-{np.dtype(dtype).name}", {**ok, "state": ok["state"].astype(dtype)})
    # Missing and unknown inputs.
    add("no-sr", {k2: v for k2, v in ok.items() if k2 != "sr"})
    add("no-state", {k2: v for k2, v in ok.items() if k2 != "state"})
    add("extra-input", {**ok, "h": np.zeros((2, 128), f32)})
    return out


def run_requests(agent: AgentProcess) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with agent.client() as client:
        for case, feeds in request_cases():

            def judge(feeds: dict[str, np.ndarray] = feeds) -> tuple[str | None, str]:
                try:
                    client.infer("silero-vad", feeds, binary=True)
                except ApiError as exc:
                    return exc.code, str(exc.body.get("error", ""))
                return None, "accepted"

            outcome = timed(case, judge)
            outcome.peak_rss_mb = _vm_hwm_mb(agent.proc.pid)
            outcomes.append(outcome)
    return outcomes


# ----------------------------------------------------------------- manifests


def manifest_cases() -> list[tuple[Case, int, object]]:
    """(case, which input, batch_axis value) for silero-vad's manifest."""
    k = "models.manifest"
    schema = ("bundle.schema",)
    out: list[tuple[Case, int, object]] = []
    values: list[tuple[str, int, object]] = [
        ("state-axis-3", 1, 3),
        ("state-axis-99", 1, 99),
        ("state-axis-huge", 1, 2**63),
        ("state-axis-negative", 1, -1),
        ("state-axis-minus-2", 1, -2),
        ("state-axis-fixed-0", 1, 0),
        ("state-axis-fixed-2", 1, 2),
        ("state-axis-true", 1, True),
        ("state-axis-false", 1, False),
        ("state-axis-string", 1, "1"),
        ("state-axis-float", 1, 1.0),
        ("state-axis-list", 1, [1]),
        ("state-axis-object", 1, {"axis": 1}),
        ("sr-axis-0", 2, 0),
        ("sr-axis-string-none", 2, "none"),
        ("input-axis-2", 0, 2),
    ]
    for name, index, value in values:
        out.append((Case(k, name, schema), index, value))
    return out


def run_manifests(bundle: Path, workdir: Path) -> list[Outcome]:
    import tarfile

    key = load_private_key(DEMO_KEY)
    trusted = [load_public_key(DEMO_PUB)]
    members: list[tuple[str, bytes]] = []
    with tarfile.open(bundle) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info)
            assert data is not None
            members.append((info.name, data.read()))
    manifest = json.loads(dict(members)["manifest.json"])
    files = [(n, d) for n, d in members if n not in ("manifest.json", "manifest.sig")]
    outcomes = []
    for case, index, value in manifest_cases():
        body = json.loads(json.dumps(manifest))
        body["inputs"][index]["batch_axis"] = value
        path = raw_tar(
            workdir / f"{case.name}.edgebundle",
            [*signed_manifest(body, key), *(file_info(n, d) for n, d in files)],
        )

        def judge(path: Path = path) -> tuple[str | None, str]:
            try:
                verify_bundle(path, trusted)
            except BundleError as exc:
                return exc.code, str(exc)
            return None, "accepted"

        outcome = timed(case, judge)
        outcome.peak_rss_mb = _self_rss_mb()
        outcomes.append(outcome)
    return outcomes


# ----------------------------------------------------------------- the packager


def package_cases(workdir: Path) -> list[tuple[Case, list[str]]]:
    k = "models.package"
    refused = ("package.refused",)
    ok = good_feeds(3)
    samples: dict[str, dict[str, np.ndarray] | bytes] = {
        "sr-batched": {**ok, "sr": np.full((3,), 16000, np.int64)},
        "sr-float": {**ok, "sr": np.array(16000.0, np.float32)},
        "state-batch-axis-0": {**ok, "state": np.zeros((3, 2, 128), np.float32)},
        "state-batch-disagrees": {**ok, "state": np.zeros((2, 4, 128), np.float32)},
        "empty-batch": {
            **ok,
            "input": np.zeros((0, CHUNK), np.float32),
            "state": np.zeros((2, 0, 128), np.float32),
        },
        "missing-sr": {n: v for n, v in ok.items() if n != "sr"},
        "extra-input": {**ok, "h": np.zeros((3,), np.float32)},
        "input-0-d": {**ok, "input": np.array(0.5, np.float32)},
        "not-an-npz": b"PK\x03\x04 this is not a zip archive at all",
        "truncated-npz": b"",  # filled below from a real npz, cut short
        "empty-file": b"",
    }
    good = workdir / "good.npz"
    np.savez(good, **ok)  # type: ignore[arg-type]
    samples["truncated-npz"] = good.read_bytes()[: good.stat().st_size // 2]
    np.savez_compressed(workdir / "z.npz", **ok)  # type: ignore[arg-type]
    zipped = bytearray((workdir / "z.npz").read_bytes())
    zipped[len(zipped) // 3 : len(zipped) // 3 + 64] = bytes(64)  # a corrupt deflate stream
    samples["corrupt-compressed-npz"] = bytes(zipped)
    samples["pickled-object"] = {**ok, "sr": np.array([{"rate": 16000}], dtype=object)}
    samples["one-npy-for-three-inputs"] = b""  # written below as an .npy
    out: list[tuple[Case, list[str]]] = []
    axes = ["--batch-axis", "state=1", "--batch-axis", "stateN=1"]
    for name, sample in samples.items():
        path = workdir / f"{name}.npz"
        if name == "one-npy-for-three-inputs":
            path = workdir / f"{name}.npy"
            np.save(path, ok["input"])
        elif isinstance(sample, bytes):
            path.write_bytes(sample)
        else:
            np.savez(path, **sample)  # type: ignore[arg-type]
        out.append((Case(k, f"sample-{name}", refused), ["--sample", str(path), *axes]))
    for flag in ["state", "state=", "=1", "state=one", "state=1.5", "state=-1", "state=3",
                 "state=0", "sr=0", "nope=1", "stateN=7"]:  # fmt: skip
        args = ["--sample", str(good), "--batch-axis", flag]
        if not flag.startswith("state"):
            args += ["--batch-axis", "state=1"]
        if not flag.startswith("stateN"):
            args += ["--batch-axis", "stateN=1"]
        out.append((Case(k, f"flag-{flag}", refused), args))
    out.append((Case(k, "state-axis-left-to-guess", refused), ["--sample", str(good)]))
    out.append((Case(k, "stateN-axis-left-to-legacy", refused),
                ["--sample", str(good), "--batch-axis", "state=1"]))  # fmt: skip
    out.append((Case(k, "flag-twice", refused), ["--sample", str(good), *axes, *axes]))
    return out


@contextlib.contextmanager
def _captured() -> Iterator[io.StringIO]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        yield err


def run_package(onnx: Path, workdir: Path) -> list[Outcome]:
    """The real CLI entry point, in this process (a child per case would take minutes)."""
    from export.cli import main

    out_dir = workdir / "dist"
    outcomes = []
    for case, args in package_cases(workdir):
        argv = ["package", str(onnx), "--name", "vad", "--version", "1", "--key", str(DEMO_KEY),
                "--out", str(out_dir), *args]  # fmt: skip

        def judge(argv: list[str] = argv) -> tuple[str | None, str]:
            with _captured() as err:
                try:
                    rc = main(argv)
                except SystemExit as exc:  # argparse's own refusals
                    rc = int(exc.code or 0)
                except Exception as exc:  # a crash: what the corpus exists to catch
                    return f"crash:{type(exc).__name__}", str(exc)
            text = err.getvalue().strip()
            if rc == 2 and text.startswith("error: ") and len(text.splitlines()) == 1:
                return "package.refused", text
            return (None if rc == 0 else f"exit:{rc}"), text

        outcome = timed(case, judge)
        outcome.peak_rss_mb = _self_rss_mb()
        outcomes.append(outcome)
    if list(out_dir.glob("*.edgebundle")):
        raise AssertionError(f"a refused packaging left a bundle: {list(out_dir.iterdir())}")
    return outcomes


# ----------------------------------------------------------------- all of it


def silero_bundle(workdir: Path) -> Path:
    from export.package import package_model

    return package_model(
        onnx_path=real_model("silero_vad", workdir),
        tflite_path=None,
        name="silero-vad",
        version="6.2.3",
        golden_inputs=good_feeds(3),
        key_path=DEMO_KEY,
        out_dir=workdir,
        runs=5,
        batch_axes={"state": 1, "stateN": 1},
    )


def run_corpus(workdir: Path) -> list[Outcome]:
    """Every case of the three classes; `workdir` must be short (a Unix socket lives there)."""
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = silero_bundle(workdir)
    outcomes = run_manifests(bundle, workdir)
    outcomes += run_package(real_model("silero_vad", workdir), workdir)
    config = base_config(workdir, bundle=bundle, api=f"max_batch_size = {MAX_BATCH}")
    with running_agent(workdir, config) as agent:
        outcomes += run_requests(agent)
    return outcomes
