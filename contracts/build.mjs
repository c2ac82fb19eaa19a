// Compile Truscl.sol with the pinned solc and write build/Truscl.json.
//
// The artifact is committed so that Python never needs Node; a test rebuilds it and compares,
// so the output must be byte-for-byte reproducible: pinned compiler, explicit EVM version, no
// metadata hash in the bytecode (it embeds source paths and would differ between checkouts),
// stable key order and a trailing newline.
//
// Usage: node build.mjs [--out DIR]   (default DIR: build/ next to this file)

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import solc from "solc";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CONTRACT = "Truscl";
const SOURCE = `${CONTRACT}.sol`;
const EVM_VERSION = "cancun"; // py-evm stops at prague; pinned so the default cannot drift
const OPTIMIZER = { enabled: true, runs: 200 };

function parseOut(argv) {
  const i = argv.indexOf("--out");
  if (i === -1) return path.join(HERE, "build");
  if (!argv[i + 1]) throw new Error("--out needs a directory");
  return path.resolve(argv[i + 1]);
}

// Resolve imports only from this package's node_modules: nothing outside the lock file.
function findImports(importPath) {
  if (!importPath.startsWith("@openzeppelin/")) {
    return { error: `import outside @openzeppelin/ refused: ${importPath}` };
  }
  const file = path.join(HERE, "node_modules", importPath);
  try {
    return { contents: fs.readFileSync(file, "utf8") };
  } catch (err) {
    return { error: `cannot read ${file}: ${err.message}` };
  }
}

function compile() {
  const input = {
    language: "Solidity",
    sources: { [SOURCE]: { content: fs.readFileSync(path.join(HERE, SOURCE), "utf8") } },
    settings: {
      evmVersion: EVM_VERSION,
      optimizer: OPTIMIZER,
      metadata: { appendCBOR: false },
      outputSelection: {
        [SOURCE]: { [CONTRACT]: ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] },
      },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const problems = output.errors ?? [];
  for (const p of problems) console.error(p.formattedMessage ?? p.message);
  if (problems.some((p) => p.severity === "error")) {
    throw new Error(`solc ${solc.version()} failed to compile ${SOURCE}`);
  }
  const contract = output.contracts?.[SOURCE]?.[CONTRACT];
  if (!contract?.evm?.bytecode?.object) throw new Error(`no bytecode for ${CONTRACT}`);
  return contract;
}

function main() {
  const outDir = parseOut(process.argv.slice(2));
  const contract = compile();
  // Keys in a fixed order: JSON.stringify keeps insertion order.
  const artifact = {
    contractName: CONTRACT,
    abi: contract.abi,
    bytecode: `0x${contract.evm.bytecode.object}`,
    deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
    compiler: {
      solc: solc.version(),
      evmVersion: EVM_VERSION,
      optimizer: OPTIMIZER,
    },
  };
  fs.mkdirSync(outDir, { recursive: true });
  const outFile = path.join(outDir, `${CONTRACT}.json`);
  fs.writeFileSync(outFile, `${JSON.stringify(artifact, null, 2)}\n`);
  console.log(`wrote ${outFile} (${(artifact.deployedBytecode.length - 2) / 2} bytes deployed)`);
}

try {
  main();
} catch (err) {
  console.error(`build failed: ${err.message}`);
  process.exit(1);
}
