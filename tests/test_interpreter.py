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
