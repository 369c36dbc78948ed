"""Anchoring end to end: salted leaves resist enumeration, one transaction per period,
100 batches on Anvil whose every reading's bundle verifies, and the submitter keystore."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from eth_account import Account
from pydantic import SecretStr

from anchor.chain import Chain, submitter_key
from anchor.job import AnchorJob
from clinic.proofs import LakeView
from streams.lake.keystore import LocalKeystore
from streams.sealer import Pending, Sealer
from vitalproof.errors import ConfigError
from vitalproof.manifest import BatchManifest
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import Settings
from vitalproof_verify.leaves import canonical_reading_bytes, leaf_hash_salted, reading_id
from vitalproof_verify.verify import verify_bundle

DAY_US = 86_400 * 1_000_000
T0 = 1_800_000_000 // 86_400 * 86_400 * 1_000_000  # a UTC midnight, in microseconds


@pytest.mark.slow
def test_dictionary_attack_over_a_day_of_heart_rates_recovers_nothing(tmp_path: Path) -> None:
    """An attacker who knows everything about a reading but its value and second of the day
    enumerates all 281 plausible heart rates (20-300 /min) at all 86,400 seconds. Against an
    unsalted leaf the attack works (the control); against our salted leaf nothing matches."""
    kms = LocalKeystore(tmp_path / "keys")
    device, patient, seq = "watch-7", "pt-7", 4242
    true_t = T0 + 37_123 * 1_000_000
    rid = reading_id(device, "heart_rate", seq, true_t)
    fields = dict(
        reading_id=rid,
        device_id=device,
        patient_id=patient,
        metric="heart_rate",
        value=73.0,
        unit="/min",
        device_time_us=true_t,
        seq=seq,
        quality=0,
    )
    canonical = canonical_reading_bytes(**fields)  # type: ignore[arg-type]
    (salt,) = kms.salts(patient, [rid])
    salted_leaf = leaf_hash_salted(salt, canonical)
    unsalted_leaf = hashlib.sha256(b"\x00" + canonical).digest()

    found_unsalted: list[tuple[int, float]] = []
    found_salted: list[tuple[int, float]] = []
    values = [(v, f"{float(v)!r}}}".encode()) for v in range(20, 301)]
    candidates = 0
    for second in range(86_400):
        t = T0 + second * 1_000_000
        rid_t = reading_id(device, "heart_rate", seq, t)
        prefix = (
            f'{{"device_id":"{device}","device_time_us":{t},"metric":"heart_rate",'
            f'"patient_id":"{patient}","quality":0,"reading_id":"{rid_t}","seq":{seq},'
            '"unit":"/min","value":'
        ).encode()
        base = hashlib.sha256(b"\x00" + prefix)
        for v, tail in values:
            h = base.copy()
            h.update(tail)
            digest = h.digest()
            if digest == unsalted_leaf:
                found_unsalted.append((second, v))
            if digest == salted_leaf:
                found_salted.append((second, v))
        candidates += len(values)
    assert candidates == 86_400 * 281
    assert found_unsalted == [(37_123, 73)], "the control attack must find the unsalted leaf"
    assert found_salted == [], "the salted leaf must not be recoverable by enumeration"


def _sealed_batches(settings: Settings, n_batches: int, per_batch: int) -> list[BatchManifest]:
    """Seal ``n_batches`` real batches (encrypted files, leaves, manifests) without Kafka."""
    kms = LocalKeystore(settings.paths.keys_dir)
    sealer = Sealer(settings.lake_dir, kms)
    rng = random.Random(5)
    manifests = []
    offset = 0
    for b in range(n_batches):
        items = []
        for k in range(per_batch):
            dev = f"dev-{k % 4}"
            batch = SampleBatch(
                device_id=dev,
                patient_id=f"pt-{k % 4}",
                gateway_id="gw",
                transport=Transport.MQTT,
                receive_time_us=T0 + b * 10**6,
            )
            batch.add(
                "heart_rate",
                "/min",
                T0 + (b * per_batch + k) * 10**6,
                b * per_batch + k,
                float(rng.randint(50, 120)),
            )
            batch.fill_reading_ids()
            items.append(Pending("t.vitals.clean", 0, offset, batch))
            offset += 1
        manifest = sealer.seal(items)
        assert manifest is not None
        manifests.append(manifest)
    return manifests


def test_one_transaction_per_period_whatever_arrived(kafka_topics: Settings) -> None:
    settings = kafka_topics
    manifests = _sealed_batches(settings, 12, 3)

    async def produce(ms: list[BatchManifest]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
        await producer.start()
        try:
            for m in ms:
                await producer.send_and_wait(settings.kafka.topic_batches, m.to_json_bytes())
        finally:
            await producer.stop()

    chain = Chain.embedded()
    job = AnchorJob(settings, chain)
    try:
        asyncio.run(produce(manifests))
        # Three periods: the first anchors all twelve batches, the next two have nothing new.
        receipts = asyncio.run(job.run(period_s=1.0, duration_s=3.5))
        assert len(receipts) == 1
        assert receipts[0].tree_size == 12
        assert job.anchor_once() is None, "nothing new: no transaction"
        asyncio.run(produce(manifests[:3]))  # redelivered manifests are not new either
        assert asyncio.run(job.run(period_s=1.0, duration_s=1.5)) == receipts
        assert chain.head().tree_size == 12
    finally:
        job.close()


def test_hundred_batches_on_anvil_every_bundle_verifies(anvil_settings: Settings) -> None:
    settings = anvil_settings
    manifests = _sealed_batches(settings, 100, 5)
    job = AnchorJob.from_settings(settings)
    try:
        for period in range(10):  # ten periods of ten batches: ten transactions
            for m in manifests[period * 10 : (period + 1) * 10]:
                job.add_manifest(m.to_json_bytes())
            assert job.anchor_once() is not None
            assert job.anchor_once() is None
        assert len(job.receipts) == 10
        assert [r.tree_size for r in job.receipts] == list(range(10, 101, 10))
    finally:
        job.close()

    view = LakeView(settings)
    table = view.table()
    from streams.lake import hex_ids

    ids = hex_ids(table["reading_id"]).to_pylist()
    rows = table.to_pylist()
    assert len(ids) == 500 == len(set(ids))
    w3 = job.chain.w3
    t0 = time.perf_counter()
    for rid, row in zip(ids, rows, strict=True):
        bundle = view.bundle(rid, row | {"reading_id": rid})
        verify_bundle(bundle, w3)
    assert time.perf_counter() - t0 < 300


def test_submitter_key_from_an_encrypted_keystore(anvil_settings: Settings, tmp_path: Path) -> None:
    account = Account.create()
    keyfile = tmp_path / "submitter.json"
    keyfile.write_text(json.dumps(Account.encrypt(account.key, "correct horse")))
    settings = anvil_settings.evolve(
        chain={
            "submitter_keystore": keyfile,
            "submitter_keystore_password": SecretStr("correct horse"),
        }
    )
    assert submitter_key(settings) == "0x" + bytes(account.key).hex()
    chain = Chain.from_settings(settings)
    assert chain.address == account.address
    w3 = chain.w3
    w3.provider.make_request("anvil_setBalance", [account.address, hex(10**20)])  # type: ignore[arg-type]
    chain.deploy()
    receipt = chain.submit_anchor(b"\x11" * 32, 1)
    assert receipt.tree_size == 1

    wrong = settings.evolve(chain={"submitter_keystore_password": SecretStr("wrong")})
    with pytest.raises(ConfigError, match="cannot decrypt keystore"):
        submitter_key(wrong)
    both = settings.evolve(chain={"submitter_key": SecretStr("0x" + "11" * 32)})
    with pytest.raises(ConfigError, match="not both"):
        submitter_key(both)
