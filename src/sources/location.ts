// A snapshot's location as `userfaultfd serve --mem-file` takes it: a path, or a URL (file:,
// nbd://host:port/export, nbd+unix:///export?socket=PATH, http:, https:).
import { fileURLToPath } from 'node:url'
import { printable } from './store'

export type SnapshotLocation =
  | { kind: 'file'; path: string }
  | { kind: 'nbd'; url: string }
  | { kind: 'http'; url: string }

export function parseLocation(value: string): SnapshotLocation {
  if (typeof value !== 'string' || value === '') throw new TypeError('a snapshot location must be a path or a URL')
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(value)?.[1]?.toLowerCase()
  // a plain path (a drive-letter-like prefix cannot occur on Linux; "x:y" without // is a path)
  if (scheme === undefined || (!value.slice(scheme.length + 1).startsWith('/') && scheme !== 'file'))
    return { kind: 'file', path: value }
  switch (scheme) {
    case 'file':
      try {
        return { kind: 'file', path: fileURLToPath(value) }
      } catch (err) {
        throw new TypeError(`bad file: URL ${value}: ${(err as Error).message}`)
      }
    case 'nbd':
    case 'nbd+unix':
      return { kind: 'nbd', url: value }
    case 'http':
    case 'https':
      return { kind: 'http', url: value }
    default:
      throw new TypeError(
        `unsupported snapshot URL ${printable(value)}: use a path, file:, nbd://, nbd+unix://, http:// or https://`,
      )
  }
}
