// Where the addon files are: the one place that knows the prebuild layout and the libc tag. Used
// by the loader (./native.ts) and by the install script (scripts/install.js requires the compiled
// dist/addon/location.js), so the two can never disagree. Imports nothing from the package.
import * as path from 'node:path'
import { familySync } from 'detect-libc'

/** Which addon to load: USERFAULTFD_NATIVE=auto (default) | build | prebuild. */
export type NativeSource = 'auto' | 'build' | 'prebuild'

/** glibc or musl, for the prebuild's libc tag (there is no musl prebuild: musl compiles). */
export function libc(): 'glibc' | 'musl' {
  return familySync() === 'musl' ? 'musl' : 'glibc'
}

/** platform-arch, the prebuilds/ folder of this machine (linux-x64, linux-arm64). */
export function platformDir(): string {
  return `${process.platform}-${process.arch}`
}

/** The prebuilt binary's file name for this libc (prebuildify's --tag-libc naming). */
export function prebuildFile(name = 'userfaultfd'): string {
  return `${name}.${libc()}.node`
}

/** The prebuilt binary for this platform under the package root `root`. */
export function prebuildPath(root: string, name = 'userfaultfd'): string {
  return path.join(root, 'prebuilds', platformDir(), prebuildFile(name))
}

export function nativeSource(): NativeSource {
  const v = process.env.USERFAULTFD_NATIVE
  if (v === undefined || v === '' || v === 'auto') return 'auto'
  if (v === 'build' || v === 'prebuild') return v
  throw new Error(`USERFAULTFD_NATIVE must be 'auto', 'build' or 'prebuild' (got '${v}')`)
}

/**
 * The places an addon named `name` is looked for, in order (bindings' path templates):
 * - a local build (build/Release, build/Debug): it exists only when someone compiled on purpose
 *   (a development checkout, `npm install --build-from-source`, or install's fallback when no
 *   prebuild loaded), so it wins and always matches the sources next to it;
 * - then the prebuilt binary for this platform, arch and libc (prebuilds/linux-x64/userfaultfd.glibc.node).
 * USERFAULTFD_NATIVE=build or =prebuild takes only that one (an error if it is absent). The
 * test-only addon (userfaultfd_testing) has no prebuild.
 */
export function candidates(source: NativeSource = nativeSource(), name = 'userfaultfd'): string[][] {
  const build = [
    ['module_root', 'build', 'Release', 'bindings'],
    ['module_root', 'build', 'Debug', 'bindings'],
  ]
  const prebuild = [['module_root', 'prebuilds', platformDir(), prebuildFile(name)]]
  return source === 'build' ? build : source === 'prebuild' ? prebuild : [...build, ...prebuild]
}
