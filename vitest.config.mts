import { defineConfig } from 'vitest/config'

// USERFAULTFD_TEST_TIME_SCALE multiplies the timeouts where everything runs slower (npm run
// test:arm64 runs the suite under full-system emulation with 6).
const scale = Number(process.env.USERFAULTFD_TEST_TIME_SCALE ?? '1') || 1

// Each test file runs in its own forked process: a test that breaks the address space (or a
// uffd left with blocked faulters) cannot take the others down.
export default defineConfig({
  test: {
    pool: 'forks',
    include: ['test/**/*.test.ts'],
    testTimeout: 20_000 * scale,
    hookTimeout: 20_000 * scale,
    teardownTimeout: 10_000 * scale,
    reporters: ['default'],
  },
})
