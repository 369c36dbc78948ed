"""Fencing a worker that lost a partition while it was frozen (a GC pause, a VM stop).

A worker stopped longer than the session timeout is expelled from the group and its
``vitals.clean`` partitions go to another worker. When it runs again it does not know yet:
it may still hold a batch of such a partition (in its buffer, or sealed by its seal process
meanwhile) and go on to seal or publish it. Two fences stop it, one per place it writes:

* **Kafka: one transactional producer per partition.** Manifests of partition *P* are
  produced by a producer whose ``transactional.id`` names *P*. The worker that takes *P*
  over starts its own producer under that id first: the transaction coordinator bumps the
  id's epoch, aborts whatever the old owner had open, and refuses every later send or
  commit of the old owner's producer (``ProducerFenced``). Readers of ``vitals.batches``
  read committed records only. So a stale owner can never publish a manifest once the new
  owner took *P*, however long it was frozen, and the check is the broker's, made when the
  record is written, not one made beforehand and raced.
* **The lake: a claim per partition.** After that, the new owner writes a fresh random
  token to ``_batches/<topic>.<partition>.owner`` and only then reads the manifests (its
  adoption). A seal process writes a manifest of *P* only if the claim still holds its own
  worker's token, read right before the write. A stale owner's seal process finds the new
  token and writes nothing (its batch's files, already written, belong to no manifest:
  invisible, like a crash's). What this cannot close is a freeze between that read and the
  write (a storage without compare-and-set cannot); such a manifest would still never
  reach ``vitals.batches`` (the first fence), so it is never anchored.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterable
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, ProducerFenced

from streams.ledger import Folder, folder
from vitalproof.errors import VitalproofError

log = logging.getLogger(__name__)

CLAIM_SUFFIX = ".owner"

TP = tuple[str, int]


class Fenced(VitalproofError):
    """Another worker owns the partition now: this worker must not seal or publish it."""


def claim_name(tp: TP) -> str:
    return f"{tp[0]}.{tp[1]}{CLAIM_SUFFIX}"


def write_claim(batches_dir: Path | Folder, tp: TP) -> str:
    """Claim ``tp`` in the lake for this worker: a fresh token, which it returns."""
    token = secrets.token_hex(16)
    folder(batches_dir).write(claim_name(tp), token.encode())
    return token


def read_claim(batches_dir: Path | Folder, tp: TP) -> str | None:
    """The token of the worker that claimed ``tp`` last (``None``: never claimed)."""
    data = folder(batches_dir).read(claim_name(tp))
    return None if data is None else data.decode()


def check_claims(batches_dir: Path | Folder, tokens: dict[TP, str], tps: Iterable[TP]) -> None:
    """Raise :class:`Fenced` unless every ``tp`` is still claimed with this worker's token."""
    for tp in tps:
        mine = tokens.get(tp)
        there = read_claim(batches_dir, tp)
        if mine is None or there != mine:
            raise Fenced(f"{tp[0]}[{tp[1]}] is claimed by another worker now")


def transactional_id(prefix: str, tp: TP) -> str:
    return f"{prefix}-seal-{tp[0]}-{tp[1]}"


class PartitionPublishers:
    """The worker's transactional producers of manifests, one per ``vitals.clean`` partition
    it owns (see the module docstring): :meth:`take` fences the previous owner."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        batches_dir: Path | Folder,
        *,
        prefix: str,
        compression_type: str | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.batches_dir = batches_dir
        self.prefix = prefix
        self.compression_type = compression_type
        self._producers: dict[TP, AIOKafkaProducer] = {}
        self._tokens: dict[TP, str] = {}

    async def take(self, tps: Iterable[TP]) -> dict[TP, str]:
        """Own ``tps`` from now on: fence their previous owners on Kafka (a fresh producer
        each, even if this worker had one: it may have been fenced meanwhile), then in the
        lake; the lake claims' tokens (for the seal process's check)."""
        wanted = sorted(set(tps))
        await self.drop(wanted)
        await asyncio.gather(*(self._start(tp) for tp in wanted))
        claims = {tp: write_claim(self.batches_dir, tp) for tp in wanted}
        self._tokens.update(claims)
        return claims

    def kept(self, tps: Iterable[TP]) -> set[TP]:
        """Those of ``tps`` that nobody took from this worker since it took them: their lake
        claim still holds its token. A partition assigned again after a freeze may have been
        another worker's in between (and its producer here fenced): it is taken afresh."""
        return {
            tp
            for tp in tps
            if tp in self._producers
            and self._tokens.get(tp) is not None
            and read_claim(self.batches_dir, tp) == self._tokens[tp]
        }

    async def _start(self, tp: TP) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            transactional_id=transactional_id(self.prefix, tp),
            enable_idempotence=True,
            acks="all",
            compression_type=self.compression_type,
        )
        await producer.start()
        # The producer id comes from the coordinator (InitProducerId): once it is here, the
        # id's epoch is bumped and the previous owner's producer is fenced. An empty
        # transaction waits for it through the public API.
        await producer.begin_transaction()
        await producer.commit_transaction()
        self._producers[tp] = producer

    async def publish(self, tp: TP, batch_id: str, manifest_json: bytes) -> None:
        """Produce one manifest of ``tp`` in its own transaction; committed on return.
        :class:`Fenced` if another worker took ``tp`` over meanwhile."""
        producer = self._producers.get(tp)
        if producer is None:
            raise Fenced(f"{tp[0]}[{tp[1]}] is not owned here")
        try:
            async with producer.transaction():
                await (await producer.send(self.topic, manifest_json, key=batch_id.encode()))
        except ProducerFenced as err:
            await self.drop([tp])
            raise Fenced(f"{tp[0]}[{tp[1]}] was taken over by another worker: {err}") from err
        except KafkaError as err:
            if "fenced" not in str(err).lower() and "epoch" not in str(err).lower():
                raise
            await self.drop([tp])
            raise Fenced(f"{tp[0]}[{tp[1]}] was taken over by another worker: {err}") from err

    async def drop(self, tps: Iterable[TP]) -> None:
        """Stop the producers of ``tps`` (revoked, or fenced)."""
        tps = list(tps)
        for tp in tps:
            self._tokens.pop(tp, None)
        gone = [p for tp in tps if (p := self._producers.pop(tp, None)) is not None]
        await asyncio.gather(*(p.stop() for p in gone), return_exceptions=True)

    async def close(self) -> None:
        await self.drop(list(self._producers))
