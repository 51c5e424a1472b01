"""The E2B-compatible API, driven by the unmodified official JavaScript SDKs
(npm ``e2b`` and ``@e2b/code-interpreter``, pinned in
tests/e2b-js/package-lock.json, installed by ``scripts/bootstrap test`` with
``npm ci``) under Node against a real ``corral serve`` on 127.0.0.1. Each
scenario is an ES module run by ``node`` in tests/e2b-js, pointed at the
server by the three environment variables alone, as in test_e2b.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from .server_helpers import ServerProcess, serving

JS_DIR = Path(__file__).resolve().parent / "e2b-js"
# the oldest that honour E2B_SANDBOX_URL: e2b 2.7.0; @e2b/code-interpreter 2.7.0 on e2b 2.28.0
JS_OLDEST = Path(__file__).resolve().parent / "e2b-js-oldest"
NODE = shutil.which("node", path="/usr/local/bin:/usr/bin:/bin")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the server tests run as root here"),
    pytest.mark.skipif(NODE is None, reason="node is missing: apt-get install nodejs"),
    pytest.mark.skipif(
        not (JS_DIR / "node_modules" / "@e2b" / "code-interpreter").is_dir(),
        reason="the E2B JS SDKs are missing: scripts/bootstrap test runs npm ci in tests/e2b-js",
    ),
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with serving() as proc:
        yield proc


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> str:
    return server.key("e2b-js")


def node(
    server: ServerProcess, key: str, script: str, timeout_s: float = 180, where: Path = JS_DIR
) -> str:
    """Run the ES module ``script`` under Node in ``where`` (where its imports
    resolve); its stdout (it must exit 0)."""
    assert NODE is not None
    env = {
        "PATH": "/usr/bin:/bin",
        "E2B_API_URL": f"{server.url}/e2b/api",
        "E2B_SANDBOX_URL": f"{server.url}/e2b/sandbox",
        "E2B_API_KEY": key,
    }
    out = subprocess.run(
        [NODE, "--input-type=module", "-e", textwrap.dedent(script)],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_js_sdk_commands_files_code(server: ServerProcess, key: str) -> None:
    out = node(
        server,
        key,
        r"""
        import assert from 'node:assert/strict'
        import { Sandbox, CommandExitError } from '@e2b/code-interpreter'

        const sb = await Sandbox.create({ timeoutMs: 120_000, metadata: { who: 'js' },
                                          envs: { GREETING: 'hi' } })
        const r = await sb.commands.run('echo $GREETING; echo oops >&2')
        assert.deepEqual([r.exitCode, r.stdout, r.stderr], [0, 'hi\n', 'oops\n'])
        await assert.rejects(sb.commands.run('exit 3'),
                             (e) => e instanceof CommandExitError && e.exitCode === 3)

        // background: stdin, listed, killed
        let h = await sb.commands.run('read x; echo got $x', { background: true, stdin: true })
        await sb.commands.sendStdin(h.pid, 'typed\n')
        assert.equal((await h.wait()).stdout, 'got typed\n')
        h = await sb.commands.run('sleep 100', { background: true })
        assert.ok((await sb.commands.list()).some((p) => p.pid === h.pid))
        assert.equal(await sb.commands.kill(h.pid), true)
        await assert.rejects(h.wait(), CommandExitError)
        const seen = []
        await sb.commands.run('echo one; echo two', { onStdout: (d) => seen.push(d) })
        assert.equal(seen.join(''), 'one\ntwo\n')

        // files: /home/user is the workspace, relative paths too
        const info = await sb.files.write('/home/user/data/a.txt', 'hello')
        assert.equal(info.path, '/home/user/data/a.txt')
        assert.equal(await sb.files.read('data/a.txt'), 'hello')
        const bytes = await sb.files.read('/home/user/data/a.txt', { format: 'bytes' })
        assert.deepEqual(Buffer.from(bytes), Buffer.from('hello'))
        await sb.files.write('b.bin', new Uint8Array([0, 1]))
        assert.deepEqual((await sb.files.list('/home/user')).map((e) => e.name).sort(),
                         ['b.bin', 'data'])
        assert.equal(await sb.files.exists('b.bin'), true)
        assert.equal(await sb.files.exists('nope'), false)
        assert.equal(await sb.files.makeDir('d1/d2'), true)
        assert.equal(await sb.files.makeDir('d1/d2'), false)
        await sb.files.rename('b.bin', 'd1/c.bin')
        assert.equal((await sb.files.getInfo('d1/c.bin')).size, 2)
        await sb.files.remove('d1')
        assert.equal(await sb.files.exists('d1'), false)
        assert.equal((await sb.commands.run('cat data/a.txt')).stdout, 'hello')

        // code: results, logs, errors, per-execution envs, contexts
        let ex = await sb.runCode("x = 40\nprint('p')\nx + 2")
        assert.equal(ex.text, '42')
        assert.deepEqual(ex.logs.stdout, ['p\n'])
        ex = await sb.runCode("import pandas as pd; pd.DataFrame({'a': [1, 2]})")
        assert.ok(ex.results[0].html && ex.results[0].data)
        ex = await sb.runCode('1 / 0')
        assert.equal(ex.error.name, 'ZeroDivisionError')
        const lines = []
        await sb.runCode("print('streamed')", { onStdout: (m) => lines.push(m.line) })
        assert.deepEqual(lines, ['streamed\n'])
        ex = await sb.runCode("import os; os.environ['ONE']", { envs: { ONE: 'cell' } })
        assert.equal(ex.text, "'cell'")
        const ctx = await sb.createCodeContext()
        await sb.runCode('y = 7', { context: ctx })
        assert.equal((await sb.runCode('y', { context: ctx })).text, '7')
        assert.ok((await sb.listCodeContexts()).some((c) => c.id === ctx.id))
        await sb.restartCodeContext(ctx)
        assert.equal((await sb.runCode('y', { context: ctx })).error.name, 'NameError')
        await sb.removeCodeContext(ctx)

        // the control plane: info, list with a metadata filter, connect, kill
        assert.deepEqual((await sb.getInfo()).metadata, { who: 'js' })
        const pager = Sandbox.list({ query: { metadata: { who: 'js' } } })
        assert.deepEqual((await pager.nextItems()).map((s) => s.sandboxId), [sb.sandboxId])
        const again = await Sandbox.connect(sb.sandboxId)
        assert.equal((await again.commands.run('echo back')).stdout, 'back\n')
        assert.equal(await sb.isRunning(), true)
        assert.equal(await sb.kill(), true)
        assert.equal(await sb.isRunning(), false)
        console.log('ok')
        """,
    )
    assert out.strip().endswith("ok")


def test_js_sdk_pause_watch_urls_metrics(server: ServerProcess, key: str) -> None:
    out = node(
        server,
        key,
        r"""
        import assert from 'node:assert/strict'
        import { Sandbox, FilesystemEventType, SandboxError } from '@e2b/code-interpreter'

        const sb = await Sandbox.create({ timeoutMs: 120_000 })
        await sb.runCode('kept = 41')
        await sb.files.write('blob.bin', 'x'.repeat(100_000))
        const pause = (ms) => new Promise((r) => setTimeout(r, ms))
        let series = []
        for (let i = 0; i < 150; i++) {  // the series gains a sample a second
          series = await sb.getMetrics()
          if (series.length && series.at(-1).diskUsed >= 100_000) break
          await pause(200)
        }
        const m = series.at(-1)
        assert.ok(m.cpuCount >= 1 && m.memUsed > 0 && m.diskUsed >= 100_000, JSON.stringify(m))

        // pause (the freezer), refused traffic meanwhile, connect resumes
        assert.equal(await sb.pause(), true)
        assert.equal((await sb.getInfo()).state, 'paused')
        await assert.rejects(sb.commands.run('true'), /is paused/)
        const again = await Sandbox.connect(sb.sandboxId)
        assert.equal((await again.getInfo()).state, 'running')
        assert.equal((await again.runCode('kept + 1')).text, '42')

        // a directory watch (a stream)
        const events = []
        const w = await sb.files.watchDir('/home/user', (e) => events.push([e.name, e.type]),
                                          { recursive: true })
        await sb.files.write('sub/new.txt', 'n')
        for (let i = 0; i < 100 && events.length < 2; i++) await pause(50)
        await w.stop()
        assert.deepEqual(events, [['sub', FilesystemEventType.CREATE],
                                  ['sub/new.txt', FilesystemEventType.CREATE]])

        // signed URLs, with fetch
        const down = await sb.downloadUrl('sub/new.txt')
        assert.equal(await (await fetch(down)).text(), 'n')
        const up = await sb.uploadUrl('up.txt', { useSignatureExpiration: 60 })
        const form = new FormData()
        form.append('file', new Blob(['via url']), 'up.txt')
        assert.equal((await fetch(up, { method: 'POST', body: form })).status, 200)
        assert.equal(await sb.files.read('up.txt'), 'via url')
        assert.equal((await fetch(down.replace('new.txt', 'up.txt'))).status, 401)

        // refused clearly: root, files outside the workspace
        await assert.rejects(sb.commands.run('id', { user: 'root' }), /root is never granted/)
        await assert.rejects(sb.files.read('/etc/passwd'), /workspace only/)
        await sb.kill()

        // a timed-out sandbox is gone
        const short = await Sandbox.create({ timeoutMs: 2_000 })
        await new Promise((r) => setTimeout(r, 4_000))
        assert.equal(await short.isRunning(), false)
        await assert.rejects(short.commands.run('true'), SandboxError)
        console.log('ok')
        """,
    )
    assert out.strip().endswith("ok")


def test_js_sdk_pty(server: ServerProcess, key: str) -> None:
    """``sandbox.pty`` under Node: output through ``onData``, typed input,
    resize, connect again, kill; another key's SDK cannot connect to it."""
    out = node(
        server,
        key,
        r"""
        import assert from 'node:assert/strict'
        import { Sandbox, CommandExitError } from 'e2b'

        const pause = (ms) => new Promise((r) => setTimeout(r, ms))
        const decoder = new TextDecoder()
        const until = async (chunks, text) => {
          for (let i = 0; i < 300; i++) {
            if (chunks.join('').includes(text)) return
            await pause(100)
          }
          throw new Error(`${JSON.stringify(text)} never came: ${JSON.stringify(chunks.join(''))}`)
        }
        const typed = (s) => new TextEncoder().encode(s)

        const sb = await Sandbox.create({ timeoutMs: 120_000 })
        const seen = []
        const h = await sb.pty.create({ cols: 80, rows: 24,
                                        onData: (d) => seen.push(decoder.decode(d)) })
        await sb.pty.sendInput(h.pid, typed('echo $((6*7))\n'))
        await until(seen, '42\r\n')  // the typed line echoes $((6*7)), not 42
        await sb.pty.resize(h.pid, { cols: 100, rows: 30 })
        await sb.pty.sendInput(h.pid, typed('stty size\n'))
        await until(seen, '30 100')
        await assert.rejects(sb.pty.resize(h.pid, { cols: 0, rows: 30 }), /pty.size.cols/)

        // follow it again after a disconnect: output from then on
        await h.disconnect()
        const again = []
        const h2 = await sb.pty.connect(h.pid, { onData: (d) => again.push(decoder.decode(d)) })
        await sb.pty.sendInput(h.pid, typed('echo again $((2+3))\n'))
        await until(again, 'again 5\r\n')
        assert.ok(!seen.join('').includes('again 5'))

        assert.equal(await sb.pty.kill(h.pid), true)
        await assert.rejects(h2.wait(), CommandExitError)
        assert.equal(await sb.pty.kill(h.pid), false)
        const lasting = await sb.pty.create({ cols: 80, rows: 24, onData: () => {}, timeoutMs: 0 })
        await lasting.disconnect()  // left running (no timeout) for another key to try
        console.log(sb.sandboxId, lasting.pid)
        console.log('ok')
        """,
    )
    assert out.strip().endswith("ok")
    sandbox_id, pid = out.split()[:2]

    other = server.key("e2b-js-pty-other")
    out = node(
        server,
        other,
        f"""
        import assert from 'node:assert/strict'
        import {{ Sandbox, SandboxNotFoundError, NotFoundError }} from 'e2b'
        await assert.rejects(Sandbox.connect({sandbox_id!r}),
                             (e) => e instanceof SandboxNotFoundError || e instanceof NotFoundError)
        console.log('ok')
        """,
    )
    assert out.strip().endswith("ok")
    out = node(
        server,
        key,
        f"""
        import assert from 'node:assert/strict'
        import {{ Sandbox }} from 'e2b'
        const sb = await Sandbox.connect({sandbox_id!r})
        const listed = await sb.commands.list()
        assert.ok(listed.some((p) => p.pid === {pid}), JSON.stringify(listed))
        assert.equal(await sb.pty.kill({pid}), true)
        await sb.kill()
        console.log('ok')
        """,
    )
    assert out.strip().endswith("ok")


def test_js_oldest_sdks(server: ServerProcess, key: str) -> None:
    """JavaScript ``e2b`` 2.7.0 and ``@e2b/code-interpreter`` 2.7.0 (on
    ``e2b`` 2.28.0), the first to honour E2B_SANDBOX_URL."""
    if not (JS_OLDEST / "node_modules" / "@e2b" / "code-interpreter").is_dir():
        pytest.skip("scripts/bootstrap test runs npm ci in tests/e2b-js-oldest")
    e2b_key = "e2b_" + key.encode().hex()  # e2b 2.28 insists on E2B's key format
    out = node(
        server,
        e2b_key,
        r"""
        import assert from 'node:assert/strict'
        import { Sandbox as Base } from 'e2b'
        import { Sandbox } from '@e2b/code-interpreter'

        const sb = await Base.create({ timeoutMs: 120_000 })
        assert.equal((await sb.commands.run('echo hi')).stdout, 'hi\n')
        const h = await sb.commands.run('read x; echo got $x', { background: true, stdin: true })
        await sb.commands.sendStdin(h.pid, 'typed\n')
        assert.equal((await h.wait()).stdout, 'got typed\n')
        await sb.files.write('a.txt', 'hello')
        assert.equal(await sb.files.read('/home/user/a.txt'), 'hello')
        const events = []
        const w = await sb.files.watchDir('/home/user', (e) => events.push(e.name))
        await sb.files.write('b.txt', 'b')
        const pause = (ms) => new Promise((r) => setTimeout(r, ms))
        for (let i = 0; i < 100 && !events.length; i++) await pause(50)
        await w.stop()
        assert.deepEqual(events, ['b.txt'])
        assert.equal(await (await fetch(await sb.downloadUrl('a.txt'))).text(), 'hello')
        let series = []
        for (let i = 0; i < 150 && !series.length; i++) {  // a sample a second
          series = await sb.getMetrics()
          if (!series.length) await pause(200)
        }
        assert.ok(series.at(-1).memUsed > 0)
        assert.equal(await sb.betaPause(), true)
        const again = await Base.connect(sb.sandboxId)  // resumes it
        assert.equal((await again.commands.run('echo back')).stdout, 'back\n')
        assert.ok((await Base.list().nextItems()).some((s) => s.sandboxId === sb.sandboxId))
        await again.kill()

        const ci = await Sandbox.create({ timeoutMs: 120_000 })
        const ex = await ci.runCode("x = 40\nprint('p')\nx + 2")
        assert.equal(ex.text, '42')
        assert.deepEqual(ex.logs.stdout, ['p\n'])
        const ctx = await ci.createCodeContext()
        await ci.runCode('y = 7', { context: ctx })
        assert.equal((await ci.runCode('y', { context: ctx })).text, '7')
        await ci.kill()
        console.log('ok')
        """,
        where=JS_OLDEST,
    )
    assert out.strip().endswith("ok")
