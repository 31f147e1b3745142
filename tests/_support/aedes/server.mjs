// A tiny Aedes broker for Tandem's interop tests: node server.mjs HOST PORT [nodelay|nagle]
// TCP_NODELAY on every accepted socket unless "nagle" is given (Aedes's stock examples leave
// Nagle's algorithm on: ~44 ms a round trip for small messages on Linux).
import { createServer } from 'node:net'
import { Aedes } from 'aedes'

const [host, portText, mode = 'nodelay'] = process.argv.slice(2)
const port = Number(portText)
if (!host || !Number.isInteger(port)) {
  console.error('usage: node server.mjs HOST PORT [nodelay|nagle]')
  process.exit(2)
}
const aedes = await Aedes.createBroker()
const server = createServer({ noDelay: mode !== 'nagle' }, aedes.handle)
server.listen(port, host, () => console.log(`aedes listening on ${host}:${port} (${mode})`))
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => aedes.close(() => process.exit(0))))
}
