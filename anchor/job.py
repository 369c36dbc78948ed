"""The periodic anchor job: batch manifests in, one anchor transaction per period out.

It reads ``vitals.batches``, appends each batch root to the append-only Merkle log (idempotent
by batch id, so a redelivered manifest changes nothing), and commits the Kafka offset only
after the log append is on disk. Every period, if the log grew, it checks that the log still
extends the last anchored head (RFC 9162 consistency) and sends one transaction through the
transaction manager's outbox: exactly one per period whatever the volume, none when nothing
is new.

Other append-only logs ride along: ``checkpoints`` (a callable handed in by the layer above,
the audit log's ``clinic.audit.CheckpointSource``) returns entries shaped like batches,
``(id, root, size)``, which are appended to the same Merkle log just before each anchor, so
one transaction commits to both. This package stays independent of clinic: it sees tuples.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from anchor.chain import AnchorReceipt, Chain
from anchor.errors import AnchorError
from anchor.log import MerkleLog
from anchor.txmanager import TxManager
from vitalproof.errors import VitalproofError
from vitalproof.manifest import BatchManifest
from vitalproof.settings import Settings

log = logging.getLogger(__name__)

#: Extra log entries to anchor with the batches, as ``(entry id, root, size)``.
CheckpointProvider = Callable[[], Iterable[tuple[str, bytes, int]]]


def ensure_contract(chain: Chain, state_dir: Path) -> str:
    """The VitalAnchor address for this chain: reuse a recorded one that still has code,
    else deploy (a restarted dev chain has forgotten it) and record the new one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    record = state_dir / f"contract-{chain.chain_id}.json"
    if record.exists():
        address = json.loads(record.read_text())["address"]
        if chain.w3.eth.get_code(address):
            chain.at(address)
            return str(address)
    address = chain.deploy()
    record.write_text(json.dumps({"address": address, "chain_id": chain.chain_id}) + "\n")
    return address


class AnchorJob:
    def __init__(
        self,
        settings: Settings,
        chain: Chain,
        *,
        confirmations: int = 1,
        checkpoints: CheckpointProvider | None = None,
    ) -> None:
        self.settings = settings
        self.chain = chain
        self.checkpoints = checkpoints
        self.log = MerkleLog(settings.anchor_dir / "log")
        self.contract = ensure_contract(chain, settings.anchor_dir)
        outbox = settings.anchor_dir / "outbox" / f"{chain.chain_id}-{self.contract.lower()}"
        self.tx = TxManager(chain, outbox, confirmations=confirmations)
        self.tx.resume()
        self.receipts: list[AnchorReceipt] = []

    @classmethod
    def from_settings(
        cls, settings: Settings, *, checkpoints: CheckpointProvider | None = None
    ) -> AnchorJob:
        return cls(settings, Chain.from_settings(settings), checkpoints=checkpoints)

    def close(self) -> None:
        """Release the log's writer lock and the outbox."""
        self.log.close()
        self.tx.close()

    # -- manifests ----------------------------------------------------------------------

    def add_manifest(self, data: bytes) -> int:
        """Append one batch to the log; returns its index (the same one on redelivery)."""
        manifest = BatchManifest.model_validate_json(data)
        return self.log.append(
            manifest.batch_id, bytes.fromhex(manifest.merkle_root), manifest.rows
        )

    def _consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            self.settings.kafka.topic_batches,
            bootstrap_servers=self.settings.kafka.bootstrap,
            group_id=f"vitalproof-anchor-{self.settings.namespace}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )

    async def _consume_for(self, consumer: AIOKafkaConsumer, seconds: float) -> int:
        added = 0
        batches = await consumer.getmany(timeout_ms=int(seconds * 1000))
        for records in batches.values():
            for record in records:
                self.add_manifest(record.value or b"")
                added += 1
        if added:
            await consumer.commit()  # only after the log appends are fsync'd
        return added

    def poll_manifests(self, *, timeout_s: float = 60.0) -> int:
        """Read everything ``vitals.batches`` holds now (used by `anchor run --once`).

        "Now" is the partitions' end offsets once this consumer has its assignment: waiting
        for an empty poll instead would stop early on a fresh cluster, where the first group
        join alone can take seconds.
        """

        async def go() -> int:
            consumer = self._consumer()
            await consumer.start()
            try:
                deadline = time.monotonic() + timeout_s
                total = 0
                while not consumer.assignment():
                    if time.monotonic() > deadline:
                        raise AnchorError(
                            f"no partition of {self.settings.kafka.topic_batches} assigned "
                            f"within {timeout_s:g} s"
                        )
                    total += await self._consume_for(consumer, 0.2)
                ends = await consumer.end_offsets(list(consumer.assignment()))

                async def behind() -> bool:
                    for tp, end in ends.items():
                        if await consumer.position(tp) < end:
                            return True
                    return False

                while await behind():
                    if time.monotonic() > deadline:
                        raise AnchorError(
                            f"could not read {self.settings.kafka.topic_batches} to its end"
                        )
                    total += await self._consume_for(consumer, 0.5)
                return total
            finally:
                await consumer.stop()

        return asyncio.run(go())

    def add_checkpoints(self) -> int:
        """Append what ``checkpoints`` returns now; the number of entries that were new.

        A failing source (its log unreadable, or broken: it refuses to checkpoint a chain
        that does not verify) is logged as an error and skipped for this period: the
        batches are anchored all the same, and the audit checkpoint follows once it is
        repaired. It is never anchored over.
        """
        if self.checkpoints is None:
            return 0
        before = self.log.size
        try:
            for entry_id, root, size in self.checkpoints():
                self.log.append(entry_id, root, size)
        except VitalproofError:
            log.exception("checkpoint source failed; anchoring the batches without it")
        return self.log.size - before

    # -- anchoring ----------------------------------------------------------------------

    def anchor_once(self) -> AnchorReceipt | None:
        """Anchor the log's current head (with fresh checkpoints) if it grew since the last
        anchor; else None."""
        self.add_checkpoints()
        size = self.log.size
        last = self.log.last_anchored()
        if last is not None:
            self.log.check_extends(last)  # a rewritten or truncated log is refused, loudly
        if size == 0 or (last is not None and last.tree_size >= size):
            return None
        root = self.log.root(size)
        entry = self.tx.submit(root, size)
        receipt = self.tx.wait_final(entry.id, timeout_s=120.0)
        self.log.record_anchor(size, root, receipt.to_json_dict())
        self.receipts.append(receipt)
        log.info("anchored size %d root %s in %s", size, root.hex(), receipt.tx_hash)
        return receipt

    async def run(
        self,
        *,
        period_s: float,
        duration_s: float | None = None,
        stop: asyncio.Event | None = None,
    ) -> list[AnchorReceipt]:
        """Consume manifests and anchor once per period until stopped; a last anchor at the end
        covers whatever arrived since the previous one."""
        consumer = self._consumer()
        await consumer.start()
        deadline = None if duration_s is None else time.monotonic() + duration_s
        next_anchor = time.monotonic() + period_s
        try:
            while not (stop is not None and stop.is_set()):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                await self._consume_for(consumer, 0.5)
                if time.monotonic() >= next_anchor:
                    await asyncio.to_thread(self.anchor_once)
                    next_anchor = time.monotonic() + period_s
            while await self._consume_for(consumer, 0.5):
                pass
            await asyncio.to_thread(self.anchor_once)
        except AnchorError:
            log.exception("anchoring failed")
            raise
        finally:
            await consumer.stop()
        return self.receipts
