"""The box's launcher in a Pod: run by exec as ``python3 -I -S -c <this file>``. Stdlib only.

Runs inside the box (nothing of corral is there): it is the process the
exec stream starts, and reads from its stdin, in order, a 4-byte big-endian
length and a JSON header, the bytes of each file the header lists, and (for
a one-shot command) the command's stdin. Then:

- it writes the files (the agent's, into the agent's emptyDir), applies the
  rlimits (lowering only), changes to ``cwd`` with exactly ``env``;
- ``channel``: moves the exec stream to fds 3 and 4 (``CORRAL_CHANNEL_FDS``),
  puts /dev/null on 0 and 1, and becomes the command (the agent);
- otherwise: runs the command as its child with the given stdin bytes on a
  pipe (the exec stream's stdin cannot be closed before Kubernetes 1.29's
  v5 protocol, so the command gets a real end of file this way) and exits
  with its status, 128+N for a command killed by signal N, as a shell does.

A command that cannot be run: exit 127 (not found) or 126, and
``not_run_message``'s line on stderr (``corral._result``).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import sys
from typing import Any, NoReturn


def _read_exact(n: int) -> bytes:
    chunks = []
    while n:
        data = os.read(0, min(n, 1 << 20))
        if not data:
            raise EOFError("the exec stream ended early")
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def _prepare(header: dict[str, Any]) -> None:
    for name, soft, hard in header["rlimits"]:
        res = getattr(resource, name)
        cur_hard = resource.getrlimit(res)[1]
        # only lower: the box has no CAP_SYS_RESOURCE to raise a hard limit
        hard = cur_hard if hard is None else (hard if cur_hard < 0 else min(hard, cur_hard))
        soft = hard if soft is None else (soft if hard < 0 else min(soft, hard))
        resource.setrlimit(res, (soft, hard))
    os.chdir(header["cwd"])


def _exec(argv: list[str], env: dict[str, str]) -> NoReturn:
    try:
        os.execvpe(argv[0], argv, env)  # noqa: S606 - argv, never a shell
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        if code == 127:
            line = f"corral: {argv[0]}: command not found in the box\n"
        else:
            line = f"corral: {argv[0]}: cannot be run in the box ({exc.strerror})\n"
        os.write(2, line.encode(errors="replace"))
        os._exit(code)


def main() -> None:
    (size,) = struct.unpack(">I", _read_exact(4))
    header = json.loads(_read_exact(size))
    for path, mode, length in header["files"]:
        data = _read_exact(length)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
    env = dict(header["env"])
    argv = header["argv"]
    if header["channel"]:
        os.dup2(0, 3)
        os.dup2(1, 4)
        null = os.open(os.devnull, os.O_RDWR)  # above 4 now: 0-4 are taken
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        env["CORRAL_CHANNEL_FDS"] = "3,4"
        _prepare(header)
        _exec(argv, env)
    stdin = header["stdin"] or 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(r, 0)
        os.close(r)
        os.close(w)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        _prepare(header)
        _exec(argv, env)
    os.close(r)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        while stdin:
            data = _read_exact(min(stdin, 1 << 16))
            stdin -= len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
    except (BrokenPipeError, EOFError):
        pass  # the command stopped reading (or the host went away): not an error
    os.close(w)
    status = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(status):
        sys.exit(128 + os.WTERMSIG(status))
    sys.exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
