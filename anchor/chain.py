"""The chain side of anchoring: deploy VitalAnchor, submit a log head, read it back, verify it.

Two kinds of chain run the same code path: the embedded py-evm chain (``web3[tester]``, in
process, nothing to start) and any JSON-RPC node (Anvil locally, a real network in
deployment). Transactions are always signed locally with an eth-account key, never by the
node, so what the tests exercise is what production runs.

The verifier's half (is an anchor still on a chain?) is
:func:`vitalproof_verify.onchain.check_anchor_on_chain`, in the proof kit.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import EthereumTesterProvider, Web3
from web3.exceptions import (
    ContractCustomError,
    ContractLogicError,
    TimeExhausted,
    Web3Exception,
)

from anchor.errors import AnchorError
from vitalproof.errors import ConfigError
from vitalproof_verify.onchain import (
    as_bytes,
    check_anchor_on_chain,
    parse_anchored,
    rpc_web3,
    to_hex,
)

if TYPE_CHECKING:
    from eth_tester import EthereumTester
    from web3.contract import Contract
    from web3.types import TxParams, TxReceipt

    from vitalproof.settings import Settings

ARTIFACT_PATH = Path(__file__).parent / "contracts" / "VitalAnchor.json"
"""The committed compiler output; tests/test_contract.py proves it matches the source."""

# DEV ONLY. Anvil's (and Hardhat's) well-known account 0 key, derived from the public
# "test test ... junk" mnemonic. Everyone knows it: never use it on a real network.
# Chain.rpc() only falls back to it when the node reports chain id 31337.
ANVIL_DEV_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
ANVIL_CHAIN_ID = 31337

MAIN_CONTRACT = "VitalAnchor"
EVENT_ONLY_CONTRACT = "VitalAnchorEventOnly"


@cache
def _artifact_file() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(ARTIFACT_PATH.read_text(encoding="utf-8")))


def load_artifact(name: str = MAIN_CONTRACT) -> dict[str, Any]:
    """ABI and bytecode of ``VitalAnchor`` or of a variant (``VitalAnchorEventOnly``)."""
    art = _artifact_file()
    if name == art["contractName"]:
        return art
    try:
        return cast(dict[str, Any], art["variants"][name])
    except KeyError:
        raise ConfigError(f"no contract {name!r} in {ARTIFACT_PATH}") from None


@cache
def _error_selectors() -> dict[bytes, tuple[str, list[str]]]:
    """4-byte selector -> (name, arg types) of every custom error, to explain reverts."""
    out: dict[bytes, tuple[str, list[str]]] = {}
    for name in (MAIN_CONTRACT, EVENT_ONLY_CONTRACT):
        for item in load_artifact(name)["abi"]:
            if item["type"] == "error":
                types = [i["type"] for i in item["inputs"]]
                sig = f"{item['name']}({','.join(types)})"
                out[keccak(text=sig)[:4]] = (item["name"], types)
    return out


def explain_revert(exc: BaseException) -> str:
    """Turn a web3 revert into ``Name(arg, ...)`` using the contract's custom errors."""
    data = getattr(exc, "data", None)
    if isinstance(data, dict):
        data = data.get("data")
    if data is None:
        # eth-tester wraps py-evm's Revert (whose first arg is the revert bytes) in one or
        # more TransactionFailed: walk the exception chain to find it.
        inner: BaseException | None = exc
        for _ in range(8):
            if inner is None:
                break
            if inner.args and isinstance(inner.args[0], bytes):
                data = "0x" + inner.args[0].hex()
                break
            inner = inner.__cause__ or inner.__context__
    if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
        raw = bytes.fromhex(data[2:])
        known = _error_selectors().get(raw[:4])
        if known is not None:
            name, types = known
            try:
                args = abi_decode(types, raw[4:])
            except Exception:  # malformed payload: fall back to the raw text below
                return f"{name}({data})"
            rendered = ", ".join("0x" + a.hex() if isinstance(a, bytes) else str(a) for a in args)
            return f"{name}({rendered})"
    return str(exc)


class AnchorRejected(AnchorError):
    """The contract refused the anchor (not a submitter, size not growing, zero root)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"contract rejected the anchor: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class AnchorReceipt:
    """Where one log head landed: everything a proof bundle needs to find it again.

    Hashes are 0x-prefixed lowercase hex strings so the record serialises to JSON as is;
    ``root`` stays raw bytes (32) because the Merkle code works in bytes.
    """

    chain_id: int
    contract: str
    tx_hash: str
    block_number: int
    block_hash: str
    log_index: int
    root: bytes
    tree_size: int
    block_timestamp: int
    gas_used: int

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready form (root as 0x hex)."""
        d = asdict(self)
        d["root"] = "0x" + self.root.hex()
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> AnchorReceipt:
        """Inverse of :meth:`to_json_dict`."""
        return cls(**{**d, "root": as_bytes(d["root"])})


@dataclass(frozen=True)
class Head:
    """The contract's latest anchored head, as returned by ``head()``."""

    root: bytes
    tree_size: int
    timestamp: int
    block_number: int


@dataclass(frozen=True)
class FeePolicy:
    """EIP-1559 fee rule: ``maxFee = min(2 * baseFee + tip, cap)``.

    Twice the base fee survives six consecutive full blocks (+12.5% each) without the
    transaction becoming unincludable. The cap bounds what a fee spike can cost; when the
    cap is below the current base fee the transaction could never be included, so we refuse
    to sign rather than sit in the mempool forever.
    """

    max_fee_cap_wei: int = 500 * 10**9
    priority_fee_wei: int | None = None  # None: ask the node (eth_maxPriorityFeePerGas)
    base_fee_multiplier: int = 2


@dataclass(frozen=True)
class Fees:
    """Both EIP-1559 fee fields of one transaction."""

    max_fee_per_gas: int
    max_priority_fee_per_gas: int

    def bumped(self, factor_num: int = 9, factor_den: int = 8) -> Fees:
        """Both fields raised by at least 12.5% (the geth/Anvil replacement rule), rounded up."""
        return Fees(
            max_fee_per_gas=max(
                math.ceil(self.max_fee_per_gas * factor_num / factor_den), self.max_fee_per_gas + 1
            ),
            max_priority_fee_per_gas=max(
                math.ceil(self.max_priority_fee_per_gas * factor_num / factor_den),
                self.max_priority_fee_per_gas + 1,
            ),
        )


def current_base_fee(w3: Web3) -> int:
    """Base fee of the next block, approximated by the latest block's."""
    block = w3.eth.get_block("latest")
    base = block.get("baseFeePerGas")
    if base is None:
        raise AnchorError("chain has no EIP-1559 base fee (pre-London): not supported")
    return int(base)


def compute_fees(w3: Web3, policy: FeePolicy) -> Fees:
    """Fees for a new transaction under ``policy``; raises if the cap cannot be included."""
    base = current_base_fee(w3)
    if policy.max_fee_cap_wei < base:
        raise AnchorError(
            f"max fee cap {policy.max_fee_cap_wei} wei is below the current base fee {base} wei:"
            " the transaction could not be included; raise the cap or wait"
        )
    tip = policy.priority_fee_wei
    if tip is None:
        try:
            tip = int(w3.eth.max_priority_fee)
        except (Web3Exception, ValueError):
            tip = 10**9
    max_fee = min(base * policy.base_fee_multiplier + tip, policy.max_fee_cap_wei)
    return Fees(max_fee_per_gas=max_fee, max_priority_fee_per_gas=min(tip, max_fee))


def submitter_key(settings: Settings) -> str | None:
    """The submitter's private key: from an encrypted keystore file (eth-account's Web3
    Secret Storage) or ``VITALPROOF_SUBMITTER_KEY``; never from anything committed."""
    if settings.chain.submitter_keystore is not None:
        if settings.chain.submitter_key is not None:
            raise ConfigError(
                "set VITALPROOF_SUBMITTER_KEY or VITALPROOF_SUBMITTER_KEYSTORE, not both"
            )
        if settings.chain.submitter_keystore_password is None:
            raise ConfigError(
                f"keystore {settings.chain.submitter_keystore} needs "
                "VITALPROOF_SUBMITTER_KEYSTORE_PASSWORD"
            )
        try:
            keyfile = json.loads(Path(settings.chain.submitter_keystore).read_text())
            key = Account.decrypt(
                keyfile, settings.chain.submitter_keystore_password.get_secret_value()
            )
        except OSError as e:
            raise ConfigError(
                f"cannot read keystore {settings.chain.submitter_keystore}: {e}"
            ) from e
        except (ValueError, KeyError) as e:
            raise ConfigError(
                f"cannot decrypt keystore {settings.chain.submitter_keystore}: {e}"
            ) from e
        return "0x" + bytes(key).hex()
    return settings.chain.submitter_key.get_secret_value() if settings.chain.submitter_key else None


class Chain:
    """One chain, one submitter key, optionally one deployed VitalAnchor.

    Build with :meth:`embedded`, :meth:`rpc` or :meth:`from_settings`.
    """

    def __init__(
        self,
        w3: Web3,
        account: LocalAccount,
        *,
        tester: EthereumTester | None = None,
        fee_policy: FeePolicy | None = None,
        receipt_timeout_s: float = 120.0,
    ) -> None:
        self.w3 = w3
        self.account = account
        self.tester = tester
        """The embedded chain's EthereumTester (snapshots, mining); None on JSON-RPC."""
        self.fee_policy = fee_policy or FeePolicy()
        self.receipt_timeout_s = receipt_timeout_s
        self._chain_id: int | None = None
        self._contract: Contract | None = None

    # -- construction -------------------------------------------------------------------

    @classmethod
    def embedded(cls, account_index: int = 0, **kwargs: Any) -> Chain:
        """An in-process py-evm chain; signs with one of eth-tester's funded dev keys."""
        provider = EthereumTesterProvider()
        tester = provider.ethereum_tester
        assert tester is not None  # EthereumTesterProvider() always builds one
        keys = tester.backend.account_keys
        account: LocalAccount = Account.from_key(keys[account_index].to_hex())
        return cls(Web3(provider), account, tester=tester, **kwargs)

    @classmethod
    def rpc(cls, url: str, private_key: str | None = None, **kwargs: Any) -> Chain:
        """A JSON-RPC chain. Without a key, only a local Anvil (chain 31337) is accepted,
        with its public dev key; anywhere else a missing key is a configuration error."""
        w3 = rpc_web3(url)
        if private_key is None:
            chain_id = int(w3.eth.chain_id)
            if chain_id != ANVIL_CHAIN_ID:
                raise ConfigError(
                    f"chain {chain_id} at {url} is not a local Anvil: set VITALPROOF_SUBMITTER_KEY"
                )
            private_key = ANVIL_DEV_KEY
        account: LocalAccount = Account.from_key(private_key)
        return cls(w3, account, **kwargs)

    @classmethod
    def from_settings(cls, settings: Settings) -> Chain:
        """The chain the settings select (embedded, local Anvil, or a given RPC URL)."""
        key = submitter_key(settings)
        if settings.chain.kind == "embedded":
            return cls.embedded()
        if settings.chain.kind == "anvil":
            return cls.rpc(
                settings.chain.rpc_url or f"http://127.0.0.1:{settings.devstack.anvil_port}", key
            )
        if not settings.chain.rpc_url:
            raise ConfigError("VITALPROOF_CHAIN=rpc needs VITALPROOF_RPC_URL")
        if key is None:
            raise ConfigError("VITALPROOF_CHAIN=rpc needs VITALPROOF_SUBMITTER_KEY")
        return cls.rpc(settings.chain.rpc_url, key)

    # -- basics -------------------------------------------------------------------------

    def with_account(self, private_key: str) -> Chain:
        """The same chain and contract, signing with another key (e.g. a second submitter)."""
        other = Chain(
            self.w3,
            Account.from_key(private_key),
            tester=self.tester,
            fee_policy=self.fee_policy,
            receipt_timeout_s=self.receipt_timeout_s,
        )
        other._contract = self._contract
        return other

    def dev_key(self, index: int) -> str:
        """Private key of the embedded chain's funded dev account ``index`` (tests only)."""
        if self.tester is None:
            raise ConfigError("dev keys are only known for the embedded chain")
        return str(self.tester.backend.account_keys[index].to_hex())

    @property
    def address(self) -> str:
        """The submitter's address."""
        return str(self.account.address)

    @property
    def chain_id(self) -> int:
        """The node's chain id (cached: it never changes for a running chain)."""
        if self._chain_id is None:
            self._chain_id = int(self.w3.eth.chain_id)
        return self._chain_id

    @property
    def contract(self) -> Contract:
        """The VitalAnchor this chain submits to; set by :meth:`deploy` or :meth:`at`."""
        if self._contract is None:
            raise ConfigError("no VitalAnchor contract: call deploy() or at(address) first")
        return self._contract

    @property
    def contract_address(self) -> str:
        return str(self.contract.address)

    def at(self, address: str, name: str = MAIN_CONTRACT) -> Contract:
        """Use an already deployed contract; refuses an address with no code."""
        checksum = to_checksum_address(address)
        if not self.w3.eth.get_code(checksum):
            raise ConfigError(f"no contract code at {checksum} on chain {self.chain_id}")
        self._contract = self.w3.eth.contract(address=checksum, abi=load_artifact(name)["abi"])
        return self._contract

    def mine(self, blocks: int = 1) -> None:
        """Mine empty blocks on a dev chain (tests: confirmations, reorgs)."""
        if self.tester is not None:
            self.tester.mine_blocks(blocks)
        else:
            self.w3.provider.make_request(cast(Any, "anvil_mine"), [hex(blocks)])

    # -- transactions -------------------------------------------------------------------

    def fees(self) -> Fees:
        return compute_fees(self.w3, self.fee_policy)

    def build_tx(
        self, data: str | bytes, *, to: str | None, nonce: int, gas: int, fees: Fees
    ) -> TxParams:
        """An EIP-1559 (type 2) transaction dict ready for local signing."""
        tx: dict[str, Any] = {
            "type": 2,
            "chainId": self.chain_id,
            "nonce": nonce,
            "gas": gas,
            "maxFeePerGas": fees.max_fee_per_gas,
            "maxPriorityFeePerGas": fees.max_priority_fee_per_gas,
            "value": 0,
            "data": to_hex(data),
        }
        if to is not None:
            tx["to"] = to_checksum_address(to)
        return cast("TxParams", tx)

    def estimate_gas(self, data: str | bytes, to: str | None) -> int:
        """Gas estimate with a margin; a revert here becomes :class:`AnchorRejected`."""
        call: dict[str, Any] = {"from": self.address, "data": to_hex(data)}
        if to is not None:
            call["to"] = to
        try:
            est = int(self.w3.eth.estimate_gas(cast("TxParams", call)))
        except (ContractCustomError, ContractLogicError, TransactionFailed) as exc:
            raise AnchorRejected(explain_revert(exc)) from exc
        # 25% plus a flat margin: state can change between estimate and inclusion (e.g. the
        # first anchor's fresh SSTOREs), and unused gas is refunded anyway.
        return est * 5 // 4 + 10_000

    def anchor_calldata(self, root: bytes, tree_size: int) -> bytes:
        """ABI-encoded ``anchor(root, treeSize)`` after checking the arguments locally."""
        if len(root) != 32:
            raise AnchorError(f"root must be 32 bytes, got {len(root)}")
        if not 0 < tree_size < 2**64:
            raise AnchorError(f"tree size must be in 1..2^64-1, got {tree_size}")
        return bytes(HexBytes(self.contract.encode_abi("anchor", args=[root, tree_size])))

    def send_signed_and_wait(self, raw: bytes) -> TxReceipt:
        """Broadcast a signed transaction and wait for its receipt."""
        tx_hash = self.w3.eth.send_raw_transaction(raw)
        try:
            return self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self.receipt_timeout_s, poll_latency=0.1
            )
        except TimeExhausted as exc:
            raise AnchorError(f"transaction {tx_hash.to_0x_hex()} not included in time") from exc

    def _sign_and_send(self, data: bytes, to: str | None) -> TxReceipt:
        gas = self.estimate_gas(data, to)
        nonce = self.w3.eth.get_transaction_count(self.account.address, "pending")
        tx = self.build_tx(data, to=to, nonce=nonce, gas=gas, fees=self.fees())
        signed = self.account.sign_transaction(cast(dict[str, Any], tx))
        return self.send_signed_and_wait(bytes(signed.raw_transaction))

    def deploy(self, name: str = MAIN_CONTRACT) -> str:
        """Deploy VitalAnchor (or a variant) from the submitter account; returns its address.

        The deployer becomes the owner and first submitter.
        """
        receipt = self._sign_and_send(bytes(HexBytes(load_artifact(name)["bytecode"])), None)
        address = receipt.get("contractAddress")
        if receipt["status"] != 1 or address is None:
            raise AnchorError(f"deployment of {name} failed in {receipt['transactionHash']!r}")
        self.at(str(address), name)
        return str(self.contract.address)

    def set_submitter(self, submitter: str, allowed: bool = True) -> TxReceipt:
        """Grant or revoke a submitter (the chain's account must be the owner)."""
        data = self.contract.encode_abi(
            "setSubmitter", args=[to_checksum_address(submitter), allowed]
        )
        return self._sign_and_send(bytes(HexBytes(data)), self.contract_address)

    def submit_anchor(self, root: bytes, tree_size: int) -> AnchorReceipt:
        """Anchor a log head and wait for inclusion (one confirmation, no durability).

        The anchor job uses :class:`anchor.txmanager.TxManager` instead, which survives
        crashes and reorgs; this direct path is for tools, tests and one-off anchors. It takes
        the node's pending nonce, so do not mix it with a TxManager on the same account: a
        signed-but-unsent outbox transaction would lose its nonce (the manager then
        re-anchors or marks the entry superseded, but it costs a transaction).
        """
        data = self.anchor_calldata(root, tree_size)
        receipt = self._sign_and_send(data, self.contract_address)
        if receipt["status"] != 1:
            raise AnchorRejected(f"transaction {to_hex(receipt['transactionHash'])} reverted")
        return self.anchor_receipt(receipt)

    # -- reading ------------------------------------------------------------------------

    def anchor_receipt(self, receipt: TxReceipt | str | bytes) -> AnchorReceipt:
        """The :class:`AnchorReceipt` of a mined anchor transaction (by receipt or hash)."""
        if isinstance(receipt, str | bytes):
            receipt = self.w3.eth.get_transaction_receipt(HexBytes(as_bytes(receipt)))
        for log in receipt["logs"]:
            parsed = parse_anchored(log, self.contract_address)
            if parsed is None:
                continue
            root, size, _ts = parsed
            block = self.w3.eth.get_block(receipt["blockNumber"])
            return AnchorReceipt(
                chain_id=self.chain_id,
                contract=self.contract_address,
                tx_hash=to_hex(receipt["transactionHash"]),
                block_number=int(receipt["blockNumber"]),
                block_hash=to_hex(receipt["blockHash"]),
                log_index=int(log["logIndex"]),
                root=root,
                tree_size=size,
                block_timestamp=int(block["timestamp"]),
                gas_used=int(receipt["gasUsed"]),
            )
        raise AnchorError(f"no Anchored event in {to_hex(receipt['transactionHash'])}")

    def head(self) -> Head:
        """The contract's latest anchored head (VitalAnchor only; the variant keeps none)."""
        root, size, ts, number = self.contract.functions.head().call()
        return Head(root=bytes(root), tree_size=int(size), timestamp=int(ts), block_number=number)

    def check(self, receipt: AnchorReceipt) -> None:
        """:func:`check_anchor_on_chain` for a receipt, on this chain's connection."""
        check_anchor_on_chain(
            self.w3,
            chain_id=receipt.chain_id,
            contract=receipt.contract,
            tx_hash=receipt.tx_hash,
            block_number=receipt.block_number,
            block_hash=receipt.block_hash,
            log_index=receipt.log_index,
            root=receipt.root,
            tree_size=receipt.tree_size,
            block_timestamp=receipt.block_timestamp,
        )
