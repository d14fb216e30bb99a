"""Every bench with its defaults: `python -m bench.all [--out-dir DIR] [--check-targets] [--only a,b]`.

Each bench module exposes `main(argv) -> exit status` and accepts `--out PATH` and `--check-targets`;
its JSON lines go to DIR/<name>.jsonl (default DIR: bench/results). A bench that fails or raises does
not stop the others; the exit status is 1 if any did.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

from bench import common

BENCHES = {
    "projection": "bench.projection",
    "lora": "bench.lora",
    "wgrad": "bench.wgrad",
    "attention": "bench.attention",
    "lora_distill": "bench.lora_distill",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--check-targets", action="store_true", help="passed on to every bench")
    parser.add_argument(
        "--only",
        type=lambda text: [name for name in text.split(",") if name],
        default=list(BENCHES),
        help=f"comma-separated subset of {','.join(BENCHES)} (a GPU call of 10 minutes fits one or two)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(BENCHES))
    if unknown:
        parser.error(f"--only: unknown bench {unknown}; expected names from {list(BENCHES)}")
    statuses = {}
    for name, module_name in BENCHES.items():
        if name not in args.only:
            continue
        bench_args = ["--out", str(args.out_dir / f"{name}.jsonl")]
        if args.check_targets:
            bench_args.append("--check-targets")
        print(f"=== bench.{name} {' '.join(bench_args)}", flush=True)
        try:
            statuses[name] = importlib.import_module(module_name).main(bench_args)
        except Exception:
            traceback.print_exc()
            statuses[name] = 1
    print(
        "\n" + "  ".join(f"{name}: {'ok' if status == 0 else 'FAILED'}" for name, status in statuses.items())
    )
    return 1 if any(statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
