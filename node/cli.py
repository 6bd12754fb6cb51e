"""``ich-node``: the command line. Each verb parses its flags and calls one function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from node.config import ConfigError, NodeConfig, load_config, parse_destination

LOGGER = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="config file (YAML); defaults apply without")
    parser.add_argument("--spool", type=Path, help="spool folder (overrides spool.path)")


def _weights_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, action="append", metavar="WEIGHTS.pt",
                        help="use these weights instead of the configured ones (repeatable: a "
                        "classifier and/or a segmenter; the JSON sidecar beside each file says "
                        "which, and its input size and neighbours apply)")


def _weights_overrides(weights: Sequence[Path] | None, no_fusion: bool) -> dict[str, Any]:
    """``pipeline.models`` overrides for ``--weights`` and ``--no-fusion``: each file in
    place of the configured file of its kind (read from its sidecar), with that file's input
    size and neighbours. ConfigError for a missing or unreadable sidecar or two files of
    one kind."""
    models: dict[str, Any] = {"fusion": None} if no_fusion else {}
    if not weights:
        return models
    from pipeline.errors import PipelineError  # torch: only when --weights is given
    from pipeline.models.weights import read_meta

    for path in weights:
        try:
            meta = read_meta(path)
        except PipelineError as exc:
            raise ConfigError(f"--weights {path}: {exc}") from exc
        if f"{meta.kind}_weights" in models:
            raise ConfigError(f"--weights names two {meta.kind} files: "
                              f"{models[f'{meta.kind}_weights']} and {path}")
        models[f"{meta.kind}_weights"] = str(path.resolve())
        models[f"{meta.kind}_input_size"] = meta.spec.size
        models[f"{meta.kind}_neighbours"] = meta.spec.neighbours
    return models


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(prog="ich-node", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = verbs.add_parser("run", help="start the DICOM node")
    _common(run)
    run.add_argument("--port", type=int, help="DICOM port (dicom.port)")
    run.add_argument("--ae-title", help="our AE title (dicom.ae_title)")
    run.add_argument("--destination", action="append", metavar="AET@HOST:PORT",
                     help="send results here (repeatable; replaces configured destinations)")
    run.add_argument("--quiet-seconds", type=float, help="assembly.quiet_seconds")

    echo = verbs.add_parser("echo", help="C-ECHO a configured destination")
    _common(echo)
    echo.add_argument("name", help="destination name")

    status = verbs.add_parser("status", help="series, jobs and outbound queue")
    _common(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--limit", type=int, default=50, help="series to list (default 50)")

    resend = verbs.add_parser("resend", help="send a study's results again (and its dead "
                              "notifications)")
    _common(resend)
    resend.add_argument("study_uid", metavar="STUDY_UID")

    config = verbs.add_parser("config", help="print the effective configuration, commented")
    _common(config)
    config.add_argument("--defaults", action="store_true",
                        help="print the defaults (what config.yaml holds) instead")

    phantom = verbs.add_parser("phantom", help="write synthetic head-CT studies with labels")
    _common(phantom)
    phantom.add_argument("--out", type=Path, required=True, help="output folder")
    phantom.add_argument("--n", type=int, default=1, help="number of studies (default 1)")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    phantom.add_argument("--subtypes", nargs="+", metavar="SUBTYPE",
                         help="hemorrhage subtypes in every study (default: random, about "
                              "half the studies negative); 'none' for negatives")
    phantom.add_argument("--slices", type=int, help="slices per study (default: random 20-300)")
    phantom.add_argument("--matrix", type=int, default=512, help="rows = columns (default 512)")
    phantom.add_argument("--layout", choices=("dicom", "ctich"), default="dicom",
                         help="DICOM + RSNA CSV + NIfTI masks, or the CT-ICH layout")
    phantom.add_argument("--patient-name", help="PatientName of every study")

    analyze = verbs.add_parser("analyze", help="analyse a folder of DICOM files offline "
                                              "and write the SR, SEG and preview files")
    _common(analyze)
    analyze.add_argument("input_dir", type=Path, metavar="INPUT_DIR")
    analyze.add_argument("--out", type=Path, required=True, metavar="OUT_DIR",
                         help="folder for the result objects")
    analyze.add_argument("--json", action="store_true", help="print the findings as JSON")

    train = verbs.add_parser("train", help="train the classifier or the segmenter")
    _common(train)
    train.add_argument("kind", choices=("classifier", "segmenter"))
    train.add_argument("--data", type=Path, help="dataset folder (not needed for phantom)")
    train.add_argument("--format", dest="fmt", choices=("phantom", "rsna", "ctich"),
                       default="phantom", help="dataset layout (default phantom: generated "
                       "on the fly)")
    train.add_argument("--out", type=Path, required=True, help="run folder (checkpoints)")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--size", type=int, default=128, help="input pixels (default 128)")
    train.add_argument("--steps-per-epoch", type=int, default=0, help="0 = one pass")
    train.add_argument("--n-train", type=int, default=120, help="phantom training studies")
    train.add_argument("--n-val", type=int, default=24, help="phantom validation studies")
    train.add_argument("--matrix", type=int, default=128, help="phantom matrix (default 128)")
    train.add_argument("--crop", type=int, default=0,
                       help="segmenter: train on CROP x CROP pixels of the SIZE grid, around "
                       "blood where a slice has it (default 0: whole slices)")
    train.add_argument("--max-minutes", type=float, default=0.0, help="time budget; 0 = none")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train.add_argument("--init", type=Path, metavar="WEIGHTS.pt",
                       help="start from these weights (same architecture and input spec; "
                       "fine-tuning), e.g. the shipped ones")

    evaluate = verbs.add_parser("evaluate", help="metrics and plots of the configured weights")
    _common(evaluate)
    evaluate.add_argument("--data", type=Path, help="dataset folder (not needed for phantom)")
    evaluate.add_argument("--format", dest="fmt", choices=("phantom", "rsna", "ctich"),
                          default="phantom")
    evaluate.add_argument("--out", type=Path, required=True, help="report folder")
    evaluate.add_argument("--n", type=int, default=40, help="phantom studies (default 40)")
    evaluate.add_argument("--seed", type=int, default=10_000,
                          help="first phantom seed (default 10000, away from training)")
    evaluate.add_argument("--matrix", type=int, default=256, help="phantom matrix")
    _weights_flags(evaluate)
    evaluate.add_argument("--no-fusion", action="store_true",
                          help="the classifier decides alone (models.fusion null)")

    fuse = verbs.add_parser("fuse", help="fit the fusion of classifier and segmenter (series "
                                         "probabilities and operating points) on validation data")
    _common(fuse)
    fuse.add_argument("--data", type=Path, help="dataset folder (not needed for phantom)")
    fuse.add_argument("--format", dest="fmt", choices=("phantom", "rsna", "ctich"),
                      default="phantom")
    fuse.add_argument("--out", type=Path, required=True, metavar="FILE.json",
                      help="fusion file to write: found as fusion.json beside the "
                      "classifier weights (models.fusion 'auto'), else name it in models.fusion")
    fuse.add_argument("--n", type=int, default=60, help="phantom studies (default 60)")
    fuse.add_argument("--seed", type=int, default=1_500_000,
                      help="first phantom seed (default 1500000: neither training nor test)")
    fuse.add_argument("--matrix", type=int, default=256, help="phantom matrix")
    fuse.add_argument("--l2", type=float, default=1.0, help="L2 penalty (default 1)")
    fuse.add_argument("--name", default="ich-fusion", help="name recorded in the file")
    fuse.add_argument("--version", default="0.1.0", help="version recorded in the file")
    _weights_flags(fuse)

    demo = verbs.add_parser("demo", help="node + local result receiver + phantom studies on "
                                         "this machine; prints findings against the truth")
    _common(demo)
    demo.add_argument("--workdir", type=Path, help="working folder (default: a new temp folder)")
    demo.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                      help="studies to send (default: negative and every subtype): negative, "
                           "epidural, subdural, subarachnoid, intraparenchymal, intraventricular")
    demo.add_argument("--seed", type=int, default=1, help="first phantom seed (default 1)")
    demo.add_argument("--slices", type=int, default=24, help="slices per study (default 24)")
    demo.add_argument("--matrix", type=int, default=192, help="rows = columns (default 192)")
    demo.add_argument("--quiet-seconds", type=float, default=2.0,
                      help="assembly quiet period (default 2)")
    demo.add_argument("--timeout", type=float, default=300.0,
                      help="give up waiting for results after this many seconds (default 300)")
    demo.add_argument("--verbose", action="store_true", help="show the node's INFO log")

    volume = verbs.add_parser("volume", help="build the HU volume of a folder of CT instances")
    _common(volume)
    volume.add_argument("input_dir", type=Path, metavar="INPUT_DIR")
    volume.add_argument("--out", type=Path, required=True, metavar="FILE.nii.gz",
                        help="NIfTI file to write")
    volume.add_argument("--json", action="store_true", help="print the reports as JSON")
    return parser


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Defaults < file < environment < flags."""
    overrides: dict[str, Any] = {}
    if args.spool is not None:
        overrides.setdefault("spool", {})["path"] = str(args.spool)
    if getattr(args, "port", None) is not None:
        overrides.setdefault("dicom", {})["port"] = args.port
    if getattr(args, "ae_title", None) is not None:
        overrides.setdefault("dicom", {})["ae_title"] = args.ae_title
    if getattr(args, "quiet_seconds", None) is not None:
        overrides.setdefault("assembly", {})["quiet_seconds"] = args.quiet_seconds
    if getattr(args, "destination", None):
        overrides["destinations"] = [parse_destination(d, i)
                                     for i, d in enumerate(args.destination)]
    models = _weights_overrides(getattr(args, "weights", None), getattr(args, "no_fusion", False))
    if models:
        overrides.setdefault("pipeline", {})["models"] = models
    return load_config(args.config, overrides)


def cmd_run(config: NodeConfig, loader: Callable[[], NodeConfig] | None = None) -> int:
    """``ich-node run``; *loader* re-reads the same sources on SIGHUP."""
    from node.app import Node

    Node(config, loader=loader).serve_forever()
    return 0


def cmd_echo(config: NodeConfig, name: str) -> int:
    """``ich-node echo NAME``."""
    from node.sender import SendError, echo

    dest = config.destination(name)
    try:
        status = echo(config, dest)
    except SendError as exc:
        print(f"echo {name}: {exc}", file=sys.stderr)
        return 1
    print(f"echo {name} ({dest.ae_title}@{dest.host}:{dest.port}): status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_status(config: NodeConfig, as_json: bool, limit: int) -> int:
    """``ich-node status``."""
    from node import status

    try:
        data = status.collect(config.spool.path, limit)
    except FileNotFoundError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(status.to_json(data) if as_json else status.render_text(data))
    return 0


def cmd_resend(config: NodeConfig, study_uid: str) -> int:
    """``ich-node resend STUDY_UID``."""
    from node.db import StateDB
    from node.notify import SqliteNotificationQueue
    from node.sender import SqliteOutboundQueue

    db = StateDB(config.spool.path, create=False)
    try:
        queue = SqliteOutboundQueue(db, config.outbound.max_attempts,
                                    config.outbound.backoff_initial_s, config.outbound.backoff_max_s)
        count = queue.resend_study(study_uid)
        notes = SqliteNotificationQueue.from_config(db, config).resend_dead(study_uid)
    finally:
        db.close()
    if count == 0 and notes == 0:
        print(f"resend: no results for study {study_uid} (not analysed yet, or unknown)",
              file=sys.stderr)
        return 1
    print(f"resend: {count} result sets of study {study_uid} queued again")
    if notes:
        print(f"resend: {notes} dead notifications of study {study_uid} queued again")
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    """``ich-node phantom``: write studies and print one line per study."""
    from pipeline.phantom import write_studies

    subtypes = [] if args.subtypes == ["none"] else args.subtypes
    for study in write_studies(args.out, args.n, args.seed, subtypes, args.slices, args.matrix,
                               args.layout, patient_name=args.patient_name):
        found = ", ".join(f"{k} {v:.1f} mL" for k, v in study.volume_ml.items() if v) or "negative"
        print(f"{study.study_dir}: {study.n_slices} slices, {found}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``ich-node train``."""
    import shlex

    from pipeline.train import train

    result = train(args.kind, args.data, args.fmt, args.out, epochs=args.epochs,
                   batch=args.batch, lr=args.lr, seed=args.seed, size=args.size,
                   resume=args.resume, steps_per_epoch=args.steps_per_epoch,
                   n_train=args.n_train, n_val=args.n_val, matrix=args.matrix,
                   max_minutes=args.max_minutes, device=args.device, crop=args.crop,
                   init=args.init, command="ich-node " + shlex.join(sys.argv[1:]))
    print(result)
    return 0


def cmd_evaluate(args: argparse.Namespace, config: NodeConfig) -> int:
    """``ich-node evaluate``."""
    import json

    from pipeline.errors import PipelineError
    from pipeline.evaluate import evaluate

    try:
        metrics = evaluate(args.data, args.fmt, args.out, config.pipeline.models, n=args.n,
                           seed=args.seed, matrix=args.matrix)
    except (PipelineError, ValueError) as exc:
        print(f"ich-node evaluate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metrics.get("summary", metrics), indent=2, default=str))
    print(f"report: {args.out}")
    return 0


def cmd_fuse(args: argparse.Namespace, config: NodeConfig) -> int:
    """``ich-node fuse``."""
    import json
    import shlex

    from pipeline.errors import PipelineError
    from pipeline.evaluate import fuse

    try:
        fusion = fuse(args.data, args.fmt, args.out, config.pipeline.models, n=args.n,
                      seed=args.seed, matrix=args.matrix, l2=args.l2, name=args.name,
                      version=args.version, command="ich-node " + shlex.join(sys.argv[1:]))
    except (PipelineError, ValueError) as exc:
        print(f"ich-node fuse: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"coefficients": fusion.coefficients,
                      "operating_points": fusion.operating_points,
                      "metrics": fusion.metrics}, indent=2))
    print(f"fusion: {args.out} (used when it lies beside the classifier weights as "
          "fusion.json, models.fusion 'auto'; elsewhere, name it in models.fusion)")
    return 0


def cmd_demo(args: argparse.Namespace, config: NodeConfig) -> int:
    """``ich-node demo``."""
    from node.demo import CASES, run_demo

    cases = args.cases or list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ConfigError(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    return run_demo(config, args.workdir, cases, args.seed, args.slices, args.matrix,
                    args.quiet_seconds, args.timeout, args.verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ich-node`` console script."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"ich-node: {exc}", file=sys.stderr)
        return 2
    from node.logs import setup_logging

    setup_logging(config.logging)
    try:
        if args.verb == "run":
            return cmd_run(config, lambda: config_from_args(args))
        if args.verb == "echo":
            return cmd_echo(config, args.name)
        if args.verb == "status":
            return cmd_status(config, args.json, args.limit)
        if args.verb == "resend":
            return cmd_resend(config, args.study_uid)
        if args.verb == "config":
            from node.configdoc import render

            print(render(NodeConfig() if args.defaults else config), end="")
            return 0
        if args.verb == "phantom":
            return cmd_phantom(args)
        if args.verb == "analyze":
            from pipeline.analyze import analyze_command

            return analyze_command(args.input_dir, args.out, args.json, config.pipeline)
        if args.verb == "train":
            return cmd_train(args)
        if args.verb == "evaluate":
            return cmd_evaluate(args, config)
        if args.verb == "fuse":
            return cmd_fuse(args, config)
        if args.verb == "demo":
            return cmd_demo(args, config)
        if args.verb == "volume":
            from pipeline.volume import volume_command

            return volume_command(args.input_dir, args.out, args.json, config.pipeline)
    except (ConfigError, KeyError, FileNotFoundError) as exc:
        print(f"ich-node {args.verb}: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled verb {args.verb}")


if __name__ == "__main__":
    sys.exit(main())
