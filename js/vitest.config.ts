import { playwright } from "@vitest/browser-playwright";
import { defineConfig } from "vitest/config";

// Tests run in a real headless Chromium: Debian's /usr/bin/chromium (Playwright's own download is not used).
export default defineConfig({
  test: {
    globals: true,
    include: ["src/**/*.test.ts"],
    browser: {
      enabled: true,
      headless: true,
      provider: playwright({
        launchOptions: {
          executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
          args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        },
      }),
      instances: [{ browser: "chromium" }],
    },
  },
});
