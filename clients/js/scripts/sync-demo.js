// Copies the client into the gateway's demo page files (rtserver/static/rtclient.js).
// tests/test_js_client.py fails when the copy is stale.
import { copyFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const src = fileURLToPath(new URL("../src/index.js", import.meta.url));
const dest = fileURLToPath(new URL("../../../rtserver/static/rtclient.js", import.meta.url));
copyFileSync(src, dest);
console.log(`copied ${src} -> ${dest}`);
