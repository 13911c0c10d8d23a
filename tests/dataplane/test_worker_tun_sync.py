"""The account TUN's routes are synced in the packet loop, so a sync does only
the difference (a full replace took 260 ms at 1000 routes, per new route) and
reuses one netlink handle per account (pyroute2 forks to make one in another
namespace, ~6 ms)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dataplane import tun
from dataplane.worker import AccountNet, Worker, WorkerConfig

from ._worker_records import ACCOUNT_A, route, tunnel


class FakeTun:
    """Stands in for ``tun.TunConfig``: records handles made and applies."""

    def __init__(self) -> None:
        self.opened: list[object] = []
        self.closed: list[object] = []
        self.applied: list[tuple[list[str], list[str], object]] = []
        self.fail_next = False

    def __call__(self, name: str, *, netns_name: str | None = None) -> Any:
        fake = self

        class Handle:
            def close(self) -> None:
                fake.closed.append(self)

        class Config:
            def open(self) -> Any:
                h = Handle()
                fake.opened.append(h)
                return h

            def apply(self, *, mtu: int, routes: Any, remove_routes: Any, ipr: Any) -> None:
                assert ipr in fake.opened and ipr not in fake.closed
                if fake.fail_next:
                    fake.fail_next = False
                    raise OSError("netlink went away")
                fake.applied.append((list(routes), list(remove_routes), ipr))

        return Config()


@pytest.fixture
def w(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Worker, FakeTun]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    w = Worker(WorkerConfig(anycast="192.0.2.1", run_dir=run_dir, metrics_port=0))
    w.dp.attach_account(AccountNet(ACCOUNT_A, lambda d: None))  # its TUN "is open"
    fake = FakeTun()
    monkeypatch.setattr(tun, "TunConfig", fake)
    return w, fake


def feed(w: Worker, *recs: Any, delete: Any = None) -> None:
    for r in recs:
        w._on_set(r.key, r)
    if delete is not None:
        w._on_delete(delete.key)
    w._drain_events()


def test_only_the_difference_is_applied_with_one_kept_handle(w: tuple[Worker, FakeTun]) -> None:
    worker, fake = w
    t, r1, r2 = tunnel(1), route(1, "10.2.0.0/24", 1), route(2, "10.3.0.0/24", 1)
    feed(worker, t, r1)
    assert [a[:2] for a in fake.applied] == [(["10.100.0.0/31", "10.2.0.0/24"], [])]
    feed(worker, r2)  # one new route: one route added, nothing replaced
    assert fake.applied[-1][:2] == (["10.3.0.0/24"], [])
    feed(worker, t)  # the same tunnel again: nothing to do, no netlink
    assert len(fake.applied) == 2
    feed(worker, delete=r2)
    assert fake.applied[-1][:2] == ([], ["10.3.0.0/24"])
    assert len(fake.opened) == 1 and not fake.closed  # one handle, kept


def test_a_failed_sync_drops_the_handle_and_the_next_one_retries(
    w: tuple[Worker, FakeTun],
) -> None:
    worker, fake = w
    feed(worker, tunnel(1), route(1, "10.2.0.0/24", 1))
    fake.fail_next = True
    feed(worker, route(2, "10.3.0.0/24", 1))  # logged, not raised
    assert fake.closed == fake.opened[:1]
    feed(worker, route(3, "10.4.0.0/24", 1))
    assert len(fake.opened) == 2
    assert fake.applied[-1][:2] == (["10.3.0.0/24", "10.4.0.0/24"], [])


def test_the_handle_is_closed_with_the_account(w: tuple[Worker, FakeTun]) -> None:
    worker, fake = w
    t, r = tunnel(1), route(1, "10.2.0.0/24", 1)
    feed(worker, t, r)
    feed(worker, delete=r)
    worker._on_delete(t.key)
    worker._drain_events()
    assert ACCOUNT_A not in worker.dp.accounts
    assert fake.closed == fake.opened


def test_a_failed_account_sync_is_retried_until_it_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose account setup failed once (a namespace a sibling was
    still creating) used to give up until the next record for that account:
    it never read the account's TUN queue, dropped the packets of SAs it
    owned, and a sibling's death took the TUN and its routes with it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    w = Worker(WorkerConfig(anycast="192.0.2.1", run_dir=run_dir, metrics_port=0))
    calls: list[str] = []

    def flaky(account: str) -> None:
        calls.append(account)
        if len(calls) <= 2:
            raise tun.TunError("cannot enter network namespace 'x': Invalid argument")

    w._sync_account = flaky  # type: ignore[method-assign]
    w._on_set(tunnel(1).key, tunnel(1))
    w._drain_events()
    assert calls == [ACCOUNT_A] and ACCOUNT_A in w._dirty_accounts
    w._update_share = lambda: None  # type: ignore[method-assign]  # no sockets in this test
    w._housekeeping()  # 0.25 s later: fails again, logged once
    w._housekeeping()  # works
    w._housekeeping()  # nothing left to do
    assert calls == [ACCOUNT_A] * 3 and not w._dirty_accounts
    assert w.metrics.registry.get_sample_value("anywan_worker_account_sync_failures_total") == 2
    errors = [r for r in caplog.records if "retrying every" in r.getMessage()]
    assert len(errors) == 1
    assert any("set up after retrying" in r.getMessage() for r in caplog.records)
