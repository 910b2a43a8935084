// --mem-file locations: paths or URLs (file:, nbd:, nbd+unix:, http:, https:).
import { describe, expect, it } from 'vitest'
import { parseLocation } from '../src/sources/location'

describe('--mem-file locations', () => {
  it('tells paths from URLs', () => {
    expect(parseLocation('/snap/mem')).toEqual({ kind: 'file', path: '/snap/mem' })
    expect(parseLocation('snap.mem')).toEqual({ kind: 'file', path: 'snap.mem' })
    expect(parseLocation('weird:name')).toEqual({ kind: 'file', path: 'weird:name' })
    expect(parseLocation('file:///snap/m%20em')).toEqual({ kind: 'file', path: '/snap/m em' })
    expect(parseLocation('nbd://h:10809/e')).toEqual({ kind: 'nbd', url: 'nbd://h:10809/e' })
    expect(parseLocation('nbd+unix:///e?socket=/s')).toEqual({ kind: 'nbd', url: 'nbd+unix:///e?socket=/s' })
    expect(parseLocation('https://b/k?sig=1')).toEqual({ kind: 'http', url: 'https://b/k?sig=1' })
    expect(() => parseLocation('ftp://h/x')).toThrow(/unsupported snapshot URL/)
    expect(() => parseLocation('')).toThrow(TypeError)
    expect(() => parseLocation('file://host/x')).toThrow(/file: URL/)
  })
})
