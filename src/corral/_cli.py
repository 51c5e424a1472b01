"""The ``corral`` command line: a thin layer over the library.

Exit status of ``corral run``: the command's own status (128+N when killed by
signal N, 126/127 when it cannot be run or is not found in the box), except

* ``124`` — a limit was hit (which one is printed, and in ``--json``);
* ``125`` — corral itself failed: invalid policy, missing tool, box setup.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import CorralError
from ._policy import Policy
from ._units import parse_duration, parse_size, timeout_arg

EXIT_LIMIT = 124
EXIT_CORRAL = 125
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a filter whose reader left


def _policy_arg(value: str) -> Policy:
    if os.sep in value or value.endswith((".toml", ".json")):
        return Policy.load(value)
    return Policy.preset(value)


def _env_arg(value: str) -> tuple[str, str]:
    name, sep, val = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=VALUE")
    return name, val


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _into_arg(value: str) -> tuple[str, str | None]:
    name, sep, where = value.partition("=")
    if name not in ("docker", "podman", "containerd") or (sep and name != "containerd"):
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected docker, podman, containerd or containerd=SOCKET"
        )
    return name, (where or None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p_run = sub.add_parser("run", help="run one command in a fresh sandbox")
    p_run.add_argument("--policy", default="default", help="preset name or policy file")
    p_run.add_argument("--memory", type=_size, help="memory limit, e.g. 256M")
    p_run.add_argument("--cpus", type=float, help="CPU quota in cores, e.g. 0.5")
    p_run.add_argument("--pids", type=int, help="maximum number of processes")
    p_run.add_argument(
        "--timeout",
        type=timeout_arg,
        default=argparse.SUPPRESS,  # absent: the policy's own; none: no limit
        help="wall-clock limit, e.g. 10s, or none",
    )
    p_run.add_argument("--workdir", help="host directory bound as the workspace")
    p_run.add_argument("--env", type=_env_arg, action="append", default=[], metavar="K=V")
    p_run.add_argument(
        "--allow-domain",
        action="append",
        default=[],
        metavar="HOST",
        help="reach HOST through corral's proxy (network mode allowlist); repeatable",
    )
    p_run.add_argument("--json", action="store_true", help="print the full result as JSON")
    p_run.add_argument("--backend", default="bwrap", help="what starts the box (default bwrap)")
    p_run.add_argument(
        "--image",
        help="a local container image whose root the box runs (docker, podman backends)",
    )
    p_run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    p_audit = sub.add_parser("audit", help="prove the walls hold: probes from inside a box")
    p_audit.add_argument("--policy", default="default", help="preset name or policy file")
    p_audit.add_argument("--backend", default="bwrap", help="the backend under audit")
    p_audit.add_argument("--probe", help="only probes whose id matches (glob or substring)")
    p_audit.add_argument("--json", action="store_true", help="one object per probe")
    p_audit.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report")
    p_audit.add_argument("--host", action="store_true", help="also check host-side hazards")
    p_audit.add_argument("--list", action="store_true", help="list the probes and exit")

    p_rt = sub.add_parser("runtime", help="build, list or remove code runtimes")
    rt_sub = p_rt.add_subparsers(dest="runtime_cmd", required=True)
    p_build = rt_sub.add_parser("build", help="build a runtime (reused while unchanged)")
    p_build.add_argument("name", nargs="?", default="default")
    p_build.add_argument("--requirements", help="a pinned requirements file (default: the lock)")
    rt_sub.add_parser("list", help="the runtimes built on this host")
    p_rm = rt_sub.add_parser("remove", help="delete a runtime")
    p_rm.add_argument("name")

    p_img = sub.add_parser("image", help="build images for the docker and podman backends")
    img_sub = p_img.add_subparsers(dest="image_cmd", required=True)
    p_ib = img_sub.add_parser(
        "build",
        help="the default image (Debian + python3 + the code runtime), or --from a Dockerfile",
    )
    p_ib.add_argument("--from", dest="dockerfile", help="build this Dockerfile instead")
    p_ib.add_argument("--tag", help="the name of the --from image (required with --from)")
    p_ib.add_argument("--context", help="the --from build context (default: its directory)")
    p_ib.add_argument(
        "--engine", choices=("docker", "podman"), default="docker", help="builds --from (docker)"
    )
    p_ib.add_argument(
        "--into",
        type=_into_arg,
        action="append",
        default=[],
        metavar="TARGET",
        help="load the default image into docker, podman or containerd[=SOCKET]; repeatable",
    )
    p_ib.add_argument("--rebuild", action="store_true", help="ignore the cached archive")
    p_ib.add_argument("--lock", type=Path, help="an image lock file (default: corral's own)")
    p_il = img_sub.add_parser(
        "lock", help="record the Debian mirror's current package versions in a lock"
    )
    p_il.add_argument("--lock", type=Path, help="the lock file to rewrite (default: corral's)")

    p_doc = sub.add_parser("doctor", help="what this host can enforce")
    p_doc.add_argument("--json", action="store_true")
    p_doc.add_argument("--backend", default="bwrap", help="the backend to check (default bwrap)")

    p_pol = sub.add_parser("policy", help="show or check a policy")
    pol_sub = p_pol.add_subparsers(dest="policy_cmd", required=True)
    p_show = pol_sub.add_parser("show", help="print a preset or file as TOML-like JSON")
    p_show.add_argument("policy")
    p_check = pol_sub.add_parser("check", help="validate a policy file")
    p_check.add_argument("file")

    p_serve = sub.add_parser("serve", help="the HTTP API (OpenAPI at /docs)")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--data-dir", type=Path, help="database and workspaces")
    p_serve.add_argument(
        "--retention", type=_duration, default=7 * 86400.0, help="keep ended sandboxes (7d)"
    )
    p_serve.add_argument("--max-upload", type=_size, default=1 << 30, help="per file (1G)")
    p_serve.add_argument(
        "--allow-private-network",
        action="store_true",
        help="let API policies allow loopback/private addresses and network mode open",
    )
    p_serve.add_argument("--log-level", default="info")
    p_serve.add_argument("--backend", default="bwrap", help="what starts every box (default bwrap)")
    p_serve.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="SPEC",
        help="a warm pool, repeatable: policy=NAME|FILE,runtime=NAME|none,size=N,"
        "kernels=python|none (defaults: default, default, 4, python)",
    )
    p_serve.add_argument(
        "--pool-max-starting",
        type=int,
        default=None,
        metavar="N",
        help="pooled boxes started at once, all pools together (default: half the CPUs)",
    )
    p_serve.add_argument(
        "--namespace",
        help="--backend kubernetes: the namespace of every box's Pod "
        "(default: the kubeconfig context's; CORRAL_K8S_NAMESPACE)",
    )

    p_keys = sub.add_parser("keys", help="API keys of corral serve")
    keys_sub = p_keys.add_subparsers(dest="keys_cmd", required=True)
    p_kc = keys_sub.add_parser("create", help="a new key (printed once, on the last line)")
    p_kc.add_argument("--name", required=True)
    p_kc.add_argument("--max-sandboxes", type=int, help="running at once")
    p_kc.add_argument("--max-memory", type=_size, help="memory of its running sandboxes")
    p_kc.add_argument("--max-lifetime", type=timeout_arg, help="lifetime of one sandbox")
    p_kc.add_argument(
        "--max-disk",
        type=_size,
        help="disk of its sandboxes: running ones by their disk limit, ended ones by "
        "their retained workspace until purged, e.g. 5G",
    )
    p_kl = keys_sub.add_parser("list", help="the keys (never their secrets)")
    p_kr = keys_sub.add_parser("revoke", help="revoke a key by id")
    p_kr.add_argument("id")
    for p_key in (p_kc, p_kl, p_kr):
        p_key.add_argument("--data-dir", type=Path, help="the server's data directory")

    p_mcp = sub.add_parser("mcp", help="an MCP server (stdio, or streamable HTTP)")
    p_mcp.add_argument("--policy", default="default", help="preset name or policy file")
    p_mcp.add_argument(
        "--timeout", type=timeout_arg, default=600.0, help="sandbox lifetime (or none)"
    )
    p_mcp.add_argument("--http", action="store_true", help="streamable HTTP at /mcp")
    p_mcp.add_argument("--host", default="127.0.0.1")
    p_mcp.add_argument("--port", type=int, default=8765)
    return parser


def _import_asyncio_without_tls() -> None:
    """``corral run`` speaks no TLS (its proxy relays bytes; nothing else in the
    process dials out), so asyncio is imported without ``ssl``: OpenSSL's
    load and ssl's enums are about a twentieth of the one-shot start-up
    (benchmarks/bench_run.py). asyncio's own modules then have ``ssl = None``,
    its documented fallback when ssl is absent; a later ``import ssl`` still
    works. Only this CLI process, and only when asyncio is not loaded yet."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # import ssl -> ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


def _cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("corral run: no command given (corral run [OPTIONS] -- CMD ...)", file=sys.stderr)
        return 2
    policy = _policy_arg(args.policy)
    changes: dict[str, Any] = {}
    if args.memory is not None:
        changes["memory_bytes"] = args.memory
    if args.cpus is not None:
        changes["cpu_cores"] = args.cpus
    if args.pids is not None:
        changes["pids"] = args.pids
    if "timeout" in vars(args):
        changes["wall_time_s"] = args.timeout
    if changes:
        policy = policy.with_limits(**changes)
    if args.env:
        policy = policy.with_env(dict(args.env))
    if args.allow_domain:
        allow = (*policy.network.allow, *args.allow_domain)
        policy = policy.with_network(mode="allowlist", allow=allow)
    _import_asyncio_without_tls()
    from ._run import run

    result = run(
        command, policy=policy, workdir=args.workdir, backend=args.backend, image=args.image
    )
    if args.json:
        print(result.to_json())
    else:
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr)
        if result.truncated:
            print("corral: output truncated at limits.output_bytes", file=sys.stderr)
        for event in result.network:
            if not event.allowed:
                print(f"corral: refused {event.host}:{event.port}: {event.reason}", file=sys.stderr)
        for note in result.degraded:
            print(f"corral: weakened: {note}", file=sys.stderr)
        if result.limit_hit is not None:
            print(
                f"corral: limit hit: {result.limit_hit} (command exit status {result.exit_code})",
                file=sys.stderr,
            )
    if result.limit_hit is not None:
        return EXIT_LIMIT
    return result.exit_code


def _cmd_audit(args: argparse.Namespace) -> int:
    import asyncio

    from . import audit as _audit

    if args.list:
        for p in _audit.PROBES:
            print(f"{p.id:28} {p.title}")
        return 0
    policy = _policy_arg(args.policy)
    reports = asyncio.run(_audit.run_probes(policy, pattern=args.probe, backend=args.backend))
    if args.probe and not reports:
        print(f"corral audit: no probe matches {args.probe!r} (see --list)", file=sys.stderr)
        return 2
    if args.junit:
        Path(args.junit).write_text(_audit.junit(reports), encoding="utf-8")
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print(_audit.table(reports, colour=sys.stdout.isatty()))
    failed = any(r.result in ("fail", "error") for r in reports)
    if args.host:
        from .backends import get_backend

        hazards = [c for c in get_backend(args.backend).doctor() if c.status != "ok"]
        for check in hazards:
            print(f"host: {check.status}: {check.name}: {check.detail}", file=sys.stderr)
            if check.fix:
                print(f"      fix: {check.fix}", file=sys.stderr)
        failed = failed or any(c.status == "fail" for c in hazards)
    return 1 if failed else 0


def _cmd_runtime(args: argparse.Namespace) -> int:
    from . import _runtime

    if args.runtime_cmd == "build":
        info = _runtime.build(args.name, requirements=args.requirements, quiet=False)
        print(f"runtime {info.name!r} ready at {info.path}")
    elif args.runtime_cmd == "list":
        for info in _runtime.list_runtimes():
            size = f"{(info.size_bytes or 0) >> 20} MiB"
            print(f"{info.name:16} {size:>9}  {info.path}  lock {info.requirements_sha256[:12]}")
    elif not _runtime.remove(args.name):
        print(f"corral runtime: no runtime {args.name!r}", file=sys.stderr)
        return 1
    return 0


def _cmd_image(args: argparse.Namespace) -> int:
    from . import image

    if args.image_cmd == "lock":
        path = args.lock or image.default_lock_path()
        built = image.record_lock(path)
        print(f"corral image: {path} records the packages of {built.ref}", file=sys.stderr)
        print(built.ref)
        return 0
    if args.dockerfile is not None:
        if not args.tag:
            print("corral image build: --from needs --tag NAME", file=sys.stderr)
            return 2
        if args.into:
            print("corral image build: --into is for the default image", file=sys.stderr)
            return 2
        print(
            image.build_dockerfile(
                args.dockerfile, args.tag, engine=args.engine, context=args.context
            )
        )
        return 0
    lock = image.Lock.load(args.lock) if args.lock else None
    built = image.build_default(lock, rebuild=args.rebuild)
    for target, where in args.into:
        if target == "containerd":
            image.import_into_containerd(
                built.path, where or image.DEFAULT_CONTAINERD, ref=built.ref
            )
        else:
            image.load_into_engine(built.path, built.ref, target)
    print(f"corral image: {built.path} ({built.digest})", file=sys.stderr)
    print(built.ref)
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .backends import get_backend

    checks = get_backend(args.backend).doctor()
    if args.json:
        print(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        for check in checks:
            print(f"{check.status.upper():5} {check.name:16} {check.detail}")
            if check.fix and check.status != "ok":
                print(f"{'':22} fix: {check.fix}")
    return 1 if any(c.status == "fail" for c in checks) else 0


def _cmd_policy(args: argparse.Namespace) -> int:
    if args.policy_cmd == "show":
        print(json.dumps(_policy_arg(args.policy).to_dict(), indent=2))
        return 0
    policy = Policy.load(Path(args.file))
    print(f"{args.file}: valid (name {policy.name!r})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server._serve import default_data_dir, serve

    if args.namespace is not None:
        if args.backend != "kubernetes":
            print("corral serve: --namespace is for --backend kubernetes", file=sys.stderr)
            return 2
        # the backend is made by name (get_backend) and reads its settings from the environment
        os.environ["CORRAL_K8S_NAMESPACE"] = args.namespace
    return serve(
        data_dir=args.data_dir or default_data_dir(),
        host=args.host,
        port=args.port,
        retention_s=args.retention,
        max_upload_bytes=args.max_upload,
        allow_private_network=args.allow_private_network,
        log_level=args.log_level,
        backend=args.backend,
        pools=args.pool,
        pool_max_starting=args.pool_max_starting,
    )


def _cmd_keys(args: argparse.Namespace) -> int:
    from .server._serve import default_data_dir, open_store

    store = open_store(args.data_dir or default_data_dir())
    try:
        if args.keys_cmd == "create":
            key, token = store.create_key(
                args.name,
                max_sandboxes=args.max_sandboxes,
                max_memory_bytes=args.max_memory,
                max_lifetime_s=args.max_lifetime,
                max_disk_bytes=args.max_disk,
            )
            print(f"created key {key.id} ({key.name}); it is shown only now:")
            print(token)
        elif args.keys_cmd == "list":
            for key in store.list_keys():
                print(
                    f"{key.id}  {key.name}  max_sandboxes={key.max_sandboxes} "
                    f"max_memory={key.max_memory_bytes} max_lifetime={key.max_lifetime_s} "
                    f"max_disk={key.max_disk_bytes}"
                )
        elif not store.revoke_key(args.id):
            print(f"corral: no active key {args.id!r}", file=sys.stderr)
            return 1
        return 0
    finally:
        store.close()


def _cmd_mcp(args: argparse.Namespace) -> int:
    from ._mcp import main as mcp_main

    return mcp_main(
        policy=_policy_arg(args.policy),
        timeout_s=args.timeout,
        http=args.http,
        host=args.host,
        port=args.port,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "run": _cmd_run,
        "audit": _cmd_audit,
        "runtime": _cmd_runtime,
        "image": _cmd_image,
        "doctor": _cmd_doctor,
        "policy": _cmd_policy,
        "serve": _cmd_serve,
        "keys": _cmd_keys,
        "mcp": _cmd_mcp,
    }
    try:
        status = handlers[args.cmd](args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except BrokenPipeError:
        # the reader went away (``corral policy show default | head -1``): stop
        # quietly, like any filter killed by SIGPIPE; nothing more is written
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except CorralError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_CORRAL
    except FileNotFoundError as exc:
        print(f"corral: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return EXIT_CORRAL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
