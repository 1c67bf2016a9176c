"""edge-export: make keys, package existing models, build from a recipe."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from agent.bundle import BundleError
from agent.signing import KeyFileError, generate_keypair

log = logging.getLogger("edge-export")


def _keygen(args: argparse.Namespace) -> int:
    private = Path(args.out) / f"{args.name}.key"
    public = Path(args.out) / f"{args.name}.pub"
    if private.exists() and not args.force:
        print(f"error: {private} exists; pass --force to replace it", file=sys.stderr)
        return 2
    if args.force:
        private.unlink(missing_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    kid = generate_keypair(private, public)
    print(f"wrote {private} (keep secret) and {public} (give to devices); key id {kid}")
    return 0


def _package(args: argparse.Namespace) -> int:
    from export.measure import MeasureError
    from export.package import (
        PackageError,
        load_golden_inputs,
        onnx_specs,
        package_model,
        parse_batch_axes,
        parse_variant_arg,
        tflite_specs,
    )

    onnx_path = tflite_path = None
    for model in args.models:
        suffix = Path(model).suffix.lower()
        if suffix == ".onnx":
            onnx_path = Path(model)
        elif suffix == ".tflite":
            tflite_path = Path(model)
        else:
            print(f"error: {model}: expected a .onnx or .tflite file", file=sys.stderr)
            return 2
    try:
        axes = parse_batch_axes(args.batch_axis)
        if onnx_path is not None and onnx_path.is_file():
            specs = onnx_specs(onnx_path, axes)[0]
        elif tflite_path is not None and tflite_path.is_file():
            specs = tflite_specs(tflite_path, axes)[0]
        else:
            missing = onnx_path or tflite_path
            raise PackageError(f"model file {missing} does not exist")
        variants = [parse_variant_arg(v) for v in args.variant or []]
        golden = load_golden_inputs(Path(args.golden_inputs), specs)
        labels = None
        if args.labels:
            labels = [x.strip() for x in Path(args.labels).read_text().splitlines() if x.strip()]
        out = package_model(
            onnx_path=onnx_path,
            tflite_path=tflite_path,
            name=args.name,
            version=args.version,
            golden_inputs=golden,
            key_path=Path(args.key),
            out_dir=Path(args.out),
            labels=labels,
            atol=args.atol,
            rtol=args.rtol,
            batch_axes=axes,
            variants=variants,
            int8_atol=args.int8_atol,
        )
    except (PackageError, MeasureError, KeyFileError, BundleError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _build(argv: list[str]) -> int:
    try:
        from export.pipeline.build import main as build_main
    except ImportError as exc:
        print(
            f"error: the build pipeline needs the export extra ({exc}); "
            "pip install 'edgerun[export]'",
            file=sys.stderr,
        )
        return 2
    return build_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "build":
        return _build(argv[1:])
    parser = argparse.ArgumentParser(prog="edge-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build a bundle from a recipe (see edge-export build --help)")

    kg = sub.add_parser("keygen", help="make an ed25519 signing key pair")
    kg.add_argument("--name", default="edgerun-signing", help="file stem for NAME.key/NAME.pub")
    kg.add_argument("--out", default=".", help="directory to write the keys to")
    kg.add_argument("--force", action="store_true", help="replace an existing key")
    kg.set_defaults(func=_keygen)

    pk = sub.add_parser("package", help="package an existing ONNX and/or TFLite model")
    pk.add_argument("models", nargs="+", metavar="MODEL", help="MODEL.onnx [MODEL.tflite]")
    pk.add_argument("--name", required=True)
    pk.add_argument("--version", required=True)
    pk.add_argument(
        "--golden-inputs",
        "--sample",
        required=True,
        help="representative inputs: .npy (one input) or .npz keyed by input name; "
        "they become the golden cases and drive the latency and memory measurements",
    )
    pk.add_argument("--key", required=True, help="private key from edge-export keygen")
    pk.add_argument("--out", default=".", help="directory for NAME-VERSION.edgebundle")
    pk.add_argument("--labels", help="text file, one label per line")
    pk.add_argument("--atol", type=float, help="golden tolerance (absolute)")
    pk.add_argument("--rtol", type=float, help="golden tolerance (relative)")
    pk.add_argument(
        "--variant",
        action="append",
        metavar="ID=PATH[,precision=P][,method=M][,built_for=T]",
        help="another build of the same model (repeatable): a multi-variant bundle; the "
        "MODEL files are variants too (ids 'onnx', 'tflite'); precision fp32|fp16|int8|mixed, "
        "method static|dynamic|qat|mixed",
    )
    pk.add_argument("--int8-atol", type=float, help="golden tolerance of int8/mixed variants")
    pk.add_argument(
        "--batch-axis",
        action="append",
        metavar="NAME=AXIS",
        help="the axis of tensor NAME that counts cases, or NAME=none for a tensor all "
        "cases share (repeatable; default: a dim named like batch/N/B, else axis 0 "
        "when it is dynamic)",
    )
    pk.set_defaults(func=_package)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
