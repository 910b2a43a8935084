'use strict'
// A Firecracker page-fault handler in a few lines: serve the memory snapshot of every VM that
// connects to SOCKET (Firecracker: PUT /snapshot/load with
// mem_backend: { backend_type: "Uffd", backend_path: SOCKET }).
//   node examples/firecracker-handler.js /tmp/uffd.sock /path/to/snapshot.mem
// (`npx userfaultfd serve --socket ... --mem-file ...` is the same as a ready-made command.)
const { FirecrackerHandler } = require('..')

async function main() {
  const [socketPath, memFile] = process.argv.slice(2)
  if (!socketPath || !memFile) throw new Error('usage: firecracker-handler.js SOCKET MEM_FILE')
  const handler = await FirecrackerHandler.listen({
    socketPath,
    memFile,
    onRemove: 'zero', // balloon-removed pages come back as zeros
    allow: (peer) => peer.uid === process.getuid(), // SO_PEERCRED: only our own user's VMs
  })
  handler.on('ready', (vm, regions) => console.log(`VM pid ${vm.peer.pid}: ${regions.length} region(s)`))
  handler.on('end', (vm, error) =>
    console.log(`VM pid ${vm.peer.pid} done: ${vm.pagesServed} pages${error ? ` (${error.message})` : ''}`),
  )
  process.once('SIGINT', async () => {
    await handler.close()
    console.log(handler.stats())
  })
  console.log(`serving ${memFile} on ${socketPath}; Ctrl-C to stop`)
}

main().catch((err) => {
  console.error(err.message)
  process.exit(1)
})
