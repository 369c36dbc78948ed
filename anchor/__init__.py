"""The append-only Merkle log of sealed batches, the anchor contract and its client, the
transaction outbox, the periodic anchor job, and building proof bundles.

Never imports ``streams`` or ``ingest`` (make lint holds it to that); the definitions a
verifier needs (leaves, RFC 9162, bundles, the on-chain check) are the proof kit's,
``vitalproof_verify``, which this package builds on.
"""
