// How one Firecracker connection (one VM) is served: one FaultServer over the uffd Firecracker
// registered (nothing is registered here), each region of the guest a served range read from the
// snapshot at the region's offset, in the region's page size (4 KiB, or 2 MiB on hugetlbfs
// guests: MISSING faults filled with 2 MiB copies). Local files and remote snapshots alike; the
// JS path (FaultResolver) is for handlers written in JavaScript, not this one.
import type { ReadMethod, RemovePolicy, SourceErrorPolicy } from '../addon/binding'
import { FaultServer, type FaultServerError, type FaultSource } from '../engines/fault-server'
import type { FaultTrace } from '../engines/fault-trace'
import type { RemoteSource } from '../sources/remote'
import type { WorkingSet } from '../sources/working-set'
import type { HistogramJSON } from '../util/histogram'
import type { GuestRegion } from './protocol'

/** The snapshot a handler serves: a local file (an fd the handler keeps open) or a remote one. */
export type EngineSnapshot = { remote: RemoteSource } | { fd: number; size: number; readMethod: ReadMethod }

export interface EngineServeOptions {
  /** after UFFD_EVENT_REMOVE (balloon): zeros, the snapshot again, or unregister */
  onRemove: RemovePolicy
  /** a page the snapshot cannot give a waiting vCPU: retry, poison, zero */
  onSourceError: SourceErrorPolicy
  /** replay this working set for every VM */
  workingSet?: WorkingSet
  /** record each VM's working set (one-page fault-around, no prefetch) */
  record: boolean
  /** fill the rest in the background (after the working set) */
  prefetch: boolean
  /** the handler's fault trace, shared by its connections */
  trace?: FaultTrace
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
  /** pages (of the regions' page size) and bytes of the guest present now, and in all */
  pagesPresent: number
  pagesTotal: number
  bytesPresent: number
  bytesTotal: number
}

export class EngineConnection {
  readonly server: FaultServer
  readonly #pageSize: number

  constructor(
    uffd: ConstructorParameters<typeof FaultServer>[0],
    regions: GuestRegion[],
    snapshot: EngineSnapshot,
    options: EngineServeOptions,
    onError: (err: FaultServerError) => void,
  ) {
    this.#pageSize = regions[0]?.pageSize ?? 4096
    // Paused until every region is served: Firecracker registered the memory already, and a
    // fault read before its region was added would be served as zeros.
    this.server = new FaultServer(uffd, {
      onRemove: options.onRemove,
      onSourceError: options.onSourceError,
      prefetch: options.prefetch && !options.record,
      paused: true,
      ...(options.trace !== undefined ? { trace: options.trace } : {}),
    })
    this.server.on('error', onError)
    this.server._leaveFaultsChannel() // the handler publishes this connection's counts
    try {
      for (const r of regions) {
        const source: FaultSource =
          'remote' in snapshot
            ? { remote: snapshot.remote, offset: r.offset }
            : // the size listen() saw: a file truncated since fails (never zeros in place of its bytes)
              { file: snapshot.fd, offset: r.offset, readMethod: snapshot.readMethod, size: snapshot.size }
        this.server.serve({ address: r.base, length: r.size }, source, {
          register: false, // Firecracker registered the guest's memory before sending the uffd
          pageSize: r.pageSize,
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
    // Pages filled from the snapshot (demand, around, background); zero pages after a REMOVE are
    // counted apart (zeroPages) and not in bytes. Every region of a guest has one page size.
    const pagesServed = s.demandPages + s.prefetchPages + s.handlerPages
    return {
      faults: s.faults,
      pagesServed,
      bytesServed: pagesServed * this.#pageSize,
      zeroPages: s.zeroPages,
      removes: s.removes,
      exists: s.exists,
      deferred: s.deferred,
      waiting: s.sourceWaiting,
      pagesPresent: s.pagesPresent,
      pagesTotal: s.pagesTotal,
      bytesPresent: s.bytesPresent,
      bytesTotal: s.bytesTotal,
    }
  }

  latencyHistogram(): HistogramJSON {
    return this.server.latencyHistogram()
  }

  /** The working set recorded so far (record mode). */
  workingSet(): Promise<WorkingSet> {
    return this.server.workingSet()
  }

  close(): void {
    this.server.close()
  }
}
