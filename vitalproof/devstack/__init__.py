"""The local stack: real Kafka (KRaft), Mosquitto and optionally Anvil on 127.0.0.1.

No Docker needed: each part is a plain process whose config, pid state, logs and data live
under ``settings.paths.stack_dir``. ``StackManager`` is what ``vitalproof stack up|status|down``
and the test fixtures use; the helpers below are what enrolment and the stream jobs need.
"""

from vitalproof.devstack.anvil import rpc_url
from vitalproof.devstack.kafka import ensure_topics
from vitalproof.devstack.manager import PartStatus, StackManager, StackStatus
from vitalproof.devstack.mosquitto import (
    collector_credentials,
    hash_password,
    remove_device,
    set_device_credentials,
)

__all__ = [
    "PartStatus",
    "StackManager",
    "StackStatus",
    "collector_credentials",
    "ensure_topics",
    "hash_password",
    "remove_device",
    "rpc_url",
    "set_device_credentials",
]
