// Proof bundles in the browser: parsing and validating one (verifier/vitalproof_verify/bundle.py
// and its schemas/proof-bundle-v1.json and -v2.json), the bytes a leaf commits to (leaves.py),
// and the offline checks in the Python verifier's order, for either version. A reviewer compares the two verifiers check by
// check: same failure names (errors.py's ProofFailure), same order, same accept/refuse rules.

import { MerkleError, equalBytes, leafHash, toHex, verifyInclusion } from "/ui/merkle.js";

/** ProofFailure of verifier/vitalproof_verify/errors.py: stable strings both verifiers print. */
export const FAILURE = Object.freeze({
  MALFORMED: "malformed bundle",
  WRONG_LEAF: "wrong leaf",
  WRONG_PATIENT_PATH: "wrong patient path",
  WRONG_BATCH_PATH: "wrong batch path",
  WRONG_LOG_PATH: "wrong log path",
  ROOT_NOT_ON_CHAIN: "root not on chain",
  REORGED_OUT: "transaction reorged out",
  WRONG_CHAIN: "wrong chain",
});

/** A bundle failed one named check (ProofError of errors.py). */
export class ProofError extends Error {
  constructor(failure, detail) {
    super(`${failure}: ${detail}`);
    this.name = "ProofError";
    this.failure = failure;
    this.detail = detail;
  }
}

export const MAX_BUNDLE_BYTES = 1 << 20;
const MAX_PATH_LENGTH = 64;
const UINT64_MAX = 2n ** 64n - 1n;

// -- parsing: JSON as Python's verifier reads it ------------------------------------------------

/**
 * JSON with integers kept exact (BigInt) and apart from floats: the Python verifier is strict
 * (17.0 is not an integer, and seq may exceed 2^53), so the source text decides, not the value.
 * Lone surrogates are refused, as Python's JSON reader refuses them.
 */
export function parseJson(text) {
  return JSON.parse(text, (key, value, context) => {
    if (!key.isWellFormed() || (typeof value === "string" && !value.isWellFormed())) {
      throw new SyntaxError("a string holds a lone surrogate");
    }
    if (typeof value === "number" && /^-?\d+$/.test(context.source)) return BigInt(context.source);
    return value;
  });
}

class Invalid extends Error {}

const fail = (where, msg) => {
  throw new Invalid(`${where.join(".") || "bundle"}: ${msg}`);
};

// Validators: (value, where) -> the value, or Invalid naming the field (pydantic's strict mode).
const str = ({ pattern, min = 0, max = Infinity } = {}) => (v, where) => {
  if (typeof v !== "string") fail(where, "Input should be a valid string");
  const n = [...v].length; // code points, as Python's len()
  if (n < min) fail(where, `String should have at least ${min} character`);
  if (n > max) fail(where, `String should have at most ${max} characters`);
  if (pattern && !pattern.test(v)) fail(where, `String should match pattern '${pattern.source}'`);
  return v;
};
const int = ({ min, max } = {}) => (v, where) => {
  if (typeof v !== "bigint") fail(where, "Input should be a valid integer");
  if (min !== undefined && v < min) fail(where, `Input should be greater than or equal to ${min}`);
  if (max !== undefined && v > max) fail(where, `Input should be less than or equal to ${max}`);
  return v;
};
const floatOrNull = (v, where) => {
  if (v === null) return null;
  if (typeof v !== "number" && typeof v !== "bigint") fail(where, "Input should be a valid number");
  const x = Number(v);
  if (!Number.isFinite(x)) fail(where, "Input should be a finite number");
  return x;
};
// Literal[1] compares with ==, so pydantic also takes 1.0 and true; the same here.
const versionOne = (v, where) => {
  if (!(v === 1n || v === 1 || v === true)) fail(where, "Input should be 1");
  return 1;
};
// Literal[2]: 2 or 2.0 (true is 1, not 2).
const isTwo = (v) => v === 2n || v === 2;
const versionTwo = (v, where) => {
  if (!isTwo(v)) fail(where, "Input should be 2");
  return 2;
};
const list = (item, max) => (v, where) => {
  if (!Array.isArray(v)) fail(where, "Input should be a valid list");
  if (v.length > max) fail(where, `List should have at most ${max} items`);
  return v.map((x, i) => item(x, [...where, i]));
};
const object = (fields) => (v, where) => {
  if (v === null || typeof v !== "object" || Array.isArray(v)) fail(where, "Input should be an object");
  const out = {};
  for (const [name, check] of Object.entries(fields)) {
    if (!Object.hasOwn(v, name)) fail([...where, name], "Field required");
    out[name] = check(v[name], [...where, name]);
  }
  for (const name of Object.keys(v)) {
    if (!Object.hasOwn(fields, name)) fail([...where, name], "Extra inputs are not permitted");
  }
  return out;
};

const hex32 = str({ pattern: /^[0-9a-f]{64}$/ });
const ethHash = str({ pattern: /^0x[0-9a-f]{64}$/ });
const uint64 = int({ min: 0n, max: UINT64_MAX });
const size64 = int({ min: 1n, max: UINT64_MAX });
const path = list(hex32, MAX_PATH_LENGTH);

const READING = object({
  reading_id: str(), device_id: str(), patient_id: str(), metric: str(), value: floatOrNull,
  unit: str(), device_time_us: int(), seq: int(), quality: int(),
});
const batchId = str({ min: 1, max: 256 });
const LOG = object({ leaf_index: uint64, tree_size: size64, root: hex32, path });
const ANCHOR = object({
  chain_id: int({ min: 1n }), contract: str({ pattern: /^0x[0-9a-fA-F]{40}$/ }), tx_hash: ethHash,
  block_number: uint64, block_hash: ethHash, log_index: uint64, tree_size: size64, root: ethHash,
  block_timestamp: uint64,
});

const BUNDLE_V1 = object({
  version: versionOne,
  reading: READING,
  salt: hex32,
  leaf_hash: hex32,
  batch: object({ batch_id: batchId, batch_root: hex32, batch_size: size64, leaf_index: uint64, path }),
  log: LOG,
  anchor: ANCHOR,
});

// Version 2 (two-level batch tree): the leaf in its patient's subtree, that subtree's root
// among the batch's patients' roots.
const BUNDLE_V2 = object({
  version: versionTwo,
  reading: READING,
  salt: hex32,
  leaf_hash: hex32,
  patient: object({ root: hex32, size: size64, leaf_index: uint64, path }),
  batch: object({
    batch_id: batchId, batch_root: hex32, batch_size: size64, patient_index: uint64,
    patient_count: size64, path,
  }),
  log: LOG,
  anchor: ANCHOR,
});

// As bundle.py's load_bundle: a version of 2 picks version 2's model; anything else is
// validated as version 1 and refused in version 1's words.
const BUNDLE = (doc, where) => {
  const v2 = doc !== null && typeof doc === "object" && !Array.isArray(doc) && isTwo(doc.version);
  return (v2 ? BUNDLE_V2 : BUNDLE_V1)(doc, where);
};

/** Parse and validate a bundle's bytes; anything that is not a bundle of version 1 or 2 is MALFORMED. */
export function loadBundle(bytes) {
  if (bytes.length > MAX_BUNDLE_BYTES) {
    throw new ProofError(FAILURE.MALFORMED, `bundle larger than ${MAX_BUNDLE_BYTES} bytes`);
  }
  let doc;
  try {
    // fatal: bytes that are not UTF-8 are not JSON; ignoreBOM keeps a BOM, which JSON refuses.
    doc = parseJson(new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(bytes));
  } catch (e) {
    throw new ProofError(FAILURE.MALFORMED, `bundle: Invalid JSON: ${e.message}`);
  }
  try {
    return BUNDLE(doc, []);
  } catch (e) {
    if (e instanceof Invalid) throw new ProofError(FAILURE.MALFORMED, e.message);
    throw e;
  }
}

// -- leaves.py: the bytes a leaf commits to ------------------------------------------------

const ESCAPES = { '"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t" };

/** A string as Python's json.dumps writes it (ensure_ascii): all but printable ASCII escaped. */
export function pyString(s) {
  const body = s.replace(/[\\"]|[^ -~]/g, (c) => ESCAPES[c] ?? "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
  return `"${body}"`;
}

/**
 * A float as Python's repr (and so json.dumps) writes it: the same shortest round-trip digits as
 * JavaScript's, but always with a ".0" or an exponent, and the exponent from 1e16 and below 1e-4.
 */
export function pyFloat(x) {
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const [mantissa, e] = Math.abs(x).toExponential().split("e");
  const sign = x < 0 ? "-" : "";
  const digits = mantissa.replace(".", "");
  const exp = Number(e);
  if (exp < -4 || exp >= 16) {
    const rest = digits.length > 1 ? `.${digits.slice(1)}` : "";
    return `${sign}${digits[0]}${rest}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  }
  if (exp < 0) return `${sign}0.${"0".repeat(-exp - 1)}${digits}`;
  return `${sign}${digits.slice(0, exp + 1).padEnd(exp + 1, "0")}.${digits.slice(exp + 1) || "0"}`;
}

/** canonical_reading_bytes of leaves.py: sorted keys, no spaces, Python's float form. */
export function canonicalReading(r) {
  const value = r.value === null ? "null" : pyFloat(r.value);
  const json =
    `{"device_id":${pyString(r.device_id)},"device_time_us":${r.device_time_us},` +
    `"metric":${pyString(r.metric)},"patient_id":${pyString(r.patient_id)},"quality":${r.quality},` +
    `"reading_id":${pyString(r.reading_id)},"seq":${r.seq},"unit":${pyString(r.unit)},"value":${value}}`;
  return new TextEncoder().encode(json);
}

/** log_leaf_data of leaves.py: the canonical JSON of one batch entry of the log. */
export function logLeafData(batchId, batchRoot, batchSize) {
  const json = `{"batch_id":${pyString(batchId)},"batch_root":"${toHex(batchRoot)}","batch_size":${batchSize},"v":1}`;
  return new TextEncoder().encode(json);
}

export function fromHex(hex) {
  const h = hex.replace(/^0x/, "");
  return Uint8Array.from(h.match(/../g) || [], (b) => parseInt(b, 16));
}

const concat = (a, b) => {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
};

// -- verify_offline of bundle.py, one check at a time -------------------------------------

/**
 * The checks that need no chain, in the Python verifier's order. Each `run(bundle, ctx)`
 * returns a one-line reason when it passes and throws ProofError when it fails; `ctx` carries
 * what one check computes for the next. `offlineChecks(bundle)` gives a bundle's list: version 2
 * checks the patient path before the batch path, version 1 has no patient path.
 */
const LEAF_CHECK = {
  id: "leaf",
  label: "The reading and its salt hash to the leaf",
  failure: FAILURE.WRONG_LEAF,
  async run(b, ctx) {
    ctx.leaf = await leafHash(concat(fromHex(b.salt), canonicalReading(b.reading)));
    if (!equalBytes(ctx.leaf, fromHex(b.leaf_hash))) {
      throw new ProofError(
        FAILURE.WRONG_LEAF, `reading and salt hash to ${toHex(ctx.leaf)}, bundle claims ${b.leaf_hash}`,
      );
    }
    return `SHA-256(0x00 || salt || reading) is ${b.leaf_hash}`;
  },
};

async function inclusion(failure, what, leaf, index, size, path, root) {
  try {
    await verifyInclusion(leaf, index, size, path.map(fromHex), fromHex(root));
  } catch (e) {
    if (!(e instanceof MerkleError)) throw e;
    throw new ProofError(failure, `${what}: ${e.message}`);
  }
}

const BATCH_CHECK_V1 = {
  id: "batch",
  label: "The leaf is in its batch (RFC 9162 inclusion)",
  failure: FAILURE.WRONG_BATCH_PATH,
  async run(b, ctx) {
    const { batch_id, batch_root, batch_size, leaf_index, path } = b.batch;
    await inclusion(
      FAILURE.WRONG_BATCH_PATH, `leaf not in batch '${batch_id}'`, ctx.leaf, leaf_index, batch_size, path,
      batch_root,
    );
    return `leaf ${leaf_index} of ${batch_size} in batch ${batch_id}`;
  },
};

const PATIENT_CHECK = {
  id: "patient",
  label: "The leaf is in its patient's subtree of the batch (RFC 9162 inclusion)",
  failure: FAILURE.WRONG_PATIENT_PATH,
  async run(b, ctx) {
    const { root, size, leaf_index, path } = b.patient;
    await inclusion(
      FAILURE.WRONG_PATIENT_PATH, `leaf not in the patient's subtree of batch '${b.batch.batch_id}'`,
      ctx.leaf, leaf_index, size, path, root,
    );
    return `leaf ${leaf_index} of ${size} in the subtree with root ${root}`;
  },
};

const BATCH_CHECK_V2 = {
  id: "batch",
  label: "The patient's subtree is in its batch (RFC 9162 inclusion)",
  failure: FAILURE.WRONG_BATCH_PATH,
  async run(b) {
    const { batch_id, batch_root, patient_index, patient_count, path } = b.batch;
    await inclusion(
      FAILURE.WRONG_BATCH_PATH, `patient's subtree not in batch '${batch_id}'`, fromHex(b.patient.root),
      patient_index, patient_count, path, batch_root,
    );
    return `subtree ${patient_index} of ${patient_count} in batch ${batch_id}`;
  },
};

const LOG_CHECK = {
  id: "log",
  label: "The batch is in the log (RFC 9162 inclusion)",
  failure: FAILURE.WRONG_LOG_PATH,
  async run(b) {
    const { batch_id, batch_root, batch_size } = b.batch;
    const entry = await leafHash(logLeafData(batch_id, fromHex(batch_root), batch_size));
    await inclusion(
      FAILURE.WRONG_LOG_PATH, `batch '${batch_id}' not in the log`, entry, b.log.leaf_index,
      b.log.tree_size, b.log.path, b.log.root,
    );
    return `entry ${b.log.leaf_index} of ${b.log.tree_size} in the log`;
  },
};

const HEAD_CHECK = {
  id: "head",
  label: "The log head is the anchored head",
  failure: FAILURE.ROOT_NOT_ON_CHAIN,
  async run(b) {
    if (b.log.tree_size !== b.anchor.tree_size || `0x${b.log.root}` !== b.anchor.root) {
      throw new ProofError(
        FAILURE.ROOT_NOT_ON_CHAIN,
        `log head (size ${b.log.tree_size}, root ${b.log.root}) is not the anchored head ` +
          `(size ${b.anchor.tree_size}, root ${b.anchor.root.slice(2)})`,
      );
    }
    return `size ${b.log.tree_size}, root ${b.log.root}`;
  },
};

export const OFFLINE_CHECKS_V1 = [LEAF_CHECK, BATCH_CHECK_V1, LOG_CHECK, HEAD_CHECK];
export const OFFLINE_CHECKS_V2 = [LEAF_CHECK, PATIENT_CHECK, BATCH_CHECK_V2, LOG_CHECK, HEAD_CHECK];

/** The offline checks of a loaded bundle's version, in the Python verifier's order. */
export function offlineChecks(bundle) {
  return bundle.version === 2 ? OFFLINE_CHECKS_V2 : OFFLINE_CHECKS_V1;
}
