"""``GET /v1/sandboxes/{id}/metrics``: each box's usage as a short time series,
sampled from its cgroup by a real ``corral serve`` while the box burns CPU,
allocates memory, forks and writes files; scoped to the key; kept a while after
the box ended."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.backends import Usage
from corral.server._live import ServiceError
from corral.server._service import Service, ServiceConfig
from corral.server._store import Store
from corral.server._usage import UsageConfig, UsageHistory
from tests.server_helpers import ServerProcess, serving


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with serving() as srv:
        yield srv


def _api(srv: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _until(
    api: httpx.Client, sandbox_id: str, check: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """The samples once ``check`` holds for them (the series fills at 1 Hz)."""
    samples: list[dict[str, Any]] = []
    for _ in range(120):
        reply = api.get(f"/v1/sandboxes/{sandbox_id}/metrics")
        assert reply.status_code == 200, reply.text
        samples = reply.json()["samples"]
        if check(samples):
            return samples
        time.sleep(0.5)
    raise AssertionError(f"never held: {samples[-3:]}")


@pytest.mark.timeout(240)
def test_usage_follows_what_the_box_does(server: ServerProcess) -> None:
    key, other = server.key("usage-a"), server.key("usage-b")
    with _api(server, key) as api, _api(server, other) as api_b:
        created = api.post(
            "/v1/sandboxes",
            json={"runtime": None, "policy": {"limits": {"memory_bytes": 256 << 20, "pids": 64}}},
        )
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        report = api.get(f"/v1/sandboxes/{sid}/metrics").json()
        assert report["sandbox_id"] == sid
        assert report["state"] == "running"
        assert report["interval_s"] > 0
        assert report["limits"]["memory_bytes"] == 256 << 20
        assert report["limits"]["pids"] == 64
        idle = _until(api, sid, lambda s: len(s) >= 3 and s[-1]["cpu_used_pct"] is not None)
        base_memory, base_pids = idle[-1]["memory_bytes"], idle[-1]["pids"]
        assert isinstance(base_memory, int)
        assert isinstance(base_pids, int)

        # burn one core, hold 96 MiB, run 8 more processes, write 8 MiB to the workspace
        work = (
            'python3 -c \'import time; x = bytearray(96 << 20); x[::4096] = b"1" * len(x[::4096]);'
            " time.sleep(60)' & "
            "for i in 1 2 3 4 5 6 7 8; do sleep 60 & done; "
            "head -c 8388608 /dev/zero > $HOME/blob; "
            "timeout 60 sh -c 'while :; do :; done'"
        )
        started = api.post(
            f"/v1/sandboxes/{sid}/commands", json={"command": work, "background": True}
        )
        assert started.status_code == 201, started.text
        busy = _until(
            api,
            sid,
            lambda s: (
                (s[-1]["cpu_used_pct"] or 0) > 50
                and (s[-1]["memory_bytes"] or 0) > base_memory + (64 << 20)
                and (s[-1]["pids"] or 0) >= base_pids + 8
                and (s[-1]["disk_bytes"] or 0) >= 8 << 20
            ),
        )
        assert busy[-1]["cpu_time_s"] > idle[-1]["cpu_time_s"]
        times = [s["time"] for s in busy]
        assert times == sorted(times)
        # since: only the newer samples
        newer = api.get(f"/v1/sandboxes/{sid}/metrics", params={"since": times[-2]}).json()
        assert [s["time"] for s in newer["samples"]][:1] == times[-1:]

        # another key: as absent as a missing sandbox
        theirs = api_b.get(f"/v1/sandboxes/{sid}/metrics")
        assert theirs.status_code == 404
        assert theirs.json()["error"]["code"] == "not_found"

        # ended: the series stops and stays readable
        assert api.delete(f"/v1/sandboxes/{sid}").status_code == 200
        ended = api.get(f"/v1/sandboxes/{sid}/metrics").json()
        assert ended["state"] == "ended"
        count = len(ended["samples"])
        assert count >= len(busy)
        time.sleep(2.5)
        assert len(api.get(f"/v1/sandboxes/{sid}/metrics").json()["samples"]) == count


def test_the_series_is_a_bounded_ring() -> None:
    series = UsageHistory.new(UsageConfig(samples=5))
    for n in range(20):
        series.add(Usage(cpu_time_s=float(n), memory_bytes=n, pids=1), disk_bytes=n)
    assert len(series.samples) == 5
    assert [s.memory_bytes for s in series.samples] == [15, 16, 17, 18, 19]  # the newest
    assert series.samples[0].cpu_used_pct is not None  # from the previous reading
    first = UsageHistory.new(UsageConfig()).add(Usage(), disk_bytes=None)
    assert (first.cpu_used_pct, first.memory_bytes, first.pids) == (None, None, None)


def test_another_keys_or_a_missing_sandbox_is_404(server: ServerProcess) -> None:
    with _api(server, server.key("usage-404")) as api:
        reply = api.get("/v1/sandboxes/sb_nope/metrics")
        assert reply.status_code == 404
        assert reply.json()["error"]["code"] == "not_found"


async def test_ended_series_are_kept_briefly_and_few() -> None:
    # a Service in this process, with real boxes: the ring of an ended box stays
    # for keep_ended_s, and only the keep_ended newest of them stay at all
    parent = Path(tempfile.mkdtemp(prefix="corral-test-usage-"))
    parent.chmod(0o755)  # the boxes' uids reach their workspaces through it
    config = ServiceConfig(
        data_dir=parent / "data",
        usage=UsageConfig(interval_s=0.2, keep_ended_s=3.0, keep_ended=1),
    )
    service = Service(Store(f"sqlite:///{parent}/corral.db"), config)
    try:
        await service.start()
        key, _ = service.store.create_key("k")
        other, _ = service.store.create_key("other")

        async def box() -> str:
            row = await service.create(
                key,
                policy=service.resolve_policy(None),
                runtime=None,
                timeout_s=60,
                idle_timeout_s=None,
                metadata={},
                env={},
                network_approval=False,
            )
            return row.id

        first, second = await box(), await box()
        for _ in range(100):
            series = [service.usage(key, sid) for sid in (first, second)]
            if all(s is not None and len(s.samples) >= 2 for s in series):
                break
            await asyncio.sleep(0.1)
        with pytest.raises(ServiceError) as theirs:
            service.usage(other, first)
        assert theirs.value.status == 404
        await service.end(first, "closed")
        kept = service.usage(key, first)
        assert kept is not None
        assert kept.ended_at is not None
        count = len(kept.samples)
        await asyncio.sleep(0.6)  # no sample is added to an ended ring
        assert len(kept.samples) == count
        await service.end(second, "closed")  # keep_ended=1: the older ended ring goes
        assert service.usage(key, first) is None
        assert service.usage(key, second) is not None
        await asyncio.sleep(3.5)  # keep_ended_s: the sampler drops it
        assert service.usage(key, second) is None
        assert service.usage_series == {}
    finally:
        await service.stop()
        shutil.rmtree(parent)
