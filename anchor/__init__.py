"""Merkle log of sealed batches, anchoring on Ethereum, and proof bundles.

Never imports ``streams`` or ``ingest``: a verifier needs only this package.
"""
