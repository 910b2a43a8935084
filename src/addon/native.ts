// Loads the addon (with `bindings`, from the places ./location.ts names) and gives it its type,
// ./binding.ts: the addon is a thin syscall layer; validation and policy live in TypeScript.
import * as path from 'node:path'
import bindings from 'bindings'
import type { Binding } from './binding'
import { candidates, libc, nativeSource } from './location'

export { candidates, libc, nativeSource, type NativeSource } from './location'

// module_root is explicit: dist/addon/ and src/addon/ both sit two levels below the package root,
// and the default (walking up from the caller's stack) breaks under bundlers and test runners.
const moduleRoot = path.join(__dirname, '..', '..')

/**
 * Loads the addon `name` (the package's own, or the test-only userfaultfd_testing) from a local
 * build or a prebuild; `T` is its declared surface. The error names what to do when none exists.
 */
export function loadAddon<T>(name: string, what: string): T & { path: string } {
  const source = nativeSource()
  try {
    return bindings({ bindings: name, module_root: moduleRoot, try: candidates(source, name) })
  } catch (err) {
    const e = err as Error
    if (/Could not locate the bindings file/.test(e.message)) {
      e.message =
        `userfaultfd: no ${what} for ${process.platform}-${process.arch} (${libc()})` +
        `${source === 'auto' ? '' : ` with USERFAULTFD_NATIVE=${source}`}. ${e.message}\n` +
        'Compile it: npm rebuild userfaultfd --build-from-source (needs python3, make and a C++ compiler).'
    }
    throw e
  }
}

const loaded = loadAddon<Binding>('userfaultfd', 'native addon')
export const native: Binding = loaded
/** The file the addon was loaded from (a local build or a prebuild). */
export const nativePath: string = loaded.path
