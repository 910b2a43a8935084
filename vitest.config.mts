import { defineConfig } from 'vitest/config'

// Each test file runs in its own forked process: a test that breaks the address space (or a
// uffd left with blocked faulters) cannot take the others down.
export default defineConfig({
  test: {
    pool: 'forks',
    include: ['test/**/*.test.ts'],
    testTimeout: 20_000,
    hookTimeout: 20_000,
    teardownTimeout: 10_000,
    reporters: ['default'],
  },
})
