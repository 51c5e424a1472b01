"""corral image: the deterministic archive, the lock, the builder's errors, and
boxes on the built default image with a real dockerd and podman.

The default image is built once per machine and lock (``scripts/bootstrap
test`` builds it; several minutes) and reused from the cache here; without
it and without mmdebstrap the image tests skip, saying how to build it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import CorralError, HostToolMissing, Policy, Pool, Sandbox, UnsupportedPolicy, image
from corral._run import run_async
from corral.backends import get_backend
from corral.backends.engine._engine import Engine
from corral.image import _archive
from tests._containerd import own_containerd
from tests._dockerd import own_dockerd
from tests.test_engines import ATTACK

SDE = 1767225600


def _tree(root: Path, order: list[str]) -> None:
    """The same small tree, its files created in ``order`` (different inodes, times)."""
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "dev").mkdir(exist_ok=True)
    for name in order:
        path = root / "usr/bin" / name
        path.write_text(f"#!/bin/sh\necho {name}\n")
        path.chmod(0o755)
    (root / "usr/bin/link").symlink_to("a")
    os.link(root / "usr/bin/a", root / "usr/bin/hard")
    os.mkfifo(root / "fifo")
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))  # left out


def test_the_layer_is_the_same_bytes_for_the_same_tree(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _tree(one, ["a", "b", "c"])
    time.sleep(0.01)
    _tree(two, ["c", "a", "b"])
    os.utime(two / "usr/bin/b", (SDE + 10**6, SDE + 10**6))  # newer than the epoch: clamped
    os.utime(one / "usr/bin/b", (SDE + 5, SDE + 5))
    digests = []
    for root in (one, two):
        out = tmp_path / f"{root.name}.tar"
        with open(out, "wb") as f:
            digest, size = _archive.write_layer(root, f, SDE)
        assert digest == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
        assert size == out.stat().st_size
        digests.append(digest)
    assert digests[0] == digests[1]
    with tarfile.open(tmp_path / "one.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == [
        "dev",
        "fifo",
        "usr",
        "usr/bin",
        "usr/bin/a",
        "usr/bin/b",
        "usr/bin/c",
        "usr/bin/hard",
        "usr/bin/link",
    ]  # sorted, device nodes left out
    assert all(m.mtime <= SDE and m.uname == "" and m.gname == "" for m in members)
    hard = next(m for m in members if m.name == "usr/bin/hard")
    assert hard.islnk()
    assert hard.linkname == "usr/bin/a"


def test_the_archive_is_both_an_oci_layout_and_a_docker_archive(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root, ["a"])
    layer = tmp_path / "layer.tar"
    with open(layer, "wb") as f:
        digest, _ = _archive.write_layer(root, f, SDE)
    config = _archive.ImageConfig(
        "localhost/corral-test:abc", ("PATH=/usr/bin",), ("/usr/bin/python3",), (), SDE
    )
    outs = []
    for n in (1, 2):
        out = tmp_path / f"image{n}.tar"
        manifest = _archive.write_archive(layer, digest, out, config)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    with tarfile.open(tmp_path / "image1.tar") as tar:
        files = {m.name: tar.extractfile(m) for m in tar.getmembers() if m.isfile()}
        read = {name: f.read() for name, f in files.items() if f is not None}
    assert json.loads(read["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(read["index.json"])
    entry = index["manifests"][0]
    assert entry["digest"] == manifest
    assert entry["annotations"]["io.containerd.image.name"] == "localhost/corral-test:abc"
    blob = read["blobs/sha256/" + manifest.split(":")[1]]
    assert hashlib.sha256(blob).hexdigest() == manifest.split(":")[1]
    (docker,) = json.loads(read["manifest.json"])
    assert docker["RepoTags"] == ["localhost/corral-test:abc"]
    assert docker["Layers"] == ["blobs/sha256/" + digest.split(":")[1]]
    conf = json.loads(read[docker["Config"]])
    assert conf["rootfs"]["diff_ids"] == [digest]


def test_the_lock_key_follows_every_input(tmp_path: Path) -> None:
    lock = image.Lock.load()
    assert lock.suite == "bookworm"
    assert "python3" in lock.include
    assert lock.packages, "the shipped lock pins every Debian package"
    req = tmp_path / "req.txt"
    req.write_bytes(lock.requirements + b"extra==1.0\n")
    assert image.Lock.load(requirements=req).key() != lock.key()
    text = image.default_lock_path().read_text()
    other = tmp_path / "other.lock"
    other.write_text(text.replace("source_date_epoch = ", "source_date_epoch = 1"))
    assert image.Lock.load(other).key() != lock.key()
    bad = tmp_path / "bad.lock"
    bad.write_text('suite = "bookworm"\nmirrors = []\ninclude = []\n')  # no variant
    with pytest.raises(CorralError) as exc:
        image.Lock.load(bad)
    assert "bad.lock" in str(exc.value)
    assert "variant" in str(exc.value)
    assert image.default_ref(lock) == f"localhost/corral-default:{lock.key()[:16]}"


def test_a_missing_mmdebstrap_says_how_to_install_it(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the build runs as root")
    env = {
        **os.environ,
        "PATH": str(tmp_path),  # no mmdebstrap on it
        "CORRAL_IMAGE_CACHE": str(tmp_path / "cache"),  # nothing cached: a build is needed
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    out = subprocess.run(
        [sys.executable, "-m", "corral", "image", "build"],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 125, out
    assert b"mmdebstrap is not available" in out.stderr
    assert b"sudo apt-get install mmdebstrap" in out.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


async def test_bwrap_refuses_an_image_naming_the_field() -> None:
    with pytest.raises(UnsupportedPolicy) as exc:
        await run_async(["true"], backend="bwrap", image="localhost/corral-default:x")
    assert exc.value.field == "image"


# -- boxes on the built default image ---------------------------------------------------


@pytest.fixture(scope="module")
def default_image() -> image.ImageArchive:
    built = image.cached()
    if built is None:
        if os.geteuid() != 0 or not Path("/usr/bin/mmdebstrap").exists():
            pytest.skip("the default image is not built: corral image build (needs mmdebstrap)")
        built = image.build_default()  # several minutes, once per machine and lock
    return built


@pytest.fixture(scope="module")
def dockerd() -> Iterator[str | None]:
    with own_dockerd() as host:
        yield host


def _usable(name: str) -> None:
    failed = [c.detail for c in get_backend(name).doctor() if c.status == "fail"]
    if failed:
        pytest.skip(f"backend {name}: {'; '.join(failed)}")


@pytest.fixture(params=["docker", "podman"])
def engine_with_image(
    request: pytest.FixtureRequest, default_image: image.ImageArchive, dockerd: str | None
) -> str:
    name: str = request.param
    _usable(name)
    image.load_into_engine(default_image.path, default_image.ref, name)  # type: ignore[arg-type]
    assert image.engine_has_image(name, default_image.ref)  # type: ignore[arg-type]
    return name


def _host_marker() -> str:
    # a file the host's /usr has and the image's lacks
    for path in ("/usr/bin/bwrap", "/usr/bin/runsc", "/usr/bin/podman"):
        if os.path.exists(path):
            return path
    pytest.skip("no host-only file to tell the roots apart")


def test_a_sandbox_on_the_default_image(
    engine_with_image: str, default_image: image.ImageArchive
) -> None:
    marker = _host_marker()
    with Sandbox(backend=engine_with_image, image=default_image.ref) as sb:
        os_release = sb.commands.run("cat /etc/os-release").stdout
        assert b"VERSION_CODENAME=bookworm" in os_release
        # the image's root, not the host's /usr
        assert sb.commands.run(f"test -e {marker}").exit_code == 1
        mounts = sb.commands.run("cat /proc/self/mountinfo").stdout
        assert b" /usr " not in mounts
        assert b" /opt/corral/runtime " not in mounts
        python = sb.commands.run("python3 -c 'import sys; print(sys.executable)'")
        assert python.stdout.strip() == b"/usr/bin/python3", python
        # files
        sb.files.write("data.txt", b"from the host")
        assert sb.commands.run("cat data.txt").stdout == b"from the host"
        sb.commands.run("echo from the box > out.txt")
        assert sb.files.read("out.txt") == b"from the box\n"
        # the read-only root holds
        assert sb.commands.run("touch /usr/bin/x").exit_code != 0
        # run_code: the image's runtime
        ex = sb.run_code("import sys, numpy; x = 6 * 7")
        assert ex.error is None, ex.error
        assert sb.run_code("x").text == "42"
        assert sb.run_code("sys.prefix").text == "'/opt/corral/runtime'"
        # and its other kernels: Deno (JavaScript) and bash
        js = sb.run_code("console.log(1 + 1)", language="javascript")
        assert js.logs.stdout == ("2\n",), js
        assert sb.run_code("echo $((6 * 7))", language="bash").logs.stdout == ("42\n",)


def test_a_pool_on_the_default_image(
    engine_with_image: str, default_image: image.ImageArchive
) -> None:
    with (
        Pool(backend=engine_with_image, image=default_image.ref, size=1) as pool,
        pool.sandbox() as sb,
    ):
        assert sb.run_code("import sys; sys.prefix").text == "'/opt/corral/runtime'"
        assert sb.commands.run(f"test -e {_host_marker()}").exit_code == 1


async def test_attacks_from_inside_an_image_box_fail(
    engine_with_image: str, default_image: image.ImageArchive
) -> None:
    # the same hardening as a host-bound box: only the root's files differ
    result = await run_async(
        ["/usr/bin/python3", "-c", ATTACK + HOST_FILES],
        policy=Policy.preset("default"),
        backend=engine_with_image,
        image=default_image.ref,
    )
    lines = dict(line.split(" ", 1) for line in result.stdout.decode().splitlines())
    assert lines["caps"] == "0000000000000000", result  # every capability dropped
    assert lines["nnp"] == "1"  # no-new-privileges
    assert int(lines["uid"]) != 0  # never root
    assert lines["mount"] == "-1 1"  # EPERM: corral's seccomp rule
    assert lines["ptrace"].startswith("-1 ")
    assert lines["rootfs"] in ("30", "13")  # the image's root is read-only
    assert lines["ifaces"] == "['lo']"  # --network none
    assert lines["shadow"] == "13"  # the image's own /etc/shadow: root's only (EACCES)
    assert lines["host"] == "absent"  # nothing of the host's tree


HOST_FILES = r"""
try:
    open("/etc/shadow").read()
    print("shadow readable")
except OSError as exc:
    print("shadow", exc.errno)
print("host", "present" if os.path.exists("/work") or os.path.exists("/root/.ssh") else "absent")
"""


def test_a_one_shot_run_on_the_default_image(
    engine_with_image: str, default_image: image.ImageArchive
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral",
            "run",
            "--backend",
            engine_with_image,
            "--image",
            default_image.ref,
            "--",
            "sh",
            "-c",
            "echo $$; python3 -c 'import sys; print(sys.version_info[:2])'; kill -9 $$",
        ],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    lines = out.stdout.decode().split()
    assert out.returncode == 137, out  # the command is not pid 1: the bound init is
    assert lines[0] != "1"
    assert "(3," in out.stdout.decode()


def test_a_missing_image_is_an_error_naming_it(engine_with_image: str) -> None:
    ref = "localhost/corral-no-such-image:1"
    with pytest.raises(HostToolMissing) as exc, Sandbox(backend=engine_with_image, image=ref):
        pass
    assert ref in str(exc.value)
    assert "corral image build --from" in str(exc.value)


def test_a_dockerfile_from_the_default_image(
    engine_with_image: str, default_image: image.ImageArchive, tmp_path: Path
) -> None:
    (tmp_path / "greeting.txt").write_text("hello from a layer\n")
    (tmp_path / "Dockerfile").write_text(
        f"FROM {default_image.ref}\n"
        "COPY greeting.txt /opt/greeting.txt\n"
        'RUN /opt/corral/runtime/bin/python -c "import pandas" && echo ok > /opt/built\n'
    )
    tag = f"localhost/corral-test-stack:{engine_with_image}"
    engine = Engine(engine_with_image)  # type: ignore[arg-type]
    try:
        built = image.build_dockerfile(tmp_path / "Dockerfile", tag, engine=engine_with_image)  # type: ignore[arg-type]
        assert built == tag
        with Sandbox(backend=engine_with_image, image=tag) as sb:
            assert sb.commands.run("cat /opt/greeting.txt /opt/built").stdout == (
                b"hello from a layer\nok\n"
            )
            assert sb.run_code("1 + 1").text == "2"
    finally:
        subprocess.run(
            [*engine.command, "rmi", "--force", tag], capture_output=True, env=engine.env()
        )
    assert not image.engine_has_image(engine_with_image, tag)  # type: ignore[arg-type]


def test_an_image_without_the_runtime_runs_commands_and_names_it_for_run_code(
    engine_with_image: str, default_image: image.ImageArchive, tmp_path: Path
) -> None:
    # any image with python3 runs a sandbox (the agent is placed at start);
    # run_code needs the runtime, and its absence names the image
    (tmp_path / "Dockerfile").write_text(
        f"FROM {default_image.ref}\nRUN rm -rf /opt/corral/runtime\n"
    )
    tag = f"localhost/corral-test-bare:{engine_with_image}"
    engine = Engine(engine_with_image)  # type: ignore[arg-type]
    try:
        image.build_dockerfile(tmp_path / "Dockerfile", tag, engine=engine_with_image)  # type: ignore[arg-type]
        with Sandbox(backend=engine_with_image, image=tag) as sb:
            assert sb.commands.run("python3 -c 'print(1 + 1)'").stdout == b"2\n"
            with pytest.raises(HostToolMissing) as exc:
                sb.run_code("1 + 1")
            assert f"the code runtime in the image {tag!r}" in str(exc.value)
            assert sb.commands.run("true").exit_code == 0  # the box is still fine
    finally:
        subprocess.run(
            [*engine.command, "rmi", "--force", tag], capture_output=True, env=engine.env()
        )


def test_a_dockerfile_whose_base_is_absent_is_refused_before_any_pull(
    engine_with_image: str, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text(
        "FROM localhost/corral-no-such-base:1 AS build\nFROM build\nRUN true\n"
    )
    with pytest.raises(CorralError) as exc:
        image.build_dockerfile(tmp_path / "Dockerfile", "localhost/x:1", engine=engine_with_image)  # type: ignore[arg-type]
    assert "FROM localhost/corral-no-such-base:1: no such image in" in str(exc.value)
    assert "never pulls" in str(exc.value)


def test_the_bases_a_dockerfile_names() -> None:
    text = (
        "# syntax comment\nARG BASE=x\nFROM --platform=linux/amd64 debian:12 AS one\n"
        "from one\nFROM $BASE\nFROM scratch\nFROM localhost/corral-default:abc as two\n"
        "RUN echo FROM nothing\n"
    )
    assert image.dockerfile_bases(text) == ["debian:12", "localhost/corral-default:abc"]


def test_import_into_containerd_for_kubernetes(default_image: image.ImageArchive) -> None:
    with own_containerd() as sock:
        if sock is None:
            pytest.skip("containerd cannot run here (not installed, or not root)")
        ref = default_image.ref
        assert not image.containerd_has_image(ref, sock)
        assert image.import_into_containerd(default_image.path, sock, ref=ref) is True
        assert image.containerd_has_image(ref, sock)  # namespace k8s.io, the CRI's
        assert not image.containerd_has_image(ref, sock, namespace="default")
        # unpacked for the snapshotter: its one layer, committed
        snaps = subprocess.run(
            ["ctr", "--address", sock, "-n", "k8s.io", "snapshots", "ls"],
            capture_output=True,
            check=True,
        ).stdout.decode()
        assert default_image.layer_digest in snaps
        assert image.import_into_containerd(default_image.path, sock, ref=ref) is False  # kept


def test_containerd_not_answering_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CorralError) as exc:
        image.import_into_containerd(tmp_path / "x.tar", str(tmp_path / "none.sock"), ref="a:b")
    assert "does not answer" in str(exc.value)
    assert str(tmp_path / "none.sock") in str(exc.value)


def test_what_a_killed_build_left_is_swept(tmp_path: Path) -> None:
    from corral.image._build import _sweep

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, alive = gone.pid, os.getpid()
    (tmp_path / f".build-{dead}" / "root" / "usr").mkdir(parents=True)
    (tmp_path / f"default-abc.tar.partial-{dead}").write_bytes(b"x")
    (tmp_path / f".build-{alive}").mkdir()  # a build still running: kept
    (tmp_path / "default-abc.tar").write_bytes(b"x")  # a finished archive: kept
    _sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".build-{alive}", "default-abc.tar"]
