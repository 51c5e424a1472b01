"""Stateful code execution through real kernels in real boxes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import pytest

from corral import (
    AsyncSandbox,
    CorralError,
    ExecutionError,
    HostToolMissing,
    Policy,
    Result,
    Sandbox,
    _runtime,
)

if _runtime.find() is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI must build the code runtime first (scripts/bootstrap)")
    pytest.skip("no code runtime: run `corral runtime build`", allow_module_level=True)

SALES = b"region,amount\nnorth,1\nsouth,2\nnorth,3\n"


async def test_state_rich_results_and_errors() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        await sb.files.write("sales.csv", SALES)
        ex = await sb.run_code(
            "import pandas as pd\ndf = pd.read_csv('sales.csv')\nprint('loaded')"
        )
        assert ex.error is None
        assert ex.logs.stdout == ("loaded\n",)
        ex = await sb.run_code("df.groupby('region').sum()")
        assert ex.text is not None
        assert "north" in ex.text
        assert ex.results[0].html is not None
        assert "<table" in ex.results[0].html
        assert ex.execution_count == 2
        ex = await sb.run_code(
            "df.plot(x='region', y='amount'); import matplotlib.pyplot as plt; plt.show()"
        )
        pngs = [r.png for r in ex.results if r.png]
        assert pngs
        assert pngs[0].startswith(b"\x89PNG\r\n\x1a\n")
        ex = await sb.run_code("from IPython.display import Markdown, JSON\nMarkdown('**hi**')")
        assert ex.results[0].markdown == "**hi**"
        ex = await sb.run_code("import sys; print('oops', file=sys.stderr); 1/0")
        assert ex.logs.stderr == ("oops\n",)
        assert ex.error is not None
        assert ex.error.name == "ZeroDivisionError"
        assert "division by zero" in ex.error.value
        assert "\x1b[" not in ex.error.traceback
        assert "1/0" in ex.error.traceback


async def test_bash_and_javascript_keep_state() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        ex = await sb.run_code('GREETING=hello; cd /tmp; f() { echo "$1!"; }', language="bash")
        assert ex.error is None
        ex = await sb.run_code("echo $GREETING; pwd; f world", language="bash")
        assert "".join(ex.logs.stdout) == "hello\n/tmp\nworld!\n"
        ex = await sb.run_code("const x = [1,2,3].map(v => v * 2); x", language="javascript")
        assert ex.text == "[ 2, 4, 6 ]"
        ex = await sb.run_code(
            "function twice(n) { return 2 * n }\nconsole.log(twice(x[2]))", language="javascript"
        )
        assert ex.logs.stdout == ("12\n",)
        ex = await sb.run_code("undefinedThing.call()", language="javascript")
        assert ex.error is not None
        assert ex.error.name == "ReferenceError"


async def test_bash_keeps_stderr_apart_and_names_the_exit_status() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        ex = await sb.run_code("echo out; echo err >&2; ls /no-such-dir", language="bash")
        assert ex.logs.stdout == ("out\n",)
        stderr = "".join(ex.logs.stderr)
        assert stderr.startswith("err\n")
        assert "No such file or directory" in stderr
        assert ex.error is not None
        assert ex.error.name == "ExitStatus"
        assert "exited with status 2" in ex.error.value
        ex = await sb.run_code("false", language="bash")
        assert ex.error is not None
        assert "exited with status 1" in ex.error.value
        assert (await sb.run_code("true", language="bash")).error is None
        # a multi-line cell, and a background job's late stderr stays with its own cell
        ex = await sb.run_code(
            "(sleep 0.5; echo late >&2) &\nif true; then\n  echo in\nfi", language="bash"
        )
        assert (ex.logs.stdout, ex.error) == (("in\n",), None)
        ex = await sb.run_code("sleep 1.5; echo mine", language="bash")
        assert ex.logs.stdout == ("mine\n",)
        assert "late" not in "".join(ex.logs.stderr)
        # an interrupted bash cell keeps the shell's state
        await sb.run_code("KEPT=yes", language="bash")
        ex = await sb.run_code("sleep 60", language="bash", timeout_s=1)
        assert ex.error is not None
        assert ex.error.limit_hit == "timeout"
        assert not ex.restarted
        assert (await sb.run_code("echo $KEPT", language="bash")).logs.stdout == ("yes\n",)


async def test_no_tool_state_in_the_workspace() -> None:
    """After cells in every language (and with their contexts ended), the
    workspace holds only what the cells wrote: no .ipython, .bash_history,
    Jupyter runtime files or Deno caches."""
    async with AsyncSandbox(timeout_s=120) as sb:
        cells = {
            "python": "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()\n"
            "open('p.txt', 'w').write('p')",
            "bash": "echo secret-cell-text > b.txt",
            "javascript": "Deno.writeTextFileSync('j.txt', 'j')",
            "typescript": "const t: string = 't'; Deno.writeTextFileSync('t.txt', t)",
        }
        contexts = []
        for language, code in cells.items():
            contexts.append(await sb.create_code_context(language))
            ex = await sb.run_code(code, context=contexts[-1])
            assert ex.error is None, (language, ex.error)
        listing = await sb.commands.run("ls -A /workspace")
        assert listing.stdout.decode().split() == ["b.txt", "j.txt", "p.txt", "t.txt"]
        for context in contexts:
            await sb.remove_code_context(context)
        listing = await sb.commands.run("ls -A /workspace; grep -rl secret-cell-text /workspace")
        assert listing.stdout.decode().split() == [
            "b.txt",
            "j.txt",
            "p.txt",
            "t.txt",
            "/workspace/b.txt",
        ]


async def test_contexts_are_independent_and_restartable() -> None:
    # 20 kernels: ~60 MiB and a dozen threads each
    policy = Policy.preset("dev").with_limits(memory_bytes=3 << 30, pids=1024)
    async with AsyncSandbox(policy, timeout_s=180) as sb:
        contexts = [await sb.create_code_context("python", cwd=f"c{i}") for i in range(20)]
        await asyncio.gather(*(sb.run_code(f"n = {i}", context=c) for i, c in enumerate(contexts)))
        values = await asyncio.gather(*(sb.run_code("n", context=c) for c in contexts))
        assert [v.text for v in values] == [str(i) for i in range(20)]
        ex = await sb.run_code("import os; os.getcwd()", context=contexts[3])
        assert ex.text == "'/workspace/c3'"
        await sb.restart_code_context(contexts[0])
        ex = await sb.run_code("n", context=contexts[0])
        assert ex.error is not None
        assert ex.error.name == "NameError"
        await sb.remove_code_context(contexts[1])
        with pytest.raises(CorralError, match="does not exist"):
            await sb.run_code("n", context=contexts[1])


async def test_timeout_interrupts_and_keeps_state() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        await sb.run_code("kept = 'still here'")
        started = time.monotonic()
        ex = await sb.run_code("while True: pass", timeout_s=2)
        assert time.monotonic() - started < 10
        assert ex.error is not None
        assert ex.error.name == "TimeoutError"
        assert ex.error.limit_hit == "timeout"
        assert not ex.restarted
        assert (await sb.run_code("kept")).text == "'still here'"
        # a cell that ignores the interrupt: the context is restarted, and says so
        ex = await sb.run_code(
            "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)",
            timeout_s=1,
        )
        assert ex.error is not None
        assert ex.error.name == "TimeoutError"
        assert ex.restarted
        assert (await sb.run_code("1 + 1")).text == "2"


async def test_memory_limit_kills_the_kernel_and_the_next_cell_works() -> None:
    policy = Policy.preset("default").with_limits(memory_bytes=768 << 20)
    async with AsyncSandbox(policy, timeout_s=120) as sb:
        await sb.run_code("x = 1")
        ex = await sb.run_code("b = bytearray(4 << 30)\nb[::4096] = b'x' * len(b[::4096])")
        assert ex.error is not None
        assert ex.error.limit_hit == "memory", ex.error
        ex = await sb.run_code("2 + 2")
        assert ex.text == "4"


async def test_callbacks_fire_as_output_happens() -> None:
    async with AsyncSandbox(timeout_s=60) as sb:
        seen: list[tuple[float, str]] = []
        results: list[Result] = []
        errors: list[ExecutionError] = []
        await sb.run_code(
            "import time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.3)\n42",
            on_stdout=lambda text: seen.append((time.monotonic(), text)),
            on_result=results.append,
        )
        assert "".join(t for _, t in seen) == "0\n1\n2\n"
        assert seen[-1][0] - seen[0][0] > 0.4
        assert results[0].text == "42"
        await sb.run_code("raise KeyError('k')", on_error=errors.append)
        assert errors[0].name == "KeyError"


async def test_kernels_die_with_the_box() -> None:
    async with AsyncSandbox(timeout_s=60) as sb:
        await sb.run_code("1")
        await sb.run_code("1", language="bash")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert "ipykernel_launcher" not in ps
    assert "bash_kernel" not in ps
    assert "kernel_driver.py bash-kernel" not in ps


async def test_a_missing_runtime_says_how_to_build_it() -> None:
    async with AsyncSandbox(runtime="not-built") as sb:
        with pytest.raises(HostToolMissing, match="corral runtime build not-built"):
            await sb.run_code("1")


def test_sync_run_code() -> None:
    with Sandbox() as sb:
        sb.files.write("sales.csv", SALES)
        sb.run_code("import pandas as pd\ndf = pd.read_csv('sales.csv')")
        assert "north" in (sb.run_code("df.groupby('region').sum()").text or "")
        ex = sb.run_code("echo $HOME; ls", language="bash")
        assert ex.logs.stdout[0] == "/workspace\n"
        context = sb.create_code_context("python", cwd="analysis")
        sb.run_code("x = 1", context=context)
        sb.restart_code_context(context)
        assert sb.run_code("x", context=context).error is not None


async def test_displays_order_errors_files_and_streaming() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        order: list[str] = []
        ex = await sb.run_code(
            "from IPython.display import display\n"
            "print('a'); display('one'); print('b'); display('two'); display('three')",
            on_stdout=lambda t: order.append(f"out:{t.strip()}"),
            on_result=lambda r: order.append(f"res:{r.text}"),
        )
        assert [r.text for r in ex.results] == ["'one'", "'two'", "'three'"]
        assert order == ["out:a", "res:'one'", "out:b", "res:'two'", "res:'three'"]
        ex = await sb.run_code("def broken(:\n    pass")
        assert ex.error is not None
        assert ex.error.name == "SyntaxError"
        assert ex.error.traceback
        # the workspace is the kernel's cwd, both ways
        await sb.run_code("open('from_code.txt', 'w').write('written by code')")
        assert await sb.files.read("from_code.txt") == b"written by code"
        await sb.files.write("from_host.txt", b"written by host")
        assert (await sb.run_code("open('from_host.txt').read()")).text == "'written by host'"
        # a plot decodes with pillow, at the figure's size (uncropped)
        ex = await sb.run_code(
            "%config InlineBackend.print_figure_kwargs = {'bbox_inches': None}\n"
            "import matplotlib.pyplot as plt\n"
            "fig = plt.figure(figsize=(4, 3), dpi=100); plt.plot([1, 3, 2]); plt.show()"
        )
        png = next(r.png for r in ex.results if r.png)
        await sb.files.write("plot.png", png)
        size = await sb.run_code("from PIL import Image; Image.open('plot.png').size")
        assert size.text == "(400, 300)"
        # async iteration: chunks arrive before the cell ends
        stamps: list[tuple[float, str]] = []
        async for kind, value in sb.stream_code(
            "print('x', flush=True)\nimport time; time.sleep(1)\nprint('y')"
        ):
            stamps.append((time.monotonic(), kind))
            if kind == "done":
                assert value.error is None  # type: ignore[union-attr]
        kinds = [k for _, k in stamps]
        assert kinds == ["stdout", "stdout", "done"]
        assert stamps[1][0] - stamps[0][0] > 0.8


async def test_a_cells_output_is_bounded_by_the_policy() -> None:
    """A cell printing without end must not fill the host's memory before its
    timeout: beyond output_bytes its output is dropped, and it says so."""
    policy = Policy.preset("default").with_limits(output_bytes=1 << 20)
    async with AsyncSandbox(policy) as sb:
        seen: list[str] = []
        notices: list[str] = []
        execution = await sb.run_code(
            "for i in range(20_000):\n    print('é' * 500)\n'still here'",
            on_stdout=seen.append,
            on_stderr=notices.append,
        )
        kept = sum(len(t.encode()) for t in execution.logs.stdout)  # bytes, not characters
        assert (1 << 20) - 4 <= kept <= 1 << 20
        assert "".join(seen) == "".join(execution.logs.stdout)
        assert notices == ["[corral] output beyond 1048576 bytes was dropped\n"]
        assert "output beyond 1048576 bytes was dropped" in "".join(execution.logs.stderr)
        assert execution.error is None
        assert (await sb.run_code("1 + 1")).text == "2"  # the next cell is whole again


# -- the channel, deadlines, cancellation, many contexts, late output (issue 12) -------


async def test_what_user_code_writes_cannot_corrupt_the_channel() -> None:
    """The kernels' own stdout is not the driver's channel: a child's unterminated
    write, a raw fd write, and bytes of any kind come back as output, and the
    next cell still answers."""
    async with AsyncSandbox(timeout_s=120) as sb:
        await sb.run_code(
            "import subprocess\nchild = subprocess.Popen(['sh', '-c', 'sleep 1; printf zz'])"
        )
        await sb.run_code("child.wait()")
        ex = await asyncio.wait_for(sb.run_code("pass"), 60)
        assert ex.error is None
        ex = await sb.run_code("import os\nos.write(1, b'partial')\nprint('x')")
        out = "".join(ex.logs.stdout)  # (the kernel orders fd and sys.stdout writes itself)
        assert "partial" in out
        assert out.replace("partial", "", 1) == "x\n"
        ex = await sb.run_code(
            "import sys\nos.write(1, b'\\xff\\xfea\\x00b')\n"
            "sys.stdout.write('y' * (1 << 20)); sys.stdout.flush()\nos.write(1, b'end')"
        )
        out = "".join(ex.logs.stdout)
        assert "\ufffd\ufffda\x00b" in out  # not UTF-8: replaced by the kernel, NUL kept
        assert out.count("y") == 1 << 20
        assert out.endswith("end")
        assert (await sb.run_code("1 + 1")).text == "2"


async def test_the_channel_cannot_be_reopened_from_inside() -> None:
    """Attack: code in a kernel tries to reach the driver's channel through
    /proc (it runs under the same uid); the driver is not dumpable."""
    async with AsyncSandbox(timeout_s=120) as sb:
        ex = await sb.run_code("import os\nos.listdir(f'/proc/{os.getppid()}/fd')")
        assert ex.error is not None
        assert ex.error.name == "PermissionError", ex.error
        ex = await sb.run_code("open(f'/proc/{os.getppid()}/fd/1', 'wb')")
        assert ex.error is not None
        assert ex.error.name == "PermissionError", ex.error
        # what the kernel has as fd 1 is not the channel either: forged events
        # written there are this cell's output, nothing more
        ex = await sb.run_code(
            "import json\nfor ident in range(1, 50):\n"
            "    os.write(1, json.dumps({'id': ident, 'event': 'done'}).encode() + b'\\n')\n"
            "import time; time.sleep(0.5)\n'after'"
        )
        assert ex.text == "'after'"
        assert '{"id": 49, "event": "done"}' in "".join(ex.logs.stdout)


async def test_a_cell_whose_end_never_comes_ends_on_the_hosts_clock() -> None:
    """The driver itself stops (SIGSTOP): no "done" ever arrives, and the call
    still ends, as a timeout, by timeout_s plus the host's grace."""
    async with AsyncSandbox(timeout_s=120) as sb:
        ex = await asyncio.wait_for(
            sb.run_code("import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)", timeout_s=1),
            60,
        )
        assert ex.error is not None
        assert ex.error.name == "TimeoutError"
        assert ex.error.limit_hit == "timeout"
        assert ex.restarted


async def test_cancelling_run_code_interrupts_the_cell() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        await sb.run_code("kept = 'still here'")
        cell = asyncio.ensure_future(sb.run_code("import time\ntime.sleep(600)", timeout_s=600))
        await asyncio.sleep(2)
        cell.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cell
        # the cell was interrupted in the box: the context is free and kept its state
        ex = await asyncio.wait_for(sb.run_code("kept"), 60)
        assert ex.text == "'still here'"
        assert not ex.restarted


@pytest.mark.parametrize("language", ["python", "bash"])
async def test_restart_ends_the_running_call_at_once(language: str) -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        context = await sb.create_code_context(language)
        code = "import time\ntime.sleep(600)" if language == "python" else "sleep 600"
        cell = asyncio.ensure_future(sb.run_code(code, context=context))
        await asyncio.sleep(2)
        await sb.restart_code_context(context)
        ex = await asyncio.wait_for(cell, 30)
        assert ex.error is not None
        assert ex.error.name == "ContextRestarted"
        assert "restarted" in ex.error.value
        assert ex.restarted
        probe = "1 + 1" if language == "python" else "echo fine"
        ex = await asyncio.wait_for(sb.run_code(probe, context=context), 60)
        assert ex.error is None


async def test_the_default_policy_holds_eight_python_contexts() -> None:
    """Eight Python contexts fit the default policy (12 threads each against
    its 128 pids); one more fails alone, naming the limit, and no other
    context is touched."""
    async with AsyncSandbox(Policy.preset("default"), timeout_s=300) as sb:
        await sb.run_code("n = 'default'")
        contexts = [await sb.create_code_context("python") for _ in range(7)]
        for i, context in enumerate(contexts):
            await sb.run_code(f"n = {i}", context=context)
        failure: CorralError | None = None
        for _ in range(6):
            try:
                contexts.append(await sb.create_code_context("python"))
            except CorralError as exc:
                failure = exc
                break
        assert failure is not None
        assert "pids limit" in str(failure), failure
        ex = await sb.run_code("n")
        assert ex.text == "'default'"
        assert not ex.restarted
        for i, context in enumerate(contexts[:7]):
            ex = await sb.run_code("n", context=context)
            assert (ex.text, ex.restarted) == (str(i), False)


async def test_output_after_a_cell_ended_is_not_put_into_the_next() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        await sb.run_code("import threading\nthreading.Timer(0.5, print, ['late']).start()")
        ex = await sb.run_code("import time\ntime.sleep(1.5)\nprint('mine')")
        assert ex.logs.stdout == ("mine\n",)


async def test_javascript_and_typescript_on_deno() -> None:
    """Deno's Jupyter kernel: state across cells, top-level await, TypeScript,
    rich results, console.log as stdout; what user code writes to the
    process's stdout cannot desynchronise later cells."""
    async with AsyncSandbox(timeout_s=120) as sb:
        ex = await sb.run_code("console.log('x'.repeat(70000))", language="js")
        assert ex.logs.stdout == ("x" * 70000 + "\n",)
        assert (await sb.run_code("1+1", language="js")).text == "2"
        assert (await sb.run_code("2+2", language="js")).text == "4"
        ex = await sb.run_code("process.stdout.write('plain\\n'); 3+3", language="javascript")
        assert ex.text == "6"
        assert (await sb.run_code("4+4", language="js")).text == "8"
        await sb.run_code("const n: number = await Promise.resolve(21)", language="typescript")
        assert (await sb.run_code("n * 2", language="typescript")).text == "42"
        ex = await sb.run_code("n + structuredClone({a: 1}).a", language="ts")
        assert ex.text == "22"
        ex = await sb.run_code("Deno.jupyter.html`<b>hi</b>`", language="ts")
        assert ex.results[0].html == "<b>hi</b>"
        ex = await sb.run_code("Deno.env.get('DENO_DIR')", language="ts")
        assert ex.text == '"/tmp/.corral/deno"'  # caches in the box, not the workspace
        ex = await sb.run_code("console.error('e'); null.x", language="ts")
        assert ex.logs.stderr == ("e\n",)
        assert ex.error is not None
        assert ex.error.name == "TypeError"
        assert ex.error.traceback


async def test_a_promise_that_never_resolves_times_out() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        ex = await asyncio.wait_for(
            sb.run_code("await new Promise(() => {})", language="js", timeout_s=1), 60
        )
        assert ex.error is not None
        assert ex.error.limit_hit == "timeout"
        assert ex.restarted  # Deno's kernel cannot be interrupted: it is restarted
        assert (await sb.run_code("1+1", language="js")).text == "2"


async def test_javascript_late_output_stays_with_its_own_cell() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        ex = await sb.run_code(
            "setTimeout(() => console.log('late'), 500);\n"
            "Promise.resolve().then(() => new Promise((r) => setTimeout(r, 700)))"
            ".then(() => console.error('late too'));\nconsole.log('now')",
            language="js",
        )
        assert ex.logs.stdout == ("now\n",)
        ex = await sb.run_code(
            "await new Promise((r) => setTimeout(r, 1500)); console.log('mine')", language="js"
        )
        assert (ex.logs.stdout, ex.logs.stderr) == (("mine\n",), ())
        # a cell's own timers and promises still print into it
        ex = await sb.run_code(
            "await new Promise((r) => setTimeout(() => { console.log('own'); r(1) }, 100))",
            language="ts",
        )
        assert ex.logs.stdout == ("own\n",)


async def test_e2b_result_shapes() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        # the first plot: chart data beside the image, and no Fontconfig noise
        ex = await sb.run_code(
            "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\n"
            "ax.bar(['a', 'b'], [3, 5]); ax.set_title('Sales'); ax.set_xlabel('region')\n"
            "plt.show()"
        )
        assert ex.error is None
        assert ex.logs.stderr == ()
        (figure,) = ex.results
        assert figure.png is not None
        assert figure.chart is not None
        assert figure.chart["type"] == "bar"
        assert (figure.chart["title"], figure.chart["x_label"]) == ("Sales", "region")
        elements = figure.chart["elements"]
        assert isinstance(elements, list)
        assert [(e["label"], e["value"]) for e in elements] == [("a", 3.0), ("b", 5.0)]
        ex = await sb.run_code("plt.plot([1, 2, 3], [2, 4, 8]); plt.title('Growth'); plt.show()")
        assert ex.results[0].chart is not None
        assert (ex.results[0].chart["type"], ex.results[0].chart["title"]) == ("line", "Growth")
        # a DataFrame's columns, a dict's JSON, the main result and the others
        ex = await sb.run_code(
            "import pandas as pd\npd.DataFrame({'n': [1, None], 's': ['x', 'y']})"
        )
        assert ex.results[0].data == {"n": [1.0, None], "s": ["x", "y"]}
        assert ex.results[0].is_main_result
        ex = await sb.run_code("{'a': [1, 2], 'b': None}")
        assert ex.results[0].json == {"a": [1, 2], "b": None}
        assert (await sb.run_code("[1, 'two']")).results[0].json == [1, "two"]
        assert (await sb.run_code("{'f': float('nan')}")).results[0].json is None
        ex = await sb.run_code(
            "from IPython.display import Latex, Javascript, Markdown, display\n"
            "display(Latex('$x^2$'), Javascript('1 + 1'), Markdown('*m*'))\n"
            "display({'application/x-corral-test': {'k': 1}, 'text/plain': 'raw'}, raw=True)\n"
            "'last'"
        )
        latex, script, markdown, raw, last = ex.results
        assert (latex.latex, script.javascript, markdown.markdown) == ("$x^2$", "1 + 1", "*m*")
        assert raw.extra == {"application/x-corral-test": {"k": 1}}
        assert [r.is_main_result for r in ex.results] == [False] * 4 + [True]
        assert last.text == "'last'"
        # a display updated by id shows its last value; clear_output clears the cell
        ex = await sb.run_code(
            "h = display('one', display_id=True)\nh.update('two')\nh.update('three')\n"
            "display('other')"
        )
        assert [r.text for r in ex.results] == ["'three'", "'other'"]
        ex = await sb.run_code(
            "from IPython.display import clear_output\nprint('gone'); display('gone too')\n"
            "clear_output()\nprint('a')\nclear_output(wait=True)\nprint('b')"
        )
        assert (ex.logs.stdout, ex.results) == (("b\n",), ())
        # PIL's Image.show() displays the image
        ex = await sb.run_code("from PIL import Image\nImage.new('RGB', (4, 4), 'red').show()")
        assert ex.error is None
        assert ex.results
        assert ex.results[0].png is not None
        assert ex.results[0].png.startswith(b"\x89PNG")


async def test_envs_for_one_call_and_contexts_by_keyword_and_id() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        await sb.run_code("import os; os.environ['KEEP'] = 'before'")
        ex = await sb.run_code(
            "os.environ['KEEP'], os.environ['NEW']", envs={"KEEP": "during", "NEW": "it's"}
        )
        assert ex.text == "('during', \"it's\")"
        ex = await sb.run_code("os.environ['KEEP'], os.environ.get('NEW')")
        assert ex.text == "('before', None)"
        ex = await sb.run_code('echo "$NEW"', language="bash", envs={"NEW": "a b $x"})
        assert ex.logs.stdout == ("a b $x\n",)
        ex = await sb.run_code("echo ${NEW-unset}", language="bash")
        assert ex.logs.stdout == ("unset\n",)
        ex = await sb.run_code("Deno.env.get('NEW')", language="js", envs={"NEW": "js"})
        assert ex.text == '"js"'
        ex = await sb.run_code("Deno.env.get('NEW') ?? 'unset'", language="js")
        assert ex.text == '"unset"'
        with pytest.raises(ValueError, match="not an environment variable name"):
            await sb.run_code("1", envs={"A;rm": "x"})
        with pytest.raises(ValueError, match="NUL"):
            await sb.run_code("1", envs={"A": "x\0y"})
        context = await sb.create_code_context(language="bash", cwd="sub")
        assert (context.language, context.cwd) == ("bash", "/workspace/sub")
        assert context in await sb.list_code_contexts()
        assert {c.language for c in await sb.list_code_contexts()} == {
            "python",
            "javascript",
            "bash",
        }
        ex = await sb.run_code("pwd; X=1", context=context.id)
        assert ex.logs.stdout == ("/workspace/sub\n",)
        await sb.restart_code_context(context.id)
        assert (await sb.run_code("echo ${X-gone}", context=context)).logs.stdout == ("gone\n",)
        await sb.remove_code_context(context.id)
        assert context not in await sb.list_code_contexts()
        with pytest.raises(CorralError, match="does not exist"):
            await sb.remove_code_context(context.id)
