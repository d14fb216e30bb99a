"""The `cdm-fast` command (also `python -m cdm_fast`): parses arguments, nothing more."""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import logging
import sys


def _doctor(args: argparse.Namespace) -> int:
    from cdm_fast.doctor import format_report, report

    data = report()
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    return 0


def _config(config_class, args: argparse.Namespace):
    """`config_class` built from the flags named like its fields (`--no-progress` sets progress=False).

    Flags carry the dataclass's defaults (tests/test_cli.py checks that a bare command builds the default
    config), so the fields without a flag keep theirs.
    """
    names = {field.name for field in dataclasses.fields(config_class)}
    values = {name: value for name, value in vars(args).items() if name in names}
    if "progress" in names:
        values["progress"] = not args.no_progress
    return config_class(**values)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(","))


def _unescaped(text: str) -> str:
    return codecs.decode(text, "unicode_escape")


def _names(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _score(args: argparse.Namespace) -> int:
    from cdm_fast.scoring import ScoreConfig, run_score

    run_score(_config(ScoreConfig, args))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cdm_fast.scoring import DemoConfig, run_demo

    run_demo(_config(DemoConfig, args))
    return 0


def _lora_distill(args: argparse.Namespace) -> int:
    from cdm_fast.distill.lora import LoraDistillConfig, run, run_seeds

    config = _config(LoraDistillConfig, args)
    if args.seeds:
        run_seeds(config, args.seeds)
    else:
        run(config)
    return 0


def _cache_latents(args: argparse.Namespace) -> int:
    from cdm_fast.distill import distributed
    from cdm_fast.distill.latents import CacheLatentsConfig, run

    try:
        out = run(_config(CacheLatentsConfig, args))
        is_main = distributed.current_rank() == 0
    finally:
        distributed.shutdown()
    if is_main:
        print(out)
    return 0


def _latent_distill(args: argparse.Namespace) -> int:
    from cdm_fast.distill import distributed
    from cdm_fast.distill.latent import LatentDistillConfig, run

    try:
        report = run(_config(LatentDistillConfig, args))
        is_main = distributed.current_rank() == 0
    finally:
        distributed.shutdown()
    if is_main:
        print(
            f"{args.out}/report.md  held-out perplexity: cache {report['heldout_perplexity']}, "
            f"free text {report['freetext_perplexity']}"
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
    score.add_argument(
        "--stop",
        action="append",
        type=_unescaped,
        help="a string that ends the answer, backslash escapes read ('\\n\\n'); repeat for more "
        "(default: the logic suite's few-shot ones for its own prompts, none for --prompts)",
    )
    score.add_argument(
        "--completions", help="a field of the --prompts file: score those completions instead of generating"
    )
    score.add_argument(
        "--num-samples", type=int, help="score N sampled completions per prompt instead of the greedy one"
    )
    score.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (--num-samples)")
    score.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (--num-samples)")
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

    distill = commands.add_parser(
        "lora-distill", help="train a LoRA on the model's high-CDM completions, report before → after"
    )
    distill.add_argument("--model", default="smollm2-135m", help="embedded name, local HF folder or hub id")
    distill.add_argument("--out", default="runs/lora-distill", help="run directory")
    distill.add_argument(
        "--num-prompts",
        type=int,
        default=16,
        help="train-split logic prompts to collect (CPU default; 256 full)",
    )
    distill.add_argument(
        "--load-in-4bit", choices=("nf4", "fp4"), help="QLoRA: train over a bitsandbytes 4-bit base"
    )
    distill.add_argument("--device-map", help='e.g. "auto": a model larger than one GPU (single process)')
    distill.add_argument(
        "--num-free-text", type=int, default=4, help="free-text prompts collected beside the logic ones"
    )
    distill.add_argument("--num-eval-prompts", type=int, default=8, help="held-out eval-split prompts")
    distill.add_argument(
        "--num-shallow-prompts", type=int, default=2, help="eval problems per task outside the training mix"
    )
    distill.add_argument("--max-new-tokens", type=int, default=32)
    distill.add_argument("--threshold", type=float, default=80.0, help="keep completions with CDM >= this")
    distill.add_argument("--top-fraction", type=float, help="keep the top q by CDM instead of --threshold")
    distill.add_argument("--min-examples", type=int, default=8, help="warn when fewer are kept")
    distill.add_argument("--rank", type=int, default=32)
    distill.add_argument("--alpha", type=float, default=64.0)
    distill.add_argument("--dropout", type=float, default=0.0)
    distill.add_argument(
        "--target-modules",
        type=_names,
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        help="comma list (default: every attention and MLP projection)",
    )
    distill.add_argument("--max-steps", type=int, default=20, help="optimizer steps per LoRA (CPU default)")
    distill.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    distill.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    distill.add_argument("--lr", type=float, default=2e-4)
    distill.add_argument("--warmup-steps", type=int, default=0, help="0: 10%% of --max-steps")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument(
        "--seeds",
        type=lambda text: [int(seed) for seed in text.split(",")],
        help="several seeds, e.g. 0,1,2: a run each in --out/seed-<s>, plus seeds.json/md with the spread",
    )
    distill.add_argument(
        "--control", action=argparse.BooleanOptionalAction, default=True, help="train the random-data control"
    )
    distill.add_argument("--checkpoint-every", type=int, default=50)
    distill.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    distill.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    distill.add_argument("--no-progress", action="store_true")
    distill.set_defaults(run=_lora_distill)

    cache_latents = commands.add_parser(
        "cache-latents", help="run the teacher once, store chosen layers' hidden states (fp8 + row scales)"
    )
    cache_latents.add_argument("--teacher", default="smollm2-135m", help="embedded name, HF folder, hub id")
    cache_latents.add_argument("--data", help="JSONL with 'text' (default: logic suite)")
    cache_latents.add_argument("--layers", type=_ints, help="hidden_states indices, e.g. 5,10,15")
    cache_latents.add_argument("--dtype", choices=("fp8", "bf16"), default="fp8")
    cache_latents.add_argument("--out", default="runs/latent-cache")
    cache_latents.add_argument("--max-length", type=int, default=320)
    cache_latents.add_argument("--batch-size", type=int, default=4)
    cache_latents.add_argument("--shard-sequences", type=int, default=64)
    cache_latents.add_argument(
        "--problems-per-task",
        dest="default_problems_per_task",
        type=int,
        default=2,
        help="default data size per task",
    )
    cache_latents.add_argument(
        "--max-new-tokens",
        dest="default_max_new_tokens",
        type=int,
        default=24,
        help="teacher solution length",
    )
    cache_latents.add_argument(
        "--freetext",
        dest="default_freetext",
        type=int,
        default=8,
        help="free-text prompts the teacher continues (default data)",
    )
    cache_latents.add_argument(
        "--freetext-max-new-tokens", dest="default_freetext_max_new_tokens", type=int, default=48
    )
    cache_latents.add_argument("--device-map", help="passed to from_pretrained, e.g. auto (one process)")
    cache_latents.add_argument("--seed", type=int, default=0)
    cache_latents.add_argument("--no-progress", action="store_true")
    cache_latents.set_defaults(run=_cache_latents)

    latent_distill = commands.add_parser(
        "latent-distill", help="train a student on MSE to projected teacher latents (+ CE)"
    )
    latent_distill.add_argument("--out", default="runs/latent-distill")
    latent_distill.add_argument("--teacher", default="smollm2-135m")
    latent_distill.add_argument("--cache", help="latent cache (default: <out>/cache)")
    latent_distill.add_argument("--data", help="JSONL with 'text' for a cache built here")
    latent_distill.add_argument(
        "--cache-layers", type=_ints, help="teacher layers for a cache built here, e.g. 5,10,15"
    )
    latent_distill.add_argument("--cache-dtype", choices=("fp8", "bf16"), default="fp8")
    latent_distill.add_argument(
        "--student", help="student HF folder, pretrained or config only (default: Llama 192x6)"
    )
    latent_distill.add_argument(
        "--student-init", choices=("projection", "truncation", "random"), default="projection"
    )
    latent_distill.add_argument(
        "--student-lora-rank", type=int, default=0, help="0: full fine-tune; R: peft LoRA of rank R"
    )
    latent_distill.add_argument("--student-lora-alpha", type=float, help="default: 2 * rank")
    latent_distill.add_argument("--layer-map", help="teacher:student pairs, e.g. 10:2,20:4")
    latent_distill.add_argument("--projection", choices=("fourier", "linear", "none"), default="fourier")
    latent_distill.add_argument("--num-frequencies", type=int, default=256)
    latent_distill.add_argument("--sigma", type=float, help="default: sigma-scale / median norm")
    latent_distill.add_argument("--sigma-scale", type=float, default=1.0)
    latent_distill.add_argument(
        "--projection-precision", choices=("bf16", "fp8", "fp8-features"), default="bf16"
    )
    latent_distill.add_argument("--ce-weight", type=float, default=1.0)
    latent_distill.add_argument("--mse-weight", type=float, default=1.0)
    latent_distill.add_argument("--lr", type=float, default=1e-3)
    latent_distill.add_argument("--batch-size", type=int, default=4)
    latent_distill.add_argument("--max-steps", type=int, default=100)
    latent_distill.add_argument("--heldout-sequences", type=int, default=4)
    latent_distill.add_argument("--checkpoint-every", type=int, default=50)
    latent_distill.add_argument("--eval-problems-per-task", type=int, default=1)
    latent_distill.add_argument("--eval-max-new-tokens", type=int, default=24)
    latent_distill.add_argument("--eval-num-shots", type=int, default=0)
    latent_distill.add_argument(
        "--eval-freetext-passages", type=int, help="held-out free-text passages (default: all)"
    )
    latent_distill.add_argument("--seed", type=int, default=0)
    latent_distill.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    latent_distill.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    latent_distill.add_argument("--no-progress", action="store_true")
    latent_distill.set_defaults(run=_latent_distill)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
