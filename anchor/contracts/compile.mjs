#!/usr/bin/env node
// Compile VitalAnchor.sol with the pinned solc-js from node_modules (no binary downloads) and
// write the committed artifact VitalAnchor.json deterministically (sorted keys, 2-space indent,
// trailing newline), so that a recompilation anywhere yields byte-identical output.
//
//   node anchor/contracts/compile.mjs           write VitalAnchor.json
//   node anchor/contracts/compile.mjs --check   recompile; exit 1 if the artifact differs
//   node anchor/contracts/compile.mjs --stdout  print the artifact instead of writing it
//
// The artifact's top level describes VitalAnchor (abi, bytecode, deployedBytecode); the
// event-only comparison contract sits under "variants".

import { createRequire } from "node:module";
import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const here = dirname(fileURLToPath(import.meta.url));
const SOURCE_NAME = "VitalAnchor.sol";
const ARTIFACT = join(here, "VitalAnchor.json");
const MAIN = "VitalAnchor";
const VARIANTS = ["VitalAnchorEventOnly"];
const PINNED = "0.8.28";

// evmVersion cancun: py-evm (the embedded chain) and Anvil both run it.
const SETTINGS = {
  evmVersion: "cancun",
  optimizer: { enabled: true, runs: 200 },
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const key of Object.keys(value).sort()) out[key] = sortKeys(value[key]);
    return out;
  }
  return value;
}

function compile() {
  const solc = require("solc");
  const version = solc.version();
  if (!version.startsWith(PINNED + "+")) {
    throw new Error(`solc ${version} found, ${PINNED} pinned: run npm ci`);
  }
  // Normalise line endings so a CRLF checkout compiles to the same metadata hash.
  const content = readFileSync(join(here, SOURCE_NAME), "utf8").replace(/\r\n/g, "\n");
  const input = { language: "Solidity", sources: { [SOURCE_NAME]: { content } }, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (output.errors ?? []).filter((e) => e.severity === "error");
  for (const e of output.errors ?? []) process.stderr.write(e.formattedMessage + "\n");
  if (errors.length > 0) throw new Error(`${errors.length} compilation error(s)`);

  const contracts = output.contracts[SOURCE_NAME];
  const entry = (name) => {
    const c = contracts[name];
    if (!c) throw new Error(`contract ${name} missing from solc output`);
    return {
      abi: c.abi,
      bytecode: "0x" + c.evm.bytecode.object,
      deployedBytecode: "0x" + c.evm.deployedBytecode.object,
    };
  };
  const artifact = {
    contractName: MAIN,
    sourceName: SOURCE_NAME,
    compiler: { name: "solc-js", version, settings: SETTINGS },
    ...entry(MAIN),
    variants: Object.fromEntries(VARIANTS.map((name) => [name, { contractName: name, ...entry(name) }])),
  };
  return JSON.stringify(sortKeys(artifact), null, 2) + "\n";
}

const args = process.argv.slice(2);
const text = compile();
if (args.includes("--check")) {
  const committed = existsSync(ARTIFACT) ? readFileSync(ARTIFACT, "utf8") : "";
  if (committed !== text) {
    process.stderr.write(`${ARTIFACT} is stale: run node anchor/contracts/compile.mjs and commit it\n`);
    process.exit(1);
  }
  process.stdout.write("artifact up to date\n");
} else if (args.includes("--stdout")) {
  process.stdout.write(text);
} else {
  writeFileSync(ARTIFACT, text);
  process.stdout.write(`wrote ${ARTIFACT}\n`);
}
