// Option rows for command tables: each checks its value up front (empty values included) and
// says what it wants in the error, naming the flag.
import { intArg } from '../util/validate'
import { type Option, type RawValue, UsageError } from './command'

interface Common {
  help: string
  short?: string
}

interface Valued extends Common {
  /** placeholder in help (PATH, MS, ...) */
  value: string
}

function one(raw: RawValue, flag: string): string | undefined {
  if (raw === undefined) return undefined
  if (typeof raw !== 'string') throw new UsageError(`${flag} needs a value`)
  if (raw === '') throw new UsageError(`${flag} needs a value, not an empty string`)
  return raw
}

/** A boolean switch: --json. */
export function flag(o: Common): Option<boolean> {
  return { type: 'boolean', help: o.help, short: o.short, convert: (raw) => raw === true }
}

/** A string; `check` may refuse it (throw UsageError). */
export function text(o: Valued & { required: true; check?: (v: string, flag: string) => void }): Option<string>
export function text(o: Valued & { default: string; check?: (v: string, flag: string) => void }): Option<string>
export function text(o: Valued & { check?: (v: string, flag: string) => void }): Option<string | undefined>
export function text(
  o: Valued & { required?: boolean; default?: string; check?: (v: string, flag: string) => void },
): Option<string | undefined> {
  return {
    type: 'string',
    value: o.value,
    help: o.help,
    short: o.short,
    required: o.required,
    defaultText: o.default,
    convert(raw, flag) {
      const v = one(raw, flag)
      if (v === undefined) return o.default
      o.check?.(v, flag)
      return v
    },
  }
}

interface IntOptions extends Valued {
  min: number
  max: number
}

// The package's one integer check (src/util/validate.ts), its error a usage error.
function toInt(raw: string, flag: string, o: IntOptions): number {
  try {
    return intArg(raw, flag, 0, o.min, o.max)
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
}

/** A whole number in [min, max]. */
export function int(o: IntOptions & { default: number; defaultText?: string }): Option<number>
export function int(o: IntOptions & { required: true }): Option<number>
export function int(o: IntOptions & { defaultText?: string }): Option<number | undefined>
export function int(
  o: IntOptions & { default?: number; required?: boolean; defaultText?: string },
): Option<number | undefined> {
  return {
    type: 'string',
    value: o.value,
    help: o.help,
    short: o.short,
    required: o.required,
    defaultText: o.defaultText ?? (o.default === undefined ? undefined : String(o.default)),
    convert(raw, flag) {
      const v = one(raw, flag)
      return v === undefined ? o.default : toInt(v, flag, o)
    },
  }
}

/** Repeatable whole numbers: --allow-uid 1000 --allow-uid 1001. */
export function ints(o: IntOptions): Option<number[]> {
  return {
    type: 'string',
    multiple: true,
    value: o.value,
    help: o.help,
    short: o.short,
    convert: (raw, flag) => ((raw ?? []) as string[]).map((v) => toInt(one(v, flag)!, flag, o)),
  }
}

/** Repeatable strings: --header 'Authorization: Bearer x' --header 'X-A: b'. */
export function texts(o: Valued & { check?: (v: string, flag: string) => void }): Option<string[]> {
  return {
    type: 'string',
    multiple: true,
    value: o.value,
    help: o.help,
    short: o.short,
    convert: (raw, flag) =>
      ((raw ?? []) as string[]).map((v) => {
        const s = one(v, flag)!
        o.check?.(s, flag)
        return s
      }),
  }
}

/** One of a few words (undefined when absent and without a default). */
export function choice<const T extends string>(o: Valued & { values: readonly T[]; default: T }): Option<T>
export function choice<const T extends string>(
  o: Valued & { values: readonly T[]; defaultText?: string },
): Option<T | undefined>
export function choice<const T extends string>(
  o: Valued & { values: readonly T[]; default?: T; defaultText?: string },
): Option<T | undefined> {
  return {
    type: 'string',
    value: o.value,
    help: `${o.help} One of: ${o.values.join(', ')}.`,
    short: o.short,
    defaultText: o.defaultText ?? o.default,
    convert(raw, flag) {
      const v = one(raw, flag)
      if (v === undefined) return o.default
      if (!(o.values as readonly string[]).includes(v))
        throw new UsageError(`${flag} must be ${o.values.join(' or ')} (got '${v}')`)
      return v as T
    },
  }
}

const UNITS: Record<string, number> = { '': 1, m: 1, mib: 1, g: 1024, gib: 1024 }

/** A size in MiB: 512, 512M, 512MiB, 2G, 2GiB (binary units). */
export function mebibytes(o: IntOptions & { default: number }): Option<number> {
  return {
    type: 'string',
    value: o.value,
    help: `${o.help} A number of MiB, or with a unit: 512M, 2G.`,
    short: o.short,
    defaultText: `${o.default} MiB`,
    convert(raw, flag) {
      const v = one(raw, flag)
      if (v === undefined) return o.default
      const m = /^([0-9]+)\s*([a-z]*)$/i.exec(v)
      const unit = m ? UNITS[m[2].toLowerCase()] : undefined
      const n = m && unit !== undefined ? Number(m[1]) * unit : Number.NaN
      if (!Number.isSafeInteger(n) || n < o.min || n > o.max)
        throw new UsageError(
          `${flag} must be a size from ${o.min} to ${o.max} MiB: a number of MiB, or with M or G (got '${v}')`,
        )
      return n
    },
  }
}

/** A size in bytes: 4096, 512K, 64M, 1G (K/M/G: powers of 1024). */
export function bytes(o: Valued & { min: number; max: number; default?: number; multipleOf?: number }): Option<number> {
  return {
    type: 'string',
    value: o.value,
    help: `${o.help} Bytes, or with K, M or G (powers of 1024): 512K, 64M, 1G.`,
    short: o.short,
    defaultText: o.default === undefined ? undefined : formatSize(o.default),
    convert(raw, flag) {
      const v = one(raw, flag)
      if (v === undefined) {
        if (o.default === undefined) throw new UsageError(`missing ${flag} ${o.value}`)
        return o.default
      }
      const m = /^([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?$/i.exec(v)
      const unit = m
        ? ({ '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 } as Record<string, number>)[m[2].toLowerCase()]
        : undefined
      const n = m && unit !== undefined ? Math.round(Number(m[1]) * unit) : Number.NaN
      if (!Number.isSafeInteger(n) || n < o.min || n > o.max)
        throw new UsageError(
          `${flag} must be a size from ${formatSize(o.min)} to ${formatSize(o.max)}, such as 4096, 512K, 64M or 1G (got '${v}')`,
        )
      if (o.multipleOf !== undefined && n % o.multipleOf !== 0)
        throw new UsageError(`${flag} must be a multiple of ${formatSize(o.multipleOf)} (got '${v}')`)
      return n
    },
  }
}

function formatSize(n: number): string {
  for (const [unit, size] of [
    ['G', 2 ** 30],
    ['M', 2 ** 20],
    ['K', 2 ** 10],
  ] as const)
    if (n >= size && n % size === 0) return `${n / size}${unit}`
  return String(n)
}
