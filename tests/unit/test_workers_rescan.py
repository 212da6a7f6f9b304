"""The owner's rescan: a message whose notification was lost with its worker is still delivered."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from submitd.config import QueueConfig
from submitd.mailqueue import Spool, new_queue_id
from submitd.message import MessageHandle
from submitd.server.workers import TrackingRunner
from submitd.views import DeliveryOutcome, Envelope, Recipient


class NoDelivery:
    """The runner is never started here: only its schedule is looked at."""

    async def deliver(self, envelope: Envelope, message: MessageHandle,
                      recipients: tuple[Recipient, ...]) -> Mapping[str, DeliveryOutcome]:
        raise AssertionError("not called")

    async def delivery_result(self, envelope: Envelope, recipient: Recipient,
                              outcome: DeliveryOutcome) -> None:
        raise AssertionError("not called")


def commit_behind_its_back(spool: Spool) -> str:
    """A committed message as a worker leaves it (only its sidecar's name matters here)."""
    queue_id = new_queue_id()
    spool.layout.create()
    (spool.layout.env / f"{queue_id}.json").write_text("{}")
    return queue_id


async def test_rescan_attempts_what_nobody_announced_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    runner = TrackingRunner(spool, NoDelivery(), QueueConfig(dir=spool.directory))
    recovered = commit_behind_its_back(spool)
    await runner.remember_queued()  # what the runner recovered at start
    announced = commit_behind_its_back(spool)
    runner.notify(announced)  # a worker told the owner
    lost = commit_behind_its_back(spool)  # its worker died before telling
    assert await runner.rescan() == 1
    assert lost in runner.known
    assert await runner.rescan() == 0  # found once, not again
    # Delivered and removed: forgotten, so the table stays as small as the queue.
    for queue_id in (recovered, lost):
        (spool.layout.env / f"{queue_id}.json").unlink()
    await runner.rescan()
    assert runner.known == {announced}
