// Property-based testing with fast-check: one seed per run, printed with every failure (with the
// shrunk counterexample fast-check reports), and the knobs to replay or deepen a run:
//   USERFAULTFD_FC_SEED=123 npx vitest run test/protocol-properties.test.ts   # replay a failure
//   USERFAULTFD_FC_RUNS=10000 npx vitest run test/*-properties.test.ts       # search harder
import fc from 'fast-check'
import { UffdError, UnsupportedError } from '../../src/index'
import { ProtocolError } from '../../src/firecracker/protocol'

export const seed =
  process.env.USERFAULTFD_FC_SEED !== undefined
    ? Number(process.env.USERFAULTFD_FC_SEED)
    : fc.sample(fc.integer(), 1)[0]
const runs = process.env.USERFAULTFD_FC_RUNS !== undefined ? Number(process.env.USERFAULTFD_FC_RUNS) : undefined

function withSeed(err: unknown, name: string): unknown {
  if (err instanceof Error)
    err.message = `${name}: property failed with seed ${seed} (replay: USERFAULTFD_FC_SEED=${seed})\n${err.message}`
  return err
}

/** fc.assert with this run's seed; a failure names the seed and the shrunk counterexample. */
export function check<Ts>(name: string, property: fc.IProperty<Ts>, numRuns = 300): void {
  try {
    fc.assert(property, { seed, numRuns: runs ?? numRuns })
  } catch (err) {
    throw withSeed(err, name)
  }
}

export async function checkAsync<Ts>(name: string, property: fc.IAsyncProperty<Ts>, numRuns = 100): Promise<void> {
  try {
    await fc.assert(property, { seed, numRuns: runs ?? numRuns })
  } catch (err) {
    throw withSeed(err, name)
  }
}

// Messages V8 itself produces when unvalidated input reaches code that assumed its type: a
// TypeError like these is a missing check, not a "clear" error.
const ENGINE_MESSAGES =
  /Cannot read properties of|is not a function|is not iterable|Cannot convert|Cannot mix BigInt|serialize a BigInt|Invalid array length|Maximum call stack|is not a constructor|Cannot destructure/

/**
 * True for the errors bad input may get: a TypeError or RangeError of the package's own (not
 * one V8 raised from deeper down), a UffdError with code/errno/syscall, a ProtocolError, an
 * UnsupportedError.
 */
export function isCleanError(err: unknown): boolean {
  if (err instanceof UffdError)
    return typeof err.code === 'string' && typeof err.errno === 'number' && typeof err.syscall === 'string'
  if (err instanceof ProtocolError || err instanceof UnsupportedError) return err.message !== ''
  if (err instanceof TypeError || err instanceof RangeError)
    return err.message !== '' && !ENGINE_MESSAGES.test(err.message)
  return false
}

/** Runs f: it may return or throw a clean error; anything else fails the property. */
export function cleanly(f: () => unknown): { ok: true; value: unknown } | { ok: false; error: Error } {
  try {
    return { ok: true, value: f() }
  } catch (err) {
    if (!isCleanError(err)) throw err
    return { ok: false, error: err as Error }
  }
}

/**
 * Values that break validators: wrong types, boundary numbers, lossy bigints, objects that
 * pretend (getters that throw, proxies, nulls in disguise), and anything fast-check makes.
 */
export const hostile: fc.Arbitrary<unknown> = fc.oneof(
  fc.constantFrom(
    undefined,
    null,
    0,
    -0,
    1,
    -1,
    0.5,
    Number.NaN,
    Number.POSITIVE_INFINITY,
    Number.NEGATIVE_INFINITY,
    2 ** 31,
    2 ** 32,
    2 ** 53,
    2 ** 64,
    Number.MAX_SAFE_INTEGER,
    -Number.MAX_SAFE_INTEGER,
    0n,
    -1n,
    2n ** 64n,
    2n ** 64n - 1n,
    2n ** 63n,
    '',
    '0',
    '4096',
    'none',
    true,
    false,
    [],
    {},
    Symbol('x'),
    () => 0,
    new ArrayBuffer(0),
    new Uint8Array(8),
    Object.create(null),
    { address: 0n, length: 0 },
    { address: -4096n, length: 4096 },
    { address: 2n ** 64n - 4096n, length: 8192 },
    new Proxy({}, { get: () => 1n }),
  ),
  fc.anything({ withBigInt: true, withBoxedValues: true, withMap: true, withSet: true, withTypedArray: true }),
  fc.double(),
  fc.bigInt(),
  fc.integer(),
)
