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

Several candidates (``vitalproof anchor run`` on several hosts): :meth:`AnchorJob.lead`. One
of them holds the lease (:mod:`anchor.leader`) and runs the job; its log entries go to
``vitals.anchor-log`` before its own log, so the next leader replays them, adopts the head
the contract holds (never anchoring a head that is already there, nor one that skips
entries), and goes on from the group's committed offsets of ``vitals.batches``.

An unreachable chain node does not stop the job (:meth:`AnchorJob._on_chain`): it goes on
logging manifests, puts the anchor off with a bounded exponential backoff
(:mod:`vitalproof.retry`), one line when the node goes and one when it is back, and resumes
as a restart would (outbox re-broadcast, the contract's head adopted), so nothing is
anchored twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from requests.exceptions import RequestException

from anchor.chain import AnchorReceipt, Chain
from anchor.errors import AnchorError
from anchor.leader import (
    LEASE_HEARTBEAT_MS,
    LEASE_SESSION_TIMEOUT_MS,
    LEASE_TOPIC,
    LOG_TOPIC,
    Lease,
    LeaseLost,
    LogReplica,
)
from anchor.log import LogEntry, MerkleLog
from anchor.txmanager import TxManager
from vitalproof.errors import VitalproofError
from vitalproof.manifest import BatchManifest
from vitalproof.retry import Backoff, ErrorPolicy, Outage
from vitalproof.settings import Settings

log = logging.getLogger(__name__)

#: Extra log entries to anchor with the batches, as ``(entry id, root, size)``.
CheckpointProvider = Callable[[], Iterable[tuple[str, bytes, int]]]


def chain_unreachable(chain: Chain | None) -> ErrorPolicy:
    """The anchor job's error policy: worth waiting for are a node that cannot be reached
    (connection refused or reset, timeouts: the HTTP provider's ``requests`` errors) and an
    anchor that did not become final while the node is unreachable; anything else (a full
    local disk, a reverted anchor, two histories) is raised."""

    def policy(exc: BaseException) -> str | None:
        if isinstance(exc, RequestException | ConnectionError | TimeoutError):
            return f"unreachable ({type(exc).__name__}: {str(exc)[:160]})"
        if isinstance(exc, AnchorError) and chain is not None and not _reachable(chain):
            return f"unreachable while an anchor waited to be final ({exc})"
        return None

    return policy


def _reachable(chain: Chain) -> bool:
    try:
        chain.w3.eth.block_number  # noqa: B018 (the call is the check)
    except OSError:
        return False
    return True


def chain_outage(settings: Settings, chain: Chain | None) -> Outage:
    """The chain as the anchor job waits for it: named by its RPC URL."""
    url = settings.chain.rpc_url or (
        settings.devstack.anvil_url if settings.chain.kind == "anvil" else settings.chain.kind
    )
    return Outage(
        "anchor job: chain",
        f"at {url}",
        chain_unreachable(chain),
        backoff=Backoff.from_settings(settings.runtime),
        logger=log,
    )


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
        # The chain first: if it is unreachable nothing is held yet (see :meth:`connect`).
        self.contract = ensure_contract(chain, settings.anchor_dir)
        self.log = MerkleLog(settings.anchor_dir / "log")
        try:
            outbox = settings.anchor_dir / "outbox" / f"{chain.chain_id}-{self.contract.lower()}"
            self.tx = TxManager(chain, outbox, confirmations=confirmations)
            self.tx.resume()
        except BaseException:
            self.log.close()
            raise
        self.receipts: list[AnchorReceipt] = []
        self.replica: LogReplica | None = None
        """While leading among candidates: where entries go before the local log."""
        self.chain_outage = chain_outage(settings, chain)
        """The chain's state as this job sees it: up, or waited for (see :meth:`_on_chain`)."""
        self._chain_retry_at = 0.0

    @classmethod
    def from_settings(
        cls, settings: Settings, *, checkpoints: CheckpointProvider | None = None
    ) -> AnchorJob:
        return cls(settings, Chain.from_settings(settings), checkpoints=checkpoints)

    @classmethod
    def connect(
        cls,
        settings: Settings,
        *,
        checkpoints: CheckpointProvider | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> AnchorJob:
        """:meth:`from_settings`, waiting (with backoff, one line when the chain is away and
        one when it is back) while the chain's node is unreachable: a job started while its
        node restarts waits for it instead of exiting."""
        outage = chain_outage(settings, None)
        while True:
            try:
                job = cls.from_settings(settings, checkpoints=checkpoints)
            except Exception as exc:
                sleep(outage.failed(exc))  # raises what is not an unreachable node
                continue
            outage.succeeded()
            job.chain_outage.outages = outage.outages
            return job

    def status(self) -> dict[str, object]:
        """What the job is doing about the chain, and how far it got (for status output)."""
        last = self.log.last_anchored()
        return {
            "chain": self.chain_outage.status(),
            "log_size": self.log.size,
            "anchored_size": 0 if last is None else last.tree_size,
        }

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
            # A killed leader's partitions go to the next one as soon as its lease does.
            session_timeout_ms=LEASE_SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=LEASE_HEARTBEAT_MS,
            auto_offset_reset="earliest",
            # Workers produce manifests in transactions, fenced per partition: a stale
            # owner's (aborted) manifest is never read (streams.fence).
            isolation_level="read_committed",
        )

    async def _append(self, entry_id: str, root: bytes, size: int) -> int:
        """Append one entry; while leading among candidates, to the shared log topic first
        (a known id is only checked: idempotent by id, as :meth:`MerkleLog.append`)."""
        if self.replica is not None and self.log.index_of(entry_id) is None:
            await self.replica.publish(self.log.size, LogEntry(entry_id, root, size))
        return self.log.append(entry_id, root, size)

    async def _consume_for(self, consumer: AIOKafkaConsumer, seconds: float) -> int:
        added = 0
        batches = await consumer.getmany(timeout_ms=int(seconds * 1000))
        for records in batches.values():
            for record in records:
                manifest = BatchManifest.model_validate_json(record.value or b"")
                await self._append(
                    manifest.batch_id, bytes.fromhex(manifest.merkle_root), manifest.rows
                )
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

    async def _add_checkpoints_shared(self) -> int:
        """:meth:`add_checkpoints` through :meth:`_append` (while leading among candidates)."""
        if self.checkpoints is None:
            return 0
        before = self.log.size
        try:
            for entry_id, root, size in self.checkpoints():
                await self._append(entry_id, root, size)
        except VitalproofError:
            log.exception("checkpoint source failed; anchoring the batches without it")
        return self.log.size - before

    def adopt_chain_head(self, *, pending_timeout_s: float = 120.0) -> None:
        """Take the contract's head as this log's last anchored one, if it is newer.

        A new leader must neither anchor again what its predecessor anchored (the contract
        would revert a size that does not grow; a retry would only burn gas) nor anchor over
        entries it lacks. So: wait until no transaction of the submitter is pending (a
        predecessor's anchor may be on its way), read the head, check this log holds it
        (same root at that size: no gap, no fork) and record it with its receipt, found
        from the ``Anchored`` event of the head's block.
        """
        w3, me = self.chain.w3, self.chain.account.address
        deadline = time.monotonic() + pending_timeout_s
        while w3.eth.get_transaction_count(me, "pending") > w3.eth.get_transaction_count(
            me, "latest"
        ):
            if time.monotonic() > deadline:
                raise AnchorError(f"a transaction of {me} stayed pending {pending_timeout_s:g} s")
            time.sleep(0.5)
        head = self.chain.head()
        if head.tree_size == 0:
            return
        last = self.log.last_anchored()
        if last is not None and last.tree_size >= head.tree_size:
            return
        if self.log.size < head.tree_size:
            raise AnchorError(
                f"the contract anchors {head.tree_size} entries, this log holds {self.log.size}: "
                f"entries are missing from {LOG_TOPIC}"
            )
        if self.log.root(head.tree_size) != head.root:
            raise AnchorError(
                f"the contract's root at size {head.tree_size} is not this log's: two histories"
            )
        events = self.chain.contract.events.Anchored.get_logs(
            from_block=head.block_number, to_block=head.block_number
        )
        for event in events:
            if int(event["args"]["treeSize"]) == head.tree_size:
                receipt = self.chain.anchor_receipt(bytes(event["transactionHash"]))
                self.log.record_anchor(head.tree_size, head.root, receipt.to_json_dict())
                log.info("adopted the anchored head %d from %s", head.tree_size, receipt.tx_hash)
                return
        raise AnchorError(
            f"no Anchored event of size {head.tree_size} in block {head.block_number}"
        )

    def anchor_once(self, *, checkpoints: bool = True) -> AnchorReceipt | None:
        """Anchor the log's current head (with fresh checkpoints unless the caller added
        them) if it grew since the last anchor; else None."""
        if checkpoints:
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

    def _anchor_without_checkpoints(self) -> AnchorReceipt | None:
        return self.anchor_once(checkpoints=False)

    async def _on_chain(self, work: Callable[[], object], *, now: bool = False) -> bool:
        """Run ``work`` (blocking chain calls) in a thread, unless the chain is being waited
        out; True if it ran to the end.

        An unreachable node (:func:`chain_unreachable`) does not stop the job: one line
        says so (and where: the RPC URL), the next try comes after a bounded exponential
        backoff while manifests are still consumed and logged, and before the next anchor
        the job does what a restart would: re-broadcast its outbox's pending transaction
        exactly as signed and adopt the contract's head (:meth:`adopt_chain_head`). So an
        anchor sent just before the node went away is recorded, never sent twice.
        ``now``: try even before the backoff is over (the last anchor when stopping; if the
        node is still away, the next run anchors what is left).
        """
        if not now and time.monotonic() < self._chain_retry_at:
            return False
        try:
            if self.chain_outage.down:
                await asyncio.to_thread(self._after_outage)
            await asyncio.to_thread(work)
        except Exception as exc:
            self._chain_retry_at = time.monotonic() + self.chain_outage.failed(exc)
            return False
        self.chain_outage.succeeded()
        return True

    async def _next_anchor(self, work: Callable[[], object], period_s: float) -> float:
        """One anchor tick; when the next is due: a period on, or sooner, as soon as the
        backoff allows, if the chain was away."""
        if await self._on_chain(work):
            return time.monotonic() + period_s
        return self._chain_retry_at

    def _after_outage(self) -> None:
        """What a restart does before anchoring: pending transactions re-broadcast as
        signed and followed; the contract's head adopted if an anchor landed meanwhile."""
        self.tx.resume()
        self.adopt_chain_head()

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
                    next_anchor = await self._next_anchor(self.anchor_once, period_s)
            while await self._consume_for(consumer, 0.5):
                pass
            await self._on_chain(self.anchor_once, now=True)
        except AnchorError:
            log.exception("anchoring failed")
            raise
        finally:
            await consumer.stop()
        return self.receipts

    # -- several candidates ---------------------------------------------------------------

    async def lead(
        self,
        *,
        period_s: float,
        duration_s: float | None = None,
        stop: asyncio.Event | None = None,
    ) -> list[AnchorReceipt]:
        """Be one of the candidates: wait for the lease, then run the job while holding it
        (:meth:`_lead`); give it up cleanly on a rebalance, wait for it again."""
        k = self.settings.kafka
        group = f"vitalproof-anchor-lease-{self.settings.namespace}"
        lease = Lease(k.bootstrap, k.topic(LEASE_TOPIC), group)
        replica = LogReplica(k.bootstrap, k.topic(LOG_TOPIC), lease_topic=k.topic(LEASE_TOPIC))
        deadline = None if duration_s is None else time.monotonic() + duration_s

        def stopped() -> bool:
            return (stop is not None and stop.is_set()) or (
                deadline is not None and time.monotonic() >= deadline
            )

        await replica.start()
        await lease.start()
        try:
            while not stopped():
                if await lease.wait_leader(1.0):
                    await self._lead(lease, replica, period_s, stopped)
        finally:
            await lease.stop()
            await replica.stop()
        return self.receipts

    async def _lead(
        self, lease: Lease, replica: LogReplica, period_s: float, stopped: Callable[[], bool]
    ) -> None:
        """One term as leader: catch up from the shared log, adopt the chain's head, then
        consume and anchor once per period; every step under the lease's lock, and only
        while the lease is held."""
        self.replica = replica
        try:
            await self._term(lease, replica, period_s, stopped)
        except LeaseLost as err:  # frozen past the session timeout: another one leads
            lease.lost()
            log.warning("anchor lease lost while this candidate was not looking: %s", err)
        finally:
            self.replica = None

    async def _term(
        self, lease: Lease, replica: LogReplica, period_s: float, stopped: Callable[[], bool]
    ) -> None:
        """The term's steps (:meth:`_lead`); :class:`LeaseLost` if a later leader fenced
        this one."""
        async with lease.work:
            if not lease.is_leader:
                return
            await replica.fence()  # no earlier leader writes from now on
            added = await replica.catch_up(self.log)
            adopted = await self._on_chain(self.adopt_chain_head)
            log.info("leading: %d entries caught up, log size %d", added, self.log.size)
        consumer = self._consumer()
        await consumer.start()
        next_anchor = time.monotonic() + period_s
        try:
            while not stopped():
                await lease.poll()
                async with lease.work:
                    if not lease.is_leader:
                        return
                    await self._consume_for(consumer, 0.5)
                    if not adopted:  # the chain was away when this term began
                        adopted = await self._on_chain(self.adopt_chain_head)
                    elif time.monotonic() >= next_anchor:
                        await self._add_checkpoints_shared()
                        await replica.barrier(self.log.size)
                        next_anchor = await self._next_anchor(
                            self._anchor_without_checkpoints, period_s
                        )
            async with lease.work:  # stopping: a last anchor, as run() makes
                if lease.is_leader and adopted:
                    while await self._consume_for(consumer, 0.5):
                        pass
                    await self._add_checkpoints_shared()
                    await replica.barrier(self.log.size)
                    await self._on_chain(self._anchor_without_checkpoints, now=True)
        finally:
            await consumer.stop()
