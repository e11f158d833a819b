// Bundle the widgets into ../opd_lens/static (gitignored, shipped in the wheel). `node build.mjs --watch` for dev.
import * as esbuild from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";

const outdir = "../opd_lens/static";
const options = {
  entryPoints: { explorer: "src/explorer.ts", monitor: "src/monitor.ts", widget: "src/widget.css" },
  bundle: true,
  format: "esm",
  minify: !process.argv.includes("--watch"),
  sourcemap: process.argv.includes("--watch") ? "inline" : false,
  target: "es2020",
  outdir,
  // Bundled code must never register as an anonymous AMD module on pages that carry RequireJS (offline reports).
  define: { "define.amd": "false" },
  logLevel: "info",
};

mkdirSync(`${outdir}/vendor`, { recursive: true });
// The runtime an offline report inlines: RequireJS and the standalone widget manager (no CDN at view time).
copyFileSync("node_modules/requirejs/require.js", `${outdir}/vendor/require.js`);
copyFileSync("node_modules/@jupyter-widgets/html-manager/dist/embed-amd.js", `${outdir}/vendor/embed-amd.js`);

if (process.argv.includes("--watch")) {
  await (await esbuild.context(options)).watch();
} else {
  await esbuild.build(options);
}
