import { defineConfig } from "vite";

// The control plane serves dist/ at `/` (LORAFORGE_WEB_DIR); `npm run dev` proxies the API
// to a local `loraforge serve`.
export default defineConfig({
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
  build: {
    target: "es2022",
    outDir: "dist",
    assetsDir: "assets",
    // scripts/postbuild.mjs reads the chunk graph from it to measure the first page.
    manifest: true,
    sourcemap: false,
    chunkSizeWarningLimit: 400,
  },
  server: {
    proxy: {
      "/v1": { target: process.env.LORAFORGE_API ?? "http://127.0.0.1:8080", changeOrigin: false },
    },
  },
});
