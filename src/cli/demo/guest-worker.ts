// A touching thread of the demo guest (--threads N): maps its regions, reports their addresses,
// then does what the guest's main thread asks (touch, verify, zeros, close) and exits by
// itself once its port closes.
import { parentPort, workerData } from 'node:worker_threads'
import { RegionOwner, type RegionSpec } from './guest-memory'

export interface WorkerData {
  specs: RegionSpec[]
  hugetlb: boolean
  memfd?: boolean
  stride: number
  counters: SharedArrayBuffer
}

export type WorkerRequest =
  | { id: number; op: 'touch' }
  | { id: number; op: 'verify'; memFile: string }
  | { id: number; op: 'zeros'; index: number; length: number }
  | { id: number; op: 'close' }

export type WorkerReply = { id: number; ok: true; value: unknown } | { id: number; ok: false; error: string }

export type WorkerHello = { op: 'mapped'; regions: RegionOwner['regions'] } | { op: 'failed'; error: string }

if (parentPort !== null) {
  const port = parentPort
  const data = workerData as WorkerData
  let owner: RegionOwner
  try {
    owner = new RegionOwner(data.specs, data)
    port.postMessage({ op: 'mapped', regions: owner.regions } satisfies WorkerHello)
  } catch (err) {
    port.postMessage({ op: 'failed', error: (err as Error).message } satisfies WorkerHello)
    port.close()
  }
  port.on('message', async (request: WorkerRequest) => {
    try {
      let value: unknown
      if (request.op === 'touch') value = await owner.touch()
      else if (request.op === 'verify') value = await owner.verify(request.memFile)
      else if (request.op === 'zeros') value = owner.zeros(request.index, request.length)
      else {
        owner.close()
        port.close()
        return
      }
      port.postMessage({ id: request.id, ok: true, value } satisfies WorkerReply)
    } catch (err) {
      port.postMessage({ id: request.id, ok: false, error: (err as Error).stack ?? String(err) } satisfies WorkerReply)
    }
  })
}
