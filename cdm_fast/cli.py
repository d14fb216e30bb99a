"""The `cdm-fast` command (also `python -m cdm_fast`): parses arguments, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _doctor(args: argparse.Namespace) -> int:
    from cdm_fast.doctor import format_report, report

    data = report()
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    return 0


def _score(args: argparse.Namespace) -> int:
    from cdm_fast.scoring import ScoreConfig, run_score

    run_score(
        ScoreConfig(
            model=args.model,
            prompts=args.prompts,
            out=args.out,
            num_prompts=args.num_prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            noise_scale=args.noise_scale,
            noise_samples=args.noise_samples,
            threshold=args.threshold,
            chat_template=args.chat_template,
            plot=args.plot,
            progress=not args.no_progress,
        )
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cdm_fast.scoring import DemoConfig, run_demo

    run_demo(
        DemoConfig(
            out_dir=args.out_dir,
            num_prompts=args.num_prompts,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            progress=not args.no_progress,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdm-fast", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log dispatch decisions (INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="versions, device, and which backend serves each op")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(run=_doctor)

    score = commands.add_parser("score", help="CDM and its parts for each prompt of a JSONL file")
    score.add_argument("--model", default="smollm2-135m", help="embedded name, local HF folder or hub id")
    score.add_argument("--prompts", help="JSONL with a 'prompt' field (default: logic-suite prompts)")
    score.add_argument("--out", default="runs/score/scores.jsonl", help="JSON lines, one per prompt")
    score.add_argument("--num-prompts", type=int, default=64, help="logic-suite prompts when no --prompts")
    score.add_argument("--max-new-tokens", type=int, default=32)
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--noise-scale", type=float, default=0.1, help="relative norm of the residual noise")
    score.add_argument("--noise-samples", type=int, default=4)
    score.add_argument("--threshold", type=float, default=80.0, help="CDM at which a prompt is deep")
    score.add_argument("--chat-template", action="store_true", help="wrap prompts in the chat template")
    score.add_argument("--plot", help="write a PNG histogram of CDM and its parts")
    score.add_argument("--no-progress", action="store_true")
    score.set_defaults(run=_score)

    demo = commands.add_parser("demo", help="the main job on the embedded model, offline, on a CPU")
    demo.add_argument("--out-dir", default="runs/demo")
    demo.add_argument("--num-prompts", type=int, default=7)
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
