"""Command line: ``python -m recsys_lib {fetch,synth,split} ...``.

    python -m recsys_lib fetch ml-latest-small          # download (or take from $MOVIELENS_MIRROR), verify, extract
    python -m recsys_lib synth --preset demo --seed 0    # write the embedded synthetic data set
    python -m recsys_lib split synthetic --strategy user_temporal --set core=5
    python -m recsys_lib params --dataset ml-32m --profile full  # every resolved parameter and its layer
    python -m recsys_lib speed [--refresh]               # this machine's speed index (~10 s, cached per boot)
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import RecsysError


def _cmd_fetch(args: argparse.Namespace) -> None:
    from .data import fetch
    path = fetch(args.name, mirror=args.mirror, force=args.force)
    print(path)


def _cmd_synth(args: argparse.Namespace) -> None:
    from .data.synthetic import generate
    path = generate(args.preset, seed=args.seed, force=args.force)
    print(path)


def _cmd_split(args: argparse.Namespace) -> None:
    from .config import apply_overrides, load_params
    from .protocol.split import make_split
    params = load_params(args.profile, args.name)["split"]
    if args.strategy:
        params["strategy"] = args.strategy
    params = apply_overrides(params, args.set)
    split = make_split(args.name, params, mirror=args.mirror, force=args.force)
    print(f"split {split.split_id} -> {split.path}")
    print(json.dumps(split.stats, indent=2))


def _cmd_params(args: argparse.Namespace) -> None:
    from .params import describe
    rows = describe(args.profile, args.dataset, args.set)
    width = min(max(len(f"{k} = {v!r}") for k, v, _ in rows), 64)
    print(f"# dataset {args.dataset}, profile {args.profile}: each value, then the layer it came from")
    for key, value, origin in rows:
        print(f"{f'{key} = {value!r}':<{width}}  # {origin}")


def _cmd_speed(args: argparse.Namespace) -> None:
    from .run.usage import REFERENCE, speed_index
    s = speed_index(refresh=args.refresh)
    parts = ", ".join(f"{k} {s[k]:g} (reference {REFERENCE[k]:g})" for k in REFERENCE)
    print(f"speed index {s['speed_index']:.2f} on {s['cpu']}, {s['torch_threads']} torch thread(s): {parts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys_lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download or copy from a mirror, verify and extract a dataset")
    p.add_argument("name")
    p.add_argument("--mirror", default=None, help="local folder with NAME.zip or NAME/ (default $MOVIELENS_MIRROR)")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("synth", help="generate the synthetic MovieLens-shaped data set")
    p.add_argument("--preset", default="demo", help="tiny | demo | 32m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("split", help="split a dataset under the protocol and print its statistics")
    p.add_argument("name")
    p.add_argument("--strategy", choices=["global_temporal", "user_temporal"], default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a split parameter, e.g. --set core=10 (repeatable)")
    p.add_argument("--profile", default="full")
    p.add_argument("--mirror", default=None)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser("params", help="print a run's resolved parameters and the layer each came from")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--profile", default="full")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override, as the pipeline takes it")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("speed", help="this machine's speed index (1.0 = the reference machine): "
                                     "give it beside any time you report")
    p.add_argument("--refresh", action="store_true", help="measure again (else cached per boot)")
    p.set_defaults(func=_cmd_speed)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except RecsysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
