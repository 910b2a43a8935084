// A Firecracker connection served by a FaultServer: for snapshots on NBD servers or behind HTTP(S)
// URLs (one RemoteSource per handler, shared by its VMs: one set of connections, one cache), and
// for working-set replay and record. Each region of the guest becomes a served range over the
// uffd Firecracker registered (nothing registered here), read from the snapshot at the region's
// offset.
import type { Userfaultfd } from '../core/userfaultfd'
import { FaultServer, type FaultServerError } from '../engines/fault-server'
import type { RemoteSource } from '../sources/remote'
import type { WorkingSet } from '../sources/working-set'
import type { GuestRegion } from './protocol'

/** The snapshot a handler serves in engine mode: a remote one, or a local file with working sets. */
export type EngineSnapshot = { remote: RemoteSource } | { file: string }

export interface EngineServeOptions {
  /** replay this working set for every VM */
  workingSet?: WorkingSet
  /** record each VM's working set (4 KiB fault-around, no prefetch) */
  record: boolean
  /** fill the rest in the background after the working set (default true) */
  prefetch: boolean
}

export interface EngineCounts {
  faults: number
  pagesServed: number
  bytesServed: number
  zeroPages: number
  removes: number
  exists: number
  deferred: number
  /** faults waiting for their bytes now */
  waiting: number
  /** pages present of the guest's memory */
  pagesPresent: number
  pagesTotal: number
}

export class EngineConnection {
  readonly server: FaultServer
  readonly #regions: GuestRegion[]

  constructor(
    uffd: Userfaultfd,
    regions: GuestRegion[],
    snapshot: EngineSnapshot,
    options: EngineServeOptions,
    onError: (err: FaultServerError) => void,
  ) {
    this.#regions = regions
    // REMOVE (balloon): zeros there, as the JS path's default; the kernel's own faults after an
    // unregister would be zeros too.
    // Paused until every region is served: Firecracker registered the memory already, and a
    // fault read before its region was added would be served as zeros.
    this.server = new FaultServer(uffd, {
      onRemove: 'zero',
      prefetch: options.prefetch && !options.record,
      paused: true,
    })
    this.server.on('error', onError)
    try {
      for (const r of regions) {
        const range = { address: r.base, length: r.size }
        const source =
          'remote' in snapshot
            ? { remote: snapshot.remote, offset: r.offset }
            : { file: snapshot.file, offset: r.offset }
        this.server.serve(range, source, {
          register: false, // Firecracker registered the guest's memory before sending the uffd
          ...(options.record ? { recordWorkingSet: true } : {}),
          ...(options.workingSet !== undefined ? { workingSet: options.workingSet } : {}),
        })
      }
    } catch (err) {
      this.server.close()
      throw err
    }
    this.server.resume()
  }

  counts(): EngineCounts {
    const s = this.server.stats()
    const pageSize = this.#regions[0]?.pageSize ?? 4096
    return {
      faults: s.faults,
      pagesServed: Math.round((s.bytes - s.zeroPages * 4096) / pageSize),
      bytesServed: s.bytes - s.zeroPages * 4096,
      zeroPages: s.zeroPages,
      removes: s.removes,
      exists: s.exists,
      deferred: s.deferred,
      waiting: s.sourceWaiting,
      pagesPresent: s.pagesPresent,
      pagesTotal: s.pagesTotal,
    }
  }

  /** The working set recorded so far (record mode). */
  workingSet(): Promise<WorkingSet> {
    return this.server.workingSet()
  }

  close(): void {
    this.server.close()
  }
}
