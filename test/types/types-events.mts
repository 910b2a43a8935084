// Consumer type tests (compiled by test/docs-snippets.test.ts in a project that depends on the
// package, tsc --strict): what the public types promise. Never run, only type-checked.
import type { EventStream, UffdEvent, Userfaultfd } from 'userfaultfd'

declare const uffd: Userfaultfd
declare const options: { batch?: boolean | number }

// events() yields single events by default and with { batch: false } ...
for await (const event of uffd.events()) {
  event satisfies UffdEvent
  if (event.type === 'pagefault') event.address satisfies bigint
}
for await (const event of uffd.events({ batch: false, signal: AbortSignal.timeout(1) })) event satisfies UffdEvent

// ... and arrays with { batch: true } or { batch: N }.
for await (const batch of uffd.events({ batch: true })) {
  batch satisfies UffdEvent[]
  for (const e of batch) e.type satisfies UffdEvent['type']
}
for await (const batch of uffd.events({ batch: 16 })) batch.length satisfies number

// Options known only at run time: either.
for await (const item of uffd.events(options)) {
  item satisfies UffdEvent | UffdEvent[]
  // @ts-expect-error not known to be an array
  item.length
}

const single: EventStream<UffdEvent> = uffd.events()
const batched: EventStream<UffdEvent[]> = uffd.events({ batch: true })
// @ts-expect-error a batch stream does not yield single events
const wrong: EventStream<UffdEvent> = uffd.events({ batch: true })
void single
void batched
void wrong
