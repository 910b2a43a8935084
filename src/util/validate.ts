// Checking user input: the one validator module. Every public option and argument that is not an
// address range (see core/range.ts) is checked here, so that bad input always gets the same kind
// of error with the same wording: a TypeError for the wrong type, a RangeError for a value out of
// range, both naming the option and what was given.

/** A short description of a value for error messages. */
export function describe(value: unknown): string {
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'an array'
  if (typeof value === 'object') return `an object (${Object.prototype.toString.call(value)})`
  return `${typeof value} ${String(value).slice(0, 40)}`
}

/** An options argument: undefined (no options) or a plain object. */
export function checkOptions(options: unknown, what: string): Record<string, unknown> {
  if (options === undefined) return {}
  if (options === null || typeof options !== 'object' || Array.isArray(options))
    throw new TypeError(`${what} options must be an object (got ${describe(options)})`)
  return options as Record<string, unknown>
}

/**
 * Options renamed in a release: passing an old name is a TypeError that names the new one (never
 * silently ignored). `renames` maps old names to new ones.
 */
export function checkRenamed(options: object, renames: Readonly<Record<string, string>>, what: string): void {
  for (const [old, now] of Object.entries(renames)) {
    if (Object.hasOwn(options, old) && (options as Record<string, unknown>)[old] !== undefined)
      throw new TypeError(`${what}: option '${old}' is now '${now}' (see CHANGELOG.md)`)
  }
}

/** A boolean option, `fallback` when absent. */
export function flag(options: Record<string, unknown>, name: string, fallback: boolean): boolean {
  const v = options[name]
  if (v === undefined) return fallback
  if (typeof v !== 'boolean') throw new TypeError(`option '${name}' must be a boolean (got ${describe(v)})`)
  return v
}

/** A boolean value (undefined: `fallback`). */
export function bool(value: unknown, name: string, fallback: boolean): boolean {
  if (value === undefined) return fallback
  if (typeof value !== 'boolean') throw new TypeError(`${name} must be a boolean (got ${describe(value)})`)
  return value
}

function intRange(min: number, max: number): string {
  if (max === Number.MAX_SAFE_INTEGER && min === 0) return 'a non-negative integer'
  if (max === Number.MAX_SAFE_INTEGER && min === 1) return 'a positive integer'
  return `an integer ${min}..${max}`
}

/** An integer in [min, max]: a TypeError for a non-number, a RangeError for anything else wrong. */
export function int(value: unknown, name: string, min: number, max: number = Number.MAX_SAFE_INTEGER): number {
  if (typeof value !== 'number') throw new TypeError(`${name} must be ${intRange(min, max)} (got ${describe(value)})`)
  if (!Number.isSafeInteger(value) || value < min || value > max)
    throw new RangeError(`${name} must be ${intRange(min, max)} (got ${describe(value)})`)
  return value
}

/** int(), with `fallback` when the value is undefined. */
export function optionalInt(
  value: unknown,
  name: string,
  fallback: number,
  min: number,
  max: number = Number.MAX_SAFE_INTEGER,
): number {
  return value === undefined ? fallback : int(value, name, min, max)
}

/** A power of two in [min, max] (sizes of windows and pages). */
export function powerOfTwo(value: unknown, name: string, min: number, max: number): number {
  const v = int(value, name, min, max)
  if ((v & (v - 1)) !== 0) throw new RangeError(`${name} must be a power of two (got ${v})`)
  return v
}

/** A non-negative number, not necessarily an integer (a rate). */
export function nonNegative(value: unknown, name: string, fallback: number): number {
  if (value === undefined) return fallback
  if (typeof value !== 'number') throw new TypeError(`${name} must be a number (got ${describe(value)})`)
  if (!(value >= 0) || value === Infinity)
    throw new RangeError(`${name} must be a non-negative number (got ${describe(value)})`)
  return value
}

/** One of `choices` (undefined: `fallback`). */
export function choice<T extends string>(value: unknown, name: string, choices: readonly T[], fallback?: T): T {
  if (value === undefined && fallback !== undefined) return fallback
  if (!choices.includes(value as T))
    throw new TypeError(`${name} must be ${choices.map((c) => `'${c}'`).join(' or ')} (got ${describe(value)})`)
  return value as T
}

/** A function. */
export function func<T extends (...args: never[]) => unknown>(value: unknown, name: string): T {
  if (typeof value !== 'function') throw new TypeError(`${name} must be a function (got ${describe(value)})`)
  return value as T
}

/**
 * An integer given as text (a command-line flag): `fallback` when absent; the same ranges and
 * wording as int(), with the flag's name.
 */
export function intArg(text: string | undefined, name: string, fallback: number, min: number, max: number): number {
  if (text === undefined) return fallback
  const n = /^-?[0-9]+$/.test(text) ? Number(text) : Number.NaN
  if (!Number.isSafeInteger(n) || n < min || n > max)
    throw new RangeError(`${name} must be ${intRange(min, max)} (got '${text}')`)
  return n
}
