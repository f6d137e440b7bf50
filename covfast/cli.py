"""covfast command line: ``covfast infer``, ``info``, ``build-engine``, ``benchmark``, ``evaluate-slices``.

A thin layer over :mod:`covfast.api`; heavy imports happen inside the commands so ``--help`` is instant.
Exit codes: 0 ok, 2 usage, 3 bad input or unwritable output, 1 internal error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from covfast import __version__
from covfast.errors import EXIT_BAD_INPUT, EXIT_OK, CovfastError, UsageError

# covfast.engine.ENGINES, spelled out so that building the parser does not import torch (a test checks they agree).
ENGINE_CHOICES = ("auto", "torch", "onnx", "tensorrt")
PRECISION_CHOICES = ("fp32", "fp16", "bf16", "int8")  # covfast.engine.runtime.PRECISIONS
TTA_CHOICES = ("none", "h", "hv")  # covfast.pipeline.infection.TTA_CHOICES
TTA_HELP = ("test-time augmentation of the infection networks: also run each slice flipped horizontally (h) or "
            "horizontally and vertically (hv) and average (default: h)")
NO_ENSEMBLE_HELP = ("run the Inf-Net alone instead of averaging it with the installed U-Net partner (fewer network "
                    "passes, lower Dice)")

INFER_EXAMPLE = """example:
  covfast infer scan.nii.gz -o out/          # writes out/scan/{report.json,lung_mask.nii.gz,infection_mask.nii.gz,preview.png}
  covfast infer dicom_folder/ other.nii.gz -o out/ --device cpu
  covfast infer scan.nii.gz -o out/ --engine onnx  # onnxruntime (pip install covfast[onnx])
  covfast infer "$(python -c 'import covfast.io; print(covfast.io.sample_path())')" -o out/
"""


def _workers(text: str):
    """``auto`` or a positive integer (the --workers option)."""
    return text if text == "auto" else _positive_int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covfast", description="Fast, quantified COVID-19 reports from chest CT.")
    parser.add_argument("--version", action="version", version=f"covfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    infer = sub.add_parser(
        "infer",
        help="lung and infection masks, percent infected, severity for CT volumes",
        description="Quantify COVID-19 infection in chest CT volumes (NIfTI files or DICOM series folders).",
        epilog=INFER_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    infer.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="a .nii/.nii.gz file, a DICOM series folder, or a folder of such inputs",
    )
    infer.add_argument(
        "-o",
        "--out",
        default="covfast_out",
        metavar="OUT",
        help="output folder; one subfolder per input (default: covfast_out)",
    )
    infer.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where the networks and the volume steps run (auto: a CUDA GPU when torch sees one)")
    infer.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default="auto",
        help="inference engine of the infection networks; auto: TensorRT, torch on CUDA, onnxruntime, torch on CPU, "
        "the first available (report.json records what ran)",
    )
    infer.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        help="precision of the infection networks (default: the cached TensorRT engine's on a GPU; int8 in "
        "onnxruntime on a CPU with 8-bit dot products (VNNI), else fp32); bf16 / fp16 run torch under autocast "
        "(or TensorRT); int8 is onnxruntime on the CPU, quantized once per model and cached",
    )
    infer.add_argument("--tta", choices=TTA_CHOICES, help=TTA_HELP)
    infer.add_argument("--no-ensemble", action="store_true", help=NO_ENSEMBLE_HELP)
    infer.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                       help="slices per network batch (default: 8 on the CPU, 32 on a GPU)")
    infer.add_argument(
        "--infection-mask",
        metavar="PATH",
        help="NIfTI infection mask (0/1 or 0/1/2) on the input's grid, used instead of the network",
    )
    infer.add_argument("--series", metavar="UID", help="SeriesInstanceUID to use from a DICOM folder with several")
    infer.add_argument("--no-preview", action="store_true", help="do not draw preview.png")
    infer.add_argument("--save-probabilities", action="store_true",
                       help="also write infection_prob.nii.gz: the network's infection probability on the input's "
                            "grid (uint8 p x 255 with scl_slope 1/255, so NIfTI readers return p)")
    infer.add_argument("--dicom-seg", action="store_true",
                       help="also write segmentation.dcm for DICOM inputs: the lungs and the infection as a DICOM SEG "
                            "that references the input series, for PACS viewers (needs pip install 'covfast[dicom]')")
    infer.add_argument(
        "--workers", type=_workers, default="auto", metavar="N|auto",
        help="volumes computed at once in worker processes that share the GPU (default auto: on a GPU three per four "
        "CPU cores, as host memory allows at 3 GB and GPU memory at 2 GB each; on a CPU 1)",
    )
    infer.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    infer.set_defaults(func=cmd_infer)

    info = sub.add_parser("info", help="version, compiled extensions, backends, devices, installed models")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    engine = sub.add_parser(
        "build-engine",
        help="export the shipped models to ONNX and build TensorRT engines (when tensorrt is installed)",
        description="Export the shipped models to ONNX and build TensorRT engines when tensorrt and a CUDA GPU are "
        "available. --precision int8 instead quantizes the ONNX graphs for onnxruntime on the CPU.",
        epilog="example:\n  covfast build-engine --precision fp16 --max-batch 32\n  covfast build-engine --precision int8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    engine.add_argument("--precision", choices=PRECISION_CHOICES, default="fp16")
    engine.add_argument("--max-batch", type=_positive_int, default=32, metavar="N", help="largest batch of the profile")
    engine.add_argument(
        "--out", metavar="DIR", help="engine cache folder (default: $COVFAST_ENGINE_DIR or ~/.cache/covfast/engines)"
    )
    engine.set_defaults(func=cmd_build_engine)

    bench = sub.add_parser(
        "benchmark",
        help="time the whole pipeline per stage on one input (default: the shipped sample)",
        description="Run covfast on INPUT once to warm up, then --runs times, and report the median and minimum "
        "seconds of each stage and end to end, peak memory, the device, versions, date and this command.",
        epilog="example:\n  covfast benchmark --runs 5 --json bench.json\n"
        "  covfast benchmark /data/P001 --device cuda --engine tensorrt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("input", nargs="?", metavar="INPUT", help="a NIfTI file or DICOM folder (default: the sample)")
    bench.add_argument("--runs", type=_positive_int, default=3, metavar="N", help="timed runs after the warm-up")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--engine", choices=ENGINE_CHOICES, default="auto")
    bench.add_argument("--precision", choices=PRECISION_CHOICES, help="as for covfast infer")
    bench.add_argument("--tta", choices=TTA_CHOICES, help="as for covfast infer")
    bench.add_argument("--no-ensemble", action="store_true", help="as for covfast infer")
    bench.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                       help="slices per network batch (default: 8 on the CPU, 32 on a GPU)")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.set_defaults(func=cmd_benchmark)

    evaluate = sub.add_parser(
        "evaluate-slices",
        help="score the shipped models on 2D slices (Inf-Net COVID-SemiSeg layout)",
        epilog="example:\n  covfast evaluate-slices --images Imgs/ --masks GT/ --task infection --json scores.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--images", required=True, metavar="DIR", help="folder of slice images (JPG/PNG)")
    evaluate.add_argument("--masks", required=True, metavar="DIR", help="folder of ground-truth masks (PNG)")
    evaluate.add_argument("--task", choices=("infection", "multiclass", "instances"), default="infection")
    evaluate.add_argument("--json", metavar="FILE", help="write the scores as JSON")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--tta", choices=TTA_CHOICES, help=TTA_HELP)
    evaluate.add_argument("--no-ensemble", action="store_true", help=NO_ENSEMBLE_HELP)
    evaluate.add_argument("--weights", metavar="DIR",
                          help="folder of weights with their model cards to score (default: the installed models)")
    evaluate.set_defaults(func=cmd_evaluate_slices)
    return parser


def _output_name(path: str, taken: set[str]) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".dcm", ".DCM", ".dicom"):
        name = name.removesuffix(suffix)
    name = name or "volume"
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}_{n}", n + 1
    taken.add(unique)
    return unique


def _summary_line(name: str, report: dict, out_dir: Path) -> str:
    lung = report["lung_volume_ml"]["total"]
    pct = report["percent_infected"]["volumetric"]
    if lung == 0:
        return f"{name}: no lung found -> {out_dir}"
    if pct is None:
        return f"{name}: lung {lung:.0f} mL; infection not quantified (no model, no --infection-mask) -> {out_dir}"
    infected = report["infected_volume_ml"]["total"]
    diagnosis = report.get("diagnosis") or {}
    call = f", looks {diagnosis['label']} (experimental)" if diagnosis.get("label") else ""
    return (
        f"{name}: lung {lung:.0f} mL, infected {infected:.1f} mL ({pct:.1f} %), "
        f"{report['severity']['ct_class']}{_pattern(report)}{call} -> {out_dir}"
    )


def _pattern(report: dict) -> str:
    from covfast.pipeline.distribution import pattern_phrase

    phrase = pattern_phrase(report)
    return f", {phrase}" if phrase else ""


class _SliceProgress:
    """Progress bar over the infection network's slices, created on the first report and closed after the input."""

    def __init__(self, name: str, disable: bool):
        self.name = name
        self.disable = disable
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.disable:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{self.name}: infection", unit="slice", leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)
        if done >= total:  # the network is done; the input's outputs are still being written
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _load_engines(engine: str, device: str, precision: str | None, ensemble: bool = True) -> None:
    """Choose and load the infection networks' engines before any input is read, so that an unavailable
    ``--engine onnx`` or ``tensorrt`` is one usage error (exit 2) with nothing written (``auto`` and ``torch`` always
    find an engine); without installed weights the pipeline notes it."""
    from covfast.errors import ModelNotInstalledError
    from covfast.pipeline.infection import infection_engines

    try:
        infection_engines(engine, device, precision=precision, ensemble=ensemble)
    except ModelNotInstalledError:
        pass


def cmd_infer(args) -> int:
    from tqdm import tqdm

    from covfast.api import default_workers, infer, infer_many
    from covfast.errors import OutputError
    from covfast.io import find_inputs
    from covfast.pipeline.run import resolve_device
    from covfast.report import summary

    out_root = Path(args.out)
    if out_root.exists() and not out_root.is_dir():
        raise OutputError(out_root, "exists and is not a folder")
    if args.infection_mask and len(args.inputs) > 1:
        raise UsageError("--infection-mask applies to a single input")
    device = resolve_device(args.device)
    if args.dicom_seg:
        from covfast.report.dicom_seg import require_highdicom

        require_highdicom()
    inputs = find_inputs(args.inputs)
    summary.read(out_root / summary.FILENAME)  # an existing file that is not our table stops the run before any work
    _show_progress_messages(not args.quiet)
    if (args.engine in ("onnx", "tensorrt") or args.precision) and not args.infection_mask:
        _load_engines(args.engine, device, args.precision, not args.no_ensemble)
    taken: set[str] = set()
    names = [_output_name(path, taken) for path in inputs]
    slices = [_SliceProgress(name, disable=args.quiet) for name in names]
    options = {"series": args.series, "device": device, "batch_size": args.batch_size,
               "preview": not args.no_preview, "save_probabilities": args.save_probabilities,
               "dicom_seg": args.dicom_seg,
               "engine": args.engine, "precision": args.precision, "tta": args.tta, "ensemble": not args.no_ensemble}
    if args.infection_mask:
        outcomes = [(0, infer(inputs[0], out_dir=out_root / names[0], infection_mask=args.infection_mask, **options))]
    else:
        workers = default_workers(device, len(inputs)) if args.workers == "auto" else args.workers
        outcomes = infer_many(inputs, [out_root / name for name in names], progress=slices.__getitem__,
                              workers=workers, **options)
    failures = 0
    rows = []
    bar = tqdm(total=len(inputs), desc="covfast", unit="volume", disable=args.quiet or len(inputs) < 2,
               file=sys.stderr)
    for index, outcome in outcomes:
        slices[index].close()
        bar.update(1)
        if isinstance(outcome, CovfastError):
            if len(inputs) == 1:
                raise outcome
            failures += 1
            tqdm.write(f"covfast: error: {outcome}", file=sys.stderr)
            continue
        for note in outcome.report["notes"]:
            tqdm.write(f"covfast: note: {names[index]}: {note}", file=sys.stderr)
        tqdm.write(_summary_line(names[index], outcome.report, out_root / names[index]))
        rows.append(summary.row(names[index], outcome.report))
    bar.close()
    if rows:
        summary.update(out_root, rows)
    return EXIT_BAD_INPUT if failures else EXIT_OK


def _show_progress_messages(show: bool) -> None:
    """Send covfast's own log messages (e.g. a one-time ONNX export that takes seconds) to stderr unless quiet."""
    logger = logging.getLogger("covfast")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("covfast: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if show else logging.WARNING)


def cmd_info(args) -> int:
    import json

    from covfast.info import collect_info, format_info

    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return EXIT_OK


def cmd_build_engine(args) -> int:
    import json

    from covfast.engine import build_engine

    print(json.dumps(build_engine(args.precision, args.max_batch, args.out), indent=2, default=str))
    return EXIT_OK


def cmd_benchmark(args) -> int:
    import json
    import shlex

    from covfast.benchmark import format_benchmark, run_benchmark
    from covfast.io import sample_path

    command = shlex.join(["covfast", *(args.argv if args.argv is not None else sys.argv[1:])])
    result = run_benchmark(args.input or sample_path(), runs=args.runs, device=args.device, engine=args.engine,
                           batch_size=args.batch_size, command=command, precision=args.precision, tta=args.tta,
                           ensemble=not args.no_ensemble)
    print(format_benchmark(result))
    if args.json:
        from covfast.io.atomic import atomic_write

        text = json.dumps(result, indent=2) + "\n"
        atomic_write(args.json, lambda file: file.write(text.encode()))
    return EXIT_OK


def cmd_evaluate_slices(args) -> int:
    import json

    from covfast.evaluate import evaluate_slices
    from covfast.pipeline.run import resolve_device

    for flag, folder in (("--images", args.images), ("--masks", args.masks), ("--weights", args.weights)):
        if folder is not None and not Path(folder).is_dir():
            raise UsageError(f"{flag} {folder}: not a folder")
    scores = evaluate_slices(
        args.images, args.masks, task=args.task, json_path=args.json, device=resolve_device(args.device),
        weights_dir=args.weights, tta=args.tta, ensemble=not args.no_ensemble,
    )
    summary = {k: v for k, v in scores.items() if k not in ("per_image",)}
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    if argv is None and code == EXIT_OK:
        _exit_now(code)
    return code


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except CovfastError as exc:
        print(f"covfast: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("covfast: interrupted", file=sys.stderr)
        return 130


def _exit_now(code: int) -> None:
    """End a successful command-line run without the interpreter's shutdown.

    Every output is complete and in place when a command returns 0, and the shutdown only costs time: its final
    garbage collection over torch's, scipy's and matplotlib's objects takes ~0.8 s of a ~7 s run (measured on the
    sample) and frees nothing the OS would not. (Freezing the objects instead made triton >= 3.9, which torch
    imports, report every frozen object as a leak on stderr.) Failed runs take the normal exit, so background writers
    finish or clean up their staging folders first.
    """
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
