// The on-chain half of a bundle's check, from the browser to a JSON-RPC URL the user gives:
// check_anchor_on_chain of verifier/vitalproof_verify/onchain.py, in its order, with its failure
// names. Like the Python verifier it needs no ABI: the Anchored event is matched on its topic
// and its two uint64 words are read by position.

import { FAILURE, ProofError } from "/ui/bundle.js";

/** keccak256("Anchored(bytes32,uint64,uint64)"): topic0 of the contract's Anchored event
 * (ANCHORED_TOPIC of onchain.py; tests/test_dashboard_verify.py holds the two equal). */
export const ANCHORED_TOPIC = "0x665a214d59c3b0d9e6c4975fba280be5e19b9b0862cff85b71d42433191945cf";

/** The endpoint could not answer a call: nothing was decided (exit code 2 of the CLI). */
export class RpcUnusable extends Error {
  constructor(message) {
    super(message);
    this.name = "RpcUnusable";
  }
}

let nextId = 1;
const TIMEOUT_MS = 30_000; // the Python CLI's default --timeout

/** One JSON-RPC 2.0 call over HTTP POST; the result, or RpcUnusable. */
export async function call(url, method, params = []) {
  let reply;
  try {
    const resp = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ jsonrpc: "2.0", id: nextId++, method, params }),
      signal: AbortSignal.timeout(TIMEOUT_MS),
    });
    if (!resp.ok) throw new Error(`HTTP ${resp.status} ${resp.statusText}`);
    reply = await resp.json();
  } catch (e) {
    throw new RpcUnusable(`cannot reach the JSON-RPC endpoint ${url}: ${e.message}`);
  }
  if (reply.error) throw new RpcUnusable(`${method} failed at ${url}: ${reply.error.message}`);
  return reply.result;
}

const quantity = (n) => "0x" + n.toString(16);
const lower = (s) => String(s).toLowerCase();

/** (root, treeSize, timestamp) if `log` is an Anchored event from `contract` (parse_anchored). */
function parseAnchored(log, contract) {
  const topics = log.topics || [];
  if (lower(log.address) !== lower(contract)) return null;
  if (topics.length !== 2 || lower(topics[0]) !== ANCHORED_TOPIC) return null;
  // abi decode of (uint64, uint64): two 32-byte words, each with 24 zero bytes of padding.
  const words = (log.data || "").slice(2).match(/.{64}/g) || [];
  if (words.length < 2 || words.slice(0, 2).some((w) => !/^0{48}/.test(w))) return null;
  return { root: lower(topics[1]), size: BigInt("0x" + words[0]), ts: BigInt("0x" + words[1]) };
}

/**
 * The checks against the chain, in check_anchor_on_chain's order; each `run(bundle, ctx)`
 * returns a one-line reason or throws ProofError. `ctx.url` is the endpoint, `ctx.chainId` the
 * chain id it answered first (as the Python CLI asks it before any check, to know it answers).
 */
export const CHAIN_CHECKS = [
  {
    id: "chain",
    label: "The endpoint is on the bundle's chain",
    failure: FAILURE.WRONG_CHAIN,
    async run(b, ctx) {
      if (ctx.chainId !== b.anchor.chain_id) {
        throw new ProofError(FAILURE.WRONG_CHAIN, `endpoint is chain ${ctx.chainId}, bundle names ${b.anchor.chain_id}`);
      }
      return `chain ${ctx.chainId}`;
    },
  },
  {
    id: "tx",
    label: "The transaction is in the named block, on the chain",
    failure: FAILURE.REORGED_OUT,
    async run(b, ctx) {
      const a = b.anchor;
      ctx.receipt = await call(ctx.url, "eth_getTransactionReceipt", [a.tx_hash]);
      if (!ctx.receipt) throw new ProofError(FAILURE.REORGED_OUT, `no receipt for transaction ${a.tx_hash}`);
      const block = await call(ctx.url, "eth_getBlockByNumber", [quantity(a.block_number), false]);
      if (!block) throw new ProofError(FAILURE.REORGED_OUT, `block ${a.block_number} does not exist on this chain`);
      if (lower(block.hash) !== a.block_hash) {
        throw new ProofError(
          FAILURE.REORGED_OUT, `block ${a.block_number} is now ${block.hash}, bundle names ${a.block_hash}`,
        );
      }
      const r = ctx.receipt;
      if (lower(r.blockHash) !== a.block_hash || BigInt(r.blockNumber) !== a.block_number) {
        throw new ProofError(
          FAILURE.REORGED_OUT,
          `transaction is in block ${BigInt(r.blockNumber)} ${r.blockHash}, bundle names ${a.block_number} ${a.block_hash}`,
        );
      }
      return `${a.tx_hash} in block ${a.block_number}`;
    },
  },
  {
    id: "event",
    label: "The transaction's Anchored event carries the root",
    failure: FAILURE.ROOT_NOT_ON_CHAIN,
    async run(b, ctx) {
      const a = b.anchor;
      if (BigInt(ctx.receipt.status) !== 1n) {
        throw new ProofError(FAILURE.ROOT_NOT_ON_CHAIN, "the anchor transaction reverted");
      }
      for (const log of ctx.receipt.logs || []) {
        if (BigInt(log.logIndex) !== a.log_index) continue;
        const got = parseAnchored(log, a.contract);
        if (got === null) break;
        if (got.root !== a.root || got.size !== a.tree_size) {
          throw new ProofError(
            FAILURE.ROOT_NOT_ON_CHAIN,
            `log ${a.log_index} anchors root ${got.root} size ${got.size}, bundle names ${a.root} size ${a.tree_size}`,
          );
        }
        if (got.ts !== a.block_timestamp) {
          throw new ProofError(FAILURE.ROOT_NOT_ON_CHAIN, `anchored at time ${got.ts}, bundle claims ${a.block_timestamp}`);
        }
        const when = new Date(Number(got.ts) * 1000).toISOString().replace(".000Z", "Z");
        return `root ${a.root.slice(0, 18)}… size ${a.tree_size}, anchored at ${when} (time ${got.ts})`;
      }
      throw new ProofError(
        FAILURE.ROOT_NOT_ON_CHAIN, `no Anchored event from ${a.contract} at log index ${a.log_index} of ${a.tx_hash}`,
      );
    },
  },
];
